"""
Neuronpedia export: the DuckDB feature store → Neuronpedia's bulk-import layout, plus the
bodies for its self-serve REST API and SAEDashboard-compatible batch files.

What is written under `out_dir` (spec: shared/specs/atlas_and_neuronpedia.md §B):

    {modelId}/{sourceId}/release.jsonl, model.jsonl, sourceset.jsonl, source.jsonl
    {modelId}/{sourceId}/features/batch-{k}.jsonl.gz       Neuron rows, 1024 features per file
    {modelId}/{sourceId}/activations/batch-{k}.jsonl.gz    Activation rows of the same features
    {modelId}/{sourceId}/explanations/batch-{k}.jsonl.gz   Explanation rows (labelled features)
    neuronpedia_api_payloads/plan.json + *.json            request bodies, ≤128 features each
    saedashboard_compat/{model}_{set}_{hook}_{d_sae}/      batch-{k}.json (SAEDashboard shape)
    manifest.json, README.txt                              files, counts, sha256; how to hand over

Notable choices
- The store is the only input: no model, no SAE weights. What the store cannot provide stays
  empty and its UI switch off: neuron alignment and correlated neurons need decoder rows
  (so `showCorrelated` is false), steering vectors, UMAP.
- Deterministic: ids are sha1(modelId|sourceId|index|k), `createdAt` is the build time recorded
  in the store (meta `build.created_at`, else the store file's mtime), JSON keys in a fixed
  order, gzip with mtime 0. The same store gives byte-identical files.
- Every line of a file carries every key: the importer takes its column list from line 1.
- Strings come from a corpus and a tokenizer, so they are untrusted: raw token bytes are decoded
  with replacement, NUL becomes U+FFFD (Postgres rejects NUL), and a literal backslash-u0000 in a
  string is written as \\u005cu0000 so the importer's text-level NUL replace cannot corrupt it.
- Never an empty .jsonl.gz: the importer JSON-parses the first line of every file.
- Logit tables use the gain-corrected W_dec·W_U when the store has it, else the raw product;
  `source.notes` says which.
- Written atomically: everything goes to a temporary sibling directory that replaces `out_dir`
  at the end. An existing `out_dir` is replaced only if it holds a previous export.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from tqdm import tqdm

from atlas import saedashboard
from atlas import store as feature_store

FORMAT = "nanochat-atlas/neuronpedia-export/1"
API_FORMAT = "nanochat-atlas/neuronpedia-api/1"
API_DIR = "neuronpedia_api_payloads"
SAEDASHBOARD_DIR = "saedashboard_compat"
BOT_CREATOR_ID = "clkht01d40000jv08hvalcvly"  # Neuronpedia's seeded bot user (prisma/seed.ts)
FEATURES_PER_FILE = 1024
API_FEATURES_PER_BATCH = 128
HIST_BINS = 50
MAX_TOKENS = 128
MAX_COS_NEIGHBORS = 50
MAX_CORRELATED = 3
MAX_DESCRIPTION = 512
BOS_BYTES = b"<|bos|>"

MODEL_ID_RE = re.compile(r"^[a-z][a-z0-9.-]*[a-z0-9]$")
SET_NAME_RE = re.compile(r"^[a-z][a-z0-9-]*[a-z0-9]$")
SOURCE_ID_RE = re.compile(r"^(\d+)-([a-z][a-z0-9-]*[a-z0-9])(?:__([a-z0-9][a-z0-9-]*))?$")

# Exact key sets, in the order they are written (spec §B.2). The validator checks against these.
RELEASE_KEYS = (
    "name", "description", "descriptionShort", "urls", "creatorName", "creatorNameShort",
    "creatorEmail", "creatorId", "visibility", "isNewUi", "featured", "defaultSourceSetName",
    "defaultSourceId", "defaultUmapSourceIds", "createdAt",
)
MODEL_KEYS = (
    "id", "instruct", "creatorId", "displayNameShort", "displayName", "tlensId", "dimension",
    "visibility", "defaultSourceSetName", "defaultSourceId", "inferenceEnabled", "layers",
    "neuronsPerLayer", "createdAt", "updatedAt", "owner", "website",
)
SOURCESET_KEYS = (
    "modelId", "name", "creatorId", "hasDashboards", "visibility", "description", "type",
    "creatorName", "urls", "creatorEmail", "releaseName", "defaultOfModelId", "defaultRange",
    "defaultShowBreaks", "showDfa", "showCorrelated", "showHeadAttribution", "showUmap",
    "createdAt",
)
SOURCE_KEYS = (
    "id", "modelId", "setName", "creatorId", "hasDashboards", "inferenceEnabled",
    "inferenceHosts", "saelensConfig", "saelensRelease", "saelensSaeId", "hfRepoId",
    "hfFolderId", "visibility", "defaultOfModelId", "hasUmap", "hasUmapLogSparsity",
    "hasUmapClusters", "num_prompts", "num_tokens_in_prompt", "dataset", "notes", "createdAt",
)
FEATURE_KEYS = (
    "modelId", "layer", "index", "creatorId", "createdAt", "sourceSetName", "maxActApprox",
    "hasVector", "vector", "vectorLabel", "vectorDefaultSteerStrength", "hookName",
    "topkCosSimIndices", "topkCosSimValues",
    "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
    "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1",
    "pos_str", "pos_values", "neg_str", "neg_values", "frac_nonzero",
    "freq_hist_data_bar_values", "freq_hist_data_bar_heights",
    "logits_hist_data_bar_values", "logits_hist_data_bar_heights", "decoder_weights_dist",
    "umap_x", "umap_y", "umap_cluster", "umap_log_feature_sparsity",
)
ACTIVATION_KEYS = (
    "id", "modelId", "layer", "index", "tokens", "values", "maxValue", "maxValueTokenIndex",
    "minValue", "binMin", "binMax", "binContains", "qualifyingTokenIndex", "dfaValues",
    "dfaTargetIndex", "dfaMaxValue", "lossValues", "logitContributions", "creatorId",
    "createdAt", "dataSource", "dataIndex",
)
EXPLANATION_KEYS = (
    "id", "modelId", "layer", "index", "description", "authorId", "typeName",
    "explanationModelName", "embedding", "umap_x", "umap_y", "umap_cluster",
    "umap_log_feature_sparsity", "notes", "createdAt",
)

# Hook type → (short name used in the source-set name, Neuronpedia's "type" label).
HOOK_NAMES = {
    "hook_resid_post": ("res", "Residual Stream"),
    "hook_resid_pre": ("res-pre", "Residual Stream Pre"),
    "hook_resid_mid": ("res-mid", "Residual Stream Mid"),
    "hook_mlp_out": ("mlp-out", "MLP Out"),
    "hook_mlp_in": ("mlp-in", "MLP In"),
    "hook_attn_out": ("att-out", "Attention Out"),
    "hook_attn_in": ("att-in", "Attention In"),
    "hook_z": ("att-z", "Attention Z"),
}
# nanochat phase directories → model-id run tag (spec §B.1: tag non-canonical checkpoints).
PHASE_TAGS = {
    "base_checkpoints": "", "mid_checkpoints": "-mid",
    "chatsft_checkpoints": "-sft", "chatrl_checkpoints": "-rl",
}


class ExportError(ValueError):
    """The store cannot be exported as asked; the message names the SAE, feature or flag."""


@dataclass
class ExportConfig:
    release: str = "nanochat-atlas"          # SourceRelease.name: neuronpedia.org/{release}
    creator_id: str = BOT_CREATOR_ID
    creator_name: str = "nanochat-atlas"
    url: str | None = None                   # project page; goes into urls and API bodies
    created_at: str | None = None            # naive UTC ISO-8601; default: from the store
    top_examples: int = 20
    interval_examples: int = 5               # per interval bin, after removing top duplicates
    saedashboard: bool = True                # also write saedashboard_compat/


@dataclass(frozen=True)
class Source:
    """One SAE of the store and its Neuronpedia ids."""
    sae_id: str
    layer: int
    hook: str
    d_in: int
    d_sae: int
    model_id: str
    set_name: str
    source_id: str
    checkpoint: str | None
    instruct: bool
    saelens_config: dict


@dataclass
class Example:
    """One activation window, decoded and rounded, ready for every output format."""
    tokens: list[str]
    values: list[float]
    qualifying: int
    bin_min: float
    bin_max: float
    bin_contains: float
    data_index: str
    top: bool


@dataclass
class Feature:
    """Everything exported about one latent (values already rounded)."""
    index: int
    density: float
    max_act: float
    pos: list[tuple[str, float]]
    neg: list[tuple[str, float]]
    freq_hist: tuple[list[float], list[float]]
    logit_hist: tuple[list[float], list[float]]
    cos_indices: list[int]
    cos_values: list[float]
    corr_indices: list[int]
    corr_pearson: list[float]
    corr_cos: list[float | None]
    label: str | None
    label_notes: str | None
    examples: list[Example]


# ----------------------------------------------------------------------------- public API

def export_neuronpedia(
    store_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    model_id: str | None = None,
    source_set: str | None = None,
    quiet: bool = False,
    cfg: ExportConfig | None = None,
) -> dict:
    """Export every SAE of the store; return a summary (sources, counts, files, bytes)."""
    cfg = cfg or ExportConfig()
    store_path, out_dir = Path(store_path), Path(out_dir)
    _check_out_dir(out_dir)
    _check_flag("--model-id", model_id, MODEL_ID_RE)
    _check_flag("--source-set", source_set, SET_NAME_RE)
    if source_set == "neurons":
        raise ExportError("--source-set 'neurons' is reserved by Neuronpedia for neuron sources")

    con = feature_store.connect(store_path, read_only=True)
    try:
        meta = _load_meta(con, store_path)
        created_at = (naive_utc(cfg.created_at, "--created-at") if cfg.created_at
                      else _created_at(meta, store_path))
        sources = _plan_sources(con, meta, model_id, source_set)
        vocab, known, bos_id = _load_vocab(con)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            ctx = _Context(cfg, meta, created_at, vocab, known, bos_id, tmp, quiet,
                           _corpus(meta, "name"))
            summaries = [_export_source(con, ctx, src, sources) for src in sources]
            api = _write_api_plan(ctx, sources, summaries)
            _write_readme(ctx, sources, summaries)
            manifest = _write_manifest(ctx, summaries)
            _swap_in(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        con.close()

    summary = {
        "out_dir": str(out_dir),
        "created_at": created_at,
        "sources": [{k: v for k, v in s.items() if not k.startswith("_")} for s in summaries],
        "api_requests": len(api["requests"]),
        "files": len(manifest["files"]),
        "bytes": sum(f["bytes"] for f in manifest["files"]),
    }
    if not quiet:
        for s in summary["sources"]:
            print(f"{s['modelId']}/{s['sourceId']}: {s['features']} features, "
                  f"{s['activations']} activations, {s['explanations']} explanations")
        print(f"wrote {summary['files']} files ({summary['bytes'] / 1e6:.1f} MB) to {out_dir}")
    return summary


def model_id_from_checkpoint(checkpoint: str | None) -> str | None:
    """'…/chatsft_checkpoints/d20/model_000650.pt' → 'nanochat-d20-sft'; None if no d{N} tag."""
    if not checkpoint:
        return None
    parts = Path(checkpoint).parts
    for i in reversed(range(len(parts))):  # nanochat: {phase}_checkpoints/d{depth}/model_*.pt
        m = re.fullmatch(r"d(\d+)\w*", parts[i])
        if m:
            phase = PHASE_TAGS.get(parts[i - 1], "") if i > 0 else ""
            return f"nanochat-d{m.group(1)}{phase}"
    return None


def default_set_name(hook: str, d_sae: int) -> str:
    """'hook_resid_post', 16384 → 'atlas-res-16k' (spec §B.1)."""
    short = HOOK_NAMES.get(hook, (_slug(hook.removeprefix("hook_")), ""))[0]
    return f"atlas-{short}-{_width(d_sae)}"


def _width(d_sae: int) -> str:
    return f"{d_sae // 1024}k" if d_sae % 1024 == 0 else str(d_sae)


def activation_id(prefix: str, model_id: str, source_id: str, index: int, k: int) -> str:
    """25-character deterministic id: prefix + 24 hex chars of sha1 (spec §B.1)."""
    digest = hashlib.sha1(f"{model_id}|{source_id}|{index}|{k}".encode()).hexdigest()
    return prefix + digest[:24]


def clean_text(s: str) -> str:
    """Make an untrusted string safe for Neuronpedia's importer: no NUL characters."""
    return s.replace("\x00", "\ufffd")


