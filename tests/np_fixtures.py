"""
Small, realistic feature stores for the Neuronpedia export tests, built through SQL.

What a store from `build_store` holds, per SAE (default: layers 4 and 10, 40 features):
- documents of a token stream, each starting with BOS; example windows of 32 tokens around an
  activating token, so some windows reach back over a BOS into the previous document;
- 20 top examples and 5 interval bins × 6 examples per live feature (the exporter keeps 5 per
  bin; both counts are parameters); one interval example of every live feature repeats its
  3rd top example;
- the last feature is dead: density 0, no examples, no activation histogram;
- hostile strings in the vocabulary (NUL, '<script>', an RTL override, half a UTF-8 character,
  a literal backslash-u0000), shown in feature 0's examples, logits and label;
- labels: feature 1's is longer than 512 characters, feature 2 has none, feature 3 only blanks;
- activation histograms with 50 bins, logit histograms with 100 (the exporter re-bins to 50);
- gain-corrected logit effects for the first SAE only.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from atlas import neuronpedia, store

HOSTILE = [
    b"\x00",
    b"<script>alert('x')</script>",
    "\u202eexe.txt".encode(),
    b"\xc3",                       # the first half of a two-byte UTF-8 character
    b"\\u0000",                    # a literal backslash-u0000 (6 characters)
    b"\n",
    b' "quoted" & <b>',
]
BOS = b"<|bos|>"
BOS_ID = len(HOSTILE)
HOSTILE_LABEL = "say <script>alert(1)</script>\x00 \u202eevil"
WINDOW = 32
SAES = (("blocks.4.hook_resid_post", 4), ("blocks.10.hook_resid_post", 10))
CREATED_AT = "2026-01-02T03:04:05Z"


def vocab(size: int = 300) -> list[bytes]:
    words = ("the of and to in is that for it as def return import class value token "
             "feature data model layer ( ) : , . = [ ]").split()
    out = list(HOSTILE) + [BOS]
    i = 0
    while len(out) < size:
        w = words[i % len(words)]
        space = " " if (i // len(words)) % 2 == 0 else ""
        out.append((space + w + str(i // (2 * len(words)) or "")).encode())
        i += 1
    return out


def build_store(path: str | Path, *, saes=SAES, n_features: int = 40, vocab_size: int = 300,
                n_top: int = 20, per_bin: int = 6, seed: int = 0, meta: dict | None = None) -> Path:
    """Write a store at `path`; `n_top` top examples and `per_bin` examples per interval bin
    per live feature (n_top ≥ 3: one interval example repeats the 3rd top one)."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    toks = vocab(vocab_size)
    stream, doc_of, pos_of = _stream(rng, len(toks))
    con = store.connect(path)
    try:
        con.execute("BEGIN")
        _insert(con, "vocab", {
            "token_id": pa.array(np.arange(len(toks), dtype=np.int32)),
            "token_bytes": pa.array(toks, pa.binary()),
            "display": pa.array([t.decode("utf-8", "replace") for t in toks]),
        })
        default_meta = {
            "model": {"model_id": "nanochat-d20", "n_layer": 20, "n_embd": 64,
                      "vocab_size": len(toks)},
            "corpus": {"name": "fineweb-edu <sample>", "documents": 1200, "seq_len": 256,
                       "tokens": 300_000},
            "build": {"created_at": CREATED_AT, "git_commit": "0123abcd",
                      "command": "python -m scripts.build_atlas --layers 4,10"},
        }
        for key, value in (default_meta if meta is None else meta).items():
            con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, json.dumps(value)])
        for i, (sae_id, layer) in enumerate(saes):
            _fill_sae(con, rng, sae_id, layer, n_features, len(toks), stream, doc_of, pos_of,
                      n_top, per_bin, gain_corrected=(i == 0))
        con.execute("COMMIT")
    finally:
        con.close()
    return path


def _stream(rng, n_vocab: int):
    """Documents of 20..80 tokens, each BOS-prefixed; returns tokens, doc id and doc position."""
    ids, docs, pos = [], [], []
    for d in range(400):
        n = int(rng.integers(20, 80))
        body = rng.integers(BOS_ID + 1, n_vocab, n - 1)
        ids += [BOS_ID, *body.tolist()]
        docs += [d] * n
        pos += list(range(n))
    return np.array(ids), np.array(docs), np.array(pos)


