"""
Forward throughput of 2026-format nanochat models: the full forward (blocks, backout,
lm_head, softcap) against stopping after block L (`stop_after_layer`, what activation
harvesting runs). All rows of one model come from one run. Each figure is the median of
`--repeats` calls, timed both by the wall clock and by this process's CPU time: on a shared
machine the wall clock also counts other processes, so the ratios use CPU time.

    python -m bench.bench_forward_2026                 # head fixture + d20-shaped model
    python -m bench.bench_forward_2026 --skip-d20 --tokens 256

Models:
- head_d4: the checkpoint nanochat 92d63d4 wrote (../shared/fixtures/nanochat_head_d4),
  skipped with a note if the fixtures are absent
- d20 (2026-03-14 shape): 20 layers, n_embd 1280, 10 heads, vocab 32768, SSSL windows,
  value embeddings on 10 layers; random weights (throughput does not depend on them)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from nanochat.checkpoint_manager import load_model_from_dir
from nanochat.formats import ERAS
from nanochat.gpt2026 import GPT2026

HEAD_CKPT = (Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nanochat_head_d4"
             / "base_checkpoints" / "d4")
D20 = dict(sequence_len=2048, vocab_size=32768, n_layer=20, n_head=10, n_kv_head=10,
           n_embd=1280, window_pattern="SSSL")


def tokens_per_second(model, idx: torch.Tensor, stop_after_layer, repeats: int):
    """(tokens per wall-clock second, tokens per CPU second of this process)."""
    with torch.inference_mode():
        model(idx, stop_after_layer=stop_after_layer)  # warm-up
        wall, cpu = [], []
        for _ in range(repeats):
            w0, c0 = time.perf_counter(), time.process_time()
            model(idx, stop_after_layer=stop_after_layer)
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    return idx.numel() / statistics.median(wall), idx.numel() / statistics.median(cpu)


def bench_model(name: str, model, batch: int, tokens: int, repeats: int) -> list[str]:
    L = model.config.n_layer
    idx = torch.randint(0, model.config.vocab_size, (batch, tokens),
                        generator=torch.Generator().manual_seed(0), device=model.get_device())
    rows = []
    full_cpu = None
    for layer in [None] + sorted({0, L // 4, L // 2, (3 * L) // 4, L - 1}):
        wall, cpu = tokens_per_second(model, idx, layer, repeats)
        full_cpu = full_cpu or cpu
        what = "full forward" if layer is None else f"stop after block {layer}"
        rows.append(f"| {name} | {what} | {wall:,.0f} | {cpu:,.0f} | {cpu / full_cpu:.2f} |")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=512, help="sequence length per row")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-d20", "--skip_d20", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default); 1 is the steadiest "
                        "on a busy machine")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"batch {args.batch} x {args.tokens} tokens, median of {args.repeats}")
    rows = []
    if HEAD_CKPT.is_dir():
        model, _, _ = load_model_from_dir(HEAD_CKPT, args.device)
        rows += bench_model("head_d4 (fixture)", model, args.batch,
                            min(args.tokens, model.config.sequence_len), args.repeats)
    else:
        print(f"note: {HEAD_CKPT} not found, head_d4 skipped")
    if not args.skip_d20:
        with torch.device(args.device):
            model = GPT2026(ERAS["2026-03-14"].config(D20))
        model.init_weights(seed=0)
        n = sum(p.numel() for p in model.parameters())
        print(f"d20 (2026-03-14 shape): {n / 1e6:.0f}M parameters")
        rows += bench_model("d20 (random weights)", model.eval(), args.batch, args.tokens,
                            args.repeats)
    print("| model | forward | tokens/s (wall) | tokens/CPU-s | speed vs full (CPU) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
