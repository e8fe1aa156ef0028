"""
Our TopK trainer against SAELens's, on identical cached activations: held-out FVU and training tokens/s.

    python -m bench.bench_vs_saelens [--checkpoint DIR] [--layer L] [--train-tokens 1000000] \
        [--saelens-python /tmp/saelens-venv/bin/python]

SAELens is a benchmark-only dependency, never imported by the project: it lives in its own venv
    python -m venv /tmp/saelens-venv && /tmp/saelens-venv/bin/pip install torch==2.13.0 sae-lens
and this file runs itself there as a subprocess (`--saelens-worker`), which imports only sae_lens,
torch and numpy.

Setup: the model's activations at one hook are cached once with `sae.activations.build_cache`
(fp32): `init + train` tokens of the train split, and a separate held-out cache from the val split.
Both trainers read the same train cache (each shuffles it its own way), take their input-norm
estimate from its first `--init-tokens` and then train on `--train-tokens`: same width, k, batch,
learning rate and schedule (5% warmup, linear decay over the last 20%), with
expected-average input normalization. Everything else is each library's own TopK recipe
(ours: unit-norm decoder with gradient projection, geometric-median b_dec, AuxK 1/32 on our loss
scale; SAELens 6: decoder-norm-rescaled selection, 0.1-norm decoder init, its AuxK). Both SAEs
are then loaded with `sae.io.load_sae` (SAELens folders load natively) and scored by the same
`sae.metrics.SAEMetrics` on the held-out cache; the worker also reports SAELens's own encode/
decode FVU as a cross-check. Training time is the wall time of each trainer's fit call (norm
estimate, training and export included), same process thread count.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_VENV_PYTHON = "/tmp/saelens-venv/bin/python"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--saelens-worker", help=argparse.SUPPRESS)  # JSON job file (runs in the SAELens venv)
    ap.add_argument("--checkpoint")
    ap.add_argument("--data")
    ap.add_argument("--layer", type=int, help="default n_layer // 2")
    ap.add_argument("--train-tokens", type=int, default=1_000_000)
    ap.add_argument("--init-tokens", type=int, default=65_536)
    ap.add_argument("--heldout-tokens", type=int, default=65_536)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--work", help="cache and outputs (default: a temp dir)")
    ap.add_argument("--saelens-python", default=DEFAULT_VENV_PYTHON)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.saelens_worker:
        return saelens_worker(Path(args.saelens_worker))
    return compare(args)


def compare(args):
    import torch

    from nanochat.model_source import resolve_corpus, resolve_model
    from sae.activations import StreamConfig, build_cache, cached_stream, model_fingerprint
    from sae.config import SAEConfig, TrainConfig
    from sae.hooks import hook_name
    from sae.io import load_sae
    from sae.metrics import SAEMetrics
    from sae.trainer import train_saes

    if not Path(args.saelens_python).exists():
        sys.exit(f"no SAELens venv at {args.saelens_python}; create it with\n  python -m venv /tmp/saelens-venv && "
                 f"/tmp/saelens-venv/bin/pip install torch==2.13.0 sae-lens")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_vs_saelens-"))
    source = resolve_model(args.checkpoint, "cpu", quiet=True)
    corpus = resolve_corpus(source, args.data)
    layer = args.layer if args.layer is not None else source.model.config.n_layer // 2
    hook = hook_name(layer)
    d_in = source.model.config.n_embd
    width = args.expansion * d_in
    B = args.batch_size
    init_tokens = math.ceil(args.init_tokens / B) * B
    train_tokens = math.ceil(args.train_tokens / B) * B
    fp = model_fingerprint(source.checkpoint_dir, source.step, source.model_id)
    kw = dict(seq_len=args.seq_len, dtype="float32", quiet=True, log=lambda m: None)
    train_cache = build_cache(source.model, source.tokenizer, corpus, [hook], init_tokens + train_tokens,
                              work / "cache", fp, split="train", **kw)
    heldout_cache = build_cache(source.model, source.tokenizer, corpus, [hook], args.heldout_tokens,
                                work / "cache", fp, split="val", **kw)
    train_cfg = TrainConfig(total_tokens=train_tokens, batch_size=B, init_tokens=init_tokens,
                            calibration_tokens=0, eval_tokens=0, warmup_steps=max(1, train_tokens // B // 20),
                            checkpoint_every=0, seed=args.seed, quiet=True)
    lr = train_cfg.resolve_lr(width)

    # ours
    sae_cfg = SAEConfig(d_in=d_in, d_sae=width, architecture="topk", k=args.k, hook_name=hook)
    stream = cached_stream(train_cache, StreamConfig([hook], batch_size=B, buffer_tokens=min(1 << 20, train_cache.n_tokens),
                                                     seed=args.seed), log=lambda m: None)
    t0 = time.perf_counter()
    train_saes([sae_cfg], train_cfg, stream, work / "ours")
    ours_s = time.perf_counter() - t0

    # SAELens, same cache, in its own venv
    job = {"cache": str(train_cache.path / train_cache.hooks[hook]["file"]),
           "heldout": str(heldout_cache.path / heldout_cache.hooks[hook]["file"]),
           "out": str(work / "saelens"), "d_in": d_in, "d_sae": width, "k": args.k, "batch_size": B,
           "train_tokens": train_tokens, "init_batches": init_tokens // B, "lr": lr,
           "warmup_steps": train_cfg.resolve_warmup_tokens() // B,
           "decay_steps": int(train_tokens // B * train_cfg.decay_frac), "seed": args.seed,
           "threads": torch.get_num_threads()}
    job_file = work / "saelens_job.json"
    job_file.write_text(json.dumps(job))
    run = subprocess.run([args.saelens_python, str(Path(__file__).resolve()), "--saelens-worker", str(job_file)],
                         capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if run.returncode != 0:
        sys.exit(f"SAELens worker failed:\n{run.stderr[-4000:]}")
    theirs = json.loads((work / "saelens" / "result.json").read_text())

    heldout = torch.from_numpy(np.array(heldout_cache.array(hook)))
    rows = {}
    for name, folder, seconds in (("ours", work / "ours" / hook, ours_s),
                                  ("SAELens", work / "saelens" / "sae", theirs["fit_s"])):
        sae = load_sae(folder)
        acc = SAEMetrics(width)
        with torch.no_grad():
            for s in range(0, heldout.shape[0], 8192):
                x = heldout[s:s + 8192]
                codes = sae.encode(x)
                acc.update(x, sae.decode(codes), codes)
        m = acc.compute()
        rows[name] = {**m, "train_s": seconds, "tokens_per_s": train_tokens / seconds}

    print(f"{source.describe()}")
    print(f"hook {hook}, d_in {d_in}, width {width}, k {args.k}, batch {B}, lr {lr:.3g}; "
          f"{train_tokens:,} training tokens (+{init_tokens:,} for the norm estimate), "
          f"{heldout_cache.n_tokens:,} held-out val tokens; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; SAELens {theirs['version']}")
    print("| trainer | held-out FVU | L0 | dead (no firing on held-out) | train s | tokens/s |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['fvu']:.4f} | {r['l0']:.1f} | {r['dead_fraction']:.1%} | "
              f"{r['train_s']:.1f} | {r['tokens_per_s']:,.0f} |")
    o, t = rows["ours"], rows["SAELens"]
    print(f"FVU ratio ours/SAELens: {o['fvu'] / t['fvu']:.3f} (lower is better); "
          f"tokens/s ratio ours/SAELens: {o['tokens_per_s'] / t['tokens_per_s']:.2f}x")
    print(f"cross-check: SAELens's own encode/decode gives held-out FVU {theirs['fvu_own']:.4f}")
    print(f"outputs in {work}")


def saelens_worker(job_file: Path):
    """Runs in the SAELens venv: train a TopK SAE on the cached activations, save it, time it."""
    import sae_lens
    import torch
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    job = json.loads(job_file.read_text())
    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    acts = np.load(job["cache"], mmap_mode="r")
    rng = np.random.default_rng(job["seed"])

    def provider():  # epochs over the cache in a fresh random order, like any shuffling loader
        B = job["batch_size"]
        while True:
            order = rng.permutation(acts.shape[0])
            for s in range(0, len(order) - B + 1, B):
                yield torch.from_numpy(np.array(acts[np.sort(order[s:s + B])]))

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=job["d_in"], d_sae=job["d_sae"], k=job["k"],
                                                normalize_activations="expected_average_only_in"))
    cfg = SAETrainerConfig(total_training_samples=job["train_tokens"], train_batch_size_samples=job["batch_size"],
                           lr=job["lr"], lr_end=0.0, lr_warm_up_steps=job["warmup_steps"],
                           lr_decay_steps=job["decay_steps"], n_batches_for_norm_estimate=job["init_batches"],
                           logger=LoggingConfig(log_to_wandb=False))
    t0 = time.perf_counter()
    trainer = SAETrainer(cfg, sae, provider())
    trained = trainer.fit()
    out = Path(job["out"])
    trained.save_inference_model(out / "sae")
    fit_s = time.perf_counter() - t0

    inference = sae_lens.SAE.load_from_disk(out / "sae")
    x = torch.from_numpy(np.array(np.load(job["heldout"], mmap_mode="r")))
    with torch.no_grad():
        x_hat = inference.decode(inference.encode(x))
    fvu = float((x - x_hat).double().pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum())
    (out / "result.json").write_text(json.dumps({"fit_s": fit_s, "fvu_own": fvu, "version": sae_lens.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