def _fill_sae(con, rng, sae_id, layer, n_features, n_vocab, stream, doc_of, pos_of,
              n_top, per_bin, gain_corrected) -> None:
    dead = n_features - 1
    cfg = {"architecture": "topk", "d_in": 64, "d_sae": n_features, "k": 8,
           "hook_name": sae_id, "dtype": "float32"}
    con.execute(
        "INSERT INTO saes (sae_id, layer, hook, arch, d_in, d_sae, k, model_id, checkpoint, "
        "train_tokens, mine_tokens, cfg_json) VALUES (?, ?, ?, 'topk', 64, ?, 8, "
        "'nanochat-d20', 'base_checkpoints/d20/model_021400.pt', 1000000, 300000, ?)",
        [sae_id, layer, sae_id.rsplit(".", 1)[-1], n_features, json.dumps(cfg)])
    feats = np.arange(n_features)
    max_act = rng.uniform(2.0, 10.0, n_features)
    count = rng.integers(10, 5000, n_features)
    max_act[dead], count[dead] = 0.0, 0
    labels = [f"{w} tokens" for w in rng.choice(["the", "of", "def", "value"], n_features)]
    labels[0], labels[1], labels[2], labels[3] = HOSTILE_LABEL, "long " * 200, None, "   "
    labels[dead] = None
    _insert(con, "features", {
        "sae_id": pa.array([sae_id] * n_features),
        "feature": pa.array(feats.astype(np.int32)),
        "density": pa.array(count / 300_000),
        "count": pa.array(count),
        "max_act": pa.array(max_act.astype(np.float32)),
        "mean_act": pa.array((max_act * 0.3).astype(np.float32)),
        "label": pa.array(labels, pa.string()),
        "label_rule": pa.array(["max-token"] * n_features),
        "label_f1": pa.array([0.5 + f / (4 * n_features) if f % 7 else None for f in feats],
                             pa.float64()),
    })

    ex = {k: [] for k in ("feature", "kind", "rank", "bin", "doc_id", "token_pos", "act",
                          "token_ids", "acts", "center")}
    bins = {k: [] for k in ("feature", "bin", "lo", "hi", "frac")}
    where = np.arange(len(stream))
    candidates = np.flatnonzero((pos_of > 0) & (where >= WINDOW) & (where < len(stream) - WINDOW))
    for f in feats[feats != dead]:
        edges = np.concatenate([[0.01], np.sort(rng.uniform(0.05, 0.9, 4)), [1.0]]) * max_act[f]
        fracs = rng.dirichlet(np.ones(5))
        for b in range(5):
            for k, v in zip(bins, (f, b, edges[b], edges[b + 1], fracs[b])):
                bins[k].append(v)
        tops = np.sort(rng.uniform(0.7, 1.0, n_top))[::-1] * max_act[f]
        tops[0] = max_act[f]
        spots = rng.choice(candidates, n_top + 5 * per_bin, replace=False)
        plan = [("top", r + 1, None, tops[r], spots[r]) for r in range(n_top)]
        plan += [("interval", r + 1, b, rng.uniform(edges[b], edges[b + 1]),
                  spots[n_top + per_bin * b + r]) for b in range(5) for r in range(per_bin)]
        # the 1st example of the highest bin repeats the 3rd top example (same token)
        plan[n_top + per_bin * 4] = ("interval", 1, 4, tops[2], spots[2])
        for kind, rank, b, act, spot in plan:
            center = int(rng.integers(WINDOW // 2, WINDOW))
            start = spot - center
            ids = stream[start:start + WINDOW].copy()
            acts = np.where(rng.random(WINDOW) < 0.2, rng.uniform(0, 0.5, WINDOW) * act, 0.0)
            acts[center] = act
            if f == 0 and kind == "top" and rank <= len(HOSTILE):
                ids[center] = rank - 1
            for k, v in zip(ex, (f, kind, rank, b, int(doc_of[spot]), int(pos_of[spot]), act,
                                 ids.astype(np.int32), acts.astype(np.float32), center)):
                ex[k].append(v)
    _insert(con, "examples", {
        "sae_id": pa.array([sae_id] * len(ex["feature"])),
        "feature": pa.array(np.array(ex["feature"], np.int32)),
        "kind": pa.array(ex["kind"]),
        "rank": pa.array(np.array(ex["rank"], np.int32)),
        "bin": pa.array(ex["bin"], pa.int32()),
        "doc_id": pa.array(np.array(ex["doc_id"], np.int64)),
        "token_pos": pa.array(np.array(ex["token_pos"], np.int32)),
        "act": pa.array(np.array(ex["act"], np.float32)),
        "token_ids": pa.array(ex["token_ids"], pa.list_(pa.int32())),
        "acts": pa.array(ex["acts"], pa.list_(pa.float32())),
        "center": pa.array(np.array(ex["center"], np.int32)),
    })
    _insert(con, "interval_bins", {
        "sae_id": pa.array([sae_id] * len(bins["feature"])),
        "feature": pa.array(np.array(bins["feature"], np.int32)),
        "bin": pa.array(np.array(bins["bin"], np.int32)),
        "lo": pa.array(np.array(bins["lo"], np.float32)),
        "hi": pa.array(np.array(bins["hi"], np.float32)),
        "frac": pa.array(np.array(bins["frac"], np.float64)),
    })

    logit = {k: [] for k in ("feature", "rank", "token_id", "value", "kind")}
    for f in feats:
        pos = np.sort(rng.uniform(0.1, 1.5, 10))[::-1]
        neg = -np.sort(rng.uniform(0.1, 1.5, 10))[::-1]
        tok = rng.choice(np.arange(BOS_ID + 1, n_vocab), 20, replace=False)
        if f == 0:
            tok[:len(HOSTILE)] = np.arange(len(HOSTILE))
        for kind, scale in (("raw", 1.0), ("gain_corrected", 0.5))[:2 if gain_corrected else 1]:
            for r in range(10):
                for k, v in zip(logit, (f, r + 1, tok[r], pos[r] * scale, kind)):
                    logit[k].append(v)
                for k, v in zip(logit, (f, -(r + 1), tok[10 + r], neg[r] * scale, kind)):
                    logit[k].append(v)
    _insert(con, "logit_effects", {
        "sae_id": pa.array([sae_id] * len(logit["feature"])),
        "feature": pa.array(np.array(logit["feature"], np.int32)),
        "rank": pa.array(np.array(logit["rank"], np.int32)),
        "token_id": pa.array(np.array(logit["token_id"], np.int32)),
        "value": pa.array(np.array(logit["value"], np.float32)),
        "kind": pa.array(logit["kind"]),
    })

    hist = {k: [] for k in ("feature", "kind", "edges", "counts")}
    for f in feats:
        if f != dead:
            sample = rng.gamma(1.5, max_act[f] / 5, 1000).clip(0, max_act[f])
            edges = np.linspace(0, max_act[f], 51)
            for k, v in zip(hist, (f, "activation", edges, np.histogram(sample, edges)[0])):
                hist[k].append(v)
        sample = rng.normal(0, 0.3, n_vocab)
        edges = np.linspace(sample.min(), sample.max(), 101)
        for k, v in zip(hist, (f, "logit", edges, np.histogram(sample, edges)[0])):
            hist[k].append(v)
    _insert(con, "histograms", {
        "sae_id": pa.array([sae_id] * len(hist["feature"])),
        "feature": pa.array(np.array(hist["feature"], np.int32)),
        "kind": pa.array(hist["kind"]),
        "edges": pa.array(hist["edges"], pa.list_(pa.float64())),
        "counts": pa.array(hist["counts"], pa.list_(pa.int64())),
    })

    nb = {k: [] for k in ("feature", "kind", "rank", "other_feature", "value")}
    for f in feats:
        n_cos = min(10, n_features - 2)
        others = rng.choice(feats[feats != f], n_cos, replace=False)
        cos = np.sort(rng.uniform(0.1, 0.9, n_cos))[::-1]
        # co-activation partners: two of the cosine neighbours, then one that is not
        partners = [others[0], others[1], next(o for o in feats if o != f and o not in others)]
        for kind, lst, vals in (("decoder_cos", others, cos),
                                ("coactivation", partners, [0.8, 0.5, 0.3])):
            for r, (o, v) in enumerate(zip(lst, vals)):
                for k, val in zip(nb, (f, kind, r + 1, o, v)):
                    nb[k].append(val)
    _insert(con, "neighbors", {
        "sae_id": pa.array([sae_id] * len(nb["feature"])),
        "feature": pa.array(np.array(nb["feature"], np.int32)),
        "kind": pa.array(nb["kind"]),
        "rank": pa.array(np.array(nb["rank"], np.int32)),
        "other_feature": pa.array(np.array(nb["other_feature"], np.int32)),
        "value": pa.array(np.array(nb["value"], np.float64)),
    })


def _insert(con, table: str, columns: dict) -> None:
    con.register("_np_rows", pa.table(columns))
    try:
        names = ", ".join(columns)
        con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM _np_rows")
    finally:
        con.unregister("_np_rows")


# ----------------------------------------------------------------------------- file helpers

def read_jsonl(path: str | Path) -> list[dict]:
    data = Path(path).read_bytes()
    if str(path).endswith(".gz"):
        data = gzip.decompress(data)
    return [json.loads(line) for line in data.decode("utf-8").split("\n") if line]


def write_jsonl(path: str | Path, rows: list, raw_lines: dict[int, str] | None = None) -> None:
    """Rewrite a (gzipped) JSONL file the way the exporter writes it (rows holding NaN or Inf
    as Python's json writes them); `raw_lines` replaces 0-based lines with raw text."""
    lines = []
    for r in rows:
        try:
            lines.append(neuronpedia.dumps(r))
        except ValueError:
            lines.append(json.dumps(r, ensure_ascii=False))
    for i, text in (raw_lines or {}).items():
        lines[i] = text
    data = ("\n".join(lines) + "\n").encode("utf-8")
    Path(path).write_bytes(gzip.compress(data, mtime=0) if str(path).endswith(".gz") else data)
