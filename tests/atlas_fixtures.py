"""
Realistic feature stores for tests and benchmarks, filled through SQL with random but
consistent data (no model, no mining run needed).

Consistency the renderer relies on, kept here as in a real store:
- every feature of every SAE has a `features` row; `max_act` equals its top example's act;
  `density = count / mine_tokens`; the last feature of each SAE is dead (count 0, no examples);
- examples are token windows from one token stream, `center` is the 0-based index of the
  activating token and `acts[center] == act`; top examples are in decreasing act order;
- interval examples fall inside their bin's [lo, hi], and bin fractions sum to 1;
- logit effects have ranks 1..10 and -1..-10; histograms have n_bins + 1 edges.

The vocabulary includes hostile strings (HOSTILE_TOKENS), and feature 0 of every SAE shows
them in its top examples, its label and its logit table, so escaping is tested everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from atlas import store
from atlas.tokens_display import visible_token

HOSTILE_TOKENS = [
    b"<script>alert(1)</script>",
    b"</script><img src=x onerror=alert(1)>",
    b"{{7*7}}",
    b"\x00",
    "\u202eevil".encode(),
    b"\n",
    b"\t",
    b"\xff\xfe",
    "a\u200db".encode(),
    b"\" onmouseover=\"alert(1)",
    b"&amp;",
    b"<|bos|>",
]
HOSTILE_LABEL = "say <script>alert(1)</script> {{7*7}} \u202edesrever\x00"
DEFAULT_SAES = (
    ("blocks.1.hook_resid_post", 1, "hook_resid_post"),
    ("blocks.3.hook_resid_post", 3, "hook_resid_post"),
)
_WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an not but "
    "def return self import class None True False print if else while value data model layer "
    "token feature python file list dict string number error ( ) : , . = [ ] { } + - * /"
).split()


def default_vocab(size: int = 300) -> list[bytes]:
    """Hostile tokens first, then word-like tokens (with and without a leading space)."""
    vocab = list(HOSTILE_TOKENS)
    i = 0
    while len(vocab) < size:
        word = _WORDS[i % len(_WORDS)]
        variant = i // len(_WORDS)
        text = (" " if variant % 2 == 0 else "") + word + ("" if variant < 2 else str(variant))
        vocab.append(text.encode())
        i += 1
    return vocab


def make_store(
    path: str | Path,
    *,
    saes=DEFAULT_SAES,
    n_features: int = 64,
    vocab: list[bytes] | None = None,
    token_stream: np.ndarray | None = None,
    window: int = 24,
    n_top: int = 10,
    n_bins: int = 5,
    per_bin: int = 3,
    n_hist_bins: int = 50,
    n_neighbors: int = 5,
    seed: int = 0,
    meta: dict | None = None,
    gain_corrected: bool = True,
) -> Path:
    """Write a complete store at `path` and return the path.

    `token_stream` (token ids from real text) makes example windows realistic; by default a
    Zipf-distributed stream over `vocab` is drawn. `gain_corrected` adds 'gain_corrected'
    logit effects to the first SAE only, so both display paths are exercised.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    vocab = default_vocab() if vocab is None else vocab
    n_vocab = len(vocab)
    if token_stream is None:
        ranks = rng.zipf(1.3, size=200_000) % (n_vocab - len(HOSTILE_TOKENS))
        token_stream = ranks + len(HOSTILE_TOKENS)
    token_stream = np.asarray(token_stream, dtype=np.int64)
    con = store.connect(path)
    try:
        con.execute("BEGIN")
        _insert(con, "vocab", {
            "token_id": pa.array(np.arange(n_vocab, dtype=np.int32)),
            "token_bytes": pa.array(vocab, pa.binary()),
            "display": pa.array([visible_token(b) for b in vocab]),
        })
        for key, value in (meta if meta is not None else _default_meta(n_vocab, saes)).items():
            con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, json.dumps(value)])
        for i, (sae_id, layer, hook) in enumerate(saes):
            _fill_sae(
                con, rng, sae_id, layer, hook, n_features, n_vocab, token_stream, window,
                n_top, n_bins, per_bin, n_hist_bins, n_neighbors, gain_corrected and i == 0,
            )
        con.execute("COMMIT")
    finally:
        con.close()
    return path


