"""
SAE quality on the demo model: every architecture on one layer, sparsity matched.

    python -m bench.bench_sae_quality [--layer 10] [--tokens 500000] [--k 32] [--write]

Trains one SAE per architecture on the same cached activations of `blocks.<layer>.hook_resid_post`
(8x width, the demo model unless --checkpoint), then splices each into the model on held-out
text. TopK and BatchTopK get k directly; the L1-penalised architectures (relu, gated, jumprelu)
get their sparsity coefficient searched (geometric bisection on the held-out L0, at most
--search-steps runs each) until L0 lands within 15% of k, so the rows compare at matched L0.
Every row is a full training run; the best-matched run of each architecture is reported.
Columns: held-out FVU (centered), L0, dead latents (never fired in the trainer's held-out
tokens), ΔCE and KL with the SAE spliced in, CE recovered vs zero ablation.
"""

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from sae.train_run import RunConfig, run_training

RESULTS_DIR = Path(__file__).resolve().parent
L0_TOLERANCE = 0.15


def train(args, arch: str, out: Path, l1: float | None = None) -> dict:
    cfg = RunConfig(layers=[args.layer], architecture=arch, expansion=args.expansion, k=args.k,
                    l1_coefficient=l1, tokens=args.tokens, batch_size=args.batch_size,
                    checkpoint=args.checkpoint,
                    out=str(out), cache_activations=True, cache_dir=args.cache_dir,
                    eval_tokens=args.eval_tokens, device=args.device, quiet=True)
    t0 = time.perf_counter()
    result = run_training(cfg)
    seconds = time.perf_counter() - t0
    sae_dir = next(iter(result.sae_dirs.values()))
    report = json.loads((sae_dir / "eval.json").read_text())
    val, held = report["val"], report["metrics"]
    return {"arch": arch, "l1": l1, "fvu": val["fvu"], "l0": val["l0"],
            "dead": held["dead_fraction"], "delta_ce": val["delta_ce"], "kl": val["kl"],
            "ce_recovered": val.get("ce_recovered"), "seconds": seconds,
            "tokens_per_s": report["training"]["tokens_per_s"], "d_sae": report["d_sae"]}


def matched(args, arch: str, root: Path) -> tuple[dict, list[dict]]:
    """Search the L1 coefficient for L0 ~= k: geometric bisection once L0 is bracketed,
    factor-of-4 steps until then."""
    from sae.config import SAEConfig
    coef = SAEConfig(d_in=args.d_in, d_sae=int(args.expansion * args.d_in), architecture=arch,
                     hook_name="x").resolved_l1_coefficient
    lo = hi = None  # coefficients known to give L0 above / below the target
    runs = []
    for step in range(args.search_steps):
        r = train(args, arch, root / f"{arch}-{step}", coef)
        runs.append(r)
        print(f"  {arch} l1={coef:.4g}: L0 {r['l0']:.1f}  FVU {r['fvu']:.4f}  ({r['seconds']:.0f} s)", flush=True)
        if abs(r["l0"] / args.k - 1) <= L0_TOLERANCE:
            break
        if r["l0"] > args.k:
            lo = coef
            coef = math.sqrt(coef * hi) if hi else coef * 4
        else:
            hi = coef
            coef = math.sqrt(coef * lo) if lo else coef / 4
    best = min(runs, key=lambda r: abs(math.log(max(r["l0"], 1e-3) / args.k)))
    return best, runs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=500_000)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4096, help="tokens per optimizer step")
    ap.add_argument("--expansion", type=float, default=8.0)
    ap.add_argument("--archs", default="topk,batchtopk,relu,gated,jumprelu")
    ap.add_argument("--search-steps", type=int, default=4)
    ap.add_argument("--eval-tokens", type=int, default=32_768)
    ap.add_argument("--checkpoint")
    ap.add_argument("--device")
    ap.add_argument("--cache-dir", help="activation cache root (default: a temp dir)")
    ap.add_argument("--write", action="store_true", help="write RESULTS_sae_quality[_bBATCH].md")
    args = ap.parse_args()

    from nanochat.model_source import resolve_model
    source = resolve_model(args.checkpoint, torch.device(args.device or "cpu"), quiet=True)
    args.d_in = source.model.config.n_embd
    rows, all_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        args.cache_dir = args.cache_dir or str(Path(tmp) / "cache")
        for arch in args.archs.split(","):
            if arch in ("topk", "batchtopk"):
                r = train(args, arch, Path(tmp) / arch)
                print(f"  {arch}: L0 {r['l0']:.1f}  FVU {r['fvu']:.4f}  ({r['seconds']:.0f} s)", flush=True)
                runs = [r]
            else:
                r, runs = matched(args, arch, Path(tmp))
            rows.append(r)
            all_runs += runs

    head = (f"{source.describe()}; `blocks.{args.layer}.hook_resid_post`, width {rows[0]['d_sae']} "
            f"({args.expansion:g}x), {args.tokens:,} training tokens per SAE in batches of "
            f"{args.batch_size:,} ({args.tokens // args.batch_size} steps), held-out evaluation on "
            f"{args.eval_tokens:,} val tokens. Machine: {platform.machine()} CPU, "
            f"{os.cpu_count()} cores, torch {torch.__version__}, 1-min load average "
            f"{os.getloadavg()[0]:.1f} at the end.")
    table = ("| architecture | L1 coefficient | L0 | FVU | dead | ΔCE (nats) | KL | CE recovered | train tokens/s |\n"
             "|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        l1 = "—" if r["l1"] is None else f"{r['l1']:.3g}"
        table += (f"| {r['arch']} | {l1} | "
                  f"{r['l0']:.1f} | {r['fvu']:.4f} | {100 * r['dead']:.1f}% | {r['delta_ce']:+.4f} | "
                  f"{r['kl']:.4f} | {_pct(r['ce_recovered'])} | {r['tokens_per_s']:,.0f} |\n")
    search = "".join(f"- {r['arch']} l1 {r['l1']:.4g}: L0 {r['l0']:.1f}, FVU {r['fvu']:.4f}\n"
                     for r in all_runs if r["l1"] is not None)
    print(head + "\n\n" + table)
    if args.write:
        suffix = "" if args.batch_size == 4096 else f"_b{args.batch_size}"
        (RESULTS_DIR / f"RESULTS_sae_quality{suffix}.md").write_text(
            "# SAE quality by architecture (demo model)\n\n"
            f"`python -m bench.bench_sae_quality --layer {args.layer} --tokens {args.tokens} --k {args.k} "
            f"--batch-size {args.batch_size} --archs {args.archs} --write`\n\n"
            + head + "\n\n" + table + "\nEvery run of the L1 coefficient search:\n\n" + search)


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


if __name__ == "__main__":
    main()
