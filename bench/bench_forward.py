"""
Full forward vs stop-after-block-L, tokens/s, measured side by side in one run.

    python -m bench.bench_forward [--seq-len 256] [--batch 4] [--repeats 3]

Models: the nanochat_d4 fixture (if ../shared/fixtures exists) and a d20-shaped model
(n_embd 1280, 10 heads, vocab 65536; random weights, speed only). Each row interleaves
the two variants so machine noise hits both alike; the ratio is what to read.
"""

import argparse
import time
from pathlib import Path

import torch

from nanochat.checkpoint_manager import load_model_from_dir
from nanochat.gpt import GPT, GPTConfig

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nanochat_d4"


def tokens_per_s(model, idx, stop, repeats):
    times = []
    with torch.inference_mode():
        model(idx, stop_after_layer=stop)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(idx, stop_after_layer=stop)
            times.append(time.perf_counter() - t0)
    return idx.numel() / min(times)


def bench(name, model, seq_len, batch, repeats, layers):
    idx = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    full = tokens_per_s(model, idx, None, repeats)
    for layer in layers:
        early = tokens_per_s(model, idx, layer, repeats)
        full_again = tokens_per_s(model, idx, None, repeats)
        full = max(full, full_again)
        print(f"| {name} | stop after block {layer} of {model.config.n_layer} | "
              f"{full:,.0f} | {early:,.0f} | {early / full:.2f}x |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-d20", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch} x seq {args.seq_len}")
    print("| model | variant | full fwd tok/s | early-exit tok/s | speed-up |")
    print("|---|---|---|---|---|")
    if FIXTURE.exists():
        model, _, _ = load_model_from_dir(FIXTURE / "base_checkpoints" / "d4", "cpu")
        bench("fixture d4 (V=4096)", model, args.seq_len, args.batch, args.repeats, [1])
    if not args.skip_d20:
        cfg = GPTConfig(sequence_len=2048, vocab_size=65536, n_layer=20, n_head=10,
                        n_kv_head=10, n_embd=1280)
        model = GPT(cfg)
        model.init_weights(seed=0)
        model.eval()
        bench("d20-shaped (random)", model, args.seq_len, 1, max(1, args.repeats - 1), [4, 10])


if __name__ == "__main__":
    main()
