"""
SAE training throughput, 1 process vs N ranks (torch.distributed, gloo on CPU / NCCL on GPUs).

    python -m bench.bench_dist_train                     # both parts, 2 ranks, CPU
    python -m bench.bench_dist_train --part trainer --ranks 2 --width 4096
    python -m bench.bench_dist_train --part cli --tokens 131072

Parts:
- trainer: `train_saes` alone on an in-memory activation stream (d_in 128, BatchTopK k=32, global
  batch 4096), so only the SAE math and its collectives are timed. A 1-process run with T threads
  against N data-parallel ranks with T/N threads each (the same cores), and a 1-thread single
  process as the per-core baseline.
- cli: `python -m scripts.sae_train` on the demo model (3 layers, on-the-fly activations) against
  `python -m torch.distributed.run --standalone --nproc_per_node N -m scripts.sae_train`, data- and
  layer-parallel; tokens/s as the trainer reports it in eval.json (training phase incl. init), and
  the whole command's wall time (model load, evaluation-free export).
Prints a markdown table with the machine's load average before and after, since on a shared
2-core machine other work changes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.distributed import DistContext

REPO = Path(__file__).resolve().parents[1]
HOOK = "blocks.10.hook_resid_post"


def _batches(rank: int, world: int, batch: int, d: int, n: int):
    """n global batches of synthetic activations (a fixed pool, so generation costs nothing)."""
    pool = torch.randn(8, batch, d, generator=torch.Generator().manual_seed(0)) + 1.0
    b = batch // world
    for i in range(n):
        yield {HOOK: pool[i % 8, rank * b:(rank + 1) * b]}


def _trainer_run(rank, world, port, args, threads, result_path):
    torch.set_num_threads(threads)
    from sae import SAEConfig, TrainConfig, train_saes
    ctx = DistContext()
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        ctx = DistContext(rank, world)
    steps = args.steps
    cfg = SAEConfig(d_in=args.d_in, d_sae=args.width, architecture=args.arch, k=32, hook_name=HOOK)
    tc = TrainConfig(total_tokens=steps * args.batch, batch_size=args.batch, init_tokens=args.batch,
                     calibration_tokens=0, eval_tokens=0, checkpoint_every=0, log_every=10**9, quiet=True)
    with tempfile.TemporaryDirectory() as out:
        stream = _batches(rank, world, args.batch, args.d_in, steps + 2)
        t0 = time.perf_counter()
        train_saes([cfg], tc, stream, out, ctx=ctx)
        wall = time.perf_counter() - t0
    if world > 1:
        dist.destroy_process_group()
    if rank == 0:
        Path(result_path).write_text(json.dumps({"tokens": steps * args.batch, "wall_s": wall}))


def bench_trainer(args) -> list[tuple[str, float]]:
    rows = []
    cores = args.threads
    for label, world, threads in (("1 process × 1 thread", 1, 1),
                                  (f"1 process × {cores} threads", 1, cores),
                                  (f"{args.ranks} ranks × {max(1, cores // args.ranks)} thread(s)", args.ranks,
                                   max(1, cores // args.ranks))):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            if world == 1:
                _trainer_run(0, 1, 0, args, threads, f.name)
            else:
                mp.spawn(_trainer_run, args=(world, _free_port(), args, threads, f.name), nprocs=world)
            r = json.loads(Path(f.name).read_text())
        rows.append((label, r["tokens"] / r["wall_s"]))
    return rows


def bench_cli(args) -> list[tuple[str, float]]:
    rows = []
    common = ["--layers", "4,10,16", "--tokens", str(args.tokens), "--eval-tokens", "0", "--quiet",
              "--device", args.device]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks)]
    env = dict(os.environ)
    runs = (("1 process × 1 thread", [sys.executable], [], "1"),
            (f"1 process × {args.threads} threads", [sys.executable], [], str(args.threads)),
            (f"{args.ranks} ranks, data-parallel", launch, [], str(max(1, args.threads // args.ranks))),
            (f"{args.ranks} ranks, layer-parallel", launch, ["--layer-parallel"],
             str(max(1, args.threads // args.ranks))))
    for label, prefix, extra, threads in runs:
        with tempfile.TemporaryDirectory() as out:
            cmd = [*prefix, "-m", "scripts.sae_train", *common, *extra, "--out", out]
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": threads}, check=True)
            wall = time.perf_counter() - t0
            reports = [json.loads(p.read_text()) for p in Path(out).glob("*/eval.json")]
        tps = min(r["training"]["tokens_per_s"] for r in reports)
        rows.append((f"{label} (whole command {wall:.0f} s)", tps))
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("trainer", "cli", "both"), default="both")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores to use in all")
    p.add_argument("--d-in", type=int, default=128)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--arch", default="batchtopk")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--tokens", type=int, default=131_072, help="cli part: training tokens per SAE")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    results = {}
    if args.part in ("trainer", "both"):
        results["trainer"] = bench_trainer(args)
    if args.part in ("cli", "both"):
        results["cli"] = bench_cli(args)
    load_after = os.getloadavg()
    print(f"\nload average before {load_before[0]:.2f} / after {load_after[0]:.2f} (1-minute), "
          f"{os.cpu_count()} cores\n")
    for part, rows in results.items():
        base = rows[1][1]  # 1 process using every core
        print(f"| {part}: run | tokens/s | vs 1 process × {args.threads} threads |")
        print("|---|---:|---:|")
        for label, tps in rows:
            print(f"| {label} | {tps:,.0f} | {tps / base:.2f}× |")
        print()


if __name__ == "__main__":
    main()
