"""
Bulk reads of the feature store for the site renderer.

The renderer must turn out hundreds of feature pages per second, so it never queries per
feature: each SAE's feature table is read once, and the per-feature details (examples, interval
bins, logit effects, histograms, neighbours) are read a chunk of features at a time with one
query per table, then split by feature with np.searchsorted on the sorted feature column.

Notable choices
- Directory keys: an SAE on `hook_resid_post` lives under `layers/<L>/`, any other hook under
  `layers/<L>-<hook without "hook_">/` (e.g. `layers/4-resid_pre/`); should two SAEs still
  collide (same layer and hook), a slug of the sae_id is appended. SAEs are ordered by
  (layer, hook, sae_id), so keys are stable between builds.
- `meta` values are JSON; a value that is not valid JSON is kept as its raw string.
- Token ids missing from `vocab` display as "⟨id⟩" instead of failing the build.
- `center` is the 0-based index of the activating token within `token_ids`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import duckdb
import numpy as np
import pyarrow as pa

from atlas.tokens_display import visible_token

_DEFAULT_HOOK = "hook_resid_post"
_FEATURE_COLUMNS = ["feature", "density", "count", "max_act", "mean_act", "label", "label_rule", "label_f1"]
_OPTIONAL_FEATURE_COLUMNS = ["label_precision", "label_recall", "flags"]


@dataclass(frozen=True)
class SaeInfo:
    sae_id: str
    key: str  # directory name under layers/
    layer: int
    hook: str
    row: dict  # every column of its `saes` row, for the model card


@dataclass
class Examples:
    """Example windows of a set of features, as flat arrays (row r's tokens are
    token_ids[offsets[r]:offsets[r + 1]]), in (feature, kind, bin, rank) order."""
    feature: np.ndarray
    kind: list[str]  # 'top' | 'interval'
    bin: list[int | None]  # quantile bin of 'interval' rows
    act: list[float]
    center: np.ndarray  # index of the activating token within its window
    token_ids: np.ndarray
    acts: np.ndarray
    offsets: np.ndarray


@dataclass
class FeatureDetail:
    rows: range = range(0)  # this feature's rows in its chunk's Examples
    bins: dict[int, tuple[float, float, float]] = field(default_factory=dict)  # bin -> lo, hi, frac
    logits: dict[str, list[tuple[int, int, float]]] = field(default_factory=dict)  # kind -> (rank, token, value)
    histograms: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # kind -> edges, counts
    neighbors: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # kind -> (other, value)


def read_meta(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    meta = {}
    for key, value in con.execute("SELECT key, value FROM meta ORDER BY key").fetchall():
        try:
            meta[key] = json.loads(value) if value is not None else None
        except (TypeError, ValueError):
            meta[key] = value
    return meta


def read_saes(con: duckdb.DuckDBPyConnection) -> list[SaeInfo]:
    cur = con.execute("SELECT * FROM saes ORDER BY layer, hook, sae_id")
    names = [d[0] for d in cur.description]
    rows = [dict(zip(names, r)) for r in cur.fetchall()]
    for row in rows:
        if row["layer"] is None:
            raise ValueError(f"saes row {row['sae_id']!r} has no layer: cannot place it in the site")
    return [
        SaeInfo(sae_id=r["sae_id"], key=k, layer=int(r["layer"]), hook=r["hook"] or _DEFAULT_HOOK, row=r)
        for r, k in zip(rows, layer_keys(rows))
    ]


def layer_keys(rows: list[dict]) -> list[str]:
    """Directory keys for `saes` rows (see the module docstring); unique and stable."""
    base = []
    for r in rows:
        hook = r["hook"] or _DEFAULT_HOOK
        base.append(str(r["layer"]) if hook.removeprefix("hook_") == "resid_post"
                    else f"{r['layer']}-{_slug(hook.removeprefix('hook_'))}")
    counts = Counter(base)
    keys = [f"{k}-{_slug(r['sae_id'])}" if counts[k] > 1 else k for k, r in zip(base, rows)]
    for key, n in Counter(keys).items():
        if n > 1:
            ids = [r["sae_id"] for r, k in zip(rows, keys) if k == key]
            raise ValueError(f"SAEs {ids} map to the same site directory layers/{key}/")
    return keys


def read_vocab(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Visible display string of every token id, indexed by id (gaps filled with "⟨id⟩")."""
    rows = con.execute("SELECT token_id, token_bytes, display FROM vocab ORDER BY token_id").fetchall()
    size = rows[-1][0] + 1 if rows else 0
    vocab = [f"\u27e8{i}\u27e9" for i in range(size)]
    for token_id, token_bytes, display in rows:
        if token_id < 0:
            raise ValueError(f"vocab has a negative token_id {token_id}")
        if token_bytes is not None:
            vocab[token_id] = visible_token(token_bytes)
        elif display is not None:
            vocab[token_id] = visible_token(display.encode())
    return vocab