def _default_meta(n_vocab: int, saes) -> dict:
    return {
        "model": {
            "model_id": "nanochat-d4", "n_layer": 4, "n_embd": 256, "vocab_size": n_vocab,
            "parameters": 3_407_872, "checkpoint": "base_checkpoints/d4/model_000150.pt",
            "format": "nanochat Oct-2025",
        },
        "corpus": {
            "name": "fineweb-edu sample <script>alert(1)</script>",
            "documents": 12_000, "tokens": 2_500_000, "split": "val",
        },
        "build": {
            "command": "python -m scripts.build_atlas --layers " + ",".join(str(s[1]) for s in saes),
            "git_commit": "0123456789abcdef", "versions": {"torch": "2.13.0", "duckdb": "1.x"},
        },
    }


def _fill_sae(con, rng, sae_id, layer, hook, n_features, n_vocab, stream, window,
              n_top, n_bins, per_bin, n_hist_bins, n_neighbors, gain_corrected) -> None:
    mine_tokens = 2_500_000
    dead = n_features - 1
    con.execute(
        "INSERT INTO saes VALUES (?, ?, ?, 'topk', 256, ?, 32, 'nanochat-d4', "
        "'base_checkpoints/d4/model_000150.pt', 50000000, ?, ?, ?, ?, ?, ?, ?, ?, '{}')",
        [sae_id, layer, hook, n_features, float(rng.uniform(0.1, 0.3)), 32.0,
         1 / n_features, float(rng.uniform(0.05, 0.3)), float(rng.uniform(0.05, 0.2)),
         float(rng.uniform(0.8, 0.98)), mine_tokens, f"saes/{sae_id}"],
    )
    feats = np.arange(n_features)
    max_act = rng.uniform(2.0, 20.0, n_features).astype(np.float32)
    count = rng.integers(50, 50_000, n_features)
    max_act[dead], count[dead] = 0.0, 0
    labels = [f"“{visible_token(_pick_word(rng))}” tokens" for _ in feats]
    labels[0] = HOSTILE_LABEL
    labels[dead] = None
    density = count / mine_tokens
    flags = [["dead"] if c == 0 else (["ultra_low_density"] if d < 1e-4 else []) for c, d in zip(count, density)]
    flags[1] = ["weak_label", "bos_dominated"]
    f1 = rng.uniform(0.2, 0.95, n_features)
    _insert(con, "features", {
        "sae_id": pa.array([sae_id] * n_features),
        "feature": pa.array(feats.astype(np.int32)),
        "density": pa.array(density),
        "count": pa.array(count),
        "max_act": pa.array(max_act),
        "mean_act": pa.array(max_act * 0.3),
        "min_act": pa.array(max_act * 0.01),
        "label": pa.array(labels, pa.string()),
        "label_rule": pa.array([None if f == dead else "max_act_token" for f in feats], pa.string()),
        "label_f1": pa.array([None if f == dead else float(f1[f]) for f in feats], pa.float64()),
        "label_precision": pa.array([None if f == dead else float(min(1, f1[f] * 1.1)) for f in feats],
                                    pa.float64()),
        "label_recall": pa.array([None if f == dead else float(f1[f] * 0.9) for f in feats], pa.float64()),
        "flags": pa.array(flags, pa.list_(pa.string())),
    })

    live = feats[feats != dead]
    rows = {k: [] for k in ("feature", "kind", "rank", "bin", "doc_id", "token_pos", "act",
                            "token_ids", "acts", "center")}
    bin_rows = {k: [] for k in ("feature", "bin", "lo", "hi", "frac")}
    for f in live:
        top_acts = np.sort(rng.uniform(0.6, 1.0, n_top))[::-1] * max_act[f]
        top_acts[0] = max_act[f]
        edges = np.sort(rng.uniform(0.02, 0.6, n_bins - 1)) * max_act[f]
        edges = np.concatenate([[0.01 * max_act[f]], edges, [max_act[f]]])
        fracs = rng.dirichlet(np.ones(n_bins))
        for b in range(n_bins):
            bin_rows["feature"].append(f)
            bin_rows["bin"].append(b)
            bin_rows["lo"].append(edges[b])
            bin_rows["hi"].append(edges[b + 1])
            bin_rows["frac"].append(fracs[b])
        examples = [("top", r + 1, None, a) for r, a in enumerate(top_acts)]
        examples += [("interval", r + 1, b, rng.uniform(edges[b], edges[b + 1]))
                     for b in range(n_bins) for r in range(per_bin)]
        for j, (kind, rank, b, act) in enumerate(examples):
            start = int(rng.integers(0, len(stream) - window))
            ids = stream[start:start + window].copy()
            center = int(rng.integers(window // 2, window))
            acts = np.where(rng.random(window) < 0.15, rng.uniform(0, 1, window) * act, 0.0)
            acts[center] = act
            if f == 0 and kind == "top":  # hostile strings front and centre
                ids[center] = j % len(HOSTILE_TOKENS)
                ids[0] = (j + 1) % len(HOSTILE_TOKENS)
            rows["feature"].append(f)
            rows["kind"].append(kind)
            rows["rank"].append(rank)
            rows["bin"].append(b)
            rows["doc_id"].append(start // 512)
            rows["token_pos"].append(start % 512 + center)
            rows["act"].append(act)
            rows["token_ids"].append(ids.astype(np.int32))
            rows["acts"].append(acts.astype(np.float32))
            rows["center"].append(center)
    n = len(rows["feature"])
    _insert(con, "examples", {
        "sae_id": pa.array([sae_id] * n),
        "feature": pa.array(np.array(rows["feature"], np.int32)),
        "kind": pa.array(rows["kind"]),
        "rank": pa.array(np.array(rows["rank"], np.int32)),
        "bin": pa.array(rows["bin"], pa.int32()),
        "doc_id": pa.array(np.array(rows["doc_id"], np.int64)),
        "token_pos": pa.array(np.array(rows["token_pos"], np.int32)),
        "act": pa.array(np.array(rows["act"], np.float32)),
        "token_ids": pa.array(rows["token_ids"], pa.list_(pa.int32())),
        "acts": pa.array(rows["acts"], pa.list_(pa.float32())),
        "center": pa.array(np.array(rows["center"], np.int32)),
    })
    n = len(bin_rows["feature"])
    _insert(con, "interval_bins", {
        "sae_id": pa.array([sae_id] * n),
        "feature": pa.array(np.array(bin_rows["feature"], np.int32)),
        "bin": pa.array(np.array(bin_rows["bin"], np.int32)),
        "lo": pa.array(np.array(bin_rows["lo"], np.float32)),
        "hi": pa.array(np.array(bin_rows["hi"], np.float32)),
        "frac": pa.array(np.array(bin_rows["frac"], np.float64)),
    })

    kinds = ["raw", "gain_corrected"] if gain_corrected else ["raw"]
    logit = {k: [] for k in ("feature", "rank", "token_id", "value", "kind")}
    for f in feats:
        pos = np.sort(rng.uniform(0.1, 1.5, 10))[::-1]
        neg = -np.sort(rng.uniform(0.1, 1.5, 10))[::-1]
        toks = rng.choice(n_vocab, 20, replace=False)
        if f == 0:
            toks[: len(HOSTILE_TOKENS)] = np.arange(len(HOSTILE_TOKENS))
        for kind, scale in zip(kinds, (1.0, 0.8)):
            for r in range(10):
                logit["feature"] += [f, f]
                logit["rank"] += [r + 1, -(r + 1)]
                logit["token_id"] += [toks[r], toks[10 + r]]
                logit["value"] += [pos[r] * scale, neg[r] * scale]
                logit["kind"] += [kind, kind]
    n = len(logit["feature"])
    _insert(con, "logit_effects", {
        "sae_id": pa.array([sae_id] * n),
        "feature": pa.array(np.array(logit["feature"], np.int32)),
        "rank": pa.array(np.array(logit["rank"], np.int32)),
        "token_id": pa.array(np.array(logit["token_id"], np.int32)),
        "value": pa.array(np.array(logit["value"], np.float32)),
        "kind": pa.array(logit["kind"]),
    })

    hist = {k: [] for k in ("feature", "kind", "edges", "counts")}
    for f in feats:
        if f != dead:
            sample = rng.gamma(1.2, max_act[f] / 6, 2000).clip(0, max_act[f])
            edges = np.linspace(0, max_act[f], n_hist_bins + 1)
            hist["feature"].append(f)
            hist["kind"].append("activation")
            hist["edges"].append(edges)
            hist["counts"].append(np.histogram(sample, edges)[0])
        sample = rng.normal(0, 0.4, n_vocab)
        edges = np.linspace(sample.min(), sample.max(), n_hist_bins + 1)
        hist["feature"].append(f)
        hist["kind"].append("logit")
        hist["edges"].append(edges)
        hist["counts"].append(np.histogram(sample, edges)[0])
    n = len(hist["feature"])
    _insert(con, "histograms", {
        "sae_id": pa.array([sae_id] * n),
        "feature": pa.array(np.array(hist["feature"], np.int32)),
        "kind": pa.array(hist["kind"]),
        "edges": pa.array(hist["edges"], pa.list_(pa.float64())),
        "counts": pa.array(hist["counts"], pa.list_(pa.int64())),
    })

    nb = {k: [] for k in ("feature", "kind", "rank", "other_feature", "value")}
    for f in feats:
        for kind in ("decoder_cos", "coactivation"):
            others = rng.choice(feats[feats != f], min(n_neighbors, n_features - 1), replace=False)
            values = np.sort(rng.uniform(0.05, 0.9, len(others)))[::-1]
            for r, (o, v) in enumerate(zip(others, values)):
                nb["feature"].append(f)
                nb["kind"].append(kind)
                nb["rank"].append(r + 1)
                nb["other_feature"].append(o)
                nb["value"].append(v)
    n = len(nb["feature"])
    _insert(con, "neighbors", {
        "sae_id": pa.array([sae_id] * n),
        "feature": pa.array(np.array(nb["feature"], np.int32)),
        "kind": pa.array(nb["kind"]),
        "rank": pa.array(np.array(nb["rank"], np.int32)),
        "other_feature": pa.array(np.array(nb["other_feature"], np.int32)),
        "value": pa.array(np.array(nb["value"], np.float64)),
    })

    tf_tokens = rng.choice(n_vocab, min(50, n_vocab), replace=False)
    _insert(con, "token_features", {
        "sae_id": pa.array([sae_id] * len(tf_tokens)),
        "token_id": pa.array(tf_tokens.astype(np.int32)),
        "feature": pa.array(rng.choice(live, len(tf_tokens)).astype(np.int32)),
        "count": pa.array(rng.integers(1, 1000, len(tf_tokens))),
        "mean_act": pa.array(rng.uniform(0.1, 5, len(tf_tokens)).astype(np.float32)),
    })


def _pick_word(rng) -> bytes:
    return (" " + _WORDS[int(rng.integers(len(_WORDS)))]).encode()


def _insert(con, table: str, columns: dict) -> None:
    """Insert an Arrow table by column name (the store's column order is not assumed)."""
    data = pa.table(columns)
    con.register("_fixture_rows", data)
    try:
        names = ", ".join(columns)
        con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM _fixture_rows")
    finally:
        con.unregister("_fixture_rows")
