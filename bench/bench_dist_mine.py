"""
Feature mining throughput with 1 process vs N torchrun ranks on this machine, as users run it.

    python -m bench.bench_dist_mine [--checkpoint DIR] [--data PATH] [--tokens 32768] [--layers 1,3]
                                    [--d-sae 4096] [--k 32] [--batch-tokens 8192] [--ranks 2]
                                    [--row-group-docs 16] [--repeats 1] [--device cpu]

Every run is the real command in a fresh process (`python -m scripts.mine_features`, or
`python -m torch.distributed.run --standalone --nproc_per_node N -m scripts.mine_features`) over the
same held-out split, token budget and SAEs, into a fresh store (--force). tokens/s is the command's
own figure for the streaming pass: all ranks' tokens over the slowest rank's pass; wall is the
whole command (start-up, model load, merge, tables, write). The N-rank run gives each rank one
thread (OMP_NUM_THREADS=1); it is compared with one process using N threads (the same cores) and
one process using one thread (the per-rank speed). Runs alternate `--repeats` times, best kept.

Model: --checkpoint, else the nanochat_d4 fixture (../shared/fixtures), else the demo model.
SAEs: randomly initialised TopK SAEs of the given shape (as bench_mine), one per layer.
Corpus: the model's (or --data's) files, the held-out one rewritten as parquet with
--row-group-docs documents per row group: ranks are dealt row groups, and small corpora (the
fixture's held-out shard is one row group of 198 documents) would leave all but rank 0 idle;
nanochat's own shards hold many row groups.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.bench_mine import FIXTURE, make_saes
from nanochat.dataset import iter_documents, list_corpus_files
from nanochat.model_source import resolve_corpus, resolve_model

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"([\d,]+) tokens, ([\d,]+) documents, ([\d,]+) tokens/s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--checkpoint")
    ap.add_argument("--data")
    ap.add_argument("--tokens", type=int, default=32_768)
    ap.add_argument("--layers", default="1,3")
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--arch", default="topk", choices=("topk",))
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--row-group-docs", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    checkpoint = args.checkpoint or (FIXTURE if FIXTURE.exists() else None)
    source = resolve_model(checkpoint, device=args.device, quiet=True)
    corpus = resolve_corpus(source, args.data)
    layers = [int(x) for x in args.layers.split(",")]
    n = args.ranks
    runs = {f"1 process, {n} threads": (1, n), "1 process, 1 thread": (1, 1),
            f"{n} ranks (torchrun), 1 thread each": (n, 1)}
    best = {name: None for name in runs}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_saes(source, corpus, layers, args, tmp / "saes")
        data = rechunked(corpus, tmp / "corpus", args.row_group_docs)
        common = ["--sae-dir", str(tmp / "saes"), "--checkpoint", str(source.checkpoint_dir),
                  "--data", str(data), "--tokens", str(args.tokens),
                  "--batch-tokens", str(args.batch_tokens), "--device", args.device, "--force"]
        for r in range(args.repeats):
            for name, (ranks, threads) in runs.items():
                got = run(ranks, threads, common + ["--store", str(tmp / f"{ranks}_{threads}_{r}.duckdb")])
                if best[name] is None or got["tokens_per_s"] > best[name]["tokens_per_s"]:
                    best[name] = got
    load_after = os.getloadavg()
    c = source.model.config
    print(f"model {source.model_id} (d_model {c.n_embd}, {c.n_layer} layers), {len(layers)} x random "
          f"TopK {args.d_sae} (k {args.k}), {args.device}, {os.cpu_count()} CPUs; load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print("| run | tokens | pass tokens/s | wall s |")
    print("|---|---|---|---|")
    for name, got in best.items():
        print(f"| {name} | {got['tokens']:,} | {got['tokens_per_s']:,.0f} | {got['wall']:.1f} |")
    dist = best[f"{n} ranks (torchrun), 1 thread each"]["tokens_per_s"]
    print(f"\n{n} ranks / 1 process with {n} threads: {dist / best[f'1 process, {n} threads']['tokens_per_s']:.2f}x; "
          f"{n} ranks / 1 process with 1 thread: {dist / best['1 process, 1 thread']['tokens_per_s']:.2f}x")


def rechunked(corpus: Path, out: Path, docs_per_group: int) -> Path:
    """A corpus folder whose held-out file (the last one) is parquet in small row groups; the
    others (the train split) are linked unchanged."""
    files = list_corpus_files(corpus)
    if len(files) < 2:
        raise ValueError(f"{corpus}: the benchmark needs a corpus folder of several files")
    out.mkdir()
    for f in files[:-1]:
        (out / f.name).symlink_to(f.resolve())
    docs = list(iter_documents(corpus, "val"))
    pq.write_table(pa.table({"text": pa.array(docs, pa.string())}),
                   out / (files[-1].stem + ".parquet"), row_group_size=docs_per_group)
    return out


def run(ranks: int, threads: int, flags: list[str]) -> dict:
    """One mining command; its token count, pass tokens/s and wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(ranks)] if ranks > 1 else [sys.executable]
    t0 = time.perf_counter()
    out = subprocess.run([*launcher, "-m", "scripts.mine_features", *flags], cwd=REPO, env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - t0
    found = SUMMARY.search(out.stderr)
    if out.returncode != 0 or found is None:
        raise RuntimeError(f"mining with {ranks} rank(s) failed ({out.returncode}):\n{out.stderr[-3000:]}")
    tokens, _, tps = (int(x.replace(",", "")) for x in found.groups())
    return {"tokens": tokens, "tokens_per_s": tps, "wall": wall}


if __name__ == "__main__":
    main()
