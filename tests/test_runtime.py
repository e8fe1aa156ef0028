"""sae/runtime.py: tracking and interventions on a live model, KV-cache and full-forward alike."""

from pathlib import Path

import pytest
import torch

from nanochat.engine import generate
from nanochat.gpt import GPT, GPTConfig
from nanochat.gpt2026 import GPT2026, GPT2026Config
from sae.config import SAEConfig
from sae.hooks import capture
from sae.models import build_sae
from sae.runtime import SAERuntime, ablate, clamp, decoder_direction, steer

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
HOOK = "blocks.1.hook_resid_post"
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]


def tiny_gpt(seed: int = 0) -> GPT:
    # PyTorch's default Linear init (nanochat's zeroes lm_head and c_proj): every path carries signal
    torch.manual_seed(seed)
    return GPT(GPTConfig(sequence_len=64, vocab_size=97, n_layer=3, n_head=4, n_kv_head=2,
                         n_embd=32)).eval()


def tiny_gpt2026(seed: int = 0) -> GPT2026:
    cfg = GPT2026Config(sequence_len=32, vocab_size=97, n_layer=3, n_head=4, n_kv_head=2,
                        n_embd=32, window_pattern="SL", ve_gate_channels=8, has_smear=True,
                        has_backout=True, short_window=4)
    model = GPT2026(cfg)
    model.init_weights(seed=seed)
    return model.eval()


def make_sae(d_in: int, hook: str = HOOK, d_sae: int = 256, k: int = 16, seed: int = 0,
             model=None, prompt=PROMPT):
    """A TopK SAE from the sae package (tied init, unit decoder rows). With a model, b_dec is set
    to the mean activation at the hook so that features fire on real residuals."""
    sae = build_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k, hook_name=hook),
                    torch.Generator().manual_seed(seed))
    if model is not None:
        with torch.no_grad(), capture(model, [hook]) as acts:
            model(torch.tensor([prompt]))
            sae.b_dec.copy_(acts[hook][0].mean(0))
    return sae.eval()


def logits_of(model, ids=PROMPT) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids]))


def kv_logits(model, ids: list[int], split: int) -> torch.Tensor:
    """Prefill ids[:split], then feed the rest one token at a time; all logits, concatenated."""
    cache = model.new_kv_cache(1, len(ids))
    with torch.inference_mode():
        out = [model(torch.tensor([ids[:split]]), kv_cache=cache)]
        for t in ids[split:]:
            out.append(model(torch.tensor([[t]]), kv_cache=cache))
    return torch.cat(out, dim=1)


def resid(model, hook: str, ids=PROMPT) -> torch.Tensor:
    with torch.inference_mode(), capture(model, [hook]) as acts:
        model(torch.tensor([ids]))
        return acts[hook].clone()


def active_feature(sae, model, ids=PROMPT, pos: int = 5) -> int:
    with torch.inference_mode(), capture(model, [sae.cfg.hook_name]) as acts:
        model(torch.tensor([ids]))
        codes = sae.encode(acts[sae.cfg.hook_name][0])
    return int(codes[pos].argmax())


