"""
Generation tokens/s with SAEs attached through sae/runtime.py, against the bare model, in one run.

    python -m bench.bench_runtime [--tokens 48] [--prompt-len 32] [--repeats 3] [--skip-d20]
                                  [--threads N]

Variants, each a KV-cache generation (prefill + greedy decode) of --tokens tokens:
    none              the bare model
    track             one 8x TopK SAE (k=32) at the middle layer, top 8 features of every token
    track + steer     the same, plus a steering edit at that layer
Models: the small model every command uses by default (nanochat.model_source: a nanochat
checkpoint under $NANOCHAT_BASE_DIR, else the demo model; the d4 fixture if neither can be
had) and a d20-shaped model (n_embd 1280, 20 layers, vocab 65536; random weights, speed only).
Variants are interleaved within every repeat so that machine noise hits all alike; each
variant's best repeat is kept, and the ratio to `none` is what to read.
"""

import argparse
import time
from pathlib import Path

import torch

from nanochat.engine import generate
from nanochat.gpt import GPT, GPTConfig
from sae.config import SAEConfig
from sae.models import build_sae
from sae.runtime import SAERuntime, steer

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nanochat_d4"
EXPANSION, K, TOP_N = 8, 32, 8


def small_model():
    """(name, model): the default model of the CLIs, else the d4 fixture."""
    from nanochat.model_source import resolve_model
    try:
        source = resolve_model(None, "cpu", quiet=True)
        return f"{source.model_id} ({source.kind})", source.model
    except (ImportError, FileNotFoundError) as e:
        if not FIXTURE.exists():
            raise SystemExit(f"no small model: {e}; and no fixture at {FIXTURE}")
        from nanochat.checkpoint_manager import load_model_from_dir
        model, _, _ = load_model_from_dir(FIXTURE / "base_checkpoints" / "d4", "cpu")
        return "fixture d4 (no demo model available)", model


def d20_model():
    cfg = GPTConfig(sequence_len=2048, vocab_size=65536, n_layer=20, n_head=10, n_kv_head=10,
                    n_embd=1280)
    model = GPT(cfg)
    model.init_weights(seed=0)
    return "d20-shaped (random)", model.eval()


def timed_generation(model, prompt, n_tokens) -> float:
    t0 = time.perf_counter()
    out = list(generate(model, prompt, n_tokens, temperature=0.0))
    elapsed = time.perf_counter() - t0
    assert len(out) == n_tokens
    return n_tokens / elapsed


@torch.inference_mode()
def bench(name, model, args) -> None:
    c = model.config
    layer = c.n_layer // 2
    hook = f"blocks.{layer}.hook_resid_post"
    sae = build_sae(SAEConfig(d_in=c.n_embd, d_sae=EXPANSION * c.n_embd, architecture="topk", k=K,
                              hook_name=hook), torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, c.vocab_size, (args.prompt_len,), generator=gen).tolist()
    runtime = SAERuntime(model, [sae])

    def none():
        return timed_generation(model, prompt, args.tokens)

    def track():
        runtime.track(top_n=TOP_N)
        try:
            return timed_generation(model, prompt, args.tokens)
        finally:
            runtime.detach()

    def track_steer():
        runtime.track(top_n=TOP_N)
        runtime.add(steer(hook, 1, 4.0))
        try:
            return timed_generation(model, prompt, args.tokens)
        finally:
            runtime.detach()

    variants = {"none": none, "track": track, "track + steer": track_steer}
    none()  # warm-up
    best = {k: 0.0 for k in variants}
    for _ in range(args.repeats):
        for key, fn in variants.items():
            best[key] = max(best[key], fn())
    for key, tps in best.items():
        print(f"| {name} | {key} | {tps:,.1f} | {tps / best['none']:.3f} | "
              f"{(1 - tps / best['none']) * 100:+.1f}% |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48, help="tokens generated per run")
    ap.add_argument("--prompt-len", "--prompt_len", dest="prompt_len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-d20", "--skip_d20", dest="skip_d20", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; prompt "
          f"{args.prompt_len} tokens, {args.tokens} generated (greedy, KV cache); "
          f"SAE {EXPANSION}x TopK k={K} at the middle layer, top {TOP_N} features per token")
    print("| model | variant | tokens/s | ratio to none | overhead |")
    print("|---|---|---|---|---|")
    bench(*small_model(), args)  # may build the demo model (training): not in inference mode
    if not args.skip_d20:
        bench(*d20_model(), args)


if __name__ == "__main__":
    main()
