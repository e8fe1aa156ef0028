"""The model reproduces nanochat's own outputs; KV cache and early exit agree with the full forward."""

import torch

from nanochat.checkpoint_manager import load_model_from_dir
from nanochat.gpt import GPT, GPTConfig


def tiny_model(seed=0, n_kv_head=2):
    cfg = GPTConfig(sequence_len=32, vocab_size=97, n_layer=3, n_head=4, n_kv_head=n_kv_head, n_embd=32)
    model = GPT(cfg)
    model.init_weights(seed)
    # nanochat zero-inits output projections; give them values so every path matters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "c_proj" in name or "lm_head" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(hash(name) % 1000))
    return model.eval()


def test_fixture_parity(d4_dir, d4_reference):
    model, tok, meta = load_model_from_dir(d4_dir / "base_checkpoints" / "d4", "cpu")
    ref = d4_reference
    with torch.no_grad():
        logits = model(ref["input_ids"])
        assert (logits - ref["logits"]).abs().max().item() <= 1e-4
        for i, expected in enumerate(ref["resid_post"]):
            got = model(ref["input_ids"], stop_after_layer=i)
            assert (got - expected).abs().max().item() <= 1e-4, f"block {i}"
        assert (model(ref["text_ids"][None]) - ref["text_logits"]).abs().max().item() <= 1e-4
    assert tok.encode(ref["text"], prepend=tok.get_bos_token_id()) == ref["text_ids"].tolist()


def test_loss_matches_cross_entropy_of_logits(d4_dir, d4_reference):
    model, _, _ = load_model_from_dir(d4_dir / "base_checkpoints" / "d4", "cpu")
    ref = d4_reference
    with torch.no_grad():
        loss = model(ref["input_ids"], ref["targets"])
    expected = torch.nn.functional.cross_entropy(ref["logits"].view(-1, 4096), ref["targets"].view(-1))
    assert abs(loss.item() - expected.item()) < 1e-4


def test_kv_cache_decoding_equals_full_forward():
    for n_kv_head in (4, 2):  # plain attention and GQA
        model = tiny_model(n_kv_head=n_kv_head)
        idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            full = model(idx)
            cache = model.new_kv_cache(2, 20)
            parts = [model(idx[:, :7], kv_cache=cache)]          # prefill
            parts.append(model(idx[:, 7:12], kv_cache=cache))    # a chunk after a prefix
            for t in range(12, 20):                              # token by token
                parts.append(model(idx[:, t:t + 1], kv_cache=cache))
        stepped = torch.cat(parts, dim=1)
        assert (stepped - full).abs().max().item() < 1e-5


def test_stop_after_layer_gives_the_same_residuals():
    model = tiny_model()
    idx = torch.randint(0, 97, (1, 16))
    seen = {}
    for i, block in enumerate(model.transformer.h):
        block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.clone()))
    with torch.no_grad():
        model(idx)
        full = dict(seen)
        for i in range(3):
            assert torch.equal(model(idx, stop_after_layer=i), full[i])


def test_stop_after_layer_skips_later_blocks_and_head():
    model = tiny_model()
    calls = []
    model.transformer.h[2].register_forward_hook(lambda *a: calls.append("h2"))
    model.lm_head.register_forward_hook(lambda *a: calls.append("head"))
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), stop_after_layer=1)
    assert calls == []


def test_rotary_sign_convention_matters():
    """nanochat rotates by -theta: flipping the sign must change the logits."""
    model = tiny_model()
    idx = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        a = model(idx)
        model.sin = -model.sin
        b = model(idx)
    assert (a - b).abs().max() > 1e-3


def test_too_long_input_is_a_clear_error():
    model = tiny_model()
    try:
        model(torch.zeros(1, 321, dtype=torch.long))
    except ValueError as e:
        assert "rotary" in str(e)
    else:
        raise AssertionError("expected ValueError")
