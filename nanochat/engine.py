"""
A small KV-cache generator for one sequence, after nanochat's Engine (engine.py, Oct-2025).

    for token in generate(model, bos_and_prompt_ids, max_tokens=64, temperature=0.6, top_k=50):
        ...

Prefill runs the whole prompt through the model once, filling a cache sized for the prompt plus
`max_tokens`; then every step feeds only the last sampled token. Any model with nanochat's
interface works: `new_kv_cache(batch_size, max_len)` and `forward(idx, kv_cache=cache)` returning
logits (B, T, V) — both the Oct-2025 `GPT` and the 2026-format model.

Notable choices
- Sampling is nanochat's `sample_next_token`: temperature 0 is argmax; otherwise softmax of
  logits/temperature (restricted to the top_k when set; top_k 0 or None means no restriction,
  the 2026 meaning) drawn with a seeded torch.Generator, so equal seeds give equal text.
- Stop tokens end the stream and are not yielded (nanochat leaves terminal tokens out).
- No tool use: nanochat's calculator evaluates model output under SIGALRM; a library
  generator has no business running either.
- `forward_last=True` also feeds the final token through the model. Nothing reads those logits,
  but forward hooks (feature tracking) then see the residual of every token that was yielded.
- Forward hooks on blocks fire in prefill (T = prompt length) and in every decode step (T = 1),
  so keys/values cached from an edited residual stay consistent with the edit.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch


def sample_next_token(logits: torch.Tensor, generator: torch.Generator | None,
                      temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B, 1)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    if top_k:
        k = min(int(top_k), logits.size(-1))
        values, indices = torch.topk(logits, k, dim=-1)
        probs = torch.softmax(values / temperature, dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=generator)
        return indices.gather(-1, choice)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.inference_mode()
def generate(model, tokens: list[int], max_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 42, stop_tokens: Iterable[int] = (),
             forward_last: bool = False) -> Iterator[int]:
    """
    Yield up to `max_tokens` sampled token ids continuing `tokens` (the prompt, BOS included
    for base models). The stream ends early at a token in `stop_tokens`, which is not yielded.
    """
    if not tokens:
        raise ValueError("generate needs a non-empty prompt (start base-model prompts with BOS)")
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: no top-k), got {top_k}")
    if max_tokens == 0:
        return
    stop = {int(t) for t in stop_tokens}
    device = model.get_device()
    generator = torch.Generator(device=device).manual_seed(seed)
    # the cache holds every position that is fed: the prompt, then each token but the last
    kv_cache = model.new_kv_cache(1, len(tokens) + max_tokens)
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    logits = model(ids, kv_cache=kv_cache)[:, -1, :]
    for i in range(max_tokens):
        next_id = sample_next_token(logits, generator, temperature, top_k)
        token = int(next_id.item())
        if token in stop:
            return
        yield token
        if i == max_tokens - 1 and not forward_last:
            return
        logits = model(next_id, kv_cache=kv_cache)[:, -1, :]
