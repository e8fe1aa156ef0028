"""
Evaluate trained SAEs on held-out text with the SAE spliced into the model: ΔCE, CE recovered, KL,
plus FVU, L0, dead/dense fractions. Several SAEs share one pass over the text.

    python -m scripts.sae_eval --sae atlas_out/saes/blocks.10.hook_resid_post
    python -m scripts.sae_eval --sae atlas_out/saes --tokens 262144 --json eval_all.json
    python -m scripts.sae_eval --sae_dir sae_outputs --checkpoint path/to/model_000650.pt

--sae takes one SAE folder (cfg.json + weights) or a directory of them. The model is --checkpoint,
else the checkpoint recorded in the SAE's cfg.json when it still exists, else the default model
(latest base model under $NANOCHAT_BASE_DIR, else the demo); the text is the val split of --data
or of the model's corpus. Results are merged into each SAE's eval.json (under "val") unless
--no-write, and written to --json when given.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from sae.evaluator import EvalConfig, evaluate_saes, save_json, write_eval_json

SAE_WEIGHT_FILES = ("sae_weights.safetensors", "sae.safetensors")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.sae_eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--sae", "--sae-path", "--sae_path", "--sae-dir", "--sae_dir", dest="sae", required=True,
                   help="an SAE folder, or a directory of SAE folders")
    p.add_argument("--tokens", type=int, default=65_536, help="held-out non-BOS tokens (default 65536)")
    p.add_argument("--json", help="also write all results to this JSON file")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir",
                   help="write the results to OUTPUT_DIR/sae_eval.json (PR #169 form of --json)")
    p.add_argument("--checkpoint", help="nanochat checkpoint dir or model_<step>.pt")
    p.add_argument("--data", help="corpus file or dir (default: the model's own corpus)")
    p.add_argument("--split", default="val", choices=("val", "train", "all"), help="corpus split (default val)")
    p.add_argument("--seq-len", "--seq_len", dest="seq_len", type=int, help="window length (default: the model's)")
    p.add_argument("--batch-windows", "--batch_windows", dest="batch_windows", type=int, default=4,
                   help="windows per forward (default 4)")
    p.add_argument("--no-zero-ablation", "--no_zero_ablation", dest="zero_ablation", action="store_false",
                   help="skip the zero-ablation forwards (no ce_recovered / kl_score)")
    p.add_argument("--no-write", "--no_write", dest="write", action="store_false",
                   help="do not merge the results into each SAE's eval.json")
    p.add_argument("--device", help="cuda, mps or cpu (default: best available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    from nanochat.common import autodetect_device
    from nanochat.model_source import resolve_corpus, resolve_model
    from sae.io import load_sae

    dirs = find_sae_dirs(args.sae)
    saes = [load_sae(d) for d in dirs]
    device = autodetect_device(args.device)
    source = resolve_model(pick_checkpoint(args.checkpoint, saes), device, quiet=args.quiet)
    corpus = resolve_corpus(source, args.data)
    if not args.quiet:
        print(f"model:  {source.describe()}", file=sys.stderr)
        print(f"text:   {corpus} ({args.split} split), up to {args.tokens:,} tokens", file=sys.stderr)
    cfg = EvalConfig(n_tokens=args.tokens, seq_len=args.seq_len, batch_windows=args.batch_windows,
                     split=args.split, zero_ablation=args.zero_ablation)
    results = evaluate_saes(source.model, source.tokenizer, corpus, saes, cfg, device=device, quiet=args.quiet)
    for d, r in zip(dirs, results):
        r["path"] = str(d)
        if args.write:
            write_eval_json(d, r)
    print(format_table(results))
    out_json = args.json or (str(Path(args.output_dir) / "sae_eval.json") if args.output_dir else None)
    if out_json:
        save_json(out_json, {"model": source.describe(), "corpus": str(corpus), "results": results})
        print(f"wrote {out_json}")
    if args.write:
        print(f"merged the results into eval.json in {len(dirs)} SAE folder(s)")
    return 0


def find_sae_dirs(path) -> list[Path]:
    """`path` itself if it is an SAE folder, else its SAE subfolders (sorted)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--sae {path}: not a directory")
    if _is_sae_dir(path):
        return [path]
    found = sorted(p for p in path.iterdir() if p.is_dir() and _is_sae_dir(p))
    if not found:
        raise FileNotFoundError(f"--sae {path}: neither an SAE folder (cfg.json + {' or '.join(SAE_WEIGHT_FILES)}) "
                                f"nor a directory of them")
    return found


def pick_checkpoint(explicit, saes):
    if explicit:
        return explicit
    recorded = {s.cfg.checkpoint for s in saes if s.cfg.checkpoint}
    if len(recorded) == 1 and Path(next(iter(recorded))).exists():
        return next(iter(recorded))
    return None


def format_table(results: list[dict]) -> str:
    cols = [("sae", "SAE", "{}"), ("n_tokens", "tokens", "{:,}"), ("l0", "L0", "{:.1f}"),
            ("fvu", "FVU", "{:.4f}"), ("explained_variance_saelens", "EV(SAELens)", "{:.4f}"),
            ("delta_ce", "ΔCE nats", "{:+.4f}"), ("ce_recovered", "CE rec", "{:.4f}"),
            ("kl", "KL", "{:.4f}"), ("dead_fraction", "dead", "{:.1%}"),
            ("dense_fraction_1pct", ">1%", "{:.1%}")]
    rows = [[h for _, h, _ in cols]]
    for r in results:
        rows.append([_fmt(r.get(key), f) for key, _, f in cols])
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    if results:
        r = results[0]
        lines.append(f"clean CE {r['ce_clean']:.4f} nats on {r['n_ce_tokens']:,} predictions"
                     + (f"; zero-ablation CE {r['ce_zero_ablation']:.4f}" if "ce_zero_ablation" in r else ""))
    return "\n".join(lines)


def _is_sae_dir(p: Path) -> bool:
    return (p / "cfg.json").is_file() and any((p / f).is_file() for f in SAE_WEIGHT_FILES)


def _fmt(value, f: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f.format(value)


if __name__ == "__main__":
    sys.exit(main())