def no_hooks_left(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ------------------------------------------------------------------------------ no-op edits

def test_strength_zero_equals_bare_model_full_and_kv():
    model = tiny_gpt()
    sae = make_sae(32, model=model)
    bare = logits_of(model)
    with SAERuntime(model, [sae]) as rt:
        rt.track(top_n=4)
        rt.add(steer(HOOK, 7, 0.0))
        assert (logits_of(model) - bare).abs().max().item() <= 1e-6
        assert (kv_logits(model, PROMPT, 5) - bare).abs().max().item() <= 1e-5


def test_tracking_alone_leaves_logits_bit_identical():
    model = tiny_gpt()
    sae = make_sae(32, model=model)
    bare = logits_of(model)
    with SAERuntime(model, [sae]) as rt:
        rt.track(top_n=8)
        assert torch.equal(logits_of(model), bare)


# ------------------------------------------------------------------------------ steering

def test_steering_raises_the_feature_as_read_by_the_same_sae():
    model = tiny_gpt()
    sae = make_sae(32, model=model)
    f = active_feature(sae, model)
    with SAERuntime(model, [sae]) as rt:
        rt.track(top_n=4, watch=[f])
        logits_of(model)
        _, before = rt.watched(HOOK)
        iv = rt.add(steer(HOOK, f, 6.0, start_pos=4))
        logits_of(model)
        positions, after = rt.watched(HOOK)
        rt.remove(iv)
    assert positions.tolist() == list(range(len(PROMPT)))
    before, after = before[:, 0], after[:, 0]
    assert torch.equal(after[:4], before[:4])  # not yet steered: bit for bit the same
    assert (after[4:] > before[4:] + 1.0).all()


def test_steering_raises_the_logits_of_its_top_promoted_tokens():
    model = tiny_gpt()
    last = f"blocks.{model.config.n_layer - 1}.hook_resid_post"
    sae = make_sae(32, hook=last, model=model)
    f = 11
    direction = decoder_direction(sae, f)
    promoted = (model.lm_head.weight @ (direction / direction.norm())).topk(5).indices
    bare = logits_of(model)
    with SAERuntime(model, [sae]) as rt:
        rt.add(steer(last, f, 20.0))
        steered = logits_of(model)
    gain = (steered - bare)[0]  # [T, V]
    assert (gain[:, promoted].mean(-1) > gain.mean(-1) + 0.5).all()
    assert (steered[0].log_softmax(-1)[:, promoted].logsumexp(-1)
            > bare[0].log_softmax(-1)[:, promoted].logsumexp(-1)).all()


def test_steer_adds_exactly_alpha_times_the_unit_direction():
    model = tiny_gpt()
    sae = make_sae(32, model=model)
    f, alpha = 3, 2.5
    bare = resid(model, HOOK)
    with SAERuntime(model, [sae]) as rt:
        rt.add(steer(HOOK, f, alpha, start_pos=2))
        edited = resid(model, HOOK)  # captured after the edit, which was hooked first
    u = sae.W_dec[f] / sae.W_dec[f].norm()
    delta = (edited - bare)[0]
    assert torch.equal(delta[:2], torch.zeros_like(delta[:2]))
    assert torch.allclose(delta[2:], alpha * u.expand_as(delta[2:]), atol=1e-5)


# ------------------------------------------------------------------------------ clamp / ablate

def test_clamp_changes_only_that_features_contribution():
    model = tiny_gpt()
    sae = make_sae(32, model=model)
    f, v = active_feature(sae, model), 9.0
    bare = resid(model, HOOK)
    with SAERuntime(model, [sae]) as rt:
        rt.add(clamp(HOOK, f, v))
        edited = resid(model, HOOK)
    with torch.no_grad():
        a = sae.encode(bare)[..., f]
    expected = bare + (v - a)[..., None] * sae.W_dec[f]
    assert torch.allclose(edited, expected, atol=1e-5)
    # tied, unit-norm init: where the feature was active, the SAE reads back exactly v
    with torch.no_grad():
        read = sae.encode(edited)[..., f]
    active = a > 0
    assert active.any()
    assert torch.allclose(read[active], torch.full_like(read[active], v), atol=1e-4)


def test_ablate_removes_the_feature_where_it_fires():
    model = tiny_gpt()
    sae = make_sae(32, model=model)
    f = active_feature(sae, model)
    with SAERuntime(model, [sae]) as rt:
        rt.track(top_n=4, watch=[f])
        logits_of(model)
        _, before = rt.watched(HOOK)
        rt.add(ablate(HOOK, f))
        changed = logits_of(model)
        _, after = rt.watched(HOOK)
    assert before[:, 0].max() > 0
    assert after[:, 0].abs().max().item() <= 1e-4
    assert not torch.equal(changed, logits_of(model))


# ------------------------------------------------------------------------------ composition

def test_interventions_compose_and_removal_restores_exact_logits():
    model = tiny_gpt()
    sae0 = make_sae(32, hook="blocks.0.hook_resid_post", model=model, seed=1)
    sae1 = make_sae(32, model=model, seed=2)
    bare = logits_of(model)
    with SAERuntime(model, [sae0, sae1]) as rt:
        rt.track(top_n=4)
        a = rt.add(steer(HOOK, 5, 1.5))
        b = rt.add(steer(HOOK, 5, 1.5))
        twice = logits_of(model)
        rt.remove(b)
        rt.remove(a)
        once = rt.add(steer(HOOK, 5, 3.0))
        assert torch.allclose(twice, logits_of(model), atol=1e-5)  # α + α == 2α
        c = rt.add(clamp("blocks.0.hook_resid_post", 9, 4.0))
        d = rt.add(ablate(HOOK, active_feature(sae1, model)))
        all_three = logits_of(model)
        assert not torch.allclose(all_three, bare, atol=1e-3)
        assert rt.interventions == (once, c, d)
        for iv in (c, once, d):
            rt.remove(iv)
        assert torch.equal(logits_of(model), bare)
    assert no_hooks_left(model)


def test_detach_restores_the_exact_original_model_and_keeps_traces():
    model = tiny_gpt()
    sae = make_sae(32, model=model)
    bare = logits_of(model)
    rt = SAERuntime(model, [sae])
    rt.track(top_n=3)
    rt.add(steer(HOOK, 1, 5.0))
    rt.add(clamp(HOOK, 2, 3.0, start_pos=3))
    assert not torch.equal(logits_of(model), bare)
    rt.detach()
    assert no_hooks_left(model)
    assert torch.equal(logits_of(model), bare)
    assert len(rt.token_features()) == len(PROMPT)  # the steered trace is still readable
    rt.track(top_n=3)  # a detached runtime can be used again
    logits_of(model)
    assert len(rt.token_features()) == len(PROMPT)
    rt.detach()
    assert no_hooks_left(model)


# ------------------------------------------------------------------------------ KV cache

@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.1.hook_resid_pre",
                                  "blocks.2.hook_mlp_out"])
