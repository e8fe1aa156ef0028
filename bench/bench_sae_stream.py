"""
Activation streaming throughput: the multi-layer stream against the bare model forward it is built on.

    python -m bench.bench_sae_stream [--checkpoint DIR] [--layers 4,10,16] [--tokens 65536]

Three variants over the same corpus text, tokens/s counted as non-BOS tokens delivered:
- bare: `model(idx, stop_after_layer=deepest)` on pre-tokenized, pre-batched windows (the floor cost);
- stream: `corpus_stream` with all layers at once (tokenize, forward, capture, BOS mask, shuffle
  buffer, fp32 batches), i.e. what the trainer consumes;
- one layer at a time: three single-hook streams, one after the other (what a per-layer trainer pays).
Variants are interleaved over `--repeats` rounds and the best round of each is kept, so machine
noise hits all of them alike; the ratios are what to read. Model: --checkpoint, else
$NANOCHAT_BASE_DIR's latest base model, else the demo model (nanochat.model_source); text: its corpus.
"""

import argparse
import time

import torch

from nanochat.common import autocast, autodetect_device
from nanochat.dataset import iter_batches, iter_documents, iter_windows
from nanochat.model_source import resolve_corpus, resolve_model
from sae.activations import StreamConfig, corpus_stream
from sae.hooks import hook_name
from sae.train_run import default_layers


def bare_forward(model, batches, deepest, device) -> float:
    n, t0 = 0, time.perf_counter()
    with torch.inference_mode(), autocast(device):
        for b in batches:
            model(b.idx.to(device), stop_after_layer=deepest)
            n += int(b.valid.sum())
    _sync(device)
    return n / (time.perf_counter() - t0)


def stream(source, corpus, hooks, args, device) -> float:
    cfg = StreamConfig(hooks, batch_size=args.batch_size, buffer_tokens=args.buffer_tokens,
                       seq_len=args.seq_len, forward_windows=args.forward_windows)
    s = corpus_stream(source.model, source.tokenizer, corpus, cfg, device=device, log=lambda m: None)
    t0 = time.perf_counter()
    while s.tokens_served < args.tokens:
        next(s)
    _sync(device)
    return s.tokens_served / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint")
    ap.add_argument("--data")
    ap.add_argument("--layers", help="comma-separated (default n/4, n/2, 3n/4)")
    ap.add_argument("--tokens", type=int, default=65_536, help="tokens per variant per round")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--buffer-tokens", type=int, default=16_384)
    ap.add_argument("--forward-windows", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device")
    args = ap.parse_args()
    device = autodetect_device(args.device)
    source = resolve_model(args.checkpoint, device, quiet=True)
    corpus = resolve_corpus(source, args.data)
    model = source.model
    layers = [int(x) for x in args.layers.split(",")] if args.layers else default_layers(model.config.n_layer)
    hooks = [hook_name(layer) for layer in layers]
    args.seq_len = args.seq_len or model.config.sequence_len
    bos = source.tokenizer.get_bos_token_id()

    windows = iter_windows(iter_documents(corpus, "train"), source.tokenizer, args.seq_len)
    batches, n = [], 0
    for b in iter_batches(windows, args.forward_windows, bos):
        batches.append(b)
        n += int(b.valid.sum())
        if n >= args.tokens:
            break

    best = {"bare": 0.0, "stream": 0.0, "per_layer": 0.0}
    bare_forward(model, batches[:1], max(layers), device)  # warm-up
    for _ in range(args.repeats):
        best["bare"] = max(best["bare"], bare_forward(model, batches, max(layers), device))
        best["stream"] = max(best["stream"], stream(source, corpus, hooks, args, device))
        # one single-hook stream per layer, each delivering the same tokens: tokens/s per SAE-batch
        times = [args.tokens / stream(source, corpus, [h], args, device) for h in hooks]
        best["per_layer"] = max(best["per_layer"], args.tokens / sum(times))

    print(f"{source.describe()}")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; layers {layers}; "
          f"{args.tokens:,} tokens per variant, window {args.seq_len}, {args.forward_windows} windows/forward, "
          f"buffer {args.buffer_tokens:,}, best of {args.repeats}")
    print("| variant | tokens/s (all layers delivered) | vs bare forward |")
    print("|---|---|---|")
    print(f"| bare forward to block {max(layers)} | {best['bare']:,.0f} | 1.00x |")
    print(f"| stream, {len(layers)} layers in one forward | {best['stream']:,.0f} | "
          f"{best['stream'] / best['bare']:.2f}x |")
    print(f"| {len(layers)} single-layer streams | {best['per_layer']:,.0f} | "
          f"{best['per_layer'] / best['bare']:.2f}x |")
    print(f"multi-layer stream vs one stream per layer: {best['stream'] / best['per_layer']:.2f}x")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
