"""
The DuckDB feature store: schema and small helpers.

The store is the one artefact every later stage reads: the site renderer, the
Neuronpedia exporter and users with SQL. It holds only data, never HTML.

Conventions
- `sae_id` is the SAE's hook name, e.g. "blocks.10.hook_resid_post".
- `feature` is the latent index in 0..d_sae-1.
- Lists (token windows, histogram bins) are DuckDB LIST columns.
- `meta` holds build-wide facts (model card, corpus, versions) as JSON strings.
- Columns added after schema version 1 are added with ALTER TABLE ... IF NOT EXISTS, so a store
  written by an older build gains them on open; columns are never removed or renamed.
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key VARCHAR PRIMARY KEY,
    value VARCHAR              -- JSON-encoded
);
CREATE TABLE IF NOT EXISTS saes (
    sae_id VARCHAR PRIMARY KEY,
    layer INTEGER,
    hook VARCHAR,              -- e.g. 'hook_resid_post'
    arch VARCHAR,              -- topk | batchtopk | relu | gated | jumprelu
    d_in INTEGER,
    d_sae INTEGER,
    k INTEGER,                 -- NULL for architectures without k
    model_id VARCHAR,          -- e.g. 'nanochat-d20'
    checkpoint VARCHAR,        -- path of the model checkpoint the SAE was trained on
    train_tokens BIGINT,
    fvu DOUBLE,
    l0 DOUBLE,
    dead_frac DOUBLE,
    delta_ce DOUBLE,           -- nats
    kl DOUBLE,
    ce_recovered DOUBLE,
    mine_tokens BIGINT,        -- tokens (BOS excluded) seen by the mining pass
    sae_path VARCHAR,
    cfg_json VARCHAR           -- the SAE's cfg.json, verbatim
);
CREATE TABLE IF NOT EXISTS features (
    sae_id VARCHAR,
    feature INTEGER,
    density DOUBLE,            -- fraction of mined tokens with a non-zero activation
    count BIGINT,              -- number of mined tokens with a non-zero activation
    max_act REAL,
    mean_act REAL,             -- mean over non-zero activations (0 for dead latents)
    label VARCHAR,             -- offline rule-based label
    label_rule VARCHAR,        -- which rule produced the label
    label_f1 DOUBLE,           -- offline detection F1 of the label (NULL if unscored)
    PRIMARY KEY (sae_id, feature)
);
CREATE TABLE IF NOT EXISTS examples (
    sae_id VARCHAR,
    feature INTEGER,
    kind VARCHAR,              -- 'top' | 'interval'
    rank INTEGER,              -- 1-based order within (feature, kind, bin)
    bin INTEGER,               -- quantile bin for 'interval' (0 = lowest); NULL for 'top'
    doc_id BIGINT,             -- document index in the mined corpus
    token_pos INTEGER,         -- position of the activating token within its document (BOS = 0)
    act REAL,                  -- activation at token_pos
    token_ids INTEGER[],       -- window of token ids around token_pos
    acts REAL[],               -- the feature's activation on each window token
    center INTEGER             -- index of token_pos inside token_ids
);
CREATE TABLE IF NOT EXISTS interval_bins (
    sae_id VARCHAR,
    feature INTEGER,
    bin INTEGER,
    lo REAL,                   -- activation range of the bin (quantiles of non-zero activations)
    hi REAL,
    frac DOUBLE                -- fraction of non-zero activations in the bin (zeros excluded)
);
CREATE TABLE IF NOT EXISTS logit_effects (
    sae_id VARCHAR,
    feature INTEGER,
    rank INTEGER,              -- 1..10 top positive, -1..-10 top negative
    token_id INTEGER,
    value REAL,
    kind VARCHAR DEFAULT 'raw' -- 'raw' (W_dec·W_U) or 'gain_corrected'
);
CREATE TABLE IF NOT EXISTS histograms (
    sae_id VARCHAR,
    feature INTEGER,
    kind VARCHAR,              -- 'activation' | 'logit'
    edges DOUBLE[],            -- n_bins + 1 edges
    counts BIGINT[]            -- n_bins counts
);
CREATE TABLE IF NOT EXISTS neighbors (
    sae_id VARCHAR,
    feature INTEGER,
    kind VARCHAR,              -- 'decoder_cos' | 'coactivation'
    rank INTEGER,              -- 1-based
    other_feature INTEGER,
    value DOUBLE
);
CREATE TABLE IF NOT EXISTS vocab (
    token_id INTEGER PRIMARY KEY,
    token_bytes BLOB,          -- raw bytes of the token (special tokens: their literal name)
    display VARCHAR            -- printable form (invalid UTF-8 replaced, whitespace made visible)
);
CREATE TABLE IF NOT EXISTS token_features (
    sae_id VARCHAR,
    token_id INTEGER,
    feature INTEGER,
    count BIGINT,
    mean_act REAL
);
CREATE TABLE IF NOT EXISTS position_profile (
    sae_id VARCHAR,
    feature INTEGER,
    pos_lo INTEGER,            -- positions [pos_lo, pos_hi) in the model's window (BOS = 0)
    pos_hi INTEGER,
    count BIGINT,              -- activations of the feature at these positions
    mean_act REAL,             -- their mean
    density DOUBLE             -- count / mined tokens at these positions
);
CREATE TABLE IF NOT EXISTS lineage (
    sae_id VARCHAR,
    feature INTEGER,
    other_sae_id VARCHAR,      -- an SAE of the nearest layer above or below, same input width
    rank INTEGER,              -- 1-based, by decoder cosine
    other_feature INTEGER,
    value DOUBLE               -- cosine of the two decoder directions
);
CREATE TABLE IF NOT EXISTS token_counts (
    token_id INTEGER PRIMARY KEY,
    count BIGINT               -- occurrences among the mined (non-BOS) tokens; absent = 0
);
"""

# schema version 2: added by the miner (atlas/mine.py)
ADDED_COLUMNS = (
    ("features", "min_act", "REAL"),             # smallest non-zero activation (0 for dead latents)
    ("features", "label_precision", "DOUBLE"),   # offline detection precision of the label
    ("features", "label_recall", "DOUBLE"),      # offline detection recall of the label
    ("features", "flags", "VARCHAR[]"),          # dead, ultra_low_density, dense, position/BOS, weak_label
    ("token_features", "frac", "DOUBLE"),        # count / occurrences of the token in the mined text
    ("token_features", "rank", "INTEGER"),       # 1-based rank of the feature for this token (by count)
)


def connect(path: str | os.PathLike, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open a store. A missing store opened read-only is an error naming the file."""
    path = Path(path)
    if read_only and not path.exists():
        raise FileNotFoundError(f"feature store not found: {path}")
    con = duckdb.connect(str(path), read_only=read_only)
    if not read_only:
        create_schema(con)
    return con


def create_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(SCHEMA)
    for table, column, typ in ADDED_COLUMNS:
        con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {typ}")
    con.execute(
        "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)]
    )
