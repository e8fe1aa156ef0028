"""
Feature mining tokens/s against the work it cannot avoid, measured side by side in one run.

    python -m bench.bench_mine [--checkpoint DIR] [--data PATH] [--tokens 262144] [--layers 1,3]
                               [--d-sae 4096] [--k 32] [--arch topk|jumprelu] [--batch-tokens 8192]
                               [--repeats 1] [--device cpu]
    python -m bench.bench_mine --sae-dir atlas_out/saes ...   # trained SAEs instead of random ones

Baseline: the same batches of the same held-out windows, one forward stopped after the deepest
hooked block, then every SAE's encode (what any feature dashboard must compute). Mining: the
full streaming pass of `atlas.mine.mine_features` over the same tokens (statistics, windows,
resumable state save), timed without the end-of-pass table building, which is reported apart.
Overhead = baseline tokens/s / mining tokens/s - 1; the target is <= 15%. Runs alternate
baseline and mining `--repeats` times and keep each one's best, so machine noise hits both.

Model: --checkpoint, else the nanochat_d4 fixture (../shared/fixtures), else the demo model.
SAEs: trained ones with --sae-dir (their sparsity is what the cost of bookkeeping depends on),
else randomly initialised TopK SAEs of the given shape, or JumpReLU SAEs (the inference form of
the default BatchTopK) whose per-latent thresholds fire on about k/d_sae of the first batch's
tokens; random JumpReLUs have a far more skewed L0 than trained ones (median 0, a tail in the
hundreds), which makes them a stress test of the coactivation cap rather than a typical case.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from atlas.mine import MineConfig, find_saes, mine_features
from nanochat.common import autocast, autodetect_device
from nanochat.dataset import iter_batches, iter_documents, iter_windows
from nanochat.model_source import resolve_corpus, resolve_model
from sae import SAEConfig, build_sae, load_sae, save_sae
from sae.hooks import hook_name, run_with_capture

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nanochat_d4" / "base_checkpoints" / "d4"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--checkpoint")
    ap.add_argument("--data")
    ap.add_argument("--tokens", type=int, default=262_144)
    ap.add_argument("--layers", default="1,3")
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--arch", default="topk", choices=("topk", "jumprelu"))
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device")
    ap.add_argument("--sae-dir", help="trained SAE folders to mine (default: random SAEs)")
    args = ap.parse_args()

    device = autodetect_device(args.device)
    checkpoint = args.checkpoint or (FIXTURE if FIXTURE.exists() else None)
    source = resolve_model(checkpoint, device=device, quiet=True)
    corpus = resolve_corpus(source, args.data)
    layers = [int(x) for x in args.layers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.sae_dir:
            sae_paths = find_saes(args.sae_dir)
            saes = [load_sae(p, device=str(device)) for p in sae_paths]
            label = f"{len(saes)} x trained {saes[0].cfg.architecture} {saes[0].cfg.d_sae}"
        else:
            saes = make_saes(source, corpus, layers, args, tmp / "saes")
            sae_paths = find_saes(tmp / "saes")
            label = f"{len(layers)} x random {args.arch} {args.d_sae} (k {args.k})"
        cfg = MineConfig(tokens=args.tokens, batch_tokens=args.batch_tokens, force=True)
        base, mine, final = [], [], []
        for r in range(args.repeats):
            base.append(baseline(source, corpus, saes, cfg, device))
            out = mine_features(sae_paths, source, corpus, tmp / f"f{r}.duckdb", cfg, quiet=True)
            mine.append(out["tokens"] / out["pass_seconds"])
            final.append(out["finalize_seconds"])
    b, m = max(base), max(mine)
    c = source.model.config
    print(f"| model | device | SAEs | tokens | baseline tok/s | mining tok/s | overhead | finalize |")
    print(f"|---|---|---|---|---|---|---|---|")
    print(f"| {source.model_id} (d_model {c.n_embd}) | {device} | {label} | {out['tokens']:,} | "
          f"{b:,.0f} | {m:,.0f} | {(b / m - 1) * 100:+.1f}% | {min(final):.1f}s |")


@torch.no_grad()
def make_saes(source, corpus, layers, args, out: Path) -> list:
    model, tok = source.model, source.tokenizer
    d = model.config.n_embd
    hooks = [hook_name(layer) for layer in layers]
    windows = iter_windows(iter_documents(corpus, "val"), tok, model.config.sequence_len)
    batch = next(iter_batches(windows, max(1, args.batch_tokens // model.config.sequence_len),
                              tok.get_bos_token_id()))
    flat = batch.valid.reshape(-1).nonzero().squeeze(1)
    acts = run_with_capture(model, batch.idx.to(model.get_device()), hooks)
    saes = []
    for layer, hook in zip(layers, hooks):
        cfg = SAEConfig(d_in=d, d_sae=args.d_sae, architecture=args.arch,
                        k=args.k if args.arch == "topk" else None, hook_name=hook,
                        model_id=source.model_id, checkpoint=str(source.checkpoint_dir),
                        jumprelu_sparsity="step")
        sae = build_sae(cfg, torch.Generator().manual_seed(layer)).to(model.get_device())
        if args.arch == "jumprelu":  # per-latent threshold at its (1 - k/d_sae) quantile
            pre = sae.pre_acts(acts[hook].reshape(batch.idx.numel(), -1)[flat.to(model.get_device())].float())
            q = int((1 - args.k / args.d_sae) * (pre.shape[0] - 1))
            sae.threshold.copy_(pre.sort(dim=0).values[q].clamp(min=0))
        path = save_sae(sae.cpu(), out / cfg.hook_name)
        saes.append(load_sae(path, device=str(model.get_device())))
    return saes


@torch.inference_mode()
def baseline(source, corpus, saes, cfg: MineConfig, device) -> float:
    """tokens/s of forward (stopped after the deepest hook) + every SAE's encode."""
    model, tok = source.model, source.tokenizer
    seq_len = model.config.sequence_len
    hooks = sorted({s.cfg.hook_name for s in saes})
    windows = iter_windows(iter_documents(corpus, "val"), tok, seq_len)
    n = 0
    t0 = time.perf_counter()
    for batch in iter_batches(windows, max(1, cfg.batch_tokens // seq_len), tok.get_bos_token_id()):
        idx = batch.idx.to(device)
        flat = batch.valid.reshape(-1).nonzero().squeeze(1).to(device)
        with autocast(device):
            acts = run_with_capture(model, idx, hooks)
        for s in saes:
            s.encode(acts[s.cfg.hook_name].reshape(idx.numel(), -1)[flat].float())
        n += flat.numel()
        if n >= cfg.tokens:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


if __name__ == "__main__":
    main()
