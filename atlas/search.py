"""
The atlas's client-side search index: labels, top tokens and feature ids of every feature.

Files under search/:
    manifest.js      window.ATLAS_SEARCH = {"layers": [[key, title], ...], "shards": [...], "count": N}
    shard-000.js     atlasSearchShard([[layer_index, feature, label, [tokens], density], ...]);
    ...

Notable choices
- .js files, not .json: a page opened from disk (file://) may load scripts but not fetch
  JSON, and the same files work on GitHub Pages under a project subpath.
- Shards of `shard_size` records (about 100 B each), loaded in parallel by search.js when the
  search page opens; 16k features are 4 shards (about 1.6 MB raw, 0.4 MB gzipped).
- Matching and ranking happen in the browser (site_templates/search.js); this module only
  writes the data, so the index format is defined in one place: here.
- JSON is ASCII-only, so U+2028, NUL and friends cannot break the script.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

SHARD_PREFIX = "atlasSearchShard("
MANIFEST_PREFIX = "window.ATLAS_SEARCH = "


@dataclass(frozen=True)
class SearchRecord:
    layer_key: str
    feature: int
    label: str  # visible text
    tokens: list[str]  # visible top activating tokens
    density: float


def write_search_index(search_dir: Path, layers: list[tuple[str, str]], records: Iterable[SearchRecord],
                       shard_size: int = 4096) -> list[str]:
    """Write manifest.js and the shards; returns the shard file names."""
    search_dir.mkdir(parents=True, exist_ok=True)
    layer_index = {key: i for i, (key, _) in enumerate(layers)}
    rows = [[layer_index[r.layer_key], r.feature, r.label, r.tokens, float(f"{r.density:.4g}")]
            for r in records]
    shards = []
    for n, start in enumerate(range(0, len(rows), shard_size)):
        name = f"shard-{n:03d}.js"
        _write(search_dir / name, SHARD_PREFIX + _json(rows[start:start + shard_size]) + ");\n")
        shards.append(name)
    manifest = {"layers": [list(lay) for lay in layers], "shards": shards, "count": len(rows)}
    _write(search_dir / "manifest.js", MANIFEST_PREFIX + _json(manifest) + ";\n")
    return shards


def read_search_index(search_dir: Path) -> list[SearchRecord]:
    """Every record of a written index (the inverse of write_search_index)."""
    manifest = json.loads(_strip(search_dir / "manifest.js", MANIFEST_PREFIX, ";"))
    keys = [key for key, _ in manifest["layers"]]
    records = []
    for name in manifest["shards"]:
        for layer, feature, label, tokens, density in json.loads(_strip(search_dir / name, SHARD_PREFIX, ");")):
            records.append(SearchRecord(keys[layer], feature, label, tokens, density))
    if len(records) != manifest["count"]:
        raise ValueError(f"{search_dir}: manifest counts {manifest['count']} records, shards hold {len(records)}")
    return records


def _strip(path: Path, prefix: str, suffix: str) -> str:
    text = path.read_text(encoding="ascii").strip()
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise ValueError(f"{path} is not a search index file (expected {prefix}...{suffix})")
    return text[len(prefix):-len(suffix)]


def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def _write(path: Path, text: str) -> None:
    path.write_bytes(text.encode("ascii"))