def test_kv_cache_and_full_forward_agree_with_interventions(hook):
    model = tiny_gpt()
    sae = make_sae(32, hook=hook, model=model)
    f = active_feature(sae, model)
    with SAERuntime(model, [sae]) as rt:
        rt.track(top_n=5, watch=[f])
        rt.add(steer(hook, 3, 4.0, start_pos=7))  # starts inside the decoded part
        rt.add(clamp(hook, f, 6.0, start_pos=2))  # starts inside the prefill
        full = logits_of(model)
        full_trace = rt.token_features()
        full_pos, full_watch = rt.watched(hook)
        cached = kv_logits(model, PROMPT, split=5)
        kv_trace = rt.token_features()
        kv_pos, kv_watch = rt.watched(hook)
    assert (cached - full).abs().max().item() <= 1e-4
    assert torch.equal(kv_pos, full_pos)
    assert torch.allclose(kv_watch, full_watch, atol=1e-4)
    for a, b in zip(full_trace, kv_trace):
        assert a.position == b.position
        assert [h.feature for h in a.features[hook][:3]] == [h.feature for h in b.features[hook][:3]]


def test_greedy_generation_with_steering_matches_full_forward_argmax():
    model = tiny_gpt()
    sae = make_sae(32, model=model)
    prompt = PROMPT[:6]
    with SAERuntime(model, [sae]) as rt:
        rt.add(steer(HOOK, 4, 5.0, start_pos=len(prompt)))  # steer only what is generated
        out = list(generate(model, prompt, max_tokens=10, temperature=0.0))
        ids = list(prompt)
        for _ in range(10):
            ids.append(int(logits_of(model, ids)[0, -1].argmax()))
    assert out == ids[len(prompt):]
    assert out != list(generate(model, prompt, max_tokens=10, temperature=0.0))


def test_seeded_generation_with_tracking_and_steering_is_deterministic():
    model = tiny_gpt()
    sae = make_sae(32, model=model)
    runs = []
    with SAERuntime(model, [sae], labels={HOOK: {i: f"label {i}" for i in range(0, 256, 2)}}) as rt:
        rt.track(top_n=4)
        rt.add(steer(HOOK, 8, 3.0))
        for _ in range(2):
            tokens = list(generate(model, PROMPT, max_tokens=12, temperature=1.0, top_k=20,
                                   seed=123, forward_last=True))
            runs.append((tokens, rt.token_features()))
    (t1, f1), (t2, f2) = runs
    assert t1 == t2 and len(t1) == 12
    assert f1 == f2
    # one entry per prompt token and per generated token, labels attached where known
    assert [t.position for t in f1] == list(range(len(PROMPT) + 12))
    hits = [h for t in f1 for h in t.features[HOOK]]
    assert all(h.activation > 0 for h in hits)
    assert all(h.label == (f"label {h.feature}" if h.feature % 2 == 0 else None) for h in hits)
    assert any(h.label for h in hits)
    values = [h.activation for h in f1[3].features[HOOK]]
    assert values == sorted(values, reverse=True)


def test_a_new_sequence_starts_a_new_trace():
    model = tiny_gpt()
    sae = make_sae(32, model=model)
    with SAERuntime(model, [sae]) as rt:
        rt.track(top_n=2)
        list(generate(model, PROMPT, max_tokens=4, temperature=0.0, forward_last=True))
        assert len(rt.token_features()) == len(PROMPT) + 4
        list(generate(model, PROMPT[:3], max_tokens=2, temperature=0.0))
        assert len(rt.token_features()) == 3 + 1  # the last token is not fed without forward_last


