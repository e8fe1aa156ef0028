"""
Render the static HTML atlas from a feature store.

    render_site("atlas_out/features.duckdb", "atlas_out/site")

Layout under the output folder (permalinks; see docs/site.md):
    index.html                        model card, one row per SAE, build info
    layers/<key>/index.html           every feature of one SAE: sortable, filterable, paged
    layers/<key>/features.js          that table's data (a .js file so file:// works)
    layers/<key>/features/<idx>.html  one page per feature
    search/index.html, search/*.js    client-side search over labels, top tokens and ids
    assets/                           the shared CSS and JS
    site.json, .nojekyll

Notable choices
- Speed: per SAE the feature table is read once and details a chunk of features at a time
  (atlas/site_data.py); templates are compiled once. Token rows are the one place a Jinja loop
  is too slow (about 3 us per token, 45 windows x 64 tokens per page), so `_context_rows`
  assembles them from fragments escaped once per vocabulary entry with markupsafe; numbers are
  the only other thing in them. Everything else goes through autoescaped templates.
- Atomic: the site is rendered into a sibling temp folder and swapped in by rename. An
  existing --out that is not an atlas (no site.json from us) is never replaced.
- Deterministic: no timestamps or absolute paths in the output; every query is ordered.
- Safety: every corpus, tokenizer and store string is plain text made visible by
  atlas/tokens_display.py and escaped by the templates; pages carry a CSP that allows no
  inline script and no other host.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import jinja2
import numpy as np
from markupsafe import Markup, escape
from tqdm import tqdm

from atlas import search, site_data, store
from atlas.notes import find_notes, note_html
from atlas.tokens_display import visible_text

TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "site_templates"
ASSETS = ("atlas.css", "atlas.js", "layer.js", "search.js")
GENERATOR = "nanochat-atlas"
SITE_FORMAT = 1
PREVIEW_ROWS = 100  # rows of a layer table rendered into its HTML (the rest come from features.js)
N_SHADES = 8  # activation highlight classes a1..a8
_META_ORDER = ("model", "corpus", "build")


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
    stats["feature_pages_per_s"] = stats["feature_pages"] / max(stats["seconds"], 1e-9)
    return stats


# ----------------------------------------------------------------------------- whole site

def _render_into(out: Path, con, notes_dir: Path, quiet: bool) -> dict:
    env = _environment()
    meta = site_data.read_meta(con)
    saes = site_data.read_saes(con)
    if not saes:
        raise ValueError("the feature store has no SAEs (table saes is empty): nothing to render")
    vocab = site_data.read_vocab(con)
    token_html = [str(escape(t)) for t in vocab]
    site = {"title": GENERATOR, "model": _model_name(meta, saes)}

    (out / "assets").mkdir()
    for name in ASSETS:
        shutil.copyfile(TEMPLATES_DIR / name, out / "assets" / name)
    (out / ".nojekyll").write_bytes(b"")

    layers, records, n_feature_pages, n_notes = [], [], 0, 0
    for sae in saes:
        layer, sae_records, n_notes_sae = _render_sae(env, con, out, site, sae, vocab, token_html,
                                                      notes_dir, quiet)
        layers.append(layer)
        records += sae_records
        n_feature_pages += layer["n_features"]
        n_notes += n_notes_sae

    search_layers = [(lay["key"], lay["title"]) for lay in layers]
    shards = search.write_search_index(out / "search", search_layers, records)
    _write(out / "search" / "index.html", env.get_template("search.html").render(
        root="../", site=site, layers=layers))
    _write(out / "index.html", env.get_template("index.html").render(
        root="", site=site, layers=layers, meta_sections=_meta_sections(meta)))
    manifest = {
        "generator": GENERATOR, "format": SITE_FORMAT,
        "schema_version": meta.get("schema_version"),
        "saes": [{"key": lay["key"], "sae_id": lay["sae_id"], "layer": lay["layer"], "hook": lay["hook"],
                  "features": lay["n_features"]} for lay in layers],
        "search_shards": shards,
    }
    _write(out / "site.json", json.dumps(manifest, indent=1) + "\n")
    return {"pages": n_feature_pages + len(layers) + 2, "feature_pages": n_feature_pages,
            "layers": len(layers), "notes": n_notes, "bytes": _tree_bytes(out)}


def _render_sae(env, con, out: Path, site: dict, sae: site_data.SaeInfo, vocab: list[str],
                token_html: list[str], notes_dir: Path, quiet: bool) -> tuple[dict, list, int]:
    cols = site_data.read_features(con, sae.sae_id)
    feats = cols["feature"]
    if not feats:
        raise ValueError(f"SAE {sae.sae_id!r} (layer {sae.layer}) has no rows in table features")
    top_tokens = site_data.read_top_tokens(con, sae.sae_id)
    labels = [visible_text(x) if x else "" for x in cols["label"]]
    tokens = {f: [_token(vocab, t) for t in top_tokens.get(f, [])] for f in feats}
    notes = find_notes(notes_dir, sae.key, set(feats), quiet)
    layer = _layer_view(sae, cols)
    layer_dir = out / "layers" / sae.key
    (layer_dir / "features").mkdir(parents=True)
    row_of = {f: i for i, f in enumerate(feats)}
    template = env.get_template("feature.html")

    bar = tqdm(total=len(feats), desc=f"render layer {sae.key}", unit="page",
               disable=quiet or not sys.stderr.isatty())
    feature_ids = np.asarray(feats)
    max_acts = np.asarray([m or 0.0 for m in cols["max_act"]], dtype=np.float64)
    for examples, details in site_data.iter_details(con, sae.sae_id, feats):
        row_max = max_acts[np.searchsorted(feature_ids, examples.feature)] if examples.feature.size else max_acts[:0]
        contexts = _context_rows(examples, row_max, token_html)
        for f, detail in details.items():
            i = row_of[f]
            page = _feature_view(f, i, cols, labels, tokens, examples, contexts, detail, vocab, row_of)
            page["note"] = note_html(notes[f].read_text(encoding="utf-8")) if f in notes else None
            html = template.render(root="../../../", site=site, layer=layer, **page)
            _write(layer_dir / "features" / f"{f}.html", html)
        bar.update(len(details))
    bar.close()

    table = [[f, cols["density"][i], _round(cols["max_act"][i]), cols["count"][i], labels[i], tokens[f],
              _round(cols["label_f1"][i])] for i, f in enumerate(feats)]
    _write(layer_dir / "features.js", "window.ATLAS_LAYER = " + _json(
        {"key": sae.key, "title": layer["title"],
         "columns": ["feature", "density", "max_act", "count", "label", "tokens", "label_f1"],
         "rows": table}) + ";\n")
    preview = [{"f": r[0], "density": _pct(r[1]), "max_act": _num(r[2]), "label": r[4], "tokens": r[5]}
               for r in table[:PREVIEW_ROWS]]
    _write(layer_dir / "index.html", env.get_template("layer.html").render(
        root="../../", site=site, layer=layer, preview=preview))
    records = [search.SearchRecord(sae.key, f, labels[i], tokens[f], cols["density"][i] or 0.0)
               for i, f in enumerate(feats)]
    return layer, records, len(notes)


# ----------------------------------------------------------------------------- page views

def _layer_view(sae: site_data.SaeInfo, cols: dict) -> dict:
    r = sae.row
    short_hook = sae.hook.removeprefix("hook_")
    counts = np.asarray([c or 0 for c in cols["count"]])
    density = np.asarray([d or 0.0 for d in cols["density"]], dtype=np.float64)
    alive = density[counts > 0]
    log_density = None
    if alive.size:
        lo, hi = np.floor(np.log10(alive.min())), np.ceil(np.log10(alive.max()))
        edges = np.linspace(lo, max(hi, lo + 1), 41)
        log_density = _histogram(edges, np.histogram(np.log10(alive), edges)[0], fmt=lambda x: f"1e{x:.0f}")
    row = {k: visible_text(v) if isinstance(v, str) else _num(v) for k, v in r.items() if k != "cfg_json"}
    row["dead_frac"], row["ce_recovered"] = _pct(r.get("dead_frac")), _pct(r.get("ce_recovered"))
    stats = [("architecture", "arch"), ("d_in", "d_in"), ("d_sae", "d_sae"), ("k", "k"), ("FVU", "fvu"),
             ("L0", "l0"), ("dead", "dead_frac"), ("ΔCE (nats)", "delta_ce"), ("KL", "kl"),
             ("CE recovered", "ce_recovered"), ("train tokens", "train_tokens"), ("mined tokens", "mine_tokens")]
    return {
        "key": sae.key, "sae_id": sae.sae_id, "layer": sae.layer, "hook": sae.hook,
        "title": f"Layer {sae.layer}" + ("" if short_hook == "resid_post" else f" · {short_hook}"),
        "hook_short": short_hook, "n_features": len(cols["feature"]), "n_alive": int((counts > 0).sum()),
        "stats": [(name, row.get(col, "—")) for name, col in stats], "row": row,
        "log_density": log_density,
    }


def _feature_view(f: int, i: int, cols: dict, labels: list[str], tokens: dict, examples: site_data.Examples,
                  contexts: list[Markup], detail: site_data.FeatureDetail, vocab: list[str], row_of: dict) -> dict:
    feats = cols["feature"]
    max_act = cols["max_act"][i] or 0.0
    top, groups = [], {}
    for r in detail.rows:
        row = (_num(examples.act[r]), contexts[r])
        if examples.kind[r] == "top":
            top.append(row)
        else:
            groups.setdefault(examples.bin[r], []).append(row)
    bins = sorted(set(groups) | set(detail.bins), key=lambda b: (b is None, -(b or 0)))
    intervals = []
    for b in bins:
        lo, hi, frac = detail.bins.get(b, (None, None, None))
        intervals.append({"bin": "?" if b is None else b, "lo": _num(lo), "hi": _num(hi), "frac": _pct(frac),
                          "rows": groups.get(b, [])})
    neighbors = []
    for kind, title in (("decoder_cos", "Decoder cosine"), ("coactivation", "Coactivation")):
        rows = [(o, labels[row_of[o]] if o in row_of else "", _num(v), o in row_of)
                for o, v in detail.neighbors.get(kind, [])]
        if rows:
            neighbors.append({"title": title, "rows": rows})
    act_hist = detail.histograms.get("activation")
    logit_hist = detail.histograms.get("logit")
    return {
        "f": f, "n_features": len(feats),
        "prev": feats[i - 1] if i > 0 else None, "next": feats[i + 1] if i + 1 < len(feats) else None,
        "label": labels[i], "label_rule": visible_text(cols["label_rule"][i]) if cols["label_rule"][i] else None,
        "label_f1": _num(cols["label_f1"][i]), "density": _pct(cols["density"][i]),
        "count": _num(cols["count"][i]), "max_act": _num(max_act), "max_raw": f"{max_act:.6g}",
        "mean_act": _num(cols["mean_act"][i]), "dead": not cols["count"][i], "top_tokens": tokens[f],
        "top": top, "intervals": intervals,
        "act_hist": _histogram(*act_hist) if act_hist else None,
        "logit_hist": _histogram(*logit_hist, signed=True) if logit_hist else None,
        "logits": _logit_tables(detail.logits, vocab), "neighbors": neighbors,
    }


def _open_tag(shade: int, center: bool) -> str:
    classes = ([f"a{shade}"] if shade else []) + (["c"] if center else [])
    return "<span" + (f' class="{" ".join(classes)}"' if classes else "") + ' data-v="'


_OPEN = {(shade, c): _open_tag(shade, c) for shade in range(N_SHADES + 1) for c in (False, True)}


def _example_rows(examples: site_data.Examples, row_max: np.ndarray, token_html: list[str]) -> list[str]:
    """Every example window of a chunk -> its HTML row, vectorised over the whole chunk.

        <div class="ex"><span class="xa">ACT</span><p class="ctx"><span>TOKEN</span>...</p></div>

    Token text comes only from `token_html` (escaped once per vocabulary entry with
    markupsafe); the rest is literal markup and formatted numbers, so the rows are safe HTML.
    A token with a non-zero activation gets a shade class a1..a8 (its act over its feature's
    max act) and its value in data-v for the hover tooltip; the activating token gets class c.
    """
    ids = examples.token_ids.astype(np.int64)
    acts = examples.acts.astype(np.float64)
    offsets = examples.offsets.astype(np.int64)
    lengths = np.diff(offsets)
    known = (ids >= 0) & (ids < len(token_html))
    text = [token_html[t] if k else str(escape(f"\u27e8{t}\u27e9"))  # ids the vocab lacks show as ⟨id⟩
            for t, k in zip(ids.tolist(), known.tolist())] if not known.all() else None
    plain = _plain_spans(token_html)
    parts = list(map(plain.__getitem__, ids.tolist())) if text is None else [f"<span>{t}</span>" for t in text]

    centers = examples.center.astype(np.int64)
    valid = (centers >= 0) & (centers < lengths)
    is_center = np.zeros(ids.size, dtype=bool)
    is_center[(offsets[:-1] + centers)[valid]] = True
    marked = np.flatnonzero((acts != 0) | is_center)
    scale = np.where(row_max > 0, N_SHADES / np.where(row_max > 0, row_max, 1.0), 0.0)
    token_row = np.repeat(np.arange(lengths.size), lengths)
    shades = np.clip(np.ceil(acts[marked] * scale[token_row[marked]]), 0, N_SHADES).astype(np.int64)
    for j, shade, act, c, t in zip(marked.tolist(), shades.tolist(), acts[marked].tolist(),
                                   is_center[marked].tolist(), ids[marked].tolist()):
        token = token_html[t] if text is None else text[j]
        parts[j] = f'{_OPEN[shade, c]}{act:.3g}">{token}</span>'
    return [f'<div class="ex"><span class="xa">{_num(act)}</span><p class="ctx">{"".join(parts[a:b])}</p></div>\n'
            for act, a, b in zip(examples.act, offsets[:-1].tolist(), offsets[1:].tolist())]


@lru_cache(maxsize=4)
def _plain_spans_cached(token_html: tuple[str, ...]) -> list[str]:
    return [f"<span>{t}</span>" for t in token_html]


def _logit_tables(logits: dict, vocab: list[str]) -> list[dict]:
    """The displayed kind first: 'gain_corrected' when the store has it, else 'raw'."""
    order = sorted(logits, key=lambda k: ({"gain_corrected": 0, "raw": 1}.get(k, 2), k))
    tables = []
    for kind in order:
        rows = logits[kind]
        tables.append({
            "kind": kind,
            "title": {"raw": "raw W_dec·W_U (no final norm)",
                      "gain_corrected": "W_dec·W_U, gain-corrected for the residual path"}.get(kind, kind),
            "pos": [(_token(vocab, t), f"{v:+.3f}") for r, t, v in sorted(rows) if r > 0],
            "neg": [(_token(vocab, t), f"{v:+.3f}") for r, t, v in sorted(rows, reverse=True) if r < 0],
        })
    return tables


def _histogram(edges, counts, signed: bool = False, fmt=None) -> dict | None:
    """A histogram as filled step polygons in a 300 x 64 SVG box (integer coordinates keep
    pages small); with `signed`, bins left of zero form a second polygon. None if empty."""
    edges, counts = np.asarray(edges, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    if counts.size == 0 or edges.size != counts.size + 1 or not counts.max() > 0:
        return None
    width, height = 300, 64
    span = edges[-1] - edges[0]
    x = np.rint((edges - edges[0]) / span * width if span > 0 else np.linspace(0, width, edges.size))
    h = np.where(counts > 0, np.maximum(np.rint(counts / counts.max() * height), 1), 0)
    x, y = x.astype(np.int64).tolist(), (height - h).astype(np.int64).tolist()
    split = int(np.sum((edges[:-1] + edges[1:]) / 2 < 0)) if signed else 0

    def polygon(a: int, b: int) -> str:
        steps = "".join([f"V{y[j]}H{x[j + 1]}" for j in range(a, b)])
        return f"M{x[a]} {height}{steps}V{height}Z" if b > a else ""

    fmt = fmt or _num
    zero = round(-edges[0] / span * width) if signed and span > 0 and edges[0] < 0 < edges[-1] else None
    return {"w": width, "h": height, "pos": polygon(split, counts.size), "neg": polygon(0, split),
            "lo": fmt(edges[0]), "hi": fmt(edges[-1]), "peak": _num(int(counts.max())), "zero": zero}


def _meta_sections(meta: dict) -> list[tuple[str, list[tuple[str, str]]]]:
    """Model-card sections from `meta`: model, corpus, build first, then any other keys."""
    keys = [k for k in _META_ORDER if k in meta] + sorted(k for k in meta if k not in _META_ORDER)
    sections = []
    for key in keys:
        value = meta[key]
        if isinstance(value, dict):
            rows = [(visible_text(k), _meta_value(v)) for k, v in value.items()]
        else:
            rows = [("value", _meta_value(value))]
        sections.append((visible_text(key), rows))
    return sections


def _meta_value(value) -> str:
    if isinstance(value, (dict, list)):
        return visible_text(json.dumps(value, ensure_ascii=False, sort_keys=True))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _num(value)
    return visible_text("—" if value is None else str(value))


def _model_name(meta: dict, saes: list[site_data.SaeInfo]) -> str:
    model = meta.get("model")
    for key in ("model_id", "name"):
        if isinstance(model, dict) and isinstance(model.get(key), str):
            return visible_text(model[key])
    return visible_text(saes[0].row.get("model_id") or "nanochat")


# ----------------------------------------------------------------------------- formatting

def _num(x) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "—" if x is None else str(x)
    if isinstance(x, (int, np.integer)) or (abs(x) >= 1000 and float(x).is_integer()):
        return f"{int(x):,}"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def _pct(x) -> str:
    return "—" if x is None else f"{x * 100:.3g}%"


def _round(x) -> float | None:
    return None if x is None else float(f"{x:.4g}")


def _token(vocab: list[str], token_id: int) -> str:
    return vocab[token_id] if 0 <= token_id < len(vocab) else f"\u27e8{token_id}\u27e9"


def _json(obj) -> str:
    # ASCII-only JSON: safe inside a .js file whatever the corpus holds (U+2028, NUL, ...).
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False)


# ----------------------------------------------------------------------------- files

def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    return env


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _check_replaceable(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} exists and is not a folder")
    if not any(out_dir.iterdir()):
        return
    try:
        ours = json.loads((out_dir / "site.json").read_text())["generator"] == GENERATOR
    except (OSError, ValueError, KeyError, TypeError):
        ours = False
    if not ours:
        raise FileExistsError(
            f"refusing to replace {out_dir}: it is not empty and holds no atlas site.json; "
            "choose a new or empty output folder")


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Replace `out_dir` by `tmp` with renames (the old site stays whole until the swap)."""
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
