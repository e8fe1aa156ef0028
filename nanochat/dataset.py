"""
Text corpora as streams of documents, and documents as BOS-aligned token windows.

Sources:
- nanochat's data dir (`<base>/base_data_climbmix/`, else `<base>/base_data/`): parquet
  shards with one `text` column; train = every shard but the last, val = the last one
  (nanochat's convention, by sorted file name, `.tmp` files ignored)
- any `.parquet` (a `text` column), `.txt` (documents separated by blank lines),
  `.jsonl` (one `{"text": ...}` per line) file, or a directory of such files. With several
  files the last one is held out; with a single file, its last 10% of documents.
Nothing is read whole: parquet one row group at a time, text files line by line.

Windows: every document is tokenized with BOS prepended and cut into windows of at most
`seq_len` tokens, each starting with BOS (continuations of long documents get a BOS too),
so every token's context is its own document. `Window.pos0` maps window positions back to
document positions (BOS = document position 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

TEXT_SUFFIXES = (".parquet", ".txt", ".jsonl")
HOLDOUT_FRACTION = 0.1


def find_nanochat_data_dir(base_dir) -> Path | None:
    """nanochat's shard directory: base_data_climbmix/ (2026-03+), else base_data/."""
    for name in ("base_data_climbmix", "base_data"):
        d = Path(base_dir) / name
        if d.is_dir() and list_corpus_files(d, must_exist=False):
            return d
    return None


def list_corpus_files(path, must_exist: bool = True) -> list[Path]:
    path = Path(path)
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise ValueError(f"unsupported corpus file {path}: expected one of {TEXT_SUFFIXES}")
        return [path]
    if not path.exists():
        if must_exist:
            raise FileNotFoundError(f"corpus not found: {path}")
        return []
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files and must_exist:
        raise FileNotFoundError(f"no .parquet/.txt/.jsonl files in {path}")
    return files


def iter_documents(path, split: str = "train") -> Iterator[str]:
    """Documents of one split ('train', 'val' or 'all') of a corpus file or directory."""
    for _, doc in iter_shard_documents(path, split):
        yield doc


def iter_shard_documents(path, split: str = "train", rank: int = 0,
                         world: int = 1) -> Iterator[tuple[int, str]]:
    """(index in the split, text) of one rank's share of a split. Parquet is dealt out by row
    group: the split's row groups, counted across its files, go to ranks in turn (group g to
    rank g % world, as nanochat's own loader strides them); text files, which have no row
    groups, one document at a time. The indices are those of the whole split, so every rank
    names a document as a single process would."""
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    base = 0  # split index of the current range's first document
    block = 0  # row groups (parquet) or documents (text) dealt so far
    for f, lo, hi in _split_ranges(path, split):
        if f.suffix == ".parquet":
            pf = _parquet_file(f)
            start = 0
            for rg in range(pf.num_row_groups):
                end = start + pf.metadata.row_group(rg).num_rows
                a, b = max(start, lo), min(end, hi)
                if a < b:
                    if block % world == rank:
                        texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
                        for i in range(a, b):
                            if not isinstance(texts[i - start], str):
                                raise ValueError(f"{f}: row {i} has no text (a null or non-string "
                                                 f"'text' value)")
                            yield base + i - lo, texts[i - start]
                    block += 1
                start = end
            n_file = start
        else:
            n_file = 0
            for i, doc in enumerate(iter_file_documents(f)):
                if i >= hi:
                    break
                n_file = i + 1
                if i >= lo:
                    if block % world == rank:
                        yield base + i - lo, doc
                    block += 1
        base += max(0, min(hi, n_file) - lo)


def _split_ranges(path, split: str) -> list[tuple[Path, int, int]]:
    """The split as (file, first document, end document) ranges: with several files the last
    is held out; a single file holds out its last HOLDOUT_FRACTION of documents."""
    files = list_corpus_files(path)
    big = 1 << 62  # "to the end": text files are not counted unless they must be
    if split == "all":
        return [(f, 0, big) for f in files]
    if len(files) >= 2:
        return [(f, 0, big) for f in (files[:-1] if split == "train" else files[-1:])]
    n = count_documents(files[0])
    if n < 2:
        raise ValueError(f"{files[0]} holds {n} document(s); at least 2 are needed to hold "
                         f"one out for validation")
    n_val = max(1, int(n * HOLDOUT_FRACTION))
    return [(files[0], 0, n - n_val) if split == "train" else (files[0], n - n_val, n)]


