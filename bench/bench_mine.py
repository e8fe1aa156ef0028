"""
Feature mining tokens/s against the work it cannot avoid, measured side by side in one run.

    python -m bench.bench_mine [--checkpoint DIR] [--data PATH] [--tokens 65536] [--layers 1,3]
                               [--d-sae 4096] [--k 32] [--arch topk] [--batch-tokens 8192]
                               [--repeats 2] [--device cpu]

Baseline: the same batches of the same held-out windows, one forward stopped after the deepest
hooked block, then every SAE's encode (what any feature dashboard must compute). Mining: the
full streaming pass of `atlas.mine.mine_features` over the same tokens (statistics, windows,
resumable state save), timed without the end-of-pass table building, which is reported apart.
Overhead = baseline tokens/s / mining tokens/s - 1; the target is <= 15%. Runs alternate
baseline and mining `--repeats` times and keep each one's best, so machine noise hits both.

Model: --checkpoint, else the nanochat_d4 fixture (../shared/fixtures), else the demo model.
SAEs: randomly initialised SAEs of the given shape (speed only; what they encode is irrelevant
to the cost of bookkeeping, which depends on d_sae and the number of active latents).
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
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--layers", default="1,3")
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--arch", default="topk", choices=("topk", "relu"))
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device")
    args = ap.parse_args()

    device = autodetect_device(args.device)
    checkpoint = args.checkpoint or (FIXTURE if FIXTURE.exists() else None)
    source = resolve_model(checkpoint, device=device, quiet=True)
    corpus = resolve_corpus(source, args.data)
    layers = [int(x) for x in args.layers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        saes = make_saes(source, layers, args, tmp / "saes")
        cfg = MineConfig(tokens=args.tokens, batch_tokens=args.batch_tokens, force=True)
        base, mine, final = [], [], []
        for r in range(args.repeats):
            base.append(baseline(source, corpus, saes, cfg, device))
            out = mine_features(find_saes(tmp / "saes"), source, corpus, tmp / f"f{r}.duckdb", cfg,
                                quiet=True)
            mine.append(out["tokens"] / out["pass_seconds"])
            final.append(out["finalize_seconds"])
    b, m = max(base), max(mine)
    c = source.model.config
    print(f"| model | device | SAEs | tokens | baseline tok/s | mining tok/s | overhead | finalize |")
    print(f"|---|---|---|---|---|---|---|---|")
    print(f"| {source.model_id} (d_model {c.n_embd}) | {device} | {len(layers)} x {args.arch} "
          f"{args.d_sae} (k {args.k}) | {out['tokens']:,} | {b:,.0f} | {m:,.0f} | "
          f"{(b / m - 1) * 100:+.1f}% | {min(final):.1f}s |")


def make_saes(source, layers, args, out: Path) -> list:
    d = source.model.config.n_embd
    saes = []
    for layer in layers:
        cfg = SAEConfig(d_in=d, d_sae=args.d_sae, architecture=args.arch,
                        k=args.k if args.arch == "topk" else None, hook_name=hook_name(layer),
                        model_id=source.model_id, checkpoint=str(source.checkpoint_dir))
        sae = build_sae(cfg, torch.Generator().manual_seed(layer))
        if args.arch == "relu":  # a bias that leaves about k latents active per token
            with torch.no_grad():
                sae.b_enc.fill_(-2.0)
        path = save_sae(sae, out / cfg.hook_name)
        saes.append(load_sae(path, device=str(source.model.get_device())))
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
