"""
Build the whole feature atlas: SAEs, DuckDB feature store, static site, Neuronpedia export.

    python -m scripts.build_atlas --layers 4,10,16
    python -m scripts.build_atlas --checkpoint ~/.cache/nanochat/base_checkpoints/d20 --layers 5,10,15
    python -m scripts.build_atlas --data my_corpus.jsonl --arch topk --k 64 --train-tokens 5000000

Without --checkpoint it uses the latest base model under $NANOCHAT_BASE_DIR, and without one
of those the embedded demo model (built once, ~5 minutes on 2 CPU cores, then cached).
A rerun skips finished stages whose inputs did not change; --force rebuilds them.

On several processes (CPU ranks or GPUs), the same flags under torchrun:
    torchrun --standalone --nproc_per_node=8 -m scripts.build_atlas --layers 4,10,16
"""

import argparse
import sys

from atlas.pipeline import AtlasConfig, build_atlas
from nanochat.distributed import RankFailure, init_distributed, shutdown
from sae.config import ARCHITECTURES
from scripts._cli import flag_adder


def parse_layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers expects comma-separated integers, got {text!r}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m scripts.build_atlas",
                                 description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add = flag_adder(ap)
    add("--layers", "--layer", type=parse_layers, default=None,
        help="comma-separated layer ids (default: n/4, n/2, 3n/4)")
    add("--out", default="atlas_out", help="the static site (default atlas_out)")
    add("--work", default=None,
        help="SAEs, feature store, exports (default <out>_work)")
    add("--checkpoint", default=None, help="nanochat checkpoint dir or model_<step>.pt")
    add("--data", default=None,
        help="corpus (.parquet/.txt/.jsonl file or dir); its last part is held out for mining")
    add("--hook", default="resid_post", help="hook kind (default resid_post)")
    add("--arch", default="batchtopk", choices=ARCHITECTURES)
    add("--width", type=int, default=None, help="latents per SAE (default 8 x d_model)")
    add("--expansion", type=float, default=8.0)
    add("--k", type=int, default=32)
    add("--train-tokens", type=int, default=None,
        help="SAE training tokens (default 500k on CPU, 50M on GPU)")
    add("--mine-tokens", type=int, default=None,
        help="held-out tokens to mine (default 250k on CPU, 10M on GPU)")
    add("--model-id", default=None, help="Neuronpedia model id (default from the checkpoint)")
    add("--source-set", default=None,
        help="Neuronpedia source-set name (default e.g. atlas-res-1k)")
    add("--device", default=None, help="cuda | mps | cpu (default: best available)")
    add("--force", action="store_true", help="rebuild every stage")
    add("--quiet", action="store_true")
    args = ap.parse_args(argv)
    cfg = AtlasConfig(layers=args.layers, out=args.out, work=args.work, checkpoint=args.checkpoint,
                      data=args.data, hook=args.hook, arch=args.arch, width=args.width,
                      expansion=args.expansion, k=args.k, train_tokens=args.train_tokens,
                      mine_tokens=args.mine_tokens, device=args.device, model_id=args.model_id,
                      source_set=args.source_set,
                      force=args.force, quiet=args.quiet)
    ctx = init_distributed(args.device)  # torchrun's process group, if launched by torchrun
    ok = False
    try:
        build_atlas(cfg, ctx)
        ok = True
    except RankFailure as e:
        print(f"error (rank {ctx.rank}): {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown(clean=ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
