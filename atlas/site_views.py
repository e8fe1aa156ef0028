"""
Views for the atlas templates: store rows -> small typed objects of display-ready values.

Every string here is plain text (made visible by atlas/tokens_display.py) that the templates
escape, with one exception: `example_rows`, the token windows, which are HTML built from
fragments escaped once per vocabulary entry (see its docstring). Views are frozen
dataclasses, not dicts, because Jinja's attribute lookup on a dict goes through a failed
getattr first, which costs more than the rest of a small table row.

Number formats: floats to 3 significant digits, integers with thousands separators,
fractions as percentages, missing values as "—".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
from markupsafe import Markup, escape

from atlas import site_data
from atlas.tokens_display import visible_text

N_SHADES = 8  # activation highlight classes a1..a8
HIST_WIDTH, HIST_HEIGHT = 300, 64
_LOGIT_TITLES = {"raw": "raw W_dec·W_U (no final norm)",
                 "gain_corrected": "W_dec·W_U, gain-corrected for the residual path"}
_SAE_STATS = (("architecture", "arch"), ("d_in", "d_in"), ("d_sae", "d_sae"), ("k", "k"), ("FVU", "fvu"),
              ("L0", "l0"), ("dead", "dead_frac"), ("ΔCE (nats)", "delta_ce"), ("KL", "kl"),
              ("CE recovered", "ce_recovered"), ("train tokens", "train_tokens"),
              ("mined tokens", "mine_tokens"))
_META_ORDER = ("model", "corpus", "build")


@dataclass(frozen=True)
class Histogram:
    title: str
    note: str
    w: int
    h: int
    pos: str  # SVG path of the bars (right of zero when signed)
    neg: str  # SVG path of the bars left of zero ("" unless signed)
    zero: int | None  # x of the zero line
    lo: str
    hi: str
    peak: str


@dataclass(frozen=True)
class Interval:
    bin: int | str
    lo: str
    hi: str
    frac: str
    html: Markup  # its example rows


@dataclass(frozen=True)
class LogitTable:
    kind: str
    title: str
    shown: bool  # the table on display; the others go in <details>
    notes: list[str]  # other kinds that only rescale this one
    pos: list[tuple[str, str]]  # (token, value)
    neg: list[tuple[str, str]]


@dataclass(frozen=True)
class Neighbors:
    title: str
    rows: list[tuple[int, str, str, bool]]  # (feature, label, value, has a page)


@dataclass(frozen=True)
class Layer:
    key: str
    sae_id: str
    layer: int
    hook: str
    hook_short: str
    title: str
    n_features: int
    n_alive: int
    stats: list[tuple[str, str]]
    row: dict  # every saes column, formatted
    log_density: Histogram | None


@dataclass(frozen=True)
class TokenHtml:
    """Every token's display text escaped once (markupsafe), bare and wrapped in <span>, the
    latter also as an object array: fancy indexing it picks a window's spans in C."""
    text: list[str]
    span: np.ndarray  # object array of str

    @classmethod
    def from_vocab(cls, vocab: list[str]) -> "TokenHtml":
        text = [str(escape(t)) for t in vocab]
        return cls(text, np.asarray([f"<span>{t}</span>" for t in text], dtype=object))


def layer_view(sae: site_data.SaeInfo, cols: dict) -> Layer:
    counts = np.asarray([c or 0 for c in cols["count"]])
    density = np.asarray([d or 0.0 for d in cols["density"]], dtype=np.float64)
    alive = density[counts > 0]
    log_density = None
    if alive.size and alive.min() > 0:
        lo, hi = np.floor(np.log10(alive.min())), np.ceil(np.log10(alive.max()))
        edges = np.linspace(lo, max(hi, lo + 1), 41)
        log_density = histogram(edges, np.histogram(np.log10(alive), edges)[0], "Feature density",
                                "log10, alive features", fmt=lambda x: f"1e{x:.0f}")
    r = sae.row
    row = {k: visible_text(v) if isinstance(v, str) else num(v) for k, v in r.items() if k != "cfg_json"}
    row["dead_frac"], row["ce_recovered"] = pct(r.get("dead_frac")), pct(r.get("ce_recovered"))
    short_hook = sae.hook.removeprefix("hook_")
    return Layer(
        key=sae.key, sae_id=visible_text(sae.sae_id), layer=sae.layer, hook=visible_text(sae.hook),
        hook_short=visible_text(short_hook),
        title=f"Layer {sae.layer}" + ("" if short_hook == "resid_post" else f" · {visible_text(short_hook)}"),
        n_features=len(cols["feature"]), n_alive=int((counts > 0).sum()),
        stats=[(name, row.get(col, "—")) for name, col in _SAE_STATS], row=row, log_density=log_density,
    )


