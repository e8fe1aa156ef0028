"""
Benchmark: SAE training throughput from a cached activation file, dense vs sparse TopK kernels.

    python -m bench.bench_sae_train                         # synthetic cache, default shapes
    python -m bench.bench_sae_train --cache acts.npy --configs 1280x32768 --k 32 --steps 20

Times the trainer's own `train_step` (forward, AuxK, backward, decoder-gradient projection, clipping,
Adam, renormalisation) on batches read from a memory-mapped .npy [tokens, d_in] file, so the model
forward is excluded. "dense" is the autograd reference path (dense B×n codes, GEMM decoder); "sparse"
is sae/sparse.py (TopK encoder with a scatter-add backward, embedding-bag decoder). Modes are
interleaved within each repeat so machine load drifts hit both alike; the reported number is the
median over repeats, and the ratio is sparse/dense from the same run.

Without --cache, a cache of planted-dictionary activations (sparse combinations of random unit
directions plus an offset) is written to a temp dir for each d_in; its content does not affect speed.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sae import SAEConfig, TrainConfig, new_run, train_step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=None, help="a .npy file [tokens, d_in] of activations (default: synthetic)")
    p.add_argument("--configs", default="128x1024,128x4096,256x8192", help="comma-separated d_in x d_sae")
    p.add_argument("--archs", default="topk,batchtopk")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", "--batch_size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode per repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode before timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    shapes = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    print(f"device={args.device} threads={torch.get_num_threads()} batch={args.batch_size} k={args.k} "
          f"steps={args.steps}x{args.repeats} torch={torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for d_in, d_sae in shapes:
            cache = Path(args.cache) if args.cache else write_synthetic_cache(Path(tmp) / f"acts_{d_in}.npy", d_in)
            acts = np.load(cache, mmap_mode="r")
            if acts.ndim != 2 or acts.shape[1] != d_in:
                raise ValueError(f"{cache}: expected [tokens, {d_in}], got {list(acts.shape)}")
            for arch in args.archs.split(","):
                rows.append(bench_one(acts, arch, d_in, d_sae, args))
                r = rows[-1]
                print(f"{d_in}x{d_sae} {arch:9s} dense {r['dense_tokens_per_s']:>10,.0f} tok/s   "
                      f"sparse {r['sparse_tokens_per_s']:>10,.0f} tok/s   sparse/dense {r['speedup']:.2f}x", flush=True)
    print()
    print("| d_in × d_sae | arch | dense tok/s | sparse tok/s | sparse / dense |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['d_in']} × {r['d_sae']} | {r['arch']} | {r['dense_tokens_per_s']:,.0f} | "
              f"{r['sparse_tokens_per_s']:,.0f} | {r['speedup']:.2f}× |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))


def bench_one(acts: np.ndarray, arch: str, d_in: int, d_sae: int, args) -> dict:
    B = args.batch_size
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=args.k)
    runs, cfgs = {}, {}
    for mode in ("dense", "sparse"):
        cfgs[mode] = TrainConfig(total_tokens=10**12, batch_size=B, sparse_kernels=mode == "sparse", device=args.device)
        runs[mode] = new_run(cfg, cfgs[mode], args.device, torch.Generator().manual_seed(0))
    scale = float(np.sqrt(d_in) / np.linalg.norm(acts[: min(len(acts), 65536)], axis=1).mean())
    dead_tokens = cfgs["dense"].resolve_dead_tokens()
    position = {"dense": 0, "sparse": 0}

    def step(mode):
        start = position[mode] % max(1, len(acts) - B)
        position[mode] += B
        rows = np.array(acts[start:start + B], dtype=np.float32)  # a copy: the memmap is read-only
        x = torch.from_numpy(rows).to(args.device) * scale
        train_step(runs[mode], x, cfgs[mode], position[mode], dead_tokens)

    for mode in ("dense", "sparse"):
        for _ in range(args.warmup):
            step(mode)
    rates = {"dense": [], "sparse": []}
    for _ in range(args.repeats):
        for mode in ("dense", "sparse"):
            _sync(args.device)
            t = time.perf_counter()
            for _ in range(args.steps):
                step(mode)
            _sync(args.device)
            rates[mode].append(args.steps * B / (time.perf_counter() - t))
    dense, sparse = statistics.median(rates["dense"]), statistics.median(rates["sparse"])
    return {"d_in": d_in, "d_sae": d_sae, "arch": arch, "k": args.k, "batch_size": B,
            "dense_tokens_per_s": dense, "sparse_tokens_per_s": sparse, "speedup": sparse / dense,
            "dense_runs": rates["dense"], "sparse_runs": rates["sparse"]}


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def write_synthetic_cache(path: Path, d_in: int, n_tokens: int = 65536, n_features: int = 4096, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_features, d_in, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    chunks = []
    for _ in range(0, n_tokens, 8192):
        idx = torch.randint(0, n_features, (8192, 16), generator=g)
        mags = torch.rand(8192, 16, generator=g)
        chunks.append(torch.nn.functional.embedding_bag(idx, dirs, mode="sum", per_sample_weights=mags) + 1.0)
    np.save(path, torch.cat(chunks)[:n_tokens].numpy().astype(np.float32))
    return path


if __name__ == "__main__":
    main()