def count_documents(path: Path) -> int:
    if path.suffix == ".parquet":
        return _parquet_file(path).metadata.num_rows
    return sum(1 for _ in iter_file_documents(path))


def iter_file_documents(path: Path) -> Iterator[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    if path.suffix == ".parquet":
        pf = _parquet_file(path)
        for rg in range(pf.num_row_groups):
            yield from pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    text = obj["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'text' "
                                     f"key ({e})") from None
                yield str(text)
    elif path.suffix == ".txt":
        para: list[str] = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    para.append(line)
                elif para:
                    yield "".join(para).rstrip("\n")
                    para = []
        if para:
            yield "".join(para).rstrip("\n")
    else:
        raise ValueError(f"unsupported corpus file {path}")


def _parquet_file(path: Path):
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise ValueError(f"cannot read parquet file {path}: {e}") from e
    if "text" not in pf.schema_arrow.names:
        raise ValueError(f"{path} has no 'text' column (columns: {pf.schema_arrow.names})")
    return pf


@dataclass
class Window:
    doc_id: int          # index of the document in the stream
    pos0: int            # document position of window position 1 (window position 0 is BOS)
    tokens: list[int]    # starts with BOS


def iter_windows(docs: Iterable[str], tokenizer, seq_len: int, batch_docs: int = 128,
                 start_doc: int = 0) -> Iterator[Window]:
    """BOS-aligned windows of at most `seq_len` tokens; doc ids count from `start_doc`."""
    return iter_indexed_windows(enumerate(docs, start_doc), tokenizer, seq_len, batch_docs)


def iter_indexed_windows(docs: Iterable[tuple[int, str]], tokenizer, seq_len: int,
                         batch_docs: int = 128) -> Iterator[Window]:
    """BOS-aligned windows of (doc_id, text) pairs, e.g. one rank's `iter_shard_documents`."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    bos = tokenizer.get_bos_token_id()
    ids_buf: list[int] = []
    buf: list[str] = []

    def flush():
        for doc_id, ids in zip(ids_buf, tokenizer.encode(buf, num_threads=4)):
            for start in range(0, max(len(ids), 1), seq_len - 1):
                chunk = ids[start:start + seq_len - 1]
                if chunk:
                    yield Window(doc_id, start + 1, [bos] + chunk)
        ids_buf.clear()
        buf.clear()

    for doc_id, doc in docs:
        ids_buf.append(doc_id)
        buf.append(doc)
        if len(buf) >= batch_docs:
            yield from flush()
    if buf:
        yield from flush()


@dataclass
class Batch:
    idx: torch.Tensor      # (B, T) int64 token ids, padded with BOS
    valid: torch.Tensor    # (B, T) bool: real tokens that are not BOS
    doc_ids: torch.Tensor  # (B,) int64
    pos0: torch.Tensor     # (B,) int64
    n_tokens: int          # real tokens, BOS included


def iter_batches(windows: Iterable[Window], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Group windows into padded batches. Padding sits at the end, so causal attention
    keeps it from touching any real token."""
    group: list[Window] = []
    for w in windows:
        group.append(w)
        if len(group) == batch_size:
            yield _collate(group, pad_id)
            group = []
    if group:
        yield _collate(group, pad_id)


def _collate(group: list[Window], pad_id: int) -> Batch:
    T = max(len(w.tokens) for w in group)
    idx = torch.full((len(group), T), pad_id, dtype=torch.long)
    valid = torch.zeros((len(group), T), dtype=torch.bool)
    for i, w in enumerate(group):
        idx[i, :len(w.tokens)] = torch.tensor(w.tokens)
        valid[i, 1:len(w.tokens)] = True
    return Batch(idx, valid, torch.tensor([w.doc_id for w in group]),
                 torch.tensor([w.pos0 for w in group]), sum(len(w.tokens) for w in group))