# ------------------------------------------------------------------------------ 2026 models

def test_runtime_on_a_2026_format_model():
    model = tiny_gpt2026()
    ids = PROMPT * 2  # 24 tokens: the short window (4) bites
    sae = make_sae(32, model=model, prompt=ids)
    bare = logits_of(model, ids)
    with SAERuntime(model, [sae]) as rt:
        rt.track(top_n=3)
        rt.add(steer(HOOK, 2, 0.0))
        assert (logits_of(model, ids) - bare).abs().max().item() <= 1e-6
        rt.clear_interventions()
        rt.add(steer(HOOK, 2, 3.0, start_pos=9))
        full = logits_of(model, ids)
        assert (kv_logits(model, ids, split=6) - full).abs().max().item() <= 1e-4
        assert not torch.allclose(full, bare, atol=1e-3)
    assert no_hooks_left(model)
    assert torch.equal(logits_of(model, ids), bare)


# ------------------------------------------------------------------------------ bad input

def test_bad_input_is_refused_with_names():
    model = tiny_gpt()
    sae = make_sae(32)
    rt = SAERuntime(model, [sae])
    with pytest.raises(ValueError, match="feature 256 out of range.*d_sae=256"):
        rt.add(steer(HOOK, 256, 1.0))
    with pytest.raises(KeyError, match="blocks.2.hook_resid_post"):
        rt.add(steer("blocks.2.hook_resid_post", 1, 1.0))
    with pytest.raises(ValueError, match="start_pos"):
        rt.add(steer(HOOK, 1, 1.0, start_pos=-1))
    with pytest.raises(KeyError, match="not active"):
        rt.remove(steer(HOOK, 1, 1.0))
    with pytest.raises(ValueError, match="top_n"):
        rt.track(top_n=0)
    with pytest.raises(ValueError, match="d_in=16.*width 32"):
        SAERuntime(model, [make_sae(16)])
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        SAERuntime(model, [make_sae(32, hook="blocks.7.hook_resid_post")])
    with pytest.raises(ValueError, match="two SAEs"):
        SAERuntime(model, [sae, make_sae(32, seed=1)])
    with pytest.raises(KeyError, match="not attached"):
        SAERuntime(model, [sae], labels={"blocks.0.hook_resid_post": {}})
    assert no_hooks_left(model)


# ------------------------------------------------------------------------------ fixtures

def _fixture(name: str):
    base = FIXTURES / name
    if not base.is_dir():
        pytest.skip(f"fixture not found: {base} (clone ../shared next to the repo)")
    from nanochat.checkpoint_manager import load_model_from_dir
    model, tok, _ = load_model_from_dir(base / "base_checkpoints" / "d4", "cpu")
    return model, tok, torch.load(base / "reference.pt")


@pytest.mark.parametrize("name", ["nanochat_d4", "nanochat_head_d4"])
def test_fixture_models_tracking_steering_and_cache(name):
    model, tok, ref = _fixture(name)
    ids = ref["text_ids"].tolist()[:48]
    sae = make_sae(model.config.n_embd, hook="blocks.2.hook_resid_post", d_sae=1024, k=32,
                   model=model, prompt=ids)
    hook = sae.cfg.hook_name
    f = active_feature(sae, model, ids, pos=10)
    with SAERuntime(model, [sae]) as rt:
        rt.track(top_n=8, watch=[f])
        with torch.inference_mode():
            tracked = model(ref["input_ids"])
        assert (tracked - ref["logits"]).abs().max().item() <= 1e-4  # tracking changes nothing
        logits_of(model, ids)
        _, before = rt.watched(hook)
        rt.add(steer(hook, f, 40.0, start_pos=20))
        full = logits_of(model, ids)
        _, after = rt.watched(hook)
        assert torch.equal(after[:20], before[:20])
        gain = after[20:, 0] - before[20:, 0]
        assert (gain >= 0).all() and (gain > 0).float().mean() > 0.5
        # tied, unit-norm init: where the feature fired already, it rises by exactly α
        fired = before[20:, 0] > 0
        assert fired.any() and torch.allclose(gain[fired], torch.full_like(gain[fired], 40.0), atol=1e-3)
        assert (kv_logits(model, ids, split=30) - full).abs().max().item() <= 1e-3
        prompt = ids[:12]
        out = list(generate(model, prompt, max_tokens=8, temperature=0.0, forward_last=True))
        assert len(rt.token_features()) == len(prompt) + len(out)
    assert no_hooks_left(model)
