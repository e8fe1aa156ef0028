"""
Mine trained SAEs into the DuckDB feature store: one pass over held-out text for every SAE.

    python -m scripts.mine_features --sae-dir atlas_out/saes                     # demo / latest base model
    python -m scripts.mine_features --sae-dir atlas_out/saes --tokens 10000000 \
        --checkpoint ~/.cache/nanochat/base_checkpoints/d20 --store atlas_out/features.duckdb
    python -m scripts.mine_features --sae-dir atlas_out/saes --data my_corpus/   # held-out part of --data

The model is chosen as in sae_train (--checkpoint, else $NANOCHAT_BASE_DIR's latest base model,
else the demo model) and each SAE is checked against the model it was trained on. The text is the
held-out split of the model's own corpus (nanochat's val shard; the demo corpus's held-out shard),
or of --data. An interrupted run resumes from its last saved chunk when rerun with the same
command; rerunning a finished one changes nothing. Query the store with SQL: see docs/store.md.
Underscore spellings of every flag work too (--sae_dir, --batch_tokens, ...).

Under torchrun the same command mines on N processes (NCCL on GPUs, cuda:LOCAL_RANK; gloo on CPU):
each rank mines its share of the documents and of --tokens, rank 0 merges every rank's statistics
and alone writes the store and prints (see docs/distributed_mining.md):

    torchrun --standalone --nproc_per_node 8 -m scripts.mine_features --sae-dir atlas_out/saes --tokens 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from atlas.mine import MineConfig, find_saes, mine_features
from nanochat.common import auto_threads
from nanochat.distributed import RankFailure, agree, init_distributed, shutdown
from nanochat.model_source import resolve_corpus, resolve_model
from scripts._cli import flag_adder


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ok = False
    try:
        ctx = init_distributed(args.device)
        auto_threads(ctx.device)  # one CPU thread when the machine is busy (nanochat.common)
        quiet = args.quiet or not ctx.is_main
        try:  # every rank loads the model; one rank's failure here is raised on all
            cfg = mine_config(args)
            saes = find_saes(args.sae_dir)
            source = resolve_model(args.checkpoint, device=ctx.device, quiet=quiet)
            corpus = resolve_corpus(source, args.data)
            error = None
        except Exception as e:
            error = e
        agree(ctx, error)
        if not quiet:
            print(f"model: {source.describe()}", file=sys.stderr)
            print(f"SAEs: {', '.join(str(p) for p in saes)}", file=sys.stderr)
            if ctx.enabled:
                print(f"torchrun: {ctx.world} ranks on {ctx.device.type}; rank 0 merges and "
                      f"writes", file=sys.stderr)
        out = mine_features(saes, source, corpus, Path(args.store), cfg, quiet=args.quiet, ctx=ctx)
        ok = True
    except RankFailure as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, KeyError, ValueError, OverflowError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last saved chunk",
              file=sys.stderr)
        return 130
    finally:
        shutdown(clean=ok)
    if ctx.is_main:
        if not args.quiet and not out["skipped"]:
            print(f"{out['tokens']:,} tokens, {out['documents']:,} documents, "
                  f"{out['tokens_per_s']:,.0f} tokens/s -> {out['store']}", file=sys.stderr)
        print(out["store"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.mine_features", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    d = MineConfig()
    add = flag_adder(p)
    add("--sae-dir", required=True, help="an SAE folder, or a folder holding SAE folders")
    add("--store", default="atlas_out/features.duckdb", help="output DuckDB file (default atlas_out/features.duckdb)")
    add("--checkpoint", help="nanochat checkpoint dir or model_<step>.pt (default: latest base model "
                             "under $NANOCHAT_BASE_DIR, else the demo model)")
    add("--data", help="corpus file or dir (.parquet/.txt/.jsonl); its held-out part is mined "
                       "(default: the model's own corpus)")
    add("--tokens", type=int, default=d.tokens, help=f"held-out tokens to mine, BOS excluded (default {d.tokens:,}; 0: all)")
    add("--split", default=d.split, choices=("val", "train", "all"), help="corpus split (default val)")
    add("--seq-len", type=int, help="window length, BOS included (default: the SAEs' context size, else the model's)")
    add("--batch-tokens", type=int, default=d.batch_tokens, help=f"tokens per forward (default {d.batch_tokens})")
    add("--chunk-tokens", type=int, default=d.chunk_tokens, help=f"tokens between resumable saves (default {d.chunk_tokens:,})")
    add("--top-k", type=int, default=d.top_k, help=f"top examples per feature (default {d.top_k})")
    add("--n-bins", type=int, default=d.n_bins, help=f"interval (quantile) bins (default {d.n_bins})")
    add("--per-bin", type=int, default=d.per_bin, help=f"examples per interval bin (default {d.per_bin})")
    add("--ctx-before", type=int, default=d.ctx_before, help=f"window tokens before the activation (default {d.ctx_before})")
    add("--ctx-after", type=int, default=d.ctx_after, help=f"window tokens after it (default {d.ctx_after})")
    add("--n-neighbors", type=int, default=d.n_neighbors, help=f"neighbours per feature and kind (default {d.n_neighbors})")
    add("--n-lineage", type=int, default=d.n_lineage,
        help=f"nearest features in each adjacent layer's SAE (default {d.n_lineage})")
    add("--no-check-model", dest="check_model", action="store_false",
        help="mine even if an SAE records another model or checkpoint")
    add("--force", action="store_true", help="mine again even if the store is up to date")
    add("--device", help="cuda, mps or cpu (default: best available)")
    add("--seed", type=int, default=d.seed)
    add("--quiet", action="store_true", help="no progress bar or messages")
    return p


def mine_config(args) -> MineConfig:
    return MineConfig(tokens=args.tokens or None, split=args.split, seq_len=args.seq_len,
                      batch_tokens=args.batch_tokens, chunk_tokens=args.chunk_tokens,
                      top_k=args.top_k, n_bins=args.n_bins, per_bin=args.per_bin,
                      ctx_before=args.ctx_before, ctx_after=args.ctx_after,
                      n_neighbors=args.n_neighbors, n_lineage=args.n_lineage,
                      check_model=args.check_model,
                      seed=args.seed, force=args.force)


if __name__ == "__main__":
    sys.exit(main())
