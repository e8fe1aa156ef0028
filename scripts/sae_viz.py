"""
Feature activations of a trained SAE over a prompt, or the atlas pages of one SAE.

    python -m scripts.sae_viz --sae atlas_out_work/saes/blocks.2.hook_resid_post --prompt "def f(x):"
    python -m scripts.sae_viz --sae DIR --prompt "..." --feature 123 --html viz.html \
        --store atlas_out_work/features.duckdb --atlas-url atlas_out
    python -m scripts.sae_viz --sae_path DIR --all_features --out atlas_one    # the PR #169 form

With --prompt: prints every token of [BOS] + prompt, shaded by the activation of --feature (or
by each token's strongest feature), and the top features that fire on it, with their labels
when a feature store is given; --html writes the same as one page. With --all_features: mines
the SAE over the model's corpus into <out>/features.duckdb and renders the atlas site for
that one SAE into <out>/site, with the same code as build_atlas.

This module also holds the display pieces that scripts/steer.py shares: finding and loading
SAE folders, reading labels and site directory keys from a store, ANSI colour that switches
off when stdout is not a terminal or NO_COLOR is set, token rows for the templates, and
rendering a page with Jinja2 (autoescaped) from site_templates/.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import jinja2

from atlas.site_data import layer_keys
from atlas.tokens_display import visible_text, visible_token

TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "site_templates"
N_SHADES = 8  # highlight classes a1..a8, as on the atlas's pages (viz_macros.html styles them)
# 256-colour backgrounds for shades 1..8: pale yellow to deep orange, like the atlas
_ANSI_SHADES = (230, 229, 222, 221, 215, 214, 208, 202)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.all_features:
            return build_atlas_for_sae(args)
        return show_prompt(args)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.sae_viz", description=__doc__.split("\n\n")[0])
    p.add_argument("--sae", "--sae-path", "--sae_path", dest="sae", required=True,
                   help="an SAE folder (cfg.json + weights)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="text to show feature activations over (BOS is prepended)")
    mode.add_argument("--all-features", "--all_features", dest="all_features", action="store_true",
                      help="mine this SAE and build its atlas pages")
    p.add_argument("--feature", type=int, help="shade tokens by this feature's activation")
    p.add_argument("--top-n", "--top_n", "--top-k", "--top_k", dest="top_n", type=int, default=5,
                   help="features listed per token (default 5)")
    p.add_argument("--store", help="features.duckdb to read labels (and atlas page keys) from")
    p.add_argument("--atlas-url", "--atlas_url", dest="atlas_url",
                   help="base URL or path of the atlas site, to link features to their pages")
    p.add_argument("--html", help="write the prompt view as one HTML page here")
    p.add_argument("--out", "--output-dir", "--output_dir", dest="out", default="sae_viz_out",
                   help="--all_features: output folder (features.duckdb and site/)")
    p.add_argument("--checkpoint", help="nanochat checkpoint dir or model_<step>.pt "
                   "(default: latest under $NANOCHAT_BASE_DIR, else the demo model)")
    p.add_argument("--data", help="--all_features: corpus to mine (default: the model's own)")
    p.add_argument("--tokens", type=int, default=None,
                   help="--all_features: tokens to mine (default: the miner's default)")
    p.add_argument("--device", help="cuda | mps | cpu (default: autodetect)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="ANSI colour (auto: only on a terminal without NO_COLOR)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def show_prompt(args) -> int:
    import torch

    from nanochat.common import autocast, autodetect_device
    from nanochat.model_source import resolve_model
    from sae.runtime import SAERuntime

    device = autodetect_device(args.device)
    saes = load_saes(args.sae, device)
    if len(saes) != 1:
        raise ValueError(f"--sae must be one SAE folder; found {len(saes)} under {args.sae}: "
                         f"{sorted(saes)}")
    (sae_id, sae), = saes.items()
    if args.feature is not None and not 0 <= args.feature < sae.cfg.d_sae:
        raise ValueError(f"--feature {args.feature} out of range for {args.sae} (d_sae={sae.cfg.d_sae})")
    labels, keys = read_store(args.store, list(saes)) if args.store else ({}, {})
    keys = site_keys(saes, keys)
    source = resolve_model(args.checkpoint, device, quiet=args.quiet)
    warn_model_mismatch(saes, source.model_id)
    tokenizer = source.tokenizer
    ids = tokenizer.encode(args.prompt, prepend=tokenizer.get_bos_token_id())

    runtime = SAERuntime(source.model, saes, labels=labels)
    with runtime, torch.inference_mode(), autocast(device):
        runtime.track(top_n=args.top_n, watch=[args.feature] if args.feature is not None else [])
        source.model(torch.tensor([ids], device=device), stop_after_layer=sae.cfg.layer)
    traced = runtime.token_features()
    focus = None
    if args.feature is not None:
        focus = runtime.watched(sae_id)[1][:, 0].tolist()
    # n_prompt=0: this view has no continuation, so no token is drawn as (dimmed) prompt
    rows = token_rows(tokenizer, ids, traced, focus, n_prompt=0, keys=keys,
                      atlas_url=args.atlas_url, focus_feature=(sae_id, args.feature))

    style = Style.for_stream(sys.stdout, args.color)
    what = f"feature {args.feature}" if args.feature is not None else "each token's top feature"
    print(style.bold(f"{visible_text(sae_id)}: {sae.cfg.architecture}, d_sae {sae.cfg.d_sae} "
                     f"on {visible_text(source.model_id)} ({source.kind}); shading: {what}"))
    if args.feature is not None:
        label = labels.get(sae_id, {}).get(args.feature)
        print(f"feature {args.feature}: {visible_text(label) if label else '(no label)'}")
    print(style.tokens(rows))
    print()
    print(style.feature_table(rows))
    if args.html:
        label = labels.get(sae_id, {}).get(args.feature)
        page = render_page("viz.html", title=f"{sae_id} · {visible_text(args.prompt[:60])}",
                           sae_id=sae_id, model=visible_text(source.model_id),
                           prompt=visible_text(args.prompt), feature=args.feature,
                           feature_label=visible_text(label) if label else None,
                           rows=rows, what=what)
        write_text(args.html, page)
        print(f"wrote {args.html}")
    return 0


def build_atlas_for_sae(args) -> int:
    """Mine one SAE into <out>/features.duckdb and render its site into <out>/site."""
    from atlas.mine import MineConfig, mine_features
    from atlas.render import render_site
    from nanochat.common import autodetect_device
    from nanochat.model_source import resolve_corpus, resolve_model

    sae_dirs = find_sae_dirs(args.sae)
    if len(sae_dirs) != 1:
        raise ValueError(f"--sae_path must be one SAE folder; found {len(sae_dirs)} under {args.sae} "
                         f"(python -m scripts.build_atlas handles several)")
    device = autodetect_device(args.device)
    source = resolve_model(args.checkpoint, device, quiet=args.quiet)
    corpus = resolve_corpus(source, args.data)
    # build_atlas's defaults: a quick pass on CPU, a thorough one on GPU
    tokens = args.tokens or (10_000_000 if device.type == "cuda" else 250_000)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store_path = out / "features.duckdb"
    mine_features(sae_dirs, source, corpus, store_path, MineConfig(tokens=tokens), quiet=args.quiet)
    stats = render_site(store_path, out / "site", quiet=args.quiet)
    print(f"wrote {store_path} and {out / 'site' / 'index.html'} "
          f"({stats['feature_pages']} feature pages)")
    return 0


# ----------------------------------------------------------------------------- shared pieces

def find_sae_dirs(path) -> list[Path]:
    """`path` itself if it is an SAE folder, else every SAE folder below it (the miner's rule)."""
    from atlas.mine import find_saes

    return find_saes(path)


def load_saes(path, device) -> dict:
    """{hook name: SAE} for every SAE folder at or under `path`."""
    from sae.io import load_sae

    saes = {}
    for d in find_sae_dirs(path):
        sae = load_sae(d, device=str(device))
        sae_id = sae.cfg.hook_name
        if not sae_id:
            raise ValueError(f"{d / 'cfg.json'} has no hook_name: cannot tell where to attach it")
        if sae_id in saes:
            raise ValueError(f"two SAEs for {sae_id} under {path}; point --sae-dir at one of them")
        saes[sae_id] = sae
    return saes


def read_store(store_path, sae_ids: list[str]) -> tuple[dict, dict]:
    """({sae_id: {feature: label}}, {sae_id: site key}) from a feature store (read-only)."""
    from atlas.site_data import read_saes
    from atlas.store import connect

    con = connect(store_path, read_only=True)
    try:
        labels = {}
        for sae_id in sae_ids:
            rows = con.execute("SELECT feature, label FROM features WHERE sae_id = ? AND label IS NOT NULL",
                               [sae_id]).fetchall()
            labels[sae_id] = {int(f): label for f, label in rows}
        keys = {info.sae_id: info.key for info in read_saes(con) if info.sae_id in sae_ids}
    finally:
        con.close()
    missing = [s for s in sae_ids if s not in keys]
    if missing:
        print(f"warning: {store_path} has no rows for {missing}; no labels for them",
              file=sys.stderr)
    return labels, keys


def site_keys(saes: dict, store_keys: dict) -> dict[str, str]:
    """The atlas directory key (layers/<key>/) of every SAE: the store's, else the site's rule."""
    rows = [{"sae_id": s, "layer": sae.cfg.layer, "hook": s.rsplit(".", 1)[-1]}
            for s, sae in saes.items()]
    return {r["sae_id"]: store_keys.get(r["sae_id"], k) for r, k in zip(rows, layer_keys(rows))}


def feature_href(atlas_url: str | None, key: str, feature: int) -> str | None:
    if not atlas_url:
        return None
    return f"{atlas_url.rstrip('/')}/layers/{quote(key)}/features/{int(feature)}.html"


def warn_model_mismatch(saes: dict, model_id: str) -> None:
    for sae_id, sae in saes.items():
        if sae.cfg.model_id and sae.cfg.model_id != model_id:
            print(f"warning: SAE {sae_id} was trained on {sae.cfg.model_id!r}, the model loaded "
                  f"is {model_id!r}", file=sys.stderr)


@dataclass
class Hit:
    sae: str            # short tag, e.g. 'L2'
    feature: int
    act: float
    label: str | None   # visible text
    href: str | None
    focus: bool         # the feature being shaded / steered


@dataclass
class TokenRow:
    position: int
    text: str           # visible token (spaces as ·)
    plain: str          # visible text (spaces kept), for running text
    generated: bool
    shade: int          # 0..N_SHADES
    act: float | None   # activation used for the shade
    hits: list[Hit] = field(default_factory=list)

    @property
    def tip(self) -> str:
        return "; ".join(f"{h.sae} f{h.feature} {h.act:.3g}" + (f" {h.label}" if h.label else "")
                         for h in self.hits)


def token_rows(tokenizer, ids: list[int], traced, focus: list[float] | None, n_prompt: int,
               keys: dict[str, str], atlas_url: str | None, focus_feature=(None, None),
               scale: float | None = None) -> list[TokenRow]:
    """
    One row per token: its text, its features (from SAERuntime.token_features) and a shade.
    The shade is `focus[i]` (the focus feature's activation) over `scale` (default: the max),
    or, without a focus, each token's strongest feature over the strongest overall.
    """
    by_pos = {t.position: t for t in traced}
    acts = []
    rows = []
    for i, tok in enumerate(ids):
        raw = tokenizer.token_bytes(tok)
        hits = []
        for sae_id, found in (by_pos[i].features.items() if i in by_pos else []):
            tag = f"L{keys.get(sae_id, sae_id)}"
            for h in found:
                hits.append(Hit(tag, h.feature, h.activation,
                                visible_text(h.label) if h.label else None,
                                feature_href(atlas_url, keys.get(sae_id, sae_id), h.feature),
                                (sae_id, h.feature) == tuple(focus_feature)))
        if focus is not None:
            act = focus[i] if i < len(focus) else None
        else:
            act = max((h.act for h in hits), default=None)
        acts.append(act or 0.0)
        rows.append(TokenRow(i, visible_token(raw), visible_text(raw.decode("utf-8", "replace")),
                             i >= n_prompt, 0, act, hits))
    top = scale if scale is not None else max(acts, default=0.0)
    for row, act in zip(rows, acts):
        row.shade = shade(act, top)
    return rows


def shade(act: float, top: float) -> int:
    """The atlas's highlight class index: ceil(act / top · N_SHADES), 0 for inactive."""
    if top <= 0 or act <= 0:
        return 0
    return min(N_SHADES, max(1, math.ceil(act / top * N_SHADES)))


class Style:
    """ANSI styling, or plain text when colour is off."""

    def __init__(self, color: bool):
        self.color = color

    @classmethod
    def for_stream(cls, stream, mode: str = "auto") -> "Style":
        if mode != "auto":
            return cls(mode == "always")
        return cls(stream.isatty() and not os.environ.get("NO_COLOR"))

    def _sgr(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color and text else text

    def bold(self, text: str) -> str:
        return self._sgr(text, "1")

    def dim(self, text: str) -> str:
        return self._sgr(text, "2")

    def accent(self, text: str) -> str:
        return self._sgr(text, "1;38;5;166")

    def token(self, row: TokenRow, text: str) -> str:
        if row.shade:
            return self._sgr(text, f"38;5;16;48;5;{_ANSI_SHADES[row.shade - 1]}")
        return text if row.generated else self.dim(text)

    def tokens(self, rows: list[TokenRow]) -> str:
        """Running text: prompt dim, generated plain, shaded by activation ([brackets] without colour)."""
        if self.color:
            return "".join(self.token(r, r.plain) for r in rows)
        return "".join(f"[{r.plain}]" if r.shade else r.plain for r in rows)

    def feature_table(self, rows: list[TokenRow], only_generated: bool = False) -> str:
        lines = []
        width = max((len(r.text) for r in rows), default=5)
        width = min(max(width, 5), 24)
        for r in rows:
            if only_generated and not r.generated:
                continue
            text = r.text if len(r.text) <= width else r.text[:width - 1] + "…"
            groups: dict[str, list[str]] = {}  # one line per SAE, the first beside the token
            for h in r.hits:
                groups.setdefault(h.sae, []).append(self.hit(h))
            cells = ["  ".join(g) for g in groups.values()] or [self.dim("(none)")]
            pos = f"{r.position:>4}"
            lines.append(f"{pos if r.generated else self.dim(pos)}  "
                         f"{self.token(r, text)}{' ' * (width - len(text))}  {cells[0]}")
            lines.extend(" " * (width + 8) + cell for cell in cells[1:])
        return "\n".join(lines)

    def hit(self, h: Hit) -> str:
        name = f"{h.sae}/f{h.feature}"
        text = f"{self.accent(name) if h.focus else self.bold(name)} {h.act:.2f}"
        return text + (f" “{h.label}”" if h.label else "")


def render_page(template: str, **context) -> str:
    """Render site_templates/<template> with autoescape (every string in context is untrusted)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template(template).render(n_shades=N_SHADES, **context)


def write_text(path, text: str) -> None:
    """Write atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def terminal_width(default: int = 100) -> int:
    return shutil.get_terminal_size((default, 24)).columns


if __name__ == "__main__":
    sys.exit(main())
