"""
Train a small nanochat base model from scratch into nanochat's on-disk layout. With no flags it
builds (or reuses) the embedded demo model that every command falls back to when there is no
nanochat checkpoint: 20 layers x 128 wide, a 4096-token BPE tokenizer, trained on the Python
standard library's sources and pydoc topics (about 5 minutes on 2 CPU cores).

    python -m scripts.base_train                                   # the demo, cached
    python -m scripts.base_train --force                           # rebuild it
    python -m scripts.base_train --preset tiny                     # seconds: for tests and CI
    python -m scripts.base_train --depth 8 --width 256 --tokens 2000000 --out runs/d8
    python -m scripts.base_train --data my_corpus.jsonl --out runs/mine --steps 500

Output: a directory laid out like $NANOCHAT_BASE_DIR (base_data/ shards, tokenizer/,
base_checkpoints/d<depth>/model_<step>.pt + meta_<step>.json) plus demo.json (config, stats,
size + sha256 of every file). Without --out it goes to $NANOCHAT_ATLAS_CACHE/demo/<config>/
(`default` for the default settings). A rerun with the same settings reuses a verified build
at once; an interrupted build resumes from its last training checkpoint (saved every ~60 s).
Underscore spellings of every flag work too (--vocab_size, --seq_len, --batch_size, ...).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from nanochat.demo import (PRESETS, DemoConfig, ensure_demo, ensure_demo_at, load_demo_info,
                           preset_config)
from scripts._cli import flag_adder


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = demo_config(args)
        config.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_settings(config, args.out)
    t0 = time.time()
    try:
        if args.out:
            path = ensure_demo_at(args.out, config, quiet=args.quiet, force=args.force)
        else:
            path = ensure_demo(config=config, quiet=args.quiet, force=args.force)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(path, time.time() - t0, explicit_out=bool(args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.base_train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    add = flag_adder(p)
    d = PRESETS["default"]
    add("--preset", choices=sorted(PRESETS),
        help="start from a named config; the flags below override it (default: "
             "$NANOCHAT_ATLAS_DEMO, else 'default')")
    add("--depth", type=int, help=f"transformer layers (default {d.depth})")
    add("--width", "--n-embd", "--model-dim", type=int, help=f"model width n_embd (default {d.n_embd})")
    add("--heads", "--n-head", type=int, help="attention heads (default: width / 64)")
    add("--vocab-size", type=int, help=f"tokenizer vocab (default {d.vocab_size})")
    add("--seq-len", "--max-seq-len", type=int,
        help=f"training window in tokens, BOS included (default {d.seq_len})")
    add("--tokens", type=int, help=f"training tokens (default {d.tokens:,})")
    add("--steps", "--num-iterations", type=int, help="optimizer steps (overrides --tokens)")
    add("--batch-size", "--device-batch-size", type=int, help=f"windows per step (default {d.batch_size})")
    add("--lr", "--matrix-lr", type=float, help=f"AdamW lr of the block matrices (default {d.lr})")
    add("--embedding-lr", type=float, help=f"(default {d.embedding_lr})")
    add("--unembedding-lr", type=float, help=f"(default {d.unembedding_lr})")
    add("--warmup-steps", type=int, help=f"(default {d.warmup_steps})")
    add("--warmdown-frac", type=float, help=f"fraction of steps that decay linearly to 0 (default {d.warmdown_frac})")
    add("--seed", type=int, help=f"(default {d.seed})")
    add("--eval-tokens", type=int,
        help=f"val tokens for the final loss and the unigram baseline (default {d.eval_tokens:,})")
    add("--data", help="train on this corpus (.parquet/.txt/.jsonl file or dir; default: the "
                       "Python stdlib + pydoc topics); its own train/val split is kept")
    add("--max-corpus-chars", type=int, help="use at most this many characters of the corpus")
    add("--out", "--output-dir", help="build exactly here (default $NANOCHAT_ATLAS_CACHE/demo/<config>)")
    add("--force", action="store_true", help="rebuild even if a verified build exists")
    add("--device", help="cuda, mps or cpu (default: best available)")
    add("--threads", type=int, help="CPU threads (default: every core)")
    add("--quiet", action="store_true", help="no progress bar or messages")
    return p


# flag -> DemoConfig field
_FIELDS = {"depth": "depth", "width": "n_embd", "heads": "n_head", "vocab_size": "vocab_size",
           "seq_len": "seq_len", "tokens": "tokens", "steps": "steps", "batch_size": "batch_size",
           "lr": "lr", "embedding_lr": "embedding_lr", "unembedding_lr": "unembedding_lr",
           "warmup_steps": "warmup_steps", "warmdown_frac": "warmdown_frac", "seed": "seed",
           "eval_tokens": "eval_tokens", "max_corpus_chars": "max_corpus_chars",
           "device": "device", "threads": "threads"}


def demo_config(args) -> DemoConfig:
    """The preset, with every flag that was given on top."""
    overrides = {field: getattr(args, flag) for flag, field in _FIELDS.items()
                 if getattr(args, flag) is not None}
    if args.data:
        overrides["data"] = str(Path(args.data).expanduser().absolute())
    if args.tokens is not None and args.steps is None:
        overrides["steps"] = None  # --tokens replaces a preset's step count
    return replace(preset_config(args.preset), **overrides)


def print_settings(config: DemoConfig, out) -> None:
    print(f"base_train: {config.model_id}, {config.depth} layers x {config.n_embd} wide, "
          f"{_plural(config.heads, 'head')}, vocab {config.vocab_size}, seq_len {config.seq_len}")
    print(f"  {config.num_steps()} steps x {config.batch_size} windows "
          f"(~{config.num_steps() * config.batch_size * config.seq_len:,} tokens); "
          f"lr {config.lr} (matrices), {config.embedding_lr} (embedding), "
          f"{config.unembedding_lr} (unembedding); seed {config.seed}")
    print(f"  corpus: {config.data or 'Python stdlib + pydoc topics'}"
          f"{f' (at most {config.max_corpus_chars:,} chars)' if config.max_corpus_chars else ''}; "
          f"output: {out or f'$NANOCHAT_ATLAS_CACHE/demo/{config.dirname()}'}")


def print_summary(path: Path, seconds: float, explicit_out: bool) -> None:
    info = load_demo_info(path)
    t = info["training"]
    print(f"done in {seconds:.0f} s: {path}")
    print(f"  model: {path / 'base_checkpoints' / ('d' + str(info['config']['depth']))}")
    print(f"  trained {t['steps']} steps, {t['train_tokens']:,} tokens in {t['train_seconds']:.0f} s "
          f"({t['tokens_per_s']:,} tokens/s on {t['device']}, {_plural(t['threads'], 'thread')})")
    print(f"  val loss {t['val_loss']:.3f} nats/token = {t['val_bpb']:.3f} bits/byte; "
          f"unigram baseline {t['unigram_val_loss']:.3f} nats/token = "
          f"{t['unigram_val_bpb']:.3f} bits/byte ({t['val_tokens']:,} val tokens)")
    if explicit_out:
        print(f"  use it: NANOCHAT_BASE_DIR={path} python -m scripts.build_atlas ...")
    else:
        print("  every command uses it when there is no nanochat checkpoint ($NANOCHAT_BASE_DIR)")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


if __name__ == "__main__":
    sys.exit(main())
