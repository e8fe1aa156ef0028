"""
Render the static HTML atlas from a feature store.

    from atlas.render import render_site
    render_site("atlas_out/features.duckdb", "atlas_out/site")

Layout under the output folder (permalinks; see docs/site.md):
    index.html                        model card, one row per SAE, build info
    layers/<key>/index.html           every feature of one SAE: sortable, filterable, paged
    layers/<key>/features.js          that table's data (a .js file so file:// works)
    layers/<key>/features/<idx>.html  one page per feature
    search/index.html, search/*.js    client-side search over labels, top tokens and ids
    assets/                           the shared CSS and JS
    site.json, .nojekyll
<key> is the layer number for resid_post SAEs, else "<layer>-<hook>" (atlas/site_data.py).

Notable choices
- Speed: per SAE the feature table is read once and the details a chunk of features at a
  time (atlas/site_data.py); token windows are turned into HTML for a whole chunk at once
  (atlas/site_views.example_rows); templates are compiled once.
- Atomic: the site is rendered into a sibling temp folder and swapped in by rename. An
  existing output folder that is not an atlas (no site.json of ours) is never replaced.
- Deterministic: no timestamps or absolute paths in the output; every query is ordered.
- Safety: every corpus, tokenizer and store string is made visible (atlas/tokens_display.py)
  and escaped by autoescaping templates; pages carry a Content-Security-Policy that allows
  no inline script and no other host; JSON data files are ASCII-only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import jinja2
import numpy as np
from tqdm import tqdm

from atlas import search, site_data, store
from atlas import site_views as views
from atlas.notes import find_notes, note_html
from atlas.tokens_display import visible_text

TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "site_templates"
ASSETS = ("atlas.css", "atlas.js", "layer.js", "search.js", "favicon.svg")
GENERATOR = "nanochat-atlas"
SITE_FORMAT = 1
PREVIEW_ROWS = 100  # rows of a layer table written into its HTML (all rows are in features.js)


def render_site(store_path: str | os.PathLike, out_dir: str | os.PathLike,
                notes_dir: str | os.PathLike | None = None, quiet: bool = False) -> dict:
    """Render the store at `store_path` into `out_dir`; returns stats (pages, seconds, ...).

    `notes_dir` defaults to `notes/` next to the store. `out_dir` is replaced atomically; it
    must be absent, empty, or a site this function wrote earlier.
    """
    t0 = time.perf_counter()
    store_path, out_dir = Path(store_path), Path(out_dir)
    notes_dir = Path(notes_dir) if notes_dir is not None else store_path.parent / "notes"
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)
        con = store.connect(store_path, read_only=True)
        try:
            stats = _render_into(tmp, con, notes_dir, quiet)
        finally:
            con.close()
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _render_into(out: Path, con, notes_dir: Path, quiet: bool) -> dict:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             auto_reload=False)  # no stat() of the templates per include
    meta = site_data.read_meta(con)
    saes = site_data.read_saes(con)
    if not saes:
        raise ValueError("the feature store has no SAEs (table saes is empty): nothing to render")
    vocab = site_data.read_vocab(con)
    token_html = views.TokenHtml.from_vocab(vocab)
    site = {"title": GENERATOR, "model": views.model_name(meta, saes)}

    (out / "assets").mkdir()
    for name in ASSETS:
        shutil.copyfile(TEMPLATES_DIR / name, out / "assets" / name)
    (out / ".nojekyll").write_bytes(b"")

    layers, records, n_notes = [], [], 0
    for sae in saes:
        layer, sae_records, sae_notes = _render_sae(env, con, out, site, sae, vocab, token_html, notes_dir, quiet)
        layers.append(layer)
        records += sae_records
        n_notes += sae_notes

    shards = search.write_search_index(out / "search", [(lay.key, lay.title) for lay in layers], records)
    _write(out / "search" / "index.html", env.get_template("search.html").render(
        root="../", site=site, layers=layers))
    _write(out / "index.html", env.get_template("index.html").render(
        root="", site=site, layers=layers, meta_sections=views.meta_sections(meta)))
    n_feature_pages = sum(lay.n_features for lay in layers)
    manifest = {
        "generator": GENERATOR, "format": SITE_FORMAT, "schema_version": meta.get("schema_version"),
        "saes": [{"key": lay.key, "sae_id": lay.sae_id, "layer": lay.layer, "hook": lay.hook,
                  "features": lay.n_features} for lay in layers],
        "feature_pages": n_feature_pages, "search_shards": shards,
    }
    _write(out / "site.json", json.dumps(manifest, indent=1) + "\n")
    return {"pages": n_feature_pages + len(layers) + 2, "feature_pages": n_feature_pages,
            "layers": len(layers), "notes": n_notes}


def _render_sae(env, con, out: Path, site: dict, sae: site_data.SaeInfo, vocab: list[str],
                token_html: views.TokenHtml, notes_dir: Path, quiet: bool):
    """One SAE's feature pages, layer page and search records; returns (layer, records, notes)."""
    cols = site_data.read_features(con, sae.sae_id)
    feats = cols["feature"]
    if not feats:
        raise ValueError(f"SAE {sae.sae_id!r} (layer {sae.layer}) has no rows in table features")
    top_tokens = site_data.read_top_tokens(con, sae.sae_id)
    labels = [visible_text(x) if x else "" for x in cols["label"]]
    flags = [[visible_text(x) for x in fl or ()] for fl in cols["flags"]]
    tokens = {f: [views.token(vocab, t) for t in top_tokens.get(f, [])] for f in feats}
    notes = find_notes(notes_dir, sae.key, set(feats), quiet)
    layer = views.layer_view(sae, cols)
    layer_dir = out / "layers" / sae.key
    pages_dir = layer_dir / "features"
    pages_dir.mkdir(parents=True)
    row_of = {f: i for i, f in enumerate(feats)}
    feature_ids = np.asarray(feats)
    max_acts = np.asarray([m or 0.0 for m in cols["max_act"]], dtype=np.float64)
    template = env.get_template("feature.html")

    bar = tqdm(total=len(feats), desc=f"render layer {sae.key}", unit="page", disable=quiet or not sys.stderr.isatty())
    for examples, details in site_data.iter_details(con, sae.sae_id, feats):
        rows_html = views.example_rows(examples, max_acts[np.searchsorted(feature_ids, examples.feature)], token_html)
        hists = views.feature_histograms(details)
        for f, detail in details.items():
            page = views.feature_view(f, row_of[f], cols, labels, flags, tokens, examples, rows_html, detail,
                                      hists[f], vocab, row_of)
            page["note"] = note_html(notes[f].read_text(encoding="utf-8")) if f in notes else None
            _write(f"{pages_dir}/{f}.html", template.render(root="../../../", site=site, layer=layer, **page))
        bar.update(len(details))
    bar.close()

    density = [_finite(d) for d in cols["density"]]
    table = [[f, density[i], _round(cols["max_act"][i]), cols["count"][i], labels[i], tokens[f],
              _round(cols["label_f1"][i]), flags[i]] for i, f in enumerate(feats)]
    _write(layer_dir / "features.js", "window.ATLAS_LAYER = " + _json({
        "key": sae.key, "title": layer.title,
        "columns": ["feature", "density", "max_act", "count", "label", "tokens", "label_f1", "flags"],
        "rows": table}) + ";\n")
    preview = [{"f": r[0], "density": views.pct(r[1]), "max_act": views.num(r[2]), "label": r[4], "tokens": r[5],
                "flags": r[7]} for r in table[:PREVIEW_ROWS]]
    _write(layer_dir / "index.html", env.get_template("layer.html").render(
        root="../../", site=site, layer=layer, preview=preview))
    records = [search.SearchRecord(sae.key, f, labels[i], tokens[f], density[i] or 0.0) for i, f in enumerate(feats)]
    return layer, records, len(notes)


def _finite(x) -> float | None:
    """A float for JSON data files: NULL, NaN and infinities become null."""
    return float(x) if x is not None and math.isfinite(x) else None


def _round(x) -> float | None:
    x = _finite(x)
    return None if x is None else float(f"{x:.4g}")


def _json(obj) -> str:
    # ASCII-only JSON: safe inside a .js file whatever the corpus holds (U+2028, NUL, ...).
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def _write(path: Path | str, text: str) -> None:
    # os-level calls: a page is one write, and Python's buffered file object costs more
    # than the write itself at hundreds of pages per second
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        data = text.encode("utf-8")
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def _check_replaceable(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise NotADirectoryError(f"output {out_dir} exists and is not a folder")
    if not any(out_dir.iterdir()):
        return
    try:
        ours = json.loads((out_dir / "site.json").read_text())["generator"] == GENERATOR
    except (OSError, ValueError, KeyError, TypeError):
        ours = False
    if not ours:
        raise FileExistsError(f"refusing to replace {out_dir}: it is not empty and holds no atlas site.json; "
                              "choose a new or empty output folder")


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Replace `out_dir` by `tmp` with two renames; the old site stays whole until the swap."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex}"
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old)
