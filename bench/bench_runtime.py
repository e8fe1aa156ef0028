"""
Generation tokens/s with SAEs attached through sae/runtime.py, against the bare model, in one run.

    python -m bench.bench_runtime [--tokens 48] [--prompt-len 32] [--repeats 3] [--skip-d20]
                                  [--threads N] [--clock wall|cpu]

Variants, each a KV-cache generation (prefill + greedy decode) of --tokens tokens:
    none              the bare model
    track             one 8x TopK SAE (k=32) at the middle layer, top 8 features of every token
    track + steer     the same, plus a steering edit at that layer
Models: the demo model (20 layers x 128 wide, vocab 4096; a random model of that shape when
the demo is not built yet) and a d20-shaped model (n_embd 1280, 20 layers, vocab 65536;
random weights). Speed does not depend on the weights.
Variants are interleaved within every repeat so that machine noise hits all alike; each
variant's best repeat is kept, and the ratio to `none` is what to read.
"""

import argparse
import time

import torch

from nanochat.engine import generate
from nanochat.gpt import GPT, GPTConfig
from sae.config import SAEConfig
from sae.models import build_sae
from sae.runtime import SAERuntime, steer

EXPANSION, K, TOP_N = 8, 32, 8


def demo_model():
    """(name, model): the built demo model, else a random model of the demo's shape.

    A benchmark does not start the demo's training (minutes on 2 idle cores); speed does not
    depend on the weights, and the name says which one ran."""
    from nanochat.checkpoint_manager import find_largest_model, load_model_from_dir
    from nanochat.demo import check_demo, default_cache_dir, preset_config

    config = preset_config()
    path = default_cache_dir() / config.dirname()
    if check_demo(path, config) is None:
        checkpoints = path / "base_checkpoints"
        model, _, _ = load_model_from_dir(checkpoints / find_largest_model(checkpoints), "cpu")
        return "demo (trained)", model.eval()
    cfg = GPTConfig(sequence_len=config.seq_len, vocab_size=config.vocab_size,
                    n_layer=config.depth, n_head=config.heads, n_kv_head=config.heads,
                    n_embd=config.n_embd)
    model = GPT(cfg)
    model.init_weights(seed=0)
    return "demo-shaped (random; demo not built)", model.eval()


def d20_model():
    cfg = GPTConfig(sequence_len=2048, vocab_size=65536, n_layer=20, n_head=10, n_kv_head=10,
                    n_embd=1280)
    model = GPT(cfg)
    model.init_weights(seed=0)
    return "d20-shaped (random)", model.eval()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed_generation(model, prompt, n_tokens, clock) -> float:
    t0 = clock()
    out = list(generate(model, prompt, n_tokens, temperature=0.0))
    elapsed = clock() - t0
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
        return timed_generation(model, prompt, args.tokens, CLOCKS[args.clock])

    def track():
        runtime.track(top_n=TOP_N)
        try:
            return timed_generation(model, prompt, args.tokens, CLOCKS[args.clock])
        finally:
            runtime.detach()

    def track_steer():
        runtime.track(top_n=TOP_N)
        runtime.add(steer(hook, 1, 4.0))
        try:
            return timed_generation(model, prompt, args.tokens, CLOCKS[args.clock])
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
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time, or this process's CPU time (steadier on a shared machine; "
                         "use with --threads 1)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, {args.clock} clock; "
          f"prompt {args.prompt_len} tokens, {args.tokens} generated (greedy, KV cache); "
          f"SAE {EXPANSION}x TopK k={K} at the middle layer, top {TOP_N} features per token")
    print("| model | variant | tokens/s | ratio to none | overhead |")
    print("|---|---|---|---|---|")
    bench(*demo_model(), args)
    if not args.skip_d20:
        bench(*d20_model(), args)


if __name__ == "__main__":
    main()