def read_features(con: duckdb.DuckDBPyConnection, sae_id: str) -> dict[str, list]:
    """The whole `features` table of one SAE as columns, ordered by feature.

    Columns added in schema version 2 (label_precision, label_recall, flags) are read
    when the store has them and are lists of None otherwise.
    """
    present = {r[0] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'features'").fetchall()}
    names = _FEATURE_COLUMNS + [c for c in _OPTIONAL_FEATURE_COLUMNS if c in present]
    cur = con.execute(f"SELECT {', '.join(names)} FROM features WHERE sae_id = ? ORDER BY feature", [sae_id])
    rows = cur.fetchall()
    cols = {name: [r[j] for r in rows] for j, name in enumerate(names)}
    for name in _OPTIONAL_FEATURE_COLUMNS:
        cols.setdefault(name, [None] * len(rows))
    return cols


def read_top_tokens(con: duckdb.DuckDBPyConnection, sae_id: str, n: int = 3) -> dict[int, list[int]]:
    """Per feature, the `n` most frequent activating tokens among its top examples."""
    rows = con.execute(
        """
        SELECT feature, tok FROM (
            SELECT feature, token_ids[center + 1] AS tok, count(*) AS n, max(act) AS m
            FROM examples WHERE sae_id = ? AND kind = 'top' AND token_ids[center + 1] IS NOT NULL
            GROUP BY feature, tok
            QUALIFY row_number() OVER (PARTITION BY feature ORDER BY n DESC, m DESC, tok) <= ?
        ) ORDER BY feature, n DESC, m DESC, tok
        """, [sae_id, n]).fetchall()
    top: dict[int, list[int]] = {}
    for feature, tok in rows:
        top.setdefault(feature, []).append(tok)
    return top


def iter_details(con: duckdb.DuckDBPyConnection, sae_id: str, features: list[int],
                 chunk_size: int = 512) -> Iterator[tuple[Examples, dict[int, FeatureDetail]]]:
    """Per-feature details, `chunk_size` features at a time (one query per table per chunk).

    Yields the chunk's examples and, per feature, its rows in them plus its other details.
    """
    for start in range(0, len(features), chunk_size):
        chunk = features[start:start + chunk_size]
        details = {f: FeatureDetail() for f in chunk}
        args = [sae_id, chunk[0], chunk[-1]]
        where = "WHERE sae_id = $1 AND feature BETWEEN $2 AND $3"

        ex = _arrow(con, "SELECT feature, kind, bin, act, center, token_ids, acts FROM examples "
                         f"{where} ORDER BY feature, kind DESC, bin DESC, rank", args)
        ids, id_offsets = _flat_lists(ex.column("token_ids"))
        acts, act_offsets = _flat_lists(ex.column("acts"))
        if not np.array_equal(id_offsets, act_offsets):
            raise ValueError(f"examples of SAE {sae_id!r}: token_ids and acts differ in length")
        examples = Examples(
            feature=ex.column("feature").to_numpy(), kind=ex.column("kind").to_pylist(),
            bin=ex.column("bin").to_pylist(), act=ex.column("act").to_pylist(),
            center=_int_or(ex.column("center").to_numpy(zero_copy_only=False), -1), token_ids=ids, acts=acts,
            offsets=id_offsets,
        )
        for f, i, j in _groups(examples.feature, details):
            details[f].rows = range(i, j)

        bins = con.execute(f"SELECT feature, bin, lo, hi, frac FROM interval_bins {where} ORDER BY feature, bin",
                           args).fetchnumpy()
        b, blo, bhi, bfrac = (bins[c].tolist() for c in ("bin", "lo", "hi", "frac"))
        for f, i, j in _groups(bins["feature"], details):
            details[f].bins = {b[r]: (blo[r], bhi[r], bfrac[r]) for r in range(i, j)}

        lg = con.execute(f"SELECT feature, kind, rank, token_id, value FROM logit_effects {where} "
                         "ORDER BY feature, kind, rank", args).fetchnumpy()
        lkind, lrank, ltok, lval = (lg[c].tolist() for c in ("kind", "rank", "token_id", "value"))
        for f, i, j in _groups(lg["feature"], details):
            for r in range(i, j):
                details[f].logits.setdefault(lkind[r] or "raw", []).append((lrank[r], ltok[r], lval[r]))

        hs = con.execute(f"SELECT feature, kind, edges, counts FROM histograms {where} ORDER BY feature, kind",
                         args).fetchnumpy()
        hkind = hs["kind"].tolist()
        for f, i, j in _groups(hs["feature"], details):
            for r in range(i, j):
                details[f].histograms[hkind[r]] = (hs["edges"][r], hs["counts"][r])

        nb = con.execute(f"SELECT feature, kind, rank, other_feature, value FROM neighbors {where} "
                         "ORDER BY feature, kind, rank", args).fetchnumpy()
        nkind, nother, nval = (nb[c].tolist() for c in ("kind", "other_feature", "value"))
        for f, i, j in _groups(nb["feature"], details):
            for r in range(i, j):
                details[f].neighbors.setdefault(nkind[r], []).append((nother[r], nval[r]))
        yield examples, details


def _arrow(con: duckdb.DuckDBPyConnection, sql: str, params: list) -> pa.Table:
    # DuckDB 1.x returns a Table here, 2.x a RecordBatchReader.
    result = con.sql(sql, params=params).arrow()
    return result.read_all() if hasattr(result, "read_all") else result


def _int_or(values: np.ndarray, missing: int) -> np.ndarray:
    """An integer column from Arrow (NULLs arrive as NaN floats) with NULL -> `missing`."""
    if values.dtype.kind == "f":
        values = np.where(np.isnan(values), missing, values)
    return values.astype(np.int64)


def _flat_lists(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A LIST column -> (all values, offsets from 0): row r is values[offsets[r]:offsets[r + 1]]."""
    lists = column.combine_chunks()
    offsets = lists.offsets.to_numpy().astype(np.int64)
    values = lists.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
    return values, offsets - offsets[0]


def _groups(feature_col: np.ndarray, details: dict[int, FeatureDetail]) -> Iterator[tuple[int, int, int]]:
    """(feature, start, end) row ranges of a feature-sorted column, for features in `details`."""
    feats = np.asarray(feature_col)
    if feats.size == 0:
        return
    wanted = np.fromiter(details, dtype=np.int64)
    starts = np.searchsorted(feats, wanted, side="left")
    ends = np.searchsorted(feats, wanted, side="right")
    for f, i, j in zip(wanted.tolist(), starts.tolist(), ends.tolist()):
        if j > i:
            yield f, i, j


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "sae"
