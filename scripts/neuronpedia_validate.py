"""
Check a Neuronpedia export offline (every check of spec §B.6, plus the API payloads and the
manifest). Prints one line per problem, `severity: file:line: key: message`; exits 1 if any
is an error.

    python -m scripts.neuronpedia_validate atlas_out_work/np_export
"""

import argparse
import sys

from atlas.neuronpedia_validate import validate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.neuronpedia_validate",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="the export directory")
    ap.add_argument("--quiet", action="store_true", help="print errors only")
    args = ap.parse_args(argv)
    problems = validate(args.dir)
    errors = [p for p in problems if p.severity == "error"]
    for p in problems:
        if p.severity == "error" or not args.quiet:
            print(p)
    print(f"{args.dir}: {len(errors)} errors, {len(problems) - len(errors)} warnings",
          file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
