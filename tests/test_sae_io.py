"""sae.io: SAELens / sparsify folders round-trip exactly; bad folders fail with clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae import SAEConfig, build_sae, load_sae, load_sparsity, save_sae, save_sparsify


def random_sae(arch, d=16, n=48, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    k = 5 if arch in ("topk", "batchtopk") else None
    cfg = SAEConfig(d_in=d, d_sae=n, architecture=arch, k=k, hook_name="blocks.3.hook_resid_post",
                    model_id="nanochat-d4", checkpoint="/ckpt/model_000150.pt", train_tokens=1234,
                    input_scale=0.5, **kw)
    sae = build_sae(cfg, g)
    with torch.no_grad():
        for p in sae.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.3, generator=g)
        if arch == "relu":
            sae.W_dec.mul_(torch.rand(n, 1, generator=g) + 0.5)
    if arch == "batchtopk":
        sae.threshold.fill_(0.4)
    return sae


ARCHS = ["topk", "batchtopk", "relu", "gated", "jumprelu"]


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_exact(arch, tmp_path):
    sae = random_sae(arch)
    exported = sae.export()
    out = save_sae(sae, tmp_path / "blocks.3.hook_resid_post")
    loaded = load_sae(out)
    assert type(loaded) is type(exported)
    for name, tensor in exported.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(7)) * 3
    assert torch.equal(loaded.encode(x), exported.encode(x))
    assert torch.equal(loaded(x), exported(x))
    assert torch.allclose(loaded(x), sae(x), atol=1e-4, rtol=1e-4)  # raw activations in, raw out
    cfg = loaded.cfg
    assert (cfg.d_in, cfg.d_sae, cfg.hook_name, cfg.layer) == (16, 48, "blocks.3.hook_resid_post", 3)
    assert cfg.architecture == exported.cfg.architecture
    assert cfg.input_scale == 1.0 and cfg.model_id == "nanochat-d4" and cfg.train_tokens == 1234
    if arch in ("batchtopk", "gated"):
        assert cfg.architecture == "jumprelu" and cfg.trained_as == arch


def test_cfg_json_is_flat_saelens_v5_style(tmp_path):
    topk = json.loads((save_sae(random_sae("topk"), tmp_path / "a") / "cfg.json").read_text())
    assert topk["architecture"] == "topk" and topk["activation_fn_str"] == "topk"
    assert topk["activation_fn_kwargs"] == {"k": 5} and topk["k"] == 5
    for key in ("d_in", "d_sae", "apply_b_dec_to_input", "finetuning_scaling_factor", "context_size", "model_name",
                "hook_name", "hook_layer", "hook_head_index", "dataset_path", "dtype", "prepend_bos",
                "normalize_activations", "model_from_pretrained_kwargs"):
        assert key in topk, key
    assert "sae_lens_version" not in topk and "metadata" not in topk
    assert topk["hook_layer"] == 3 and topk["normalize_activations"] == "none" and topk["dtype"] == "float32"
    relu = json.loads((save_sae(random_sae("relu"), tmp_path / "b") / "cfg.json").read_text())
    assert relu["architecture"] == "standard" and relu["activation_fn_str"] == "relu"
    jump = json.loads((save_sae(random_sae("batchtopk"), tmp_path / "c") / "cfg.json").read_text())
    assert jump["architecture"] == "jumprelu" and jump["activation_fn_kwargs"] == {}
    weights = load_file(str(tmp_path / "c" / "sae_weights.safetensors"))
    assert set(weights) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    assert weights["W_enc"].shape == (16, 48) and weights["W_dec"].shape == (48, 16)
    assert torch.allclose(weights["threshold"], weights["threshold"][0].expand(48))  # uniform θ


def test_sparsity_and_extra_keys(tmp_path):
    logd = torch.log10(torch.rand(48) + 1e-10)
    out = save_sae(random_sae("topk"), tmp_path / "s", sparsity=logd, extra={"fvu": 0.12},
                   extra_files={"eval.json": b"{}"})
    assert torch.equal(load_sparsity(out), logd)
    assert json.loads((out / "cfg.json").read_text())["fvu"] == 0.12
    assert (out / "eval.json").read_bytes() == b"{}"
    assert load_sparsity(tmp_path) is None
    with pytest.raises(ValueError, match="log10"):
        save_sae(random_sae("topk"), tmp_path / "t", sparsity=torch.rand(48) + 1)
    with pytest.raises(ValueError, match="d_sae"):
        save_sae(random_sae("topk"), tmp_path / "t", sparsity=torch.zeros(3))
    with pytest.raises(ValueError, match="clashes"):
        save_sae(random_sae("topk"), tmp_path / "t", extra={"d_in": 3})


def test_save_replaces_folder_atomically(tmp_path):
    target = tmp_path / "sae"
    save_sae(random_sae("topk", seed=1), target, extra_files={"old.txt": b"x"})
    save_sae(random_sae("relu", seed=2), target)
    assert not (target / "old.txt").exists()
    assert load_sae(target).cfg.architecture == "relu"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temp or old folders left


def test_load_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_sae(tmp_path / "nope")
    folder = save_sae(random_sae("jumprelu"), tmp_path / "j")
    (folder / "cfg.json").rename(folder / "cfg.bak")
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae(folder)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="cfg.json.*not valid JSON"):
        load_sae(folder)
    (folder / "cfg.bak").rename(folder / "cfg.json")
    weights = load_file(str(folder / "sae_weights.safetensors"))
    save_file({k: v for k, v in weights.items() if k != "threshold"}, str(folder / "sae_weights.safetensors"))
    with pytest.raises(KeyError, match="sae_weights.safetensors.*threshold"):
        load_sae(folder)
    weights["b_dec"] = torch.zeros(3)
    save_file(weights, str(folder / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="'b_dec' has shape"):
        load_sae(folder)
    (folder / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="sae_weights.safetensors"):
        load_sae(folder)
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors"):
        load_sae(folder)


def _write_third_party(folder, cfg, tensors):
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))


def test_loads_third_party_saelens_folders(tmp_path):
    g = torch.Generator().manual_seed(0)
    d, n = 8, 24
    W_enc, W_dec = torch.randn(d, n, generator=g), torch.randn(n, d, generator=g)
    b_enc, b_dec = torch.randn(n, generator=g), torch.randn(d, generator=g)
    x = torch.randn(50, d, generator=g)
    v5_topk = {"architecture": "topk", "d_in": d, "d_sae": n, "activation_fn_str": "topk",
               "activation_fn_kwargs": {"k": 3}, "hook_name": "blocks.2.hook_resid_post", "hook_layer": 2,
               "model_name": "gpt2", "apply_b_dec_to_input": True, "dtype": "float32"}
    _write_third_party(tmp_path / "v5", v5_topk, {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec})
    sae = load_sae(tmp_path / "v5")
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.layer, sae.cfg.model_id) == ("topk", 3, 2, "gpt2")
    pre = torch.relu((x - b_dec) @ W_enc + b_enc)
    top = pre.topk(3, dim=-1)
    assert torch.allclose(sae.encode(x), torch.zeros(50, n).scatter(1, top.indices, top.values))
    # v6: LLM fields under metadata, no b_dec subtraction, JumpReLU
    theta = torch.rand(n, generator=g)
    v6_jump = {"architecture": "jumprelu", "d_in": d, "d_sae": n, "apply_b_dec_to_input": False,
               "normalize_activations": "none", "metadata": {"hook_name": "blocks.5.hook_resid_post",
                                                             "model_name": "gemma", "sae_lens_version": "6.1.0"}}
    _write_third_party(tmp_path / "v6", v6_jump,
                       {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": theta})
    sae = load_sae(tmp_path / "v6")
    assert (sae.cfg.hook_name, sae.cfg.layer, sae.cfg.apply_b_dec_to_input) == ("blocks.5.hook_resid_post", 5, False)
    pre = x @ W_enc + b_enc
    assert torch.allclose(sae.encode(x), torch.relu(pre) * (pre > theta))
    # gated: converted to the equivalent JumpReLU
    b_gate, b_mag, r_mag = (torch.randn(n, generator=g) * 0.5 for _ in range(3))
    gated = {"architecture": "gated", "d_in": d, "d_sae": n, "hook_name": "blocks.1.hook_resid_post", "hook_layer": 1}
    _write_third_party(tmp_path / "gated", gated, {"W_enc": W_enc, "W_dec": W_dec, "b_dec": b_dec,
                                                   "b_gate": b_gate, "b_mag": b_mag, "r_mag": r_mag})
    sae = load_sae(tmp_path / "gated")
    u = (x - b_dec) @ W_enc
    expected = ((u + b_gate) > 0) * torch.relu(u * r_mag.exp() + b_mag)
    assert sae.cfg.architecture == "jumprelu"
    assert torch.allclose(sae(x), expected @ W_dec + b_dec, atol=1e-4)
    # unsupported preprocessing is refused, naming the key
    bad = dict(v5_topk, normalize_activations="layer_norm")
    _write_third_party(tmp_path / "ln", bad, {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec})
    with pytest.raises(ValueError, match="normalize_activations"):
        load_sae(tmp_path / "ln")


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_sparsify_round_trip(apply_b_dec, tmp_path):
    sae = random_sae("topk", apply_b_dec_to_input=apply_b_dec).export()
    out = save_sparsify(sae, tmp_path / "blocks.3.hook_resid_post")
    cfg = json.loads((out / "cfg.json").read_text())
    assert (cfg["activation"], cfg["num_latents"], cfg["k"], cfg["d_in"]) == ("topk", 48, 5, 16)
    tensors = load_file(str(out / "sae.safetensors"))
    assert set(tensors) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    assert tensors["encoder.weight"].shape == (48, 16)
    # sparsify's own encode: ReLU(linear(x - b_dec)), then top-k
    x = torch.randn(100, 16) * 3
    pre = torch.relu((x - tensors["b_dec"]) @ tensors["encoder.weight"].t() + tensors["encoder.bias"])
    top = pre.topk(5, dim=-1)
    assert torch.allclose(torch.zeros(100, 48).scatter(1, top.indices, top.values), sae.encode(x), atol=1e-4)
    loaded = load_sae(out)
    assert loaded.cfg.hook_name == "blocks.3.hook_resid_post" and loaded.cfg.layer == 3
    assert torch.allclose(loaded(x), sae(x), atol=1e-4)
    with pytest.raises(ValueError, match="TopK"):
        save_sparsify(random_sae("relu"), tmp_path / "r")


@pytest.mark.parametrize("arch", ARCHS)
def test_sae_lens_loads_our_folders(arch, tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (optional interop check)")
    ours = random_sae(arch).export()
    out = save_sae(ours, tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(str(out), device="cpu")
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    x = torch.randn(64, 16) * 3
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), ours.encode(x), atol=1e-5)
        assert torch.allclose(theirs.decode(ours.encode(x)), ours.decode(ours.encode(x)), atol=1e-5)
