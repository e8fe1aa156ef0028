"""
Static atlas render speed and page size, on one core.

    python -m bench.bench_render [--features 4096] [--window 33] [--repeats 3] [--write]

Builds a feature store with the miner's default profile (20 top examples + 5 quantile bins x 5
samples per feature, 33-token windows, 10 neighbours of each kind, 64-bin activation and 50-bin
logit histograms, raw + gain-corrected logit tables), with windows cut from real text tokenized
by the nanochat_d4 fixture's tokenizer when ../shared/fixtures exists (else a synthetic Zipf
stream), then renders the whole site `--repeats` times with the process pinned to one CPU.
Speed is feature pages per second of the whole render_site call (store reads, search index,
layer pages included), best of the repeats, by CPU time and by wall clock, writing to disk (the
temp folder) and, where /dev/shm exists, to RAM, to tell rendering from file-system cost. Page
size is the
mean gzip (level 6, what web servers use) of the feature pages. A fixed pure-Python loop is
timed alongside so numbers from busy or slow machines can be put in proportion.
"""

import argparse
import gzip
import os
import pickle
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from atlas.render import render_site
from tests.atlas_fixtures import make_store

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nanochat_d4"
RESULTS = Path(__file__).resolve().parent / "RESULTS_render.md"


def real_text():
    """(vocab bytes, token stream) from the fixture's tokenizer and corpus, or None."""
    if not FIXTURE.exists():
        return None
    import pyarrow.parquet as pq
    with open(FIXTURE / "tokenizer" / "tokenizer.pkl", "rb") as f:
        enc = pickle.load(f)
    texts = pq.read_table(FIXTURE / "base_data" / "shard_00000.parquet").column("text").to_pylist()[:100]
    stream = np.concatenate([np.asarray(ids) for ids in enc.encode_ordinary_batch(texts)])
    return [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab)], stream


def reference_loop_s() -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        sum(range(10_000_000))
        best = min(best, time.process_time() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--features", type=int, default=4096, help="features of the one SAE")
    ap.add_argument("--window", type=int, default=33, help="tokens per example window")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true", help=f"write the results to {RESULTS.name}")
    args = ap.parse_args()

    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})  # one core, DuckDB's threads included
    text = real_text()
    vocab, stream = text if text else (None, None)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store_path = make_store(Path(tmp) / "features.duckdb", saes=(("blocks.2.hook_resid_post", 2, "hook_resid_post"),),
                                n_features=args.features, vocab=vocab, token_stream=stream, window=args.window,
                                n_top=20, n_bins=5, per_bin=5, n_neighbors=10, n_hist_bins=64)
        print(f"store: {args.features} features built in {time.perf_counter() - t0:.0f} s "
              f"({'fixture text' if text else 'synthetic tokens'})")
        targets = [("disk", Path(tmp))] + ([("RAM (/dev/shm)", Path("/dev/shm"))] if Path("/dev/shm").is_dir() else [])
        runs = {}
        for name, base in targets:
            with tempfile.TemporaryDirectory(dir=base) as out:
                for _ in range(args.repeats):
                    c0 = time.process_time()
                    stats = render_site(store_path, Path(out) / "site", quiet=True)
                    runs.setdefault(name, []).append((stats["seconds"], time.process_time() - c0))
                    print(f"render to {name}: {stats['feature_pages']} feature pages, "
                          f"{runs[name][-1][0]:.2f} s wall, {runs[name][-1][1]:.2f} s CPU")
                pages = sorted((Path(out) / "site").glob("layers/*/features/*.html"))
                raw = [p.stat().st_size for p in pages]
                gz = [len(gzip.compress(p.read_bytes(), 6)) for p in pages]
                site_bytes = sum(p.stat().st_size for p in (Path(out) / "site").rglob("*") if p.is_file())

    n = len(pages)
    ref = reference_loop_s()
    rows = [("feature pages", f"{n:,}"),
            ("example windows", f"45 x {args.window} tokens ({'real text' if text else 'synthetic'})")]
    for name, times in runs.items():
        rows += [(f"pages/s to {name}, CPU time (best of {args.repeats})", f"{n / min(c for _, c in times):,.0f}"),
                 (f"pages/s to {name}, wall clock (best of {args.repeats})", f"{n / min(w for w, _ in times):,.0f}")]
    rows += [
        ("mean page, raw", f"{statistics.mean(raw) / 1024:.1f} KB"),
        ("mean page, gzip -6", f"{statistics.mean(gz) / 1024:.1f} KB"),
        ("largest page, gzip -6", f"{max(gz) / 1024:.1f} KB"),
        ("whole site", f"{site_bytes / 2**20:.1f} MB"),
        ("reference loop sum(range(1e7)), CPU", f"{ref:.2f} s"),
        ("1-min load average (2 cores)", f"{os.getloadavg()[0]:.1f}"),
    ]
    table = "| measure | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    print(table)
    if args.write:
        RESULTS.write_text(
            "# Atlas render benchmark\n\n"
            f"`python -m bench.bench_render --features {args.features} --window {args.window} "
            f"--repeats {args.repeats}`, pinned to one core of a 2-core CPU sandbox "
            f"({platform.processor() or platform.machine()}, Python {platform.python_version()}).\n\n"
            + table + "\n" + RESULTS_NOTES)


RESULTS_NOTES = """Reading the numbers
- Speed covers the whole `render_site` call: store reads, feature pages, layer pages, search
  index, the atomic swap. "CPU time" leaves out time spent waiting for the core, so on a shared
  machine it is the fairer figure; it still grows when other processes compete for caches and
  memory. Time the same reference loop on another machine to scale the numbers to it.
- "disk" renders into the temp folder, "RAM" into /dev/shm: the difference is file-system cost
  (creating one file per feature), which depends on the disk and on what else is writing.
- Size: the budget is 15 KB gzipped per feature page on average; GitHub Pages serves gzip.
"""


if __name__ == "__main__":
    main()
