"""
Offline validator for a Neuronpedia export (spec §B.6); the `neuronpedia` package has none.

`validate(root)` reads an export directory as Neuronpedia's importer and upload API would and
returns every problem it finds, each naming the file, the 1-based line (JSONL files) and the key
(a path such as `values[3]` or `features[2].activations[0].tokens`).

Checks
- Structure: the four metadata files (exactly one line, exactly the schema keys), at least one
  features batch, activations unless every feature is dead, optional explanations; every line
  of a file has the key set of its first line (the importer takes its columns from line 1);
  no empty file or blank line (the importer parses line 1 and joins lines into one array).
- Ids: model, source-set and source ids match Neuronpedia's regexes; `layer` equals the
  directory's source id; `sourceSetName`/`setName` equal the source set's name; indices are
  unique canonical decimal strings in [0, d_sae); activation and explanation ids are 25
  characters and unique across the whole export; every activation and explanation refers to a
  feature of its source.
- Arrays: len(tokens) == len(values) in 1..1024; maxValue/minValue/maxValueTokenIndex agree with
  values; histograms have 50 centres and 50 heights (or none); pos_*/neg_* lengths match;
  frac_nonzero in [0, 1]; binContains in [0, 1] or −1.
- Values: descriptions 1..512 characters; no NaN or Inf; no NUL and no text the importer's
  raw `\\u0000` replace would hit; UTF-8.
- API payloads (`neuronpedia_api_payloads/`): the limits of the upload routes (≤128 features,
  indices unique ints, ≤20 logits, 1..1024 tokens, ≥1 activation, fractions in [0, 1]), and
  every uploaded feature exists in the bulk export; each feature is uploaded at most once.
- manifest.json: every listed file exists with its size and sha256.

Notable choices
- Severity "warning" for what works but is probably unintended (files over 100 MB, an empty
  `pos_str`, which hides Neuronpedia's stats panel, files not in the manifest); the CLI fails
  only on errors.
- NaN/NUL are located by walking a row only when its raw text contains a suspicious token, so
  clean rows cost one substring scan.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from atlas.neuronpedia import (
    ACTIVATION_KEYS, API_DIR, EXPLANATION_KEYS, FEATURE_KEYS, HIST_BINS, MODEL_ID_RE,
    MODEL_KEYS, RELEASE_KEYS, SAEDASHBOARD_DIR, SET_NAME_RE, SOURCE_ID_RE, SOURCE_KEYS,
    SOURCESET_KEYS,
)

MAX_GZ_BYTES = 100 * 1024 * 1024
ROW_ID_RE = re.compile(r"^[a-z][a-z0-9]{24}$")
INDEX_RE = re.compile(r"^(0|[1-9][0-9]*)$")
API_MAX_FEATURES = 128
API_MAX_INDEX = 10_000_000
API_MAX_LOGITS = 20
MAX_TOKENS = 1024
MAX_DESCRIPTION = 512
METADATA = (("release.jsonl", RELEASE_KEYS), ("model.jsonl", MODEL_KEYS),
            ("sourceset.jsonl", SOURCESET_KEYS), ("source.jsonl", SOURCE_KEYS))
HIST_PAIRS = (("freq_hist_data_bar_values", "freq_hist_data_bar_heights"),
              ("logits_hist_data_bar_values", "logits_hist_data_bar_heights"))


@dataclass(frozen=True)
class Problem:
    path: str                  # relative to the export root
    line: int | None           # 1-based line of a JSONL file
    key: str | None            # key path inside the row, e.g. "values[3]"
    message: str
    severity: str = "error"    # "error" | "warning"

    def __str__(self) -> str:
        where = self.path + (f":{self.line}" if self.line is not None else "")
        return f"{self.severity}: {where}: " + (f"{self.key}: " if self.key else "") + self.message


def validate(root: str | Path) -> list[Problem]:
    """Every problem of the export at `root` (empty list: valid)."""
    report = _Report(Path(root))
    if not report.root.is_dir():
        return [Problem(str(root), None, None, "not a directory")]
    _check_manifest(report)
    ids: dict[str, str] = {}          # activation/explanation id → where first seen
    features: dict[tuple[str, str], set[str]] = {}
    model_dirs = [d for d in sorted(report.root.iterdir()) if d.is_dir()
                  and d.name not in (API_DIR, SAEDASHBOARD_DIR) and not d.name.startswith(".")]
    if not model_dirs:
        report.add(".", None, None, "no {modelId}/{sourceId} directories")
    for mdir in model_dirs:
        _check_id(report, mdir.name, None, None, mdir.name, MODEL_ID_RE, "model id")
        sdirs = sorted((d for d in mdir.iterdir() if d.is_dir()), key=_source_order)
        if not sdirs:
            report.add(mdir.name, None, None, "no source directories")
        for f in sorted(p for p in mdir.iterdir() if not p.is_dir()):
            report.add(report.rel(f), None, None, "unexpected file", "warning")
        for sdir in sdirs:
            features[(mdir.name, sdir.name)] = _check_source(report, sdir, mdir.name, ids)
    if (report.root / API_DIR).is_dir():
        report.problems += validate_api_payloads(report.root, features)
    return report.problems


def validate_api_payloads(root: str | Path,
                          features: dict[tuple[str, str], set[str]] | None = None) -> list[Problem]:
    """Problems of `neuronpedia_api_payloads/` alone; `features` (modelId, sourceId) → indices
    of the bulk export, to check that every uploaded feature exists there."""
    report = _Report(Path(root))
    api = report.root / API_DIR
    plan = _load_json(report, api / "plan.json")
    if not isinstance(plan, dict) or not isinstance(plan.get("requests"), list):
        report.add(report.rel(api / "plan.json"), None, "requests", "missing or not a list")
        return report.problems
    sent: set[tuple[str, str, int]] = set()
    for i, req in enumerate(plan["requests"]):
        key = f"requests[{i}]"
        if not isinstance(req, dict) or not isinstance(req.get("file"), str) \
                or "/" in req["file"] or req["file"].startswith("."):
            report.add(report.rel(api / "plan.json"), None, key, "needs a plain 'file' name")
            continue
        path = api / req["file"]
        body = _load_json(report, path)
        if body is None:
            continue
        endpoint = req.get("endpoint")
        if endpoint == "model/new":
            _check_api_model(report, path, body)
        elif endpoint == "source-set/new":
            _check_api_source_set(report, path, body)
        elif endpoint == "feature/upload-batch":
            _check_api_features(report, path, body, req, sent, features)
        else:
            report.add(report.rel(api / "plan.json"), None, f"{key}.endpoint",
                       f"unknown endpoint {endpoint!r}")
    return report.problems


# ----------------------------------------------------------------------------- bulk layout

class _Report:
    def __init__(self, root: Path):
        self.root = root
        self.problems: list[Problem] = []

    def rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def add(self, path: str, line: int | None, key: str | None, message: str,
            severity: str = "error") -> None:
        self.problems.append(Problem(path, line, key, message, severity))


def _check_source(report: _Report, sdir: Path, model_id: str, ids: dict) -> set[str]:
    rel = report.rel(sdir)
    meta = {}
    for name, keys in METADATA:
        path = sdir / name
        if not path.is_file():
            report.add(f"{rel}/{name}", None, None, "missing")
            continue
        rows = list(_rows(report, path))
        if len(rows) != 1:
            report.add(report.rel(path), None, None, f"has {len(rows)} lines, expected exactly 1")
        if rows:
            _check_keys(report, report.rel(path), 1, rows[0][1], keys, unknown="error")
            meta[name] = rows[0][1]
    set_name = _check_metadata(report, rel, sdir.name, model_id, meta)
    d_sae = None
    cfg = meta.get("source.jsonl", {}).get("saelensConfig")
    if isinstance(cfg, dict) and isinstance(cfg.get("d_sae"), int):
        d_sae = cfg["d_sae"]

    indices: set[str] = set()
    live: set[str] = set()
    for path in _batches(report, sdir / "features", required=True):
        rel_path = report.rel(path)
        for line, row in _consistent_rows(report, path, FEATURE_KEYS):
            _check_feature(report, rel_path, line, row, model_id, sdir.name, set_name, d_sae,
                           indices, live)
    for path in _batches(report, sdir / "activations", required=bool(live)):
        rel_path = report.rel(path)
        for line, row in _consistent_rows(report, path, ACTIVATION_KEYS):
            _check_activation(report, rel_path, line, row, model_id, sdir.name, indices, ids)
    if (sdir / "explanations").exists():
        for path in _batches(report, sdir / "explanations", required=False):
            rel_path = report.rel(path)
            for line, row in _consistent_rows(report, path, EXPLANATION_KEYS):
                _check_explanation(report, rel_path, line, row, model_id, sdir.name, indices,
                                   ids)
    known = {"features", "activations", "explanations"} | {n for n, _ in METADATA}
    for p in sorted(sdir.iterdir()):
        if p.name not in known:
            report.add(report.rel(p), None, None, "unexpected file (not imported)", "warning")
    return indices


def _check_metadata(report: _Report, rel: str, source_id: str, model_id: str,
                    meta: dict) -> str | None:
    release, model = meta.get("release.jsonl", {}), meta.get("model.jsonl", {})
    sset, source = meta.get("sourceset.jsonl", {}), meta.get("source.jsonl", {})
    set_name = sset.get("name")
    checks = [
        ("model.jsonl", "id", model.get("id"), model_id),
        ("sourceset.jsonl", "modelId", sset.get("modelId"), model_id),
        ("source.jsonl", "modelId", source.get("modelId"), model_id),
        ("source.jsonl", "id", source.get("id"), source_id),
        ("source.jsonl", "setName", source.get("setName"), set_name),
        ("sourceset.jsonl", "releaseName", sset.get("releaseName"), release.get("name")),
    ]
    for name, key, got, want in checks:
        if name in meta and got != want:
            report.add(f"{rel}/{name}", 1, key, f"is {got!r}, expected {want!r}")
    if set_name is not None:
        _check_id(report, f"{rel}/sourceset.jsonl", 1, "name", set_name, SET_NAME_RE,
                  "source set name")
        if set_name == "neurons":
            report.add(f"{rel}/sourceset.jsonl", 1, "name", "'neurons' is reserved")
    m = SOURCE_ID_RE.match(source_id)
    if not m:
        report.add(rel, None, None, f"source id {source_id!r} is not '{{layer}}-{{set}}[__suffix]'")
    elif set_name is not None and m.group(2) != set_name:
        report.add(rel, None, None, f"source id {source_id!r} does not name set {set_name!r}")
    layers = model.get("layers")
    if "model.jsonl" in meta:
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            report.add(f"{rel}/model.jsonl", 1, "layers", f"{layers!r} is not a positive int")
        elif m and int(m.group(1)) >= layers:
            report.add(rel, None, None, f"layer {m.group(1)} is not below model layers {layers}")
    return set_name


def _check_feature(report, path, line, row, model_id, source_id, set_name, d_sae, indices,
                   live) -> None:
    _check_row_ids(report, path, line, row, model_id, source_id)
    index = row.get("index")
    if _check_index(report, path, line, index, d_sae):
        if index in indices:
            report.add(path, line, "index", f"feature {index} appears twice")
        indices.add(index)
    if "sourceSetName" in row and row["sourceSetName"] != set_name:
        report.add(path, line, "sourceSetName",
                   f"is {row['sourceSetName']!r}, expected {set_name!r}")
    max_act = row.get("maxActApprox")
    if not _is_num(max_act) or max_act < 0:
        report.add(path, line, "maxActApprox", f"{max_act!r} is not a number ≥ 0")
    elif max_act > 0:
        live.add(index)
    for s_key, v_key in (("pos_str", "pos_values"), ("neg_str", "neg_values")):
        strs, vals = row.get(s_key), row.get(v_key)
        if not _is_list(strs, str):
            report.add(path, line, s_key, "is not a list of strings")
        elif not _is_list(vals, float):
            report.add(path, line, v_key, "is not a list of numbers")
        elif len(strs) != len(vals):
            report.add(path, line, v_key, f"has {len(vals)} entries, {s_key} has {len(strs)}")
    if _is_list(row.get("pos_str"), str) and not row["pos_str"]:
        report.add(path, line, "pos_str", "is empty: Neuronpedia hides the stats panel",
                   "warning")
    frac = row.get("frac_nonzero")
    if not _is_num(frac) or not 0 <= frac <= 1:
        report.add(path, line, "frac_nonzero", f"{frac!r} is not in [0, 1]")
    for v_key, h_key in HIST_PAIRS:
        vals, heights = row.get(v_key), row.get(h_key)
        if not _is_list(vals, float) or not _is_list(heights, float):
            report.add(path, line, v_key, "histogram arrays must be lists of numbers")
        elif len(vals) != len(heights) or len(vals) not in (0, HIST_BINS):
            report.add(path, line, h_key, f"{len(vals)} centres and {len(heights)} heights, "
                                          f"expected {HIST_BINS} each")
    for group in (("topkCosSimIndices", "topkCosSimValues"),
                  ("correlated_features_indices", "correlated_features_pearson",
                   "correlated_features_l1"),
                  ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1"),
                  ("correlated_neurons_indices", "correlated_neurons_pearson",
                   "correlated_neurons_l1")):
        lists = [row.get(k) for k in group]
        if not all(isinstance(x, list) for x in lists):
            report.add(path, line, group[0], f"{', '.join(group)} must be lists")
        elif len({len(x) for x in lists}) > 1:
            report.add(path, line, group[1], f"lengths differ: {[len(x) for x in lists]}")


def _check_activation(report, path, line, row, model_id, source_id, indices, ids) -> None:
    _check_row_ids(report, path, line, row, model_id, source_id)
    _check_row_id(report, path, line, row.get("id"), ids)
    index = row.get("index")
    if index not in indices:
        report.add(path, line, "index", f"refers to feature {index!r}, which is not in features/")
    tokens, values = row.get("tokens"), row.get("values")
    if not _is_list(tokens, str):
        report.add(path, line, "tokens", "is not a list of strings")
        return
    if not _is_list(values, float):
        report.add(path, line, "values", "is not a list of numbers")
        return
    if len(tokens) != len(values):
        report.add(path, line, "values", f"has {len(values)} entries, tokens has {len(tokens)}")
        return
    if not 1 <= len(tokens) <= MAX_TOKENS:
        report.add(path, line, "tokens", f"has {len(tokens)} entries, expected 1..{MAX_TOKENS}")
        return
    if not all(map(math.isfinite, values)):
        return  # already reported by the NaN scan, with the exact position
    top, low = max(values), min(values)
    if not _is_num(row.get("maxValue")) or not math.isclose(row["maxValue"], top, abs_tol=1e-6):
        report.add(path, line, "maxValue", f"is {row.get('maxValue')!r}, max(values) is {top}")
    if not _is_num(row.get("minValue")) or not math.isclose(row["minValue"], low, abs_tol=1e-6):
        report.add(path, line, "minValue", f"is {row.get('minValue')!r}, min(values) is {low}")
    i = row.get("maxValueTokenIndex")
    if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(values) \
            or not math.isclose(values[i], top, abs_tol=1e-6):
        report.add(path, line, "maxValueTokenIndex", f"{i!r} is not the position of max(values)")
    q = row.get("qualifyingTokenIndex")
    if q is not None and (not isinstance(q, int) or not 0 <= q < len(values)):
        report.add(path, line, "qualifyingTokenIndex", f"{q!r} is outside 0..{len(values) - 1}")
    contains = row.get("binContains")
    if not _is_num(contains) or not (0 <= contains <= 1 or contains == -1):
        report.add(path, line, "binContains", f"{contains!r} is not in [0, 1] or -1")
    for key in ("binMin", "binMax"):
        if not _is_num(row.get(key)):
            report.add(path, line, key, f"{row.get(key)!r} is not a number")


def _check_explanation(report, path, line, row, model_id, source_id, indices, ids) -> None:
    _check_row_ids(report, path, line, row, model_id, source_id)
    _check_row_id(report, path, line, row.get("id"), ids)
    if row.get("index") not in indices:
        report.add(path, line, "index",
                   f"refers to feature {row.get('index')!r}, which is not in features/")
    text = row.get("description")
    if not isinstance(text, str) or not 1 <= len(text) <= MAX_DESCRIPTION:
        n = len(text) if isinstance(text, str) else None
        report.add(path, line, "description", f"must be 1..{MAX_DESCRIPTION} characters (got {n})")
    if not isinstance(row.get("authorId"), str) or not row["authorId"]:
        report.add(path, line, "authorId", "must be an existing user id")


def _check_row_ids(report, path, line, row, model_id, source_id) -> None:
    if row.get("modelId") != model_id:
        report.add(path, line, "modelId", f"is {row.get('modelId')!r}, expected {model_id!r}")
    if row.get("layer") != source_id:
        report.add(path, line, "layer", f"is {row.get('layer')!r}, expected the source id "
                                        f"{source_id!r}")


def _check_row_id(report, path, line, row_id, ids: dict) -> None:
    if not isinstance(row_id, str) or not ROW_ID_RE.match(row_id):
        report.add(path, line, "id", f"{row_id!r} is not a 25-character lowercase id")
    elif row_id in ids:
        report.add(path, line, "id", f"{row_id} duplicates {ids[row_id]} (the importer would "
                                     "silently drop this row)")
    else:
        ids[row_id] = f"{path}:{line}"


def _check_index(report, path, line, index, d_sae) -> bool:
    if not isinstance(index, str) or not INDEX_RE.match(index):
        report.add(path, line, "index", f"{index!r} is not a decimal string")
        return False
    if d_sae is not None and int(index) >= d_sae:
        report.add(path, line, "index", f"{index} is not below d_sae {d_sae}")
        return False
    return True


def _check_id(report, path, line, key, value, pattern, what) -> None:
    if not isinstance(value, str) or not pattern.match(value) or "--" in value \
            or ".." in value or not 2 <= len(value) <= 32:
        report.add(path, line, key, f"{what} {value!r} does not match {pattern.pattern} "
                                    "(2..32 chars, no '--' or '..')")


def _check_keys(report, path, line, row, keys, unknown="warning") -> None:
    for k in keys:
        if k not in row:
            report.add(path, line, k, "missing")
    for k in row:
        if k not in keys:
            report.add(path, line, k, "is not a column of the schema", unknown)


def _batches(report: _Report, folder: Path, required: bool) -> list[Path]:
    if not folder.is_dir():
        if required:
            report.add(report.rel(folder), None, None, "missing")
        return []
    files = sorted(folder.glob("batch-*.jsonl.gz"), key=lambda p: _batch_number(p.name))
    for p in sorted(folder.iterdir()):
        if p not in files:
            report.add(report.rel(p), None, None, "not a batch-N.jsonl.gz file (not imported)",
                       "warning")
    if required and not files:
        report.add(report.rel(folder), None, None, "has no batch-N.jsonl.gz files")
    for p in files:
        if p.stat().st_size > MAX_GZ_BYTES:
            report.add(report.rel(p), None, None, f"{p.stat().st_size / 2**20:.0f} MiB; keep "
                                                  "batch files under 100 MB", "warning")
    return files


def _source_order(path: Path) -> tuple:
    m = SOURCE_ID_RE.match(path.name)
    return (int(m.group(1)), path.name) if m else (-1, path.name)


def _batch_number(name: str) -> int:
    m = re.match(r"batch-(\d+)\.jsonl\.gz$", name)
    return int(m.group(1)) if m else -1


def _consistent_rows(report: _Report, path: Path, keys) -> Iterator[tuple[int, dict]]:
    """Rows of a batch file; line 1 must have the schema keys, every line line 1's keys."""
    first: set[str] | None = None
    rel = report.rel(path)
    for line, row in _rows(report, path):
        if first is None:
            first = set(row)
            _check_keys(report, rel, line, row, keys)
        elif set(row) != first:
            for k in sorted(first - set(row)):
                report.add(rel, line, k, "missing (line 1 has it)")
            for k in sorted(set(row) - first):
                report.add(rel, line, k, "not on line 1: the importer ignores it on every line")
        yield line, row


