"""
Train SAEs on a nanochat model's activations, one per layer, from one shared activation stream.

    python -m scripts.sae_train --layers 4,10,16                       # the demo / latest base model
    python -m scripts.sae_train --layers 10 --arch topk --k 64 --expansion 16 --tokens 50000000 \
        --checkpoint ~/.cache/nanochat/base_checkpoints/d20 --out atlas_out/saes
    python -m scripts.sae_train --layers 4,10,16 --out atlas_out/saes --resume   # after an interruption
    python -m scripts.sae_train --checkpoint path/to/model_000650.pt --layer 10  # the PR #169 form
    torchrun --standalone --nproc_per_node 2 -m scripts.sae_train --layers 4,10,16   # 2 ranks, data-parallel
    torchrun --standalone --nproc_per_node 3 -m scripts.sae_train --layers 4,10,16 --layer-parallel

Writes OUT/<hook name>/ per SAE (SAELens cfg.json + sae_weights.safetensors + sparsity.safetensors,
eval.json with training-stream and spliced val metrics, training_state.pt) and OUT/checkpoint.pt
(resumable state). Underscore spellings of every flag work too (--expansion_factor, --hook_type,
--output_dir, --num_activations, --learning_rate, --batch_size, ...).

Under torchrun the flags mean the same (--batch-size and --tokens are global); each rank streams its
share of the corpus; only rank 0 prints and writes. A run resumes with the same number of ranks.
"""

from __future__ import annotations

import argparse
import sys

from nanochat.common import auto_threads
from nanochat.distributed import RankFailure, init_distributed, shutdown
from sae.config import ARCHITECTURES
from sae.hooks import HOOK_KINDS
from sae.train_run import RunConfig, run_training
from scripts._cli import flag_adder

# the PR #169 CLI's short hook names
_HOOK_ALIASES = {"attn": "attn_out", "mlp": "mlp_out"}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = run_config(args)
        ctx = init_distributed(cfg.device)  # a single process without torchrun's environment
        auto_threads(ctx.device)  # one CPU thread when the machine is busy (nanochat.common)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tag = f"rank {ctx.rank}: " if ctx.enabled else ""
    ok = False
    try:
        run_training(cfg, ctx=ctx)
        ok = True
    except FileExistsError as e:
        print(f"{tag}error: {e}\nadd --resume to continue that run, or choose another --out", file=sys.stderr)
        return 2
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"{tag}error: {e}", file=sys.stderr)
        return 2
    except RankFailure as e:
        print(f"{tag}error: {e}", file=sys.stderr)
        return 1
    finally:
        shutdown(clean=ok)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.sae_train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    add = flag_adder(p)
    add("--layers", "--layer", help="comma-separated layers, e.g. 4,10,16 (default: n/4, n/2, 3n/4)")
    add("--hook", "--hook-type", default="resid_post",
        help=f"hook kind: {', '.join(k.removeprefix('hook_') for k in HOOK_KINDS)} "
             f"(also attn = attn_out, mlp = mlp_out)")
    add("--arch", "--activation", "--architecture", default="batchtopk", choices=ARCHITECTURES,
        metavar="ARCH", help=f"SAE architecture: {', '.join(ARCHITECTURES)} (default batchtopk)")
    add("--width", type=int, help="latents per SAE (default: expansion × d_model)")
    add("--expansion", "--expansion-factor", type=float, default=8.0, help="width / d_in when --width is not given (default 8)")
    add("--k", type=int, default=32, help="active latents per token for topk/batchtopk (default 32)")
    add("--l1-coefficient", type=float, help="sparsity weight for relu/gated/jumprelu")
    add("--tokens", "--num-activations", type=int,
        help="training tokens per SAE (default 500,000 on CPU, about 3 minutes for 3 SAEs on the demo "
             "model with 2 cores; 50,000,000 on CUDA)")
    add("--num-epochs", type=int, default=1,
        help="PR #169 compatibility: multiplies --tokens (fresh tokens are streamed, not repeated)")
    add("--batch-size", type=int,
        help="tokens per optimizer step (default 4096, down to 1024 for runs shorter than 400 steps)")
    add("--lr", "--learning-rate", type=float, help="Adam learning rate (default 2e-4/sqrt(width/16384)·sqrt(batch/8192))")
    add("--checkpoint", help="nanochat checkpoint dir or model_<step>.pt (default: latest base model "
                             "under $NANOCHAT_BASE_DIR, else the demo model)")
    add("--data", help="corpus file or dir (.parquet/.txt/.jsonl; default: the model's own corpus)")
    add("--out", "--output-dir", default="atlas_out/saes", help="output dir (default atlas_out/saes)")
    add("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    add("--device", help="cuda, mps or cpu (default: best available)")
    add("--seq-len", type=int, help="window length in tokens, BOS included (default: the model's)")
    add("--buffer-tokens", type=int, help="shuffle-buffer size in tokens (default: by --buffer-mb)")
    add("--buffer-mb", type=float, default=1024.0, help="shuffle-buffer memory budget (default 1024)")
    add("--cache-activations", action="store_true",
        help="store the stream's activations on disk and reuse them in later runs with the same "
             "model, corpus, hooks and token count")
    add("--cache-dir", help="activation cache root (default $NANOCHAT_ATLAS_CACHE/activations)")
    add("--cache-dtype", default="float16", choices=("float16", "float32"))
    add("--eval-tokens", type=int,
        help="val-split tokens for the spliced evaluation (ΔCE, KL); 0 skips it (default 16384 on CPU, "
             "1048576 on CUDA)")
    add("--seed", type=int, default=0)
    add("--quiet", action="store_true", help="no progress bars or messages")
    add("--layer-parallel", action="store_true",
        help="under torchrun: each rank trains the SAEs of some of the layers and receives those "
             "layers' activations (default: data-parallel, every rank trains every SAE)")
    add("--prepare-neuronpedia", action="store_true", help=argparse.SUPPRESS)
    return p


def run_config(args) -> RunConfig:
    if args.prepare_neuronpedia:
        raise ValueError("--prepare_neuronpedia is not part of training here: train, then run "
                         "python -m scripts.neuronpedia_export")
    if args.num_epochs < 1:
        raise ValueError(f"--num-epochs={args.num_epochs}: expected >= 1")
    layers = None
    if args.layers:
        try:
            layers = [int(x) for x in str(args.layers).split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--layers {args.layers!r}: expected comma-separated integers") from None
    hook = args.hook.removeprefix("hook_")
    return RunConfig(layers=layers, hook=_HOOK_ALIASES.get(hook, hook), architecture=args.arch,
                     width=args.width, expansion=args.expansion, k=args.k,
                     l1_coefficient=args.l1_coefficient, tokens=args.tokens * args.num_epochs if args.tokens else None,
                     batch_size=args.batch_size, lr=args.lr, checkpoint=args.checkpoint,
                     data=args.data, out=args.out, resume=args.resume, device=args.device,
                     seq_len=args.seq_len, buffer_tokens=args.buffer_tokens,
                     buffer_mb=args.buffer_mb, cache_activations=args.cache_activations,
                     cache_dir=args.cache_dir, cache_dtype=args.cache_dtype,
                     eval_tokens=args.eval_tokens, seed=args.seed, quiet=args.quiet,
                     layer_parallel=args.layer_parallel)


if __name__ == "__main__":
    sys.exit(main())
