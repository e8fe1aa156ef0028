"""2026-format checkpoints: exact parity with nanochat HEAD, KV-cache windows, era detection."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import nanochat.gpt2026 as gpt2026
from nanochat.checkpoint_manager import (build_model, load_checkpoint, load_model,
                                         load_model_from_dir, save_checkpoint)
from nanochat.formats import ERAS, OCT_2025, UnsupportedFormatError, detect_era
from nanochat.gpt import GPT
from nanochat.gpt2026 import GPT2026, GPT2026Config
from nanochat.model_source import resolve_model

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
HEAD = FIXTURES / "nanochat_head_d4"
D4 = FIXTURES / "nanochat_d4"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"nanochat fixtures not found at {path} (they sit beside the checkout "
                    f"as ../shared/fixtures)")
    return path


@pytest.fixture(scope="module")
def head():
    """(model, tokenizer, meta, reference) for the checkpoint written by nanochat 92d63d4."""
    model, tok, meta = load_model_from_dir(need(HEAD) / "base_checkpoints" / "d4", "cpu")
    return model, tok, meta, torch.load(HEAD / "reference.pt")


def head_state():
    ckpt = need(HEAD) / "base_checkpoints" / "d4"
    return torch.load(ckpt / "model_000080.pt"), json.loads((ckpt / "meta_000080.json").read_text())


# ---------------------------------------------------------------- parity with nanochat HEAD

def test_head_fixture_parity(head):
    model, tok, meta, ref = head
    assert isinstance(model, GPT2026) and model.config.era == "2026-03-14"
    assert ref["input_ids"].shape[1] == 256 > model.window_sizes[0] == 128  # the window bites
    resid_post = {}
    hooks = [block.register_forward_hook(lambda m, a, out, i=i: resid_post.__setitem__(i, out))
             for i, block in enumerate(model.transformer.h)]
    try:
        with torch.no_grad():
            assert (model(ref["input_ids"]) - ref["logits"]).abs().max().item() <= 1e-4
            for i, expected in enumerate(ref["resid_post"]):
                assert (resid_post[i] - expected).abs().max().item() <= 1e-4, f"block {i}"
            assert (model(ref["text_ids"][None]) - ref["text_logits"]).abs().max().item() <= 1e-4
            loss = model(ref["input_ids"], ref["targets"])
    finally:
        for h in hooks:
            h.remove()
    assert abs(loss.item() - ref["loss"].item()) < 1e-5
    assert tok.encode(ref["text"], prepend=tok.get_bos_token_id()) == ref["text_ids"].tolist()


def test_head_constants_are_those_of_the_newest_era(head):
    c = head[0].config
    assert (c.rope_base, c.qk_scale, c.softcap, c.ve_gate_channels, c.ve_gate_range) == \
        (100000.0, 1.2, 15.0, 12, 3.0)
    assert head[0].window_sizes == [128, 128, 128, 256]  # SSSL, short = 256/4 ceiled to 128
    assert c.has_smear and c.has_backout and not c.rotary_bf16


def test_load_model_api_and_climbmix_data(tmp_path, monkeypatch):
    base = tmp_path / "base"
    shutil.copytree(need(HEAD), base)
    (base / "reference.pt").unlink()
    (base / "base_data").rename(base / "base_data_climbmix")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    model, _, meta = load_model("base", "cpu", "eval")
    assert isinstance(model, GPT2026) and meta["step"] == 80
    src = resolve_model()
    assert src.data_dir == base / "base_data_climbmix"


def test_oct_fixture_still_loads_into_gpt_and_gpt2026_agrees():
    """The Oct-2025 path is untouched, and GPT2026 with every 2026 feature off is the same model."""
    ckpt = need(D4) / "base_checkpoints" / "d4"
    sd, meta = load_checkpoint(ckpt, 150)
    assert detect_era(sd, meta).name == OCT_2025
    assert type(build_model(sd, meta, "cpu")) is GPT
    ref = torch.load(D4 / "reference.pt")
    model = GPT2026(ERAS["2025-12-23"].config(meta["model_config"]))
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert (model.eval()(ref["input_ids"]) - ref["logits"]).abs().max().item() <= 1e-4


# ---------------------------------------------------------------- KV cache with windows

def decode(model, idx, cuts):
    """Logits from running idx through one KV cache in chunks ending at `cuts`."""
    cache = model.new_kv_cache(idx.size(0), idx.size(1))
    parts, start = [], 0
    for end in cuts:
        parts.append(model(idx[:, start:end], kv_cache=cache))
        start = end
    assert cache.get_pos() == idx.size(1)
    return torch.cat(parts, dim=1)


def test_head_kv_cache_equals_full_forward(head):
    model, _, _, ref = head
    idx = ref["input_ids"]
    with torch.no_grad():
        full = model(idx)
        token_by_token = decode(model, idx, [200] + list(range(201, 257)))  # 200 > window
        chunked = decode(model, idx, [60, 190, 256])
    assert (token_by_token - full).abs().max().item() < 1e-4
    assert (chunked - full).abs().max().item() < 1e-4


def tiny_config(era="2026-03-14", **over) -> GPT2026Config:
    mc = dict(sequence_len=16, vocab_size=100, n_layer=4, n_head=4, n_kv_head=2, n_embd=64,
              window_pattern="SL")
    mc.update(over)
    return ERAS[era].config(mc)


def tiny(era="2026-03-14", seed=0, **over) -> GPT2026:
    model = GPT2026(tiny_config(era, **over))
    model.init_weights(seed)
    return model.eval()


@pytest.mark.parametrize("era", ["2026-01-11", "2026-03-02", "2026-03-14"])
def test_kv_cache_beyond_sequence_len(era):
    """Past sequence_len even the long layers slide; decoding must agree with the full forward."""
    model = tiny(era)
    assert model.window_sizes == [8, 16, 8, 16] or model.window_sizes == [128, 16, 128, 16]
    idx = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        assert (decode(model, idx, [20] + list(range(21, 41))) - full).abs().max().item() < 1e-5
        assert (decode(model, idx, [13, 14, 31, 40]) - full).abs().max().item() < 1e-5
        # the window is real: the same tokens without the far past give other logits
        assert (model(idx[:, 20:])[:, -1] - full[:, -1]).abs().max().item() > 1e-3


def test_sliding_window_limits_attention():
    model = tiny("2026-03-09", window_pattern="S", sequence_len=512)  # short = 512/3 -> 256
    assert model.window_sizes[:3] == [256, 256, 256]
    short = tiny("2026-01-11", window_pattern="S", n_layer=2, sequence_len=16)  # windows [8, 16]
    idx = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(2))
    changed = idx.clone()
    changed[0, 0] = (idx[0, 0] + 1) % 100
    with torch.no_grad():
        a = short(idx, stop_after_layer=0)
        b = short(changed, stop_after_layer=0)
    # block 0 has window 8: position 9 cannot see position 0, position 8 can
    # (the smear-free 2026-01-11 era, so position 1 only differs through attention)
    assert torch.equal(a[0, 9:], b[0, 9:])
    assert not torch.equal(a[0, 8], b[0, 8])


# ---------------------------------------------------------------- hooks and residual gain

def test_hook_points_keep_their_meaning():
    model = tiny()
    idx = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(3))
    seen = {}

    def keep(name):
        return lambda m, a, out: seen.__setitem__(name, out.clone())

    for i, block in enumerate(model.transformer.h):
        block.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(f"pre{i}", a[0].clone()))
        block.register_forward_hook(keep(f"post{i}"))
        block.attn.register_forward_hook(keep(f"attn{i}"))
        block.mlp.register_forward_hook(keep(f"mlp{i}"))
    with torch.no_grad():
        model(idx)
        for i in range(4):
            assert torch.equal(model(idx, stop_after_layer=i), seen[f"post{i}"])
    lr, l0 = model.resid_lambdas.detach(), model.x0_lambdas.detach()
    x0 = seen["pre0"] / (lr[0] + l0[0])  # block 0 receives (lr0 + l00) * x0
    for i in range(4):
        # resid_mid and resid_post are sums over the *mixed* input block i receives
        assert torch.allclose(seen[f"pre{i}"] + seen[f"attn{i}"] + seen[f"mlp{i}"],
                              seen[f"post{i}"], atol=1e-5)
        if i:
            mixed = lr[i] * seen[f"post{i - 1}"] + l0[i] * x0
            assert torch.allclose(seen[f"pre{i}"], mixed, atol=1e-5)
            assert not torch.allclose(seen[f"pre{i}"], seen[f"post{i - 1}"], atol=1e-2)


@pytest.mark.parametrize("era", ["2026-01-11", "2026-03-14"])
def test_residual_gain_matches_the_forward(era, monkeypatch):
    """A write of d into block L's output reaches the final norm's input as gain(L)*d, when
    the blocks themselves add nothing (output projections zeroed). The write is spliced in
    by a forward hook, so this also checks that later mixing and backout see the edit."""
    model = tiny(era, n_layer=5)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
    final_in = []
    real_norm = gpt2026.norm
    monkeypatch.setattr(gpt2026, "norm", lambda x: (final_in.append(x), real_norm(x))[1])
    idx = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(4))
    d = torch.randn(64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(idx)
        base = final_in[-1]
        gains = []
        for layer in range(5):
            h = model.transformer.h[layer].register_forward_hook(lambda m, a, out: out + d)
            model(idx)
            h.remove()
            got = (final_in[-1] - base)[0, 2]
            gain = model.residual_gain(layer)
            assert torch.allclose(got, gain * d, atol=1e-4), (layer, gain)
            gains.append(gain)
    lam = model.resid_lambdas.detach()
    assert gains[-1] == 1.0 and abs(gains[3] - lam[4].item()) < 1e-6
    if era == "2026-03-14":  # layers 0..2 precede or are the backout layer (5 // 2)
        b = model.backout_lambda.item()
        assert abs(gains[2] - (lam[3] * lam[4]).item() + b) < 1e-6
    with pytest.raises(ValueError, match="out of range"):
        model.residual_gain(5)


def test_oct_model_gain_is_one(tmp_path):
    from nanochat.gpt import GPTConfig
    model = GPT(GPTConfig(sequence_len=8, vocab_size=50, n_layer=2, n_head=1, n_kv_head=1,
                          n_embd=16))
    assert model.residual_gain(0) == model.residual_gain(1) == 1.0


# ---------------------------------------------------------------- round trips per era

# Written from nanochat_format.md §8 independently of formats.ERAS:
# (lambdas, ve gate width, smear+backout, rope base, qk scale, softcap, S window at seq 1000)
EXPECTED = {
    OCT_2025: (False, 0, False, 10000.0, 1.0, 15.0, None),
    "2025-12-23": (False, 0, False, 10000.0, 1.0, 15.0, None),
    "2026-01-11": (True, 0, False, 10000.0, 1.0, 15.0, 500),
    "2026-01-18": (True, 32, False, 10000.0, 1.0, 15.0, 500),
    "2026-03-02": (True, 32, False, 10000.0, 1.0, 20.0, 500),
    "2026-03-09": (True, 12, False, 100000.0, 1.15, 15.0, 384),
    "2026-03-14": (True, 12, True, 100000.0, 1.2, 15.0, 256),
}


def write_tiny(tmp_path, era, declare=True, vocab_size=100):
    mc = dict(sequence_len=1000, vocab_size=vocab_size, n_layer=4, n_head=4, n_kv_head=2,
              n_embd=64, window_pattern="SSL")
    if not ERAS[era].lambdas:
        del mc["window_pattern"]
    config = ERAS[era].config(mc)
    model = era_model(config, seed=7)
    meta = {"step": 3, "model_config": mc}
    if declare:
        meta["nanochat_era"] = era
    save_checkpoint(tmp_path / era, 3, model.state_dict(), meta)
    return model.eval(), tmp_path / era


def era_model(config, seed):
    if isinstance(config, GPT2026Config):
        model = GPT2026(config)
        model.init_weights(seed)
        return model
    model = GPT(config)
    model.init_weights(seed)
    with torch.no_grad():  # give the zero-initialised projections values
        for name, p in model.named_parameters():
            if "c_proj" in name or "lm_head" in name:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("era", list(EXPECTED))
def test_each_era_round_trips(tmp_path, era):
    model, ckpt = write_tiny(tmp_path, era)
    sd, meta = load_checkpoint(ckpt, 3)
    loaded = build_model(sd, meta, "cpu")
    lambdas, ve, smear, rope, qk, softcap, short = EXPECTED[era]
    if era == OCT_2025:
        assert type(loaded) is GPT
    else:
        c = loaded.config
        assert (c.era, c.has_lambdas, c.ve_gate_channels, c.has_smear, c.has_backout) == \
            (era, lambdas, ve, smear, smear)
        assert (c.rope_base, c.qk_scale, c.softcap) == (rope, qk, softcap)
        assert c.padded_vocab_size == 128
        # "SSL" tiled over 4 layers, the last one long; no pattern before 2026-01-11
        assert loaded.window_sizes == ([short, short, 1000, 1000] if short else [1000] * 4)
        assert sorted(loaded.value_embeds) == (["1", "3"] if ve else [])
    idx = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = loaded(idx)
        assert out.shape == (2, 20, 100)  # padded rows cropped
        assert torch.equal(out, model(idx))
    # eras with their own keys are found without the declaration too
    meta.pop("nanochat_era")
    if era in ("2026-01-18", "2026-03-02"):
        with pytest.raises(UnsupportedFormatError, match="ambiguous"):
            detect_era(sd, meta)
    else:
        assert detect_era(sd, meta).name == era


def test_softcap_eras_share_weights_but_not_logits(tmp_path):
    _, ckpt = write_tiny(tmp_path, "2026-01-18")
    sd, meta = load_checkpoint(ckpt, 3)
    a = build_model(sd, meta, "cpu")
    b = build_model(sd, dict(meta, nanochat_era="2026-03-02"), "cpu")
    idx = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        # residuals differ only by the rotary tables' bf16 rounding (before 2026-03-04)
        assert torch.allclose(a(idx, stop_after_layer=3), b(idx, stop_after_layer=3), atol=2e-2)
        la, lb = a(idx), b(idx)
    assert not torch.allclose(la, lb, atol=1e-3)
    assert torch.allclose(15 * torch.atanh(la / 15), 20 * torch.atanh(lb / 20), atol=2e-2)


def test_save_meta_of_gpt2026_config():
    c = tiny_config()
    assert c.nanochat_model_config() == dict(sequence_len=16, vocab_size=100, n_layer=4,
                                             n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")
    before_windows = tiny_config("2025-12-23", window_pattern="L")
    assert "window_pattern" not in before_windows.nanochat_model_config()


# ---------------------------------------------------------------- refusals

def refused(sd, meta, *fragments):
    with pytest.raises(UnsupportedFormatError) as e:
        detect_era(sd, meta, where="ck/model_000080.pt")
    msg = str(e.value)
    assert "ck/model_000080.pt" in msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def test_unknown_keys_are_refused_by_name():
    sd, meta = head_state()
    sd["bigram_embed.weight"] = torch.zeros(4096, 256)
    sd["transformer.h.0.attn.c_proj_scalar"] = torch.zeros(256)
    refused(sd, meta, "bigram_embed.weight", "transformer.h.0.attn.c_proj_scalar", "smear_lambda")


def test_partial_feature_sets_are_refused():
    sd, meta = head_state()
    del sd["backout_lambda"]
    refused(sd, meta, "backout_lambda", "smear_gate.weight")
    sd, meta = head_state()
    del sd["x0_lambdas"]
    refused(sd, meta, "x0_lambdas")


def test_value_embeddings_on_wrong_layers_or_width_are_refused():
    sd, meta = head_state()
    sd["value_embeds.0.weight"] = sd.pop("value_embeds.1.weight")
    refused(sd, meta, "value_embeds", "[1, 3]")
    sd, meta = head_state()
    for i in (1, 3):
        sd[f"transformer.h.{i}.attn.ve_gate.weight"] = torch.zeros(2, 16)
    refused(sd, meta, "ve_gate", "16")


def test_combinations_of_no_era_are_refused():
    sd, meta = head_state()
    for i in (1, 3):  # smear/backout (2026-03-14) with the 32-wide gate of 2026-01-18
        sd[f"transformer.h.{i}.attn.ve_gate.weight"] = torch.zeros(2, 32)
    refused(sd, meta, "matches no nanochat format", "(2, 32)")
    sd, meta = head_state()
    sd["transformer.wte.weight"] = sd["transformer.wte.weight"][:4000]
    sd["lm_head.weight"] = sd["lm_head.weight"][:4000]
    meta["model_config"]["vocab_size"] = 4000  # lambdas always come with a padded vocab
    refused(sd, meta, "4000 rows", "4032")
    sd, meta = head_state()
    meta["model_config"]["window_pattern"] = "SXL"
    refused(sd, meta, "'SXL'")


def test_declared_era_must_agree_with_keys():
    sd, meta = head_state()
    refused(sd, dict(meta, nanochat_era="2026-03-09"), "2026-03-09", "2026-03-14")
    refused(sd, dict(meta, nanochat_era="2027-01-01"), "2027-01-01")


def test_ambiguous_message_names_both_eras(tmp_path):
    _, ckpt = write_tiny(tmp_path, "2026-03-02", declare=False)
    sd, meta = load_checkpoint(ckpt, 3)
    msg = refused(sd, meta, "ambiguous", "2026-01-18", "2026-03-02", "softcap 20",
                  "attn.ve_gate on layers [1, 3] (2, 32)", '"nanochat_era"')
    assert "resid_lambdas (4,)" in msg