def dumps(obj) -> str:
    """One JSON line: fixed key order, UTF-8, no NaN, no text the importer would mangle."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    # The importer replaces the 6 characters \u0000 in the raw text before parsing; a literal
    # backslash + "u0000" in a string is encoded as \\u0000, which that replace would break.
    return text.replace("\\\\u0000", "\\u005cu0000")


# ----------------------------------------------------------------------------- planning

@dataclass
class _Context:
    cfg: ExportConfig
    meta: dict
    created_at: str
    vocab: np.ndarray          # object array: token id → decoded string (None if absent)
    known: np.ndarray          # bool array: token id present in the vocab table
    bos_id: int | None
    root: Path
    quiet: bool
    dataset: str | None                # corpus name, for Activation.dataSource
    logit_kind: dict[str, str] = field(default_factory=dict)  # sae_id → 'gain_corrected'|'raw'


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        manifest = out_dir / "manifest.json"
        try:
            ours = json.loads(manifest.read_text())["format"] == FORMAT
        except (OSError, ValueError, KeyError, TypeError):
            ours = False
        if not ours:
            raise ExportError(
                f"{out_dir} exists and is not a previous Neuronpedia export (no {manifest.name} "
                "of ours); refusing to replace it. Choose an empty or new directory.")


def _check_flag(flag: str, value: str | None, pattern: re.Pattern) -> None:
    if value is not None and not (pattern.match(value) and "--" not in value
                                  and ".." not in value and 2 <= len(value) <= 32):
        raise ExportError(f"{flag} {value!r} is not a valid Neuronpedia id: 2..32 chars "
                          f"matching {pattern.pattern}, without '--' or '..'")


def _load_meta(con, store_path: Path) -> dict:
    try:
        rows = con.execute("SELECT key, value FROM meta").fetchall()
    except duckdb.CatalogException as e:
        raise ExportError(f"{store_path} is not a feature store (no meta table)") from e
    meta = {}
    for key, value in rows:
        try:
            meta[key] = json.loads(value)
        except (TypeError, ValueError):
            meta[key] = value
    return meta


def _created_at(meta: dict, store_path: Path) -> str:
    build = meta.get("build") if isinstance(meta.get("build"), dict) else {}
    stamp = build.get("created_at")
    if isinstance(stamp, str):
        return naive_utc(stamp, "meta build.created_at")
    mtime = datetime.fromtimestamp(int(store_path.stat().st_mtime), timezone.utc)
    return mtime.replace(tzinfo=None).isoformat()


def naive_utc(stamp: str, what: str) -> str:
    """'2026-01-02T04:04:05+01:00' → '2026-01-02T03:04:05' (Neuronpedia's createdAt form)."""
    try:
        dt = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError as e:
        raise ExportError(f"{what} {stamp!r} is not an ISO-8601 time") from e
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc).replace(tzinfo=None)
    return dt.replace(microsecond=0).isoformat()