def _rows(report: _Report, path: Path) -> Iterator[tuple[int, dict]]:
    rel = report.rel(path)
    try:
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        report.add(rel, None, None, f"cannot read: {e}")
        return
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    if not lines:
        report.add(rel, None, None, "empty (the importer parses the first line)")
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            report.add(rel, n, None, "blank line")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            report.add(rel, n, None, f"not UTF-8: {e}")
            continue
        try:
            row = json.loads(text)
        except ValueError as e:
            report.add(rel, n, None, f"not JSON: {e}")
            continue
        if not isinstance(row, dict):
            report.add(rel, n, None, "not a JSON object")
            continue
        _scan(report, rel, n, text, row)
        yield n, row


def _scan(report: _Report, rel: str, line: int | None, text: str, obj) -> None:
    """NaN/Inf and NUL anywhere in a row, reported with the key path."""
    if "\\u0000" in text or "\x00" in text:
        for key, value in _walk(obj):
            if isinstance(value, str) and ("\x00" in value or "\\u0000" in value):
                report.add(rel, line, key, "contains \\u0000 (Postgres rejects NUL; the "
                                           "importer rewrites the raw text)")
    if "NaN" in text or "Infinity" in text:
        for key, value in _walk(obj):
            if isinstance(value, float) and not math.isfinite(value):
                report.add(rel, line, key, f"{value} is not a finite number")


