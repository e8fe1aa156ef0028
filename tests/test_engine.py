"""nanochat/engine.py: KV-cache generation agrees with full forwards, is seeded, stops cleanly."""

from pathlib import Path

import pytest
import torch

from nanochat.engine import generate, sample_next_token
from nanochat.gpt import GPT, GPTConfig

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def tiny_gpt(seed: int = 0, n_layer: int = 3) -> GPT:
    # PyTorch's default Linear init (not nanochat's, which zeroes lm_head) gives varied logits
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=97, n_layer=n_layer, n_head=4,
                          n_kv_head=2, n_embd=32))
    return model.eval()


def greedy_full_forward(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_kv_cache_matches_full_forward():
    model = tiny_gpt()
    prompt = [5, 17, 3, 88, 42]
    out = list(generate(model, prompt, max_tokens=20, temperature=0.0))
    assert out == greedy_full_forward(model, prompt, 20)


def test_seeded_sampling_is_deterministic_and_seed_dependent():
    model = tiny_gpt()
    prompt = [1, 2, 3]
    a = list(generate(model, prompt, max_tokens=30, temperature=1.0, seed=7))
    b = list(generate(model, prompt, max_tokens=30, temperature=1.0, seed=7))
    c = list(generate(model, prompt, max_tokens=30, temperature=1.0, seed=8))
    assert a == b
    assert a != c
    assert len(a) == 30


def test_top_k_one_is_greedy_and_top_k_restricts_support():
    model = tiny_gpt()
    prompt = [9, 8, 7]
    greedy = list(generate(model, prompt, max_tokens=12, temperature=0.0))
    assert list(generate(model, prompt, max_tokens=12, temperature=1.5, top_k=1)) == greedy
    logits = torch.randn(4, 97, generator=torch.Generator().manual_seed(0))
    allowed = logits.topk(5, dim=-1).indices
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        picked = sample_next_token(logits, gen, temperature=2.0, top_k=5)
        assert (picked == allowed).any(dim=-1).all()


def test_stop_tokens_end_the_stream_unyielded():
    model = tiny_gpt()
    prompt = [4, 4, 4]
    greedy = list(generate(model, prompt, max_tokens=10, temperature=0.0))
    stop_at = greedy[3]
    first = greedy.index(stop_at)
    out = list(generate(model, prompt, max_tokens=10, temperature=0.0, stop_tokens=[stop_at]))
    assert out == greedy[:first]


def test_forward_last_feeds_every_yielded_token():
    model = tiny_gpt()
    fed = []
    handle = model.register_forward_pre_hook(lambda mod, args, kwargs: fed.append(args[0].shape[1]),
                                             with_kwargs=True)
    try:
        list(generate(model, [1, 2, 3, 4], max_tokens=5, temperature=0.0))
        plain = list(fed)
        fed.clear()
        list(generate(model, [1, 2, 3, 4], max_tokens=5, temperature=0.0, forward_last=True))
    finally:
        handle.remove()
    assert plain == [4, 1, 1, 1, 1]
    assert fed == [4, 1, 1, 1, 1, 1]


def test_bad_arguments_are_refused():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="non-empty prompt"):
        list(generate(model, [], max_tokens=3))
    with pytest.raises(ValueError, match="temperature"):
        list(generate(model, [1], max_tokens=3, temperature=-1.0))
    with pytest.raises(ValueError, match="top_k"):
        list(generate(model, [1], max_tokens=3, top_k=-2))
    assert list(generate(model, [1], max_tokens=0)) == []
    # prompt + max_tokens beyond the rotary table (10 x sequence_len) is refused by the model
    with pytest.raises(ValueError, match="rotary"):
        list(generate(model, [1] * 600, max_tokens=100, temperature=0.0))


def test_fixture_model_greedy_kv_matches_full_forward():
    base = FIXTURES / "nanochat_d4"
    if not base.is_dir():
        pytest.skip(f"fixture checkpoint not found: {base} (clone ../shared next to the repo)")
    from nanochat.checkpoint_manager import load_model_from_dir
    model, tokenizer, _ = load_model_from_dir(base / "base_checkpoints" / "d4", "cpu")
    prompt = tokenizer.encode("def main():\n    ", prepend=tokenizer.get_bos_token_id())
    out = list(generate(model, prompt, max_tokens=16, temperature=0.0))
    assert out == greedy_full_forward(model, prompt, 16)
    assert isinstance(tokenizer.decode(out), str)