def _plan_sources(con, meta, model_override, set_override) -> list[Source]:
    rows = con.execute(
        "SELECT sae_id, layer, hook, arch, d_in, d_sae, k, model_id, checkpoint, train_tokens, "
        "cfg_json FROM saes ORDER BY layer, sae_id").fetchall()
    if not rows:
        raise ExportError("the store has no SAEs (table saes is empty)")
    sources: list[Source] = []
    for sae_id, layer, hook, arch, d_in, d_sae, k, mid, ckpt, train_tokens, cfg_json in rows:
        if layer is None or layer < 0 or not d_sae or d_sae <= 0:
            raise ExportError(f"SAE {sae_id}: layer {layer!r} / d_sae {d_sae!r} are not usable")
        hook = hook or sae_id.rsplit(".", 1)[-1]
        model_id = model_override or _model_id_for(sae_id, mid, ckpt)
        set_name = set_override or default_set_name(hook, d_sae)
        sources.append(Source(
            sae_id=sae_id, layer=int(layer), hook=hook, d_in=int(d_in or 0), d_sae=int(d_sae),
            model_id=model_id, set_name=set_name, source_id=f"{layer}-{set_name}",
            checkpoint=ckpt, instruct=any(t in (ckpt or "") for t in ("chatsft", "chatrl")),
            saelens_config=_saelens_config(sae_id, hook, arch, d_in, d_sae, k, train_tokens,
                                           cfg_json),
        ))
    # Several SAEs on one layer in one set (e.g. resid_pre and resid_post under --source-set)
    # need the "__{variant}" suffix to keep source ids unique.
    seen: dict[tuple[str, str], int] = {}
    for s in sources:
        seen[(s.model_id, s.source_id)] = seen.get((s.model_id, s.source_id), 0) + 1
    out = []
    for s in sources:
        if seen[(s.model_id, s.source_id)] > 1:
            s = replace(s, source_id=f"{s.source_id}__{_slug(s.hook.removeprefix('hook_'))}")
        out.append(s)
    for s in out:
        _check_flag("source-set name (use --source-set)", s.set_name, SET_NAME_RE)
    keys = [(s.model_id, s.source_id) for s in out]
    if len(set(keys)) != len(keys):
        raise ExportError(f"two SAEs map to the same Neuronpedia source: {sorted(keys)}")
    return out


def _model_id_for(sae_id: str, stored: str | None, checkpoint: str | None) -> str:
    candidates = [_slug(stored) if stored else None, model_id_from_checkpoint(checkpoint)]
    for c in candidates:
        if c and MODEL_ID_RE.match(c) and 2 <= len(c) <= 32:
            return c
    raise ExportError(f"SAE {sae_id}: cannot derive a Neuronpedia model id from model_id "
                      f"{stored!r} or checkpoint {checkpoint!r}; pass --model-id")


def _slug(s: str) -> str:
    s = re.sub(r"[^a-z0-9.-]+", "-", s.lower())
    s = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", s))
    return s.strip("-.")


def _saelens_config(sae_id, hook, arch, d_in, d_sae, k, train_tokens, cfg_json) -> dict:
    try:
        cfg = json.loads(cfg_json) if cfg_json else None
    except ValueError as e:
        raise ExportError(f"SAE {sae_id}: saes.cfg_json is not valid JSON ({e})") from e
    if isinstance(cfg, dict) and cfg:
        return cfg
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "hook_name": sae_id,
           "hook": hook, "training_tokens": train_tokens}
    if k is not None:
        cfg["k"] = k
    return cfg