def _walk(obj, path: str = "") -> Iterator[tuple[str, object]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, obj


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_list(x, kind) -> bool:
    """A list of strings (kind=str) or of numbers (kind=float; bools are not numbers)."""
    return isinstance(x, list) and set(map(type, x)) <= ({str} if kind is str else {int, float})


# ----------------------------------------------------------------------------- manifest

def _check_manifest(report: _Report) -> None:
    path = report.root / "manifest.json"
    if not path.is_file():
        report.add("manifest.json", None, None, "missing (sizes and sha256 not checked)",
                   "warning")
        return
    manifest = _load_json(report, path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        report.add("manifest.json", None, "files", "missing or not a list")
        return
    listed = set()
    for i, entry in enumerate(manifest["files"]):
        rel = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(rel, str) or rel.startswith("/") or ".." in Path(rel).parts:
            report.add("manifest.json", None, f"files[{i}].path", f"{rel!r} is not a relative path")
            continue
        listed.add(rel)
        file = report.root / rel
        if not file.is_file():
            report.add(rel, None, None, "listed in manifest.json but missing")
            continue
        data = file.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != entry.get("bytes") or digest != entry.get("sha256"):
            report.add(rel, None, None, "size or sha256 differs from manifest.json (changed "
                                        "since the export)")
    for file in sorted(p for p in report.root.rglob("*") if p.is_file()):
        rel = report.rel(file)
        if rel != "manifest.json" and rel not in listed:
            report.add(rel, None, None, "not listed in manifest.json", "warning")


# ----------------------------------------------------------------------------- API payloads

def _load_json(report: _Report, path: Path):
    rel = report.rel(path)
    try:
        text = path.read_bytes().decode("utf-8")
        obj = json.loads(text)
    except FileNotFoundError:
        report.add(rel, None, None, "missing")
        return None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        report.add(rel, None, None, f"not readable JSON: {e}")
        return None
    _scan(report, rel, None, text, obj)
    return obj


def _check_api_model(report: _Report, path: Path, body) -> None:
    rel = report.rel(path)
    if not isinstance(body, dict):
        report.add(rel, None, None, "not a JSON object")
        return
    _check_id(report, rel, None, "id", body.get("id"), MODEL_ID_RE, "model id")
    layers = body.get("layers")
    if not isinstance(layers, int) or isinstance(layers, bool) or not 1 <= layers <= 127:
        report.add(rel, None, "layers", f"{layers!r} is not an int in 1..127")
    name = body.get("displayName")
    if name is not None and (not isinstance(name, str) or len(name) > 64):
        report.add(rel, None, "displayName", "must be a string of at most 64 characters")


def _check_api_source_set(report: _Report, path: Path, body) -> None:
    rel = report.rel(path)
    if not isinstance(body, dict):
        report.add(rel, None, None, "not a JSON object")
        return
    _check_id(report, rel, None, "name", body.get("name"), SET_NAME_RE, "source set name")
    if body.get("name") == "neurons":
        report.add(rel, None, "name", "'neurons' is reserved")
    _check_id(report, rel, None, "modelId", body.get("modelId"), MODEL_ID_RE, "model id")
    desc = body.get("description")
    if desc is not None and (not isinstance(desc, str) or len(desc) > 128):
        report.add(rel, None, "description", "must be a string of at most 128 characters")


def _check_api_features(report, path, body, req, sent, bulk) -> None:
    rel = report.rel(path)
    if not isinstance(body, dict) or not isinstance(body.get("features"), list):
        report.add(rel, None, "features", "missing or not a list")
        return
    model_id, source = body.get("modelId"), body.get("source")
    if (model_id, source) != (req.get("modelId"), req.get("source")):
        report.add(rel, None, "source", "modelId/source differ from plan.json")
    if not isinstance(source, str) or not SOURCE_ID_RE.match(source) or "__" in source:
        report.add(rel, None, "source", f"{source!r} is not an API-creatable source id")
    feats = body["features"]
    if not 1 <= len(feats) <= API_MAX_FEATURES:
        report.add(rel, None, "features", f"{len(feats)} features, expected 1..{API_MAX_FEATURES}")
    seen = set()
    bulk_indices = bulk.get((model_id, source)) if bulk is not None else None
    for i, f in enumerate(feats):
        key = f"features[{i}]"
        if not isinstance(f, dict):
            report.add(rel, None, key, "not a JSON object")
            continue
        index = f.get("index")
        if not isinstance(index, int) or isinstance(index, bool) \
                or not 0 <= index <= API_MAX_INDEX:
            report.add(rel, None, f"{key}.index", f"{index!r} is not an int in 0..{API_MAX_INDEX}")
        elif index in seen:
            report.add(rel, None, f"{key}.index", f"{index} appears twice in this batch")
        else:
            seen.add(index)
            if (model_id, source, index) in sent:
                report.add(rel, None, f"{key}.index", f"{index} is uploaded by an earlier batch")
            sent.add((model_id, source, index))
            if bulk_indices is not None and str(index) not in bulk_indices:
                report.add(rel, None, f"{key}.index", f"feature {index} is not in the bulk "
                                                      f"export of {model_id}/{source}")
        density = f.get("density")
        if density is not None and (not _is_num(density) or not 0 <= density <= 1):
            report.add(rel, None, f"{key}.density", f"{density!r} is not in [0, 1]")
        for lk in ("topLogits", "bottomLogits"):
            logits = f.get(lk, [])
            if not isinstance(logits, list) or len(logits) > API_MAX_LOGITS or not all(
                    isinstance(x, dict) and isinstance(x.get("token"), str)
                    and _is_num(x.get("value")) for x in logits):
                report.add(rel, None, f"{key}.{lk}", f"must be at most {API_MAX_LOGITS} "
                                                     "{token, value} entries")
        for j, e in enumerate(f.get("explanations", [])):
            text = e.get("text") if isinstance(e, dict) else None
            if not isinstance(text, str) or not 1 <= len(text) <= MAX_DESCRIPTION:
                report.add(rel, None, f"{key}.explanations[{j}].text",
                           f"must be 1..{MAX_DESCRIPTION} characters")
        acts = f.get("activations")
        if not isinstance(acts, list) or not acts:
            report.add(rel, None, f"{key}.activations", "needs at least one activation")
            continue
        for j, a in enumerate(acts):
            akey = f"{key}.activations[{j}]"
            if not isinstance(a, dict):
                report.add(rel, None, akey, "not a JSON object")
                continue
            tokens, values = a.get("tokens"), a.get("values")
            if not _is_list(tokens, str) or not _is_list(values, float):
                report.add(rel, None, f"{akey}.tokens", "tokens/values must be lists of "
                                                        "strings/numbers")
            elif len(tokens) != len(values) or not 1 <= len(tokens) <= MAX_TOKENS:
                report.add(rel, None, f"{akey}.values", f"{len(values)} values for "
                                                        f"{len(tokens)} tokens (1..{MAX_TOKENS})")
            frac = a.get("quantileFraction")
            if frac is not None and (not _is_num(frac) or not 0 <= frac <= 1):
                report.add(rel, None, f"{akey}.quantileFraction", f"{frac!r} is not in [0, 1]")
    if req.get("indices") != [f.get("index") for f in feats if isinstance(f, dict)]:
        report.add(rel, None, "features", "indices differ from plan.json")
