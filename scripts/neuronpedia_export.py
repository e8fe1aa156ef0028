"""
Export the DuckDB feature store to Neuronpedia's bulk-import layout, plus the request bodies
for its REST API and SAEDashboard-compatible batch files.

    python -m scripts.neuronpedia_export --store atlas_out_work/features.duckdb \
        --out atlas_out_work/np_export
    python -m scripts.neuronpedia_export --store features.duckdb --out np_export \
        --model-id nanochat-d20-sft --source-set myname-res-16k --url https://github.com/me/atlas

Then check it with `python -m scripts.neuronpedia_validate DIR`; DIR/README.txt says how to
hand it over.
"""

import argparse
import sys

from atlas.neuronpedia import ExportConfig, ExportError, export_neuronpedia


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.neuronpedia_export",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="the feature store (features.duckdb)")
    ap.add_argument("--out", required=True, help="export directory (replaced if it holds a "
                                                 "previous export)")
    ap.add_argument("--model-id", "--model_id", dest="model_id",
                    help="Neuronpedia model id (default: from the checkpoint, e.g. nanochat-d20)")
    ap.add_argument("--source-set", "--source_set", dest="source_set",
                    help="source-set name (default: atlas-{hook}-{width}, e.g. atlas-res-16k)")
    ap.add_argument("--release", default=ExportConfig.release, help="release name")
    ap.add_argument("--creator-id", "--creator_id", dest="creator_id",
                    default=ExportConfig.creator_id, help="Neuronpedia user id of the creator")
    ap.add_argument("--creator-name", "--creator_name", dest="creator_name",
                    default=ExportConfig.creator_name)
    ap.add_argument("--url", help="project URL for the release and the API bodies")
    ap.add_argument("--created-at", "--created_at", dest="created_at",
                    help="ISO-8601 build time (default: recorded in the store)")
    ap.add_argument("--no-saedashboard", "--no_saedashboard", dest="saedashboard",
                    action="store_false", help="skip the saedashboard_compat/ files")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    cfg = ExportConfig(release=args.release, creator_id=args.creator_id,
                       creator_name=args.creator_name, url=args.url,
                       created_at=args.created_at, saedashboard=args.saedashboard)
    try:
        export_neuronpedia(args.store, args.out, model_id=args.model_id,
                           source_set=args.source_set, quiet=args.quiet, cfg=cfg)
    except (ExportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
