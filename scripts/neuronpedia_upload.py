"""
Upload an export to Neuronpedia through its REST API. A dry run unless --yes is given.

    python -m scripts.neuronpedia_upload atlas_out_work/np_export            # prints the plan
    NEURONPEDIA_API_KEY=... python -m scripts.neuronpedia_upload atlas_out_work/np_export --yes

The key is read from NEURONPEDIA_API_KEY only. A ledger (default
~/.cache/nanochat-atlas/neuronpedia_ledger.jsonl) records what the server accepted, so a rerun
never uploads a feature twice.
"""

import argparse
import sys
from pathlib import Path

from atlas.neuronpedia_upload import DEFAULT_API_URL, MAX_BATCH, UploadConfig, UploadError, upload


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.neuronpedia_upload",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="the export directory")
    ap.add_argument("--yes", action="store_true", help="really send (default: dry run)")
    ap.add_argument("--api-url", "--api_url", dest="api_url", default=DEFAULT_API_URL,
                    help=f"API root (default {DEFAULT_API_URL})")
    ap.add_argument("--ledger", type=Path, help="ledger file (default: in the cache directory)")
    ap.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int,
                    default=MAX_BATCH, help=f"features per request, 1..{MAX_BATCH}")
    ap.add_argument("--skip-create", "--skip_create", dest="skip_create", action="store_true",
                    help="do not create the model and source sets (they exist already)")
    ap.add_argument("--max-retries", "--max_retries", dest="max_retries", type=int,
                    default=UploadConfig.max_retries, help="retries on 429/5xx/network errors")
    ap.add_argument("--retry-delay", "--retry_delay", dest="retry_delay", type=float,
                    default=UploadConfig.retry_delay_s, help="first backoff in seconds")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    cfg = UploadConfig(api_url=args.api_url, yes=args.yes, ledger=args.ledger,
                       batch_size=args.batch_size, skip_create=args.skip_create,
                       max_retries=args.max_retries, retry_delay_s=args.retry_delay)
    try:
        upload(args.dir, cfg, log=(lambda *a: None) if args.quiet else print)
    except UploadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