def feature_view(f: int, i: int, cols: dict, labels: list[str], flags: list[list[str]], tokens: dict,
                 examples: site_data.Examples, rows_html: list[str], detail: site_data.FeatureDetail,
                 hists: list[Histogram | None], vocab: list[str], row_of: dict) -> dict:
    """The feature page's template variables. `i` is the feature's row in `cols`; `rows_html` and
    `hists` come from `example_rows` and `feature_histograms` for the feature's chunk."""
    feats = cols["feature"]
    max_act = cols["max_act"][i] or 0.0
    top, groups = [], {}
    for r in detail.rows:
        if examples.kind[r] == "top":
            top.append(rows_html[r])
        else:
            groups.setdefault(examples.bin[r], []).append(rows_html[r])
    intervals = []
    for b in sorted(set(groups) | set(detail.bins), key=lambda b: (b is None, -(b or 0))):
        lo, hi, frac = detail.bins.get(b, (None, None, None))
        intervals.append(Interval("?" if b is None else b, num(lo), num(hi), pct(frac),
                                  Markup("".join(groups.get(b, [])))))
    neighbors = []
    for kind, title in (("decoder_cos", "Decoder cosine"), ("coactivation", "Coactivation")):
        rows = [(o, labels[row_of[o]] if o in row_of else "", num(v), o in row_of)
                for o, v in detail.neighbors.get(kind, [])]
        if rows:
            neighbors.append(Neighbors(title, rows))
    return {
        "f": f, "n_features": len(feats),
        "prev": feats[i - 1] if i > 0 else None, "next": feats[i + 1] if i + 1 < len(feats) else None,
        "label": labels[i], "label_rule": visible_text(cols["label_rule"][i]) if cols["label_rule"][i] else None,
        "label_f1": num(cols["label_f1"][i]), "label_precision": num(cols["label_precision"][i]),
        "label_recall": num(cols["label_recall"][i]), "flags": flags[i], "density": pct(cols["density"][i]),
        "count": num(cols["count"][i]), "max_act": num(max_act), "max_raw": f"{max_act:.6g}",
        "mean_act": num(cols["mean_act"][i]), "dead": not cols["count"][i], "top_tokens": tokens[f],
        "top": Markup("".join(top)), "intervals": intervals, "histograms": [h for h in hists if h is not None],
        "logits": logit_tables(detail.logits, vocab), "neighbors": neighbors,
    }


HISTOGRAM_KINDS = (("activation", "Activations", "non-zero, count per bin"),
                   ("logit", "Logit effects", "over the vocabulary"))


def feature_histograms(details: dict[int, site_data.FeatureDetail]) -> dict[int, list[Histogram | None]]:
    """Per feature of a chunk, its activation and logit-effect histograms (None where absent)."""
    out = {f: [] for f in details}
    for kind, title, note in HISTOGRAM_KINDS:
        have = [f for f, d in details.items() if kind in d.histograms]
        views = dict(zip(have, histograms([details[f].histograms[kind] for f in have], title, note,
                                          signed=kind == "logit")))
        for f in details:
            out[f].append(views.get(f))
    return out