def _load_vocab(con) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Token strings as Neuronpedia shows them: raw bytes decoded with replacement (so half a
    UTF-8 character becomes U+FFFD), leading spaces and newlines kept, NUL replaced."""
    rows = con.execute("SELECT token_id, token_bytes FROM vocab ORDER BY token_id").fetchall()
    if not rows:
        raise ExportError("the store has no vocabulary (table vocab is empty)")
    strings = np.full(rows[-1][0] + 1, None, dtype=object)
    bos_id = None
    for tid, raw in rows:
        raw = bytes(raw or b"")
        strings[tid] = clean_text(raw.decode("utf-8", errors="replace"))
        if raw == BOS_BYTES:
            bos_id = tid
    return strings, np.array([t is not None for t in strings], dtype=bool), bos_id


# ----------------------------------------------------------------------------- one source

def _export_source(con, ctx: _Context, src: Source, all_sources: list[Source]) -> dict:
    sdir = ctx.root / src.model_id / src.source_id
    for sub in ("features", "activations", "explanations"):
        (sdir / sub).mkdir(parents=True, exist_ok=True)
    feats = con.execute(
        "SELECT feature, density, label, label_rule, label_f1 FROM features WHERE sae_id = ? "
        "ORDER BY feature", [src.sae_id]).fetchall()
    if not feats:
        raise ExportError(f"SAE {src.sae_id}: no rows in table features")
    for f, density, *_ in feats:
        if not 0 <= f < src.d_sae:
            raise ExportError(f"SAE {src.sae_id}: feature {f} outside [0, d_sae={src.d_sae})")
        if density is None or not 0.0 <= density <= 1.0:
            raise ExportError(f"SAE {src.sae_id} feature {f}: density {density!r} not in [0, 1]")
    logits = _load_logits(con, ctx, src)
    hists = _load_histograms(con, src)
    cos, corr, cos_pairs = _load_neighbors(con, src)
    bins = _load_bins(con, src)
    _write_metadata(ctx, src, [s for s in all_sources if s.model_id == src.model_id], sdir)

    dash = saedashboard.Writer(
        ctx.root / SAEDASHBOARD_DIR / f"{src.model_id}_{src.set_name}_{src.sae_id}_{src.d_sae}",
        model_id=src.model_id, layer=src.layer, sae_set=src.set_name,
    ) if ctx.cfg.saedashboard else None
    counts = {"features": 0, "activations": 0, "explanations": 0, "dead": 0}
    api_ok = "__" not in src.source_id  # the API cannot create suffixed sources
    api_pending: list[dict] = []
    api_requests: list[dict] = []  # plan.json entries of the batches written so far
    chunks = [feats[i:i + FEATURES_PER_FILE] for i in range(0, len(feats), FEATURES_PER_FILE)]
    bar = tqdm(chunks, desc=f"neuronpedia {src.source_id}", unit="batch",
               disable=ctx.quiet or not sys.stderr.isatty())
    for k, chunk in enumerate(bar):
        examples = _load_examples(con, ctx, src, chunk[0][0], chunk[-1][0], bins)
        features = [_feature(row, logits, hists, cos, corr, cos_pairs, examples.get(row[0], []))
                    for row in chunk]
        neurons = [_neuron_row(ctx, src, f) for f in features]
        acts = [[_activation_row(ctx, src, f, j, ex) for j, ex in enumerate(f.examples)]
                for f in features]
        expl = [_explanation_row(ctx, src, f) for f in features if f.label]
        _write_jsonl_gz(sdir / "features" / f"batch-{k}.jsonl.gz", neurons)
        flat = [row for rows in acts for row in rows]
        if flat:  # never an empty file: the importer parses line 1 of each
            _write_jsonl_gz(sdir / "activations" / f"batch-{k}.jsonl.gz", flat)
        if expl:
            _write_jsonl_gz(sdir / "explanations" / f"batch-{k}.jsonl.gz", expl)
        if dash:
            for n, a in zip(neurons, acts):
                dash.add(saedashboard.feature_from_rows(
                    n, a, n_prompts=_corpus(ctx.meta, "documents"),
                    n_tokens_in_prompt=_corpus(ctx.meta, "seq_len"), dataset=ctx.dataset))
        for f in features:
            if not f.examples:
                counts["dead"] += 1
                continue  # the API requires at least one activation per feature
            if api_ok:
                api_pending.append(_api_feature(f))
            if len(api_pending) == API_FEATURES_PER_BATCH:
                _write_api_batch(ctx, src, api_pending, api_requests)
        counts["features"] += len(features)
        counts["activations"] += len(flat)
        counts["explanations"] += len(expl)
    if api_pending:
        _write_api_batch(ctx, src, api_pending, api_requests)
    if dash:
        dash.close(run_settings=_dashboard_settings(ctx, src))
    if not any((sdir / "explanations").iterdir()):
        (sdir / "explanations").rmdir()
    return {"modelId": src.model_id, "sourceId": src.source_id, "saeId": src.sae_id,
            "layer": src.layer, "setName": src.set_name, **counts,
            "_api_requests": api_requests}


def _write_api_batch(ctx: _Context, src: Source, features: list[dict], requests: list) -> None:
    """Write one upload-batch body (then empty `features`) and note it for plan.json."""
    name = f"features-{src.model_id}-{src.source_id}-{len(requests):04d}.json"
    body = {"modelId": src.model_id, "source": src.source_id, "features": features}
    _write_text(ctx.root / API_DIR / name, dumps(body) + "\n")
    requests.append({"endpoint": "feature/upload-batch", "file": name, "modelId": src.model_id,
                     "source": src.source_id, "indices": [f["index"] for f in features]})
    features.clear()


def _write_metadata(ctx: _Context, src: Source, same_model: list[Source], sdir: Path) -> None:
    """release, model, sourceset and source rows: one line each, exactly the §B.2 keys."""
    cfg, t = ctx.cfg, ctx.created_at
    default = same_model[0]  # the lowest layer: the source Neuronpedia opens the model with
    urls = [cfg.url] if cfg.url else []
    model_cfg = ctx.meta.get("model") if isinstance(ctx.meta.get("model"), dict) else {}
    d_model = int(model_cfg.get("n_embd") or max(s.d_in for s in same_model))
    hook_type = HOOK_NAMES.get(src.hook, (src.hook, src.hook))[1]
    tag = src.model_id.removeprefix("nanochat-")
    release = {
        "name": cfg.release,
        "description": f"Sparse autoencoder features of nanochat ({src.model_id}), built with "
                       "nanochat-atlas",
        "descriptionShort": f"nanochat SAEs ({src.model_id})",
        "urls": urls,
        "creatorName": cfg.creator_name,
        "creatorNameShort": cfg.creator_name,
        "creatorEmail": None,
        "creatorId": cfg.creator_id,
        "visibility": "PUBLIC",
        "isNewUi": False,
        "featured": False,
        "defaultSourceSetName": default.set_name,
        "defaultSourceId": default.source_id,
        "defaultUmapSourceIds": [],
        "createdAt": t,
    }
    model = {
        "id": src.model_id,
        "instruct": src.instruct,
        "creatorId": cfg.creator_id,
        "displayNameShort": f"nanochat {tag}",
        "displayName": f"nanochat {tag} (karpathy/nanochat)",
        "tlensId": None,
        "dimension": d_model,
        "visibility": "PUBLIC",
        "defaultSourceSetName": default.set_name,
        "defaultSourceId": default.source_id,
        "inferenceEnabled": False,
        "layers": _n_layer(model_cfg, src, same_model),
        "neuronsPerLayer": 4 * d_model,  # nanochat's MLP width
        "createdAt": t,
        "updatedAt": t,
        "owner": "karpathy/nanochat",
        "website": "https://github.com/karpathy/nanochat",
    }
    sourceset = {
        "modelId": src.model_id,
        "name": src.set_name,
        "creatorId": cfg.creator_id,
        "hasDashboards": True,
        "visibility": "PUBLIC",
        "description": f"{hook_type} - {_width(src.d_sae)}",
        "type": hook_type,
        "creatorName": cfg.creator_name,
        "urls": urls,
        "creatorEmail": None,
        "releaseName": cfg.release,
        "defaultOfModelId": None,
        "defaultRange": 1,
        "defaultShowBreaks": True,
        "showDfa": False,
        "showCorrelated": False,  # neuron alignment / correlated neurons need decoder rows
        "showHeadAttribution": False,
        "showUmap": False,
        "createdAt": t,
    }
    source = {
        "id": src.source_id,
        "modelId": src.model_id,
        "setName": src.set_name,
        "creatorId": cfg.creator_id,
        "hasDashboards": True,
        "inferenceEnabled": False,
        "inferenceHosts": [],
        "saelensConfig": src.saelens_config,
        "saelensRelease": None,
        "saelensSaeId": None,
        "hfRepoId": None,
        "hfFolderId": None,
        "visibility": "PUBLIC",
        "defaultOfModelId": None,
        "hasUmap": False,
        "hasUmapLogSparsity": False,
        "hasUmapClusters": False,
        "num_prompts": _corpus(ctx.meta, "documents"),
        "num_tokens_in_prompt": _corpus(ctx.meta, "seq_len"),
        "dataset": ctx.dataset,
        "notes": _source_notes(ctx, src),
        "createdAt": t,
    }
    for name, row in (("release", release), ("model", model), ("sourceset", sourceset),
                      ("source", source)):
        _write_text(sdir / f"{name}.jsonl", dumps(row) + "\n")


def _n_layer(model_cfg: dict, src: Source, same_model: list[Source]) -> int:
    if model_cfg.get("n_layer"):
        return int(model_cfg["n_layer"])
    m = re.search(r"-d(\d+)", src.model_id)  # nanochat's d{depth} tag: depth == n_layer
    return int(m.group(1)) if m else max(s.layer for s in same_model) + 1


def _corpus(meta: dict, key: str):
    corpus = meta.get("corpus")
    value = corpus.get(key) if isinstance(corpus, dict) else None
    return clean_text(value) if isinstance(value, str) else value


def _source_notes(ctx: _Context, src: Source) -> str:
    build = ctx.meta.get("build") if isinstance(ctx.meta.get("build"), dict) else {}
    notes = [f"SAE on nanochat {src.sae_id}"]
    if src.hook == "hook_resid_post":
        notes[0] += (f" (the output of block {src.layer}, before the next block's resid/x0 "
                     "scalars and before the final RMSNorm)")
    if ctx.logit_kind[src.sae_id] == "gain_corrected":
        notes.append("logit tables: W_dec·W_U scaled by the gain of nanochat's residual scalars "
                     "and backout between this layer and the final norm")
    else:
        notes.append("logit tables: raw W_dec·W_U (no final norm, no softcap)")
    norm = src.saelens_config.get("normalize_activations")
    if norm:
        notes.append(f"SAE input normalisation: {norm}")
    if build.get("git_commit"):
        notes.append(f"atlas build {build['git_commit']}")
    if src.checkpoint:
        notes.append(f"checkpoint {src.checkpoint}")
    return clean_text("; ".join(notes))


# ----------------------------------------------------------------------------- store reads

def _load_logits(con, ctx: _Context, src: Source) -> dict[int, tuple[list, list]]:
    kinds = {k for (k,) in con.execute(
        "SELECT DISTINCT kind FROM logit_effects WHERE sae_id = ?", [src.sae_id]).fetchall()}
    kind = "gain_corrected" if "gain_corrected" in kinds else "raw"
    ctx.logit_kind[src.sae_id] = kind
    out: dict[int, tuple[list, list]] = {}
    rows = con.execute(
        "SELECT feature, rank, token_id, value FROM logit_effects WHERE sae_id = ? AND kind = ? "
        "ORDER BY feature, abs(rank)", [src.sae_id, kind]).fetchall()
    for f, rank, tid, value in rows:
        pos, neg = out.setdefault(f, ([], []))
        (pos if rank > 0 else neg).append((_token(ctx, tid, src, f), _num(value, src, f, "logit")))
    return out


def _load_histograms(con, src: Source) -> dict[tuple[int, str], tuple[list, list]]:
    out = {}
    for f, kind, edges, counts in con.execute(
            "SELECT feature, kind, edges, counts FROM histograms WHERE sae_id = ? "
            "AND kind IN ('activation', 'logit')", [src.sae_id]).fetchall():
        out[(f, kind)] = rebin(edges, counts, HIST_BINS, where=f"SAE {src.sae_id} feature {f} "
                                                             f"{kind} histogram")
    return out


def _load_neighbors(con, src: Source):
    """Decoder-cosine neighbours (≤50), co-activation neighbours (≤3), and every stored
    cosine by unordered pair, to put cosines next to correlations where the store has them."""
    cos: dict[int, list[tuple[int, float]]] = {}
    corr: dict[int, list[tuple[int, float]]] = {}
    pairs: dict[tuple[int, int], float] = {}
    for f, kind, other, value in con.execute(
            "SELECT feature, kind, other_feature, value FROM neighbors WHERE sae_id = ? "
            "AND kind IN ('decoder_cos', 'coactivation') AND other_feature <> feature "
            "ORDER BY feature, kind, rank", [src.sae_id]).fetchall():
        value = _num(value, src, f, f"{kind} neighbour")
        if kind == "decoder_cos":
            pairs.setdefault((min(f, other), max(f, other)), value)
        target = cos if kind == "decoder_cos" else corr
        lst = target.setdefault(f, [])
        if len(lst) < (MAX_COS_NEIGHBORS if kind == "decoder_cos" else MAX_CORRELATED):
            lst.append((int(other), value))
    return cos, corr, pairs


def _load_bins(con, src: Source) -> dict[tuple[int, int], tuple[float, float, float]]:
    return {(f, b): (_round(lo), _round(hi), _round(frac))
            for f, b, lo, hi, frac in con.execute(
                "SELECT feature, bin, lo, hi, frac FROM interval_bins WHERE sae_id = ?",
                [src.sae_id]).fetchall()}


def _load_examples(con, ctx: _Context, src: Source, lo: int, hi: int,
                   bins) -> dict[int, list]:
    """Top examples, then interval examples from the highest bin down, for features lo..hi.

    The windows of the whole chunk are decoded, checked and rounded as flat arrays (one numpy
    pass, not one per example); only the final slicing into rows is per example."""
    tbl = con.sql(
        "SELECT feature, kind, rank, bin, doc_id, token_pos, token_ids, acts, center "
        "FROM examples WHERE sae_id = ? AND feature BETWEEN ? AND ? "
        "ORDER BY feature, kind = 'interval', bin DESC, rank", params=[src.sae_id, lo, hi]).arrow()
    if isinstance(tbl, pa.RecordBatchReader):  # duckdb ≥ 1.4 streams, older returns a Table
        tbl = tbl.read_all()
    cols = {name: tbl[name].to_pylist() for name in
            ("feature", "kind", "rank", "bin", "doc_id", "token_pos", "center")}
    ids_col = tbl["token_ids"].combine_chunks()
    acts_col = tbl["acts"].combine_chunks()
    offsets = ids_col.offsets.to_numpy().astype(np.int64)
    ids = ids_col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    acts = acts_col.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    center = np.array([-1 if c is None else c for c in cols["center"]], dtype=np.int64)

    def where(i: int) -> str:
        return (f"SAE {src.sae_id} feature {cols['feature'][i]} {cols['kind'][i]} example "
                f"rank {cols['rank'][i]}")

    lengths, acts_lengths = np.diff(offsets), np.diff(acts_col.offsets.to_numpy())
    bad = (lengths != acts_lengths) | (center < 0) | (center >= lengths)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ExportError(f"{where(i)}: token_ids ({lengths[i]}), acts ({acts_lengths[i]}) and "
                          f"center ({cols['center'][i]}) do not describe a window")
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    if not np.isfinite(acts).all():
        raise ExportError(f"{where(int(row_of[~np.isfinite(acts)][0]))}: non-finite activation")
    inside = (ids >= 0) & (ids < len(ctx.known))
    inside[inside] = ctx.known[ids[inside]]
    if not inside.all():
        first = int(np.flatnonzero(~inside)[0])
        raise ExportError(f"{where(int(row_of[first]))}: token id {ids[first]} is not in "
                          "table vocab")
    starts, stops = _document_spans(ids, row_of, offsets, center, ctx.bos_id)
    tokens = ctx.vocab[ids].tolist()
    values = (np.round(acts, 4) + 0.0).tolist()  # + 0.0 turns -0.0 into 0.0

    out: dict[int, list[Example]] = {}
    seen_top: dict[int, set] = {}
    per_bin: dict[tuple[int, int], int] = {}
    for i, (f, kind, b) in enumerate(zip(cols["feature"], cols["kind"], cols["bin"])):
        key = (cols["doc_id"][i], cols["token_pos"][i])
        top_keys = seen_top.setdefault(f, set())
        if kind == "top":
            if len(top_keys) >= ctx.cfg.top_examples:
                continue
            top_keys.add(key)
            span = (-1.0, None, -1.0)  # binMax is the feature's maximum, filled in _feature
        elif kind == "interval":
            if key in top_keys or per_bin.get((f, b), 0) >= ctx.cfg.interval_examples:
                continue
            if (f, b) not in bins:
                raise ExportError(f"{where(i)}: bin {b} has no row in table interval_bins")
            per_bin[(f, b)] = per_bin.get((f, b), 0) + 1
            span = bins[(f, b)]
        else:
            raise ExportError(f"{where(i)}: unknown kind {kind!r} (expected 'top' or 'interval')")
        a, z = offsets[i] + starts[i], offsets[i] + stops[i]
        out.setdefault(f, []).append(Example(
            tokens[a:z], values[a:z], int(center[i] - starts[i]), span[0], span[1], span[2],
            f"{key[0]}:{key[1]}", kind == "top"))
    return out


def _document_spans(ids, row_of, offsets, center, bos_id) -> tuple[np.ndarray, np.ndarray]:
    """Per window, the [start, stop) to keep: the qualifying token's document without its BOS
    (cut after the last BOS before the centre and at the first BOS after it), ≤128 tokens."""
    n = len(center)
    lengths = np.diff(offsets)
    starts, stops = np.zeros(n, dtype=np.int64), lengths.copy()
    if bos_id is not None:
        at = np.flatnonzero(ids == bos_id)
        rows, local = row_of[at], at - offsets[row_of[at]]
        before, after = local < center[rows], local > center[rows]
        np.maximum.at(starts, rows[before], local[before] + 1)
        np.minimum.at(stops, rows[after], local[after])
    long = stops - starts > MAX_TOKENS
    starts[long] = np.maximum(starts[long], np.minimum(center[long] - MAX_TOKENS // 2,
                                                       stops[long] - MAX_TOKENS))
    stops[long] = starts[long] + MAX_TOKENS
    return starts, stops


def _token(ctx: _Context, tid: int, src: Source, f: int) -> str:
    if tid is None or not 0 <= tid < len(ctx.vocab) or ctx.vocab[tid] is None:
        raise ExportError(f"SAE {src.sae_id} feature {f}: logit token id {tid} is not in vocab")
    return ctx.vocab[tid]


def _num(x, src: Source, f: int, what: str) -> float:
    if x is None or not np.isfinite(x):
        raise ExportError(f"SAE {src.sae_id} feature {f}: {what} value {x!r} is not finite")
    return _round(x)


def _round(x, digits: int = 4) -> float:
    return round(float(x), digits) + 0.0


def rebin(edges, counts, n_bins: int, where: str = "histogram") -> tuple[list, list]:
    """Bin centres and heights on `n_bins` equal bins over the same range.

    Exact when the stored bins nest in the new ones (same count, or a multiple of it);
    otherwise counts are spread uniformly within each stored bin (heights are floats then).
    """
    edges = np.asarray(edges, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    if len(edges) != len(counts) + 1 or len(counts) == 0:
        raise ExportError(f"{where}: {len(edges)} edges for {len(counts)} counts")
    if not (np.isfinite(edges).all() and np.isfinite(counts).all()) or (np.diff(edges) < 0).any():
        raise ExportError(f"{where}: edges must be finite and non-decreasing")
    if len(counts) == n_bins:
        new_edges, heights = edges, counts
    elif edges[-1] > edges[0] and (np.diff(edges) > 0).all():
        new_edges = np.linspace(edges[0], edges[-1], n_bins + 1)
        cdf = np.concatenate([[0.0], np.cumsum(counts)])
        heights = np.diff(np.interp(new_edges, edges, cdf))
    else:
        raise ExportError(f"{where}: cannot re-bin {len(counts)} bins with empty width to {n_bins}")
    centres = (np.round((new_edges[:-1] + new_edges[1:]) / 2, 4) + 0.0).tolist()
    heights = (np.round(heights, 4) + 0.0).tolist()
    return centres, [int(h) if h.is_integer() else h for h in heights]


# ----------------------------------------------------------------------------- rows

def _feature(row, logits, hists, cos, corr, cos_pairs, examples: list[Example]) -> Feature:
    f, density, label, rule, f1 = row
    max_act = max((max(e.values) for e in examples), default=0.0)
    for e in examples:
        if e.top:
            e.bin_max = max_act
    pos, neg = logits.get(f, ([], []))
    cos_list = cos.get(f, [])
    corr_list = corr.get(f, [])
    label = clean_text(label or "").strip()[:MAX_DESCRIPTION].rstrip() or None
    notes = [f"rule={clean_text(rule)}"] if rule else []
    if f1 is not None:
        notes.append(f"F1={f1:.2f}")
    return Feature(
        index=int(f), density=float(density), max_act=max_act, pos=pos, neg=neg,
        freq_hist=hists.get((f, "activation"), ([], [])),
        logit_hist=hists.get((f, "logit"), ([], [])),
        cos_indices=[o for o, _ in cos_list], cos_values=[v for _, v in cos_list],
        corr_indices=[o for o, _ in corr_list], corr_pearson=[v for _, v in corr_list],
        corr_cos=[cos_pairs.get((min(f, o), max(f, o))) for o, _ in corr_list],
        label=label, label_notes="; ".join(notes) if label and notes else None,
        examples=examples,
    )


def _neuron_row(ctx: _Context, src: Source, f: Feature) -> dict:
    return {
        "modelId": src.model_id,
        "layer": src.source_id,
        "index": str(f.index),
        "creatorId": ctx.cfg.creator_id,
        "createdAt": ctx.created_at,
        "sourceSetName": src.set_name,
        "maxActApprox": f.max_act,
        "hasVector": False,
        "vector": [],
        "vectorLabel": None,
        "vectorDefaultSteerStrength": 10,
        "hookName": None,
        "topkCosSimIndices": f.cos_indices,
        "topkCosSimValues": f.cos_values,
        # neuron alignment needs decoder rows, correlated neurons model activations: neither
        # is in the store
        "neuron_alignment_indices": [],
        "neuron_alignment_values": [],
        "neuron_alignment_l1": [],
        "correlated_neurons_indices": [],
        "correlated_neurons_pearson": [],
        "correlated_neurons_l1": [],
        "correlated_features_indices": f.corr_indices,
        "correlated_features_pearson": f.corr_pearson,
        "correlated_features_l1": f.corr_cos,  # cosine in the "_l1" slot, as SAEDashboard does
        "pos_str": [s for s, _ in f.pos],
        "pos_values": [v for _, v in f.pos],
        "neg_str": [s for s, _ in f.neg],
        "neg_values": [v for _, v in f.neg],
        "frac_nonzero": f.density,
        "freq_hist_data_bar_values": f.freq_hist[0],
        "freq_hist_data_bar_heights": f.freq_hist[1],
        "logits_hist_data_bar_values": f.logit_hist[0],
        "logits_hist_data_bar_heights": f.logit_hist[1],
        "decoder_weights_dist": [],
        "umap_x": None,
        "umap_y": None,
        "umap_cluster": None,
        "umap_log_feature_sparsity": None,
    }


def _activation_row(ctx: _Context, src: Source, f: Feature, k: int, ex: Example) -> dict:
    top = max(ex.values)
    return {
        "id": activation_id("c", src.model_id, src.source_id, f.index, k),
        "modelId": src.model_id,
        "layer": src.source_id,
        "index": str(f.index),
        "tokens": ex.tokens,
        "values": ex.values,
        "maxValue": top,
        "maxValueTokenIndex": ex.values.index(top),
        "minValue": min(ex.values),
        "binMin": ex.bin_min,
        "binMax": ex.bin_max,
        "binContains": ex.bin_contains,
        "qualifyingTokenIndex": ex.qualifying,
        "dfaValues": [],
        "dfaTargetIndex": None,
        "dfaMaxValue": None,
        "lossValues": [],
        "logitContributions": None,
        "creatorId": ctx.cfg.creator_id,
        "createdAt": ctx.created_at,
        "dataSource": ctx.dataset,
        "dataIndex": ex.data_index,
    }


def _explanation_row(ctx: _Context, src: Source, f: Feature) -> dict:
    return {
        "id": activation_id("e", src.model_id, src.source_id, f.index, 0),
        "modelId": src.model_id,
        "layer": src.source_id,
        "index": str(f.index),
        "description": f.label,
        "authorId": ctx.cfg.creator_id,
        "typeName": None,
        "explanationModelName": None,
        "embedding": None,
        "umap_x": None,
        "umap_y": None,
        "umap_cluster": None,
        "umap_log_feature_sparsity": None,
        "notes": f.label_notes,
        "createdAt": ctx.created_at,
    }


def _api_feature(f: Feature) -> dict:
    """One feature of POST /api/feature/upload-batch (spec §B.3, §B.4)."""
    top = [e for e in f.examples if e.top]
    top_min = min((max(e.values) for e in top), default=None)
    acts = []
    for e in f.examples:
        if e.top:
            acts.append({"tokens": e.tokens, "values": e.values, "quantileMax": f.max_act,
                         "quantileMin": top_min, "quantileFraction": None})
        else:
            acts.append({"tokens": e.tokens, "values": e.values, "quantileMax": e.bin_max,
                         "quantileMin": e.bin_min, "quantileFraction": e.bin_contains})
    return {
        "index": f.index,
        "density": f.density,
        "topLogits": [{"token": s, "value": v} for s, v in f.pos[:20]],
        "bottomLogits": [{"token": s, "value": v} for s, v in f.neg[:20]],
        "explanations": ([{"text": f.label, "methodName": None, "modelName": None}]
                         if f.label else []),
        "activations": acts,
    }


def _dashboard_settings(ctx: _Context, src: Source) -> dict:
    return {
        "generator": "nanochat-atlas (from the DuckDB feature store)",
        "model_id": src.model_id, "sae_set": src.set_name, "sae_path": src.sae_id,
        "hook_name": src.sae_id, "layer": src.layer, "d_sae": src.d_sae,
        "n_features_at_a_time": saedashboard.FEATURES_PER_BATCH,
        "top_acts_group_size": ctx.cfg.top_examples,
        "quantile_group_size": ctx.cfg.interval_examples,
        "n_prompts_total": _corpus(ctx.meta, "documents"),
        "n_tokens_in_prompt": _corpus(ctx.meta, "seq_len"),
        "dataset_path": ctx.dataset,
        "created_at": ctx.created_at,
    }


# ----------------------------------------------------------------------------- files

def _write_api_plan(ctx: _Context, sources: list[Source], summaries: list[dict]) -> dict:
    """Bodies of model/new and source-set/new, and plan.json: every request in order."""
    api = ctx.root / API_DIR
    requests, skipped = [], []
    url = {"url": ctx.cfg.url} if ctx.cfg.url else {}
    for model_id in dict.fromkeys(s.model_id for s in sources):
        srcs = [s for s in sources if s.model_id == model_id]
        meta_model = ctx.meta.get("model") if isinstance(ctx.meta.get("model"), dict) else {}
        body = {"id": model_id, "layers": _n_layer(meta_model, srcs[0], srcs),
                "displayName": f"nanochat {model_id.removeprefix('nanochat-')}", **url}
        name = f"model-{model_id}.json"
        _write_text(api / name, json.dumps(body, indent=1) + "\n")
        requests.append({"endpoint": "model/new", "file": name, "modelId": model_id})
        for set_name in dict.fromkeys(s.set_name for s in srcs):
            s0 = next(s for s in srcs if s.set_name == set_name)
            hook_type = HOOK_NAMES.get(s0.hook, (s0.hook, s0.hook))[1]
            body = {"name": set_name, "modelId": model_id,
                    "description": f"{hook_type} - {_width(s0.d_sae)} (nanochat-atlas)"[:128],
                    **url}
            name = f"source-set-{model_id}-{set_name}.json"
            _write_text(api / name, json.dumps(body, indent=1) + "\n")
            requests.append({"endpoint": "source-set/new", "file": name, "modelId": model_id,
                             "name": set_name})
    for src, summ in zip(sources, summaries):
        if "__" in src.source_id:
            skipped.append({"modelId": src.model_id, "source": src.source_id,
                            "reason": "suffixed sources cannot be created through the API"})
            continue
        if summ["dead"]:
            skipped.append({"modelId": src.model_id, "source": src.source_id,
                            "reason": f"{summ['dead']} features without activations "
                                      "(the API requires at least one)"})
        requests += summ["_api_requests"]
    plan = {"format": API_FORMAT, "created_at": ctx.created_at, "requests": requests,
            "skipped": skipped}
    _write_text(api / "plan.json", json.dumps(plan, indent=1) + "\n")
    return plan


def _write_readme(ctx: _Context, sources: list[Source], summaries: list[dict]) -> None:
    lines = [
        "Neuronpedia export written by nanochat-atlas",
        "=" * 44,
        "",
        f"Build time (createdAt of every row): {ctx.created_at}",
        f"Release: {ctx.cfg.release}",
        "",
        "Sources (one directory each, in Neuronpedia's bulk-import layout):",
    ]
    for s in summaries:
        lines.append(f"  {s['modelId']}/{s['sourceId']}  ({s['saeId']}): {s['features']} "
                     f"features, {s['activations']} activations, {s['explanations']} explanations")
    lines += [
        "",
        "1. Check it",
        "   python -m scripts.neuronpedia_validate <this directory>",
        "",
        "2. Hand it over (the full export: histograms, logit tables, neighbours, labels)",
        "   Neuronpedia imports bulk data only from its own bucket, s3://neuronpedia-datasets/v1/",
        "   {modelId}/{sourceId}/, so the maintainers have to copy it there. Pack the model",
        "   directories and send them with the form behind \"Add New SAEs\" on neuronpedia.org",
        "   (https://forms.gle/Yg51TYFutJysiyDP7):",
    ]
    for model_id in dict.fromkeys(s.model_id for s in sources):
        lines.append(f"     tar czf {model_id}.tar.gz {model_id}/")
    lines += [
        "   They run `aws s3 sync . s3://neuronpedia-datasets/v1` and then, per source,",
        "   GET /api/admin/import?modelId=<modelId>&sourceId=<sourceId>.",
        "   manifest.json lists every file with its size, line count and sha256.",
        "",
        "3. Or upload it yourself (unlisted pages at once, but the API cannot carry",
        "   histograms, neighbours or correlations)",
        f"   {API_DIR}/ holds the request bodies, in the order of plan.json.",
        "   python -m scripts.neuronpedia_upload <this directory>          # dry run",
        "   NEURONPEDIA_API_KEY=... python -m scripts.neuronpedia_upload <this directory> --yes",
        "   A local ledger records what was sent, so a rerun never uploads a feature twice.",
        "",
        f"{SAEDASHBOARD_DIR}/ (if present) has the same data as SAEDashboard batch-N.json files,",
        "so upstream converters (neuronpedia-utils, sae_dashboard.neuronpedia_export) can",
        "regenerate the bulk layout as a cross-check.",
        "",
    ]
    _write_text(ctx.root / "README.txt", "\n".join(lines))


def _write_manifest(ctx: _Context, summaries: list[dict]) -> dict:
    files = []
    for path in sorted(p for p in ctx.root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        rel = path.relative_to(ctx.root).as_posix()
        if rel.endswith(".jsonl.gz"):
            data_lines = gzip.decompress(data).count(b"\n")
        elif rel.endswith(".jsonl"):
            data_lines = data.count(b"\n")
        else:
            data_lines = None
        files.append({"path": rel, "bytes": len(data), "lines": data_lines,
                      "sha256": hashlib.sha256(data).hexdigest()})
    build = ctx.meta.get("build") if isinstance(ctx.meta.get("build"), dict) else {}
    manifest = {
        "format": FORMAT,
        "created_at": ctx.created_at,
        "release": ctx.cfg.release,
        "store_schema_version": ctx.meta.get("schema_version"),
        "build": {"git_commit": build.get("git_commit"), "command": build.get("command")},
        "sources": [{k: v for k, v in s.items() if not k.startswith("_")} for s in summaries],
        "files": files,
    }
    _write_text(ctx.root / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest


def _write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                compresslevel=5, mtime=0) as gz:
        for row in rows:
            gz.write((dumps(row) + "\n").encode("utf-8"))


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))


def _swap_in(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)  # left by a crash between the two renames
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