def example_rows(examples: site_data.Examples, row_max: np.ndarray, tokens: TokenHtml) -> list[str]:
    """Every example window of a chunk -> its HTML row, vectorised over the whole chunk.

        <div class="ex"><span class="xa">ACT</span><p class="ctx"><span>TOKEN</span>...</p></div>

    A Jinja loop costs about 3 us per token and a page has ~1.5k tokens, so the rows are built
    here. Token text comes only from `tokens` (escaped once per vocabulary entry); everything
    else is literal markup and formatted numbers, so the rows are safe HTML. A token with a
    non-zero activation gets a shade class a1..a8 (its act over its feature's max act, `row_max`
    per window) and its value in data-v for the hover tooltip; the activating token gets class c.
    """
    ids = examples.token_ids.astype(np.int64)
    acts = examples.acts.astype(np.float64)
    offsets = examples.offsets.astype(np.int64)
    lengths = np.diff(offsets)
    known = (ids >= 0) & (ids < len(tokens.text))
    safe_ids = np.where(known, ids, 0)
    parts = tokens.span[safe_ids].tolist()
    unknown = {j: str(escape(f"\u27e8{ids[j]}\u27e9")) for j in np.flatnonzero(~known).tolist()}
    for j, text in unknown.items():  # ids the vocab lacks show as ⟨id⟩
        parts[j] = f"<span>{text}</span>"

    centers = examples.center.astype(np.int64)
    valid = (centers >= 0) & (centers < lengths)
    is_center = np.zeros(ids.size, dtype=bool)
    is_center[(offsets[:-1] + centers)[valid]] = True
    marked = np.flatnonzero((acts != 0) | is_center)
    scale = np.where(row_max > 0, N_SHADES / np.where(row_max > 0, row_max, 1.0), 0.0)
    token_row = np.repeat(np.arange(lengths.size), lengths)
    shades = np.clip(np.ceil(acts[marked] * scale[token_row[marked]]), 0, N_SHADES).astype(np.int64)
    opens = map(_OPEN_TAGS.__getitem__, (shades * 2 + is_center[marked]).tolist())
    texts = map(tokens.text.__getitem__, safe_ids[marked].tolist())
    for j, tag, value, text in zip(marked.tolist(), opens, act_strings(acts[marked]), texts):
        parts[j] = f'{tag}{value}">{unknown.get(j, text)}</span>'
    return [f'<div class="ex"><span class="xa">{act}</span><p class="ctx">{"".join(parts[a:b])}</p></div>\n'
            for act, a, b in zip(act_strings(np.asarray(examples.act, dtype=np.float64)),
                                 offsets[:-1].tolist(), offsets[1:].tolist())]


def _open_tag(shade: int, center: bool) -> str:
    classes = ([f"a{shade}"] if shade else []) + (["c"] if center else [])
    return "<span" + (f' class="{" ".join(classes)}"' if classes else "") + ' data-v="'


_OPEN_TAGS = [_open_tag(shade, c) for shade in range(N_SHADES + 1) for c in (False, True)]  # [2*shade + c]
# "%.3g" strings of 3-significant-digit values between 1e-4 and 1e5, by (exponent, mantissa):
# a table lookup is several times cheaper than formatting the ~250 hover values of a page.
_EXPONENTS = range(-4, 5)
_ACT_TABLE = [f"{m * 10.0 ** (e - 2):.3g}" for e in _EXPONENTS for m in range(100, 1000)]


def act_strings(values: np.ndarray) -> list[str]:
    """f"{v:.3g}" for every value (table lookup where possible, format() for the rest)."""
    mag = np.where(np.isfinite(values), np.abs(values), 0.0)
    exp = np.floor(np.log10(np.where(mag > 0, mag, 1.0))).astype(np.int64)
    mant = np.rint(mag / 10.0 ** (exp - 2)).astype(np.int64)
    exp, mant = np.where(mant >= 1000, exp + 1, exp), np.where(mant >= 1000, 100, mant)
    fast = (values > 0) & (mag > 0) & (exp >= _EXPONENTS.start) & (exp < _EXPONENTS.stop)
    index = np.where(fast, (exp - _EXPONENTS.start) * 900 + mant - 100, 0)
    out = list(map(_ACT_TABLE.__getitem__, index.tolist()))
    for j in np.flatnonzero(~fast).tolist():
        out[j] = f"{values[j]:.3g}"
    return out


def logit_tables(logits: dict, vocab: list[str]) -> list[LogitTable]:
    """One table per stored kind, 'gain_corrected' first (the one shown) when present. A kind that
    only rescales the shown one (same tokens and ranks, one factor) becomes a note, not a table."""
    order = sorted(logits, key=lambda k: ({"gain_corrected": 0, "raw": 1}.get(k, 2), k))
    tables, notes = [], []
    for kind in order:
        rows = sorted(logits[kind])  # ranks -10..-1, then 1..10
        title = _LOGIT_TITLES.get(kind, visible_text(kind))
        factor = _rescale_factor(sorted(logits[order[0]]), rows) if tables else None
        if factor is not None:
            notes.append(f"{title}: the same tokens, values × {factor:.4g}")
            continue
        tables.append((kind, title, rows))
    return [LogitTable(
        kind=visible_text(kind), title=title, shown=n == 0, notes=notes if n == 0 else [],
        pos=[(token(vocab, t), f"{v:+.3f}") for r, t, v in rows if r > 0],
        neg=[(token(vocab, t), f"{v:+.3f}") for r, t, v in reversed(rows) if r < 0],
    ) for n, (kind, title, rows) in enumerate(tables)]


def _rescale_factor(shown: list, other: list) -> float | None:
    if len(shown) != len(other) or any(a[:2] != b[:2] for a, b in zip(shown, other)):
        return None
    ratios = [b[2] / a[2] for a, b in zip(shown, other) if a[2] != 0]
    if not ratios or any(abs(r - ratios[0]) > 1e-3 * abs(ratios[0]) for r in ratios):
        return None
    return ratios[0]


def histogram(edges, counts, title: str, note: str, signed: bool = False, fmt=None) -> Histogram | None:
    """One histogram (see `histograms`)."""
    return histograms([(edges, counts)], title, note, signed, fmt)[0]


def histograms(pairs: list, title: str, note: str, signed: bool = False, fmt=None) -> list[Histogram | None]:
    """(edges, counts) pairs -> SVG views, vectorised over pairs of the same bin count.

    Bars are filled step polygons with integer coordinates (small pages); with `signed`, bins
    left of zero form a second polygon. None where there is nothing to draw.
    """
    fmt = fmt or num
    w, h = HIST_WIDTH, HIST_HEIGHT
    out: list[Histogram | None] = [None] * len(pairs)
    by_size: dict[int, list[int]] = {}
    for j, (edges, counts) in enumerate(pairs):
        if len(counts) > 0 and len(edges) == len(counts) + 1:
            by_size.setdefault(len(counts), []).append(j)
    for n, members in by_size.items():
        edges = np.array([pairs[j][0] for j in members], dtype=np.float64)
        counts = np.array([pairs[j][1] for j in members], dtype=np.float64)
        lo, hi, peak = edges[:, 0], edges[:, -1], counts.max(axis=1)
        span = hi - lo
        x = np.where((span > 0)[:, None], (edges - lo[:, None]) * (w / np.where(span > 0, span, 1.0))[:, None],
                     np.linspace(0, w, n + 1)[None, :])
        y = h - np.where(counts > 0, np.maximum(np.rint(counts * (h / np.where(peak > 0, peak, 1.0))[:, None]), 1), 0)
        split = np.count_nonzero(edges[:, :-1] + edges[:, 1:] < 0, axis=1) if signed else np.zeros(len(members), int)
        zero = np.rint(-lo / np.where(span > 0, span, 1.0) * w)
        drawable = (peak > 0) & np.isfinite(edges).all(axis=1)
        for j, xs, ys, s, z, ok, a, b, p in zip(members, np.rint(x).astype(np.int64).tolist(), y.astype(np.int64).tolist(),
                                                split.tolist(), zero.tolist(), drawable.tolist(), lo.tolist(),
                                                hi.tolist(), peak.tolist()):
            if ok:
                out[j] = Histogram(title, note, w, h, _polygon(xs, ys, s, n, h), _polygon(xs, ys, 0, s, h),
                                   int(z) if signed and a < 0 < b else None, fmt(a), fmt(b), num(int(p)))
    return out


def _polygon(x: list[int], y: list[int], a: int, b: int, base: int) -> str:
    """Bars a..b-1 as one step outline from the baseline."""
    if b <= a:
        return ""
    return f"M{x[a]} {base}" + "".join(map("V{}H{}".format, y[a:b], x[a + 1:b + 1])) + f"V{base}Z"


def meta_sections(meta: dict) -> list[tuple[str, list[tuple[str, str]]]]:
    """Model-card sections from `meta`: model, corpus, build, other objects; then scalars as 'store'."""
    keys = [k for k in _META_ORDER if k in meta] + sorted(k for k in meta if k not in _META_ORDER)
    sections, scalars = [], []
    for key in keys:
        value = meta[key]
        if isinstance(value, dict):
            sections.append((visible_text(key), [(visible_text(k), _meta_value(v)) for k, v in value.items()]))
        else:
            scalars.append((visible_text(key), _meta_value(value)))
    return sections + ([("store", scalars)] if scalars else [])


def _meta_value(value) -> str:
    if isinstance(value, (dict, list)):
        return visible_text(json.dumps(value, ensure_ascii=False, sort_keys=True))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return num(value)
    return visible_text("—" if value is None else str(value))


def model_name(meta: dict, saes: list[site_data.SaeInfo]) -> str:
    model = meta.get("model")
    for key in ("model_id", "name"):
        if isinstance(model, dict) and isinstance(model.get(key), str):
            return visible_text(model[key])
    return visible_text(saes[0].row.get("model_id") or "nanochat")


def num(x) -> str:
    if x is None:
        return "—"
    if type(x) is int:
        return f"{x:,}"
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def pct(x) -> str:
    return "—" if x is None else f"{x * 100:.3g}%"


def token(vocab: list[str], token_id: int) -> str:
    return vocab[token_id] if 0 <= token_id < len(vocab) else f"\u27e8{token_id}\u27e9"
