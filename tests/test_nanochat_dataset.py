"""Corpora stream as documents with nanochat's split convention; windows start at BOS."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.dataset import (find_nanochat_data_dir, iter_batches, iter_documents,
                              iter_shard_documents, iter_windows, list_corpus_files)
from nanochat.tokenizer import Tokenizer


def test_fixture_shards_split(d4_dir):
    data = d4_dir / "base_data"
    files = list_corpus_files(data)
    assert [f.name for f in files] == ["shard_00000.parquet", "shard_00003.parquet"]
    val = list(iter_documents(data, "val"))
    assert val == pq.read_table(files[-1]).column("text").to_pylist()
    first_train = next(iter(iter_documents(data, "train")))
    assert first_train == pq.read_table(files[0]).column("text")[0].as_py()
    assert find_nanochat_data_dir(d4_dir) == data


def test_climbmix_dir_preferred(tmp_path):
    for name in ("base_data", "base_data_climbmix"):
        (tmp_path / name).mkdir()
        pq.write_table(pa.table({"text": ["x"]}), tmp_path / name / "shard_00000.parquet")
    (tmp_path / "base_data_climbmix" / "shard_00001.parquet.tmp").write_text("partial")
    assert find_nanochat_data_dir(tmp_path) == tmp_path / "base_data_climbmix"
    assert len(list_corpus_files(tmp_path / "base_data_climbmix")) == 1


def test_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("para one\nline two\n\n\npara two\n\n" + "\n\n".join(f"p{i}" for i in range(18)))
    docs = list(iter_documents(tmp_path / "a.txt", "all"))
    assert docs[:2] == ["para one\nline two", "para two"] and len(docs) == 20
    # a single file holds out its last 10% of documents
    assert list(iter_documents(tmp_path / "a.txt", "val")) == docs[-2:]
    assert list(iter_documents(tmp_path / "a.txt", "train")) == docs[:-2]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(5)))
    assert list(iter_documents(tmp_path / "b.jsonl", "all"))[-1] == "doc 4"
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        list(iter_documents(tmp_path / "bad.jsonl", "all"))


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        list(iter_documents(tmp_path / "nope", "train"))
    with pytest.raises(FileNotFoundError, match="no .parquet"):
        list(iter_documents(tmp_path, "train"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="x.csv"):
        list(iter_documents(tmp_path / "x.csv", "train"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "y.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        list(iter_documents(tmp_path / "y.parquet", "all"))
    (tmp_path / "z.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="z.parquet"):
        list(iter_documents(tmp_path / "z.parquet", "all"))


def test_windows_start_at_bos_and_map_back(d4_dir):
    tok = Tokenizer.from_directory(d4_dir / "tokenizer")
    bos = tok.get_bos_token_id()
    docs = ["short doc", "word " * 300]
    windows = list(iter_windows(docs, tok, seq_len=64))
    assert all(w.tokens[0] == bos and len(w.tokens) <= 64 for w in windows)
    full = tok.encode(docs[1], prepend=bos)
    rebuilt = [bos]
    for w in [w for w in windows if w.doc_id == 1]:
        assert w.pos0 == len(rebuilt)          # window position 1 is document position pos0
        rebuilt.extend(w.tokens[1:])
    assert rebuilt == full
    batch = next(iter_batches(windows, 8, pad_id=bos))
    assert batch.valid.sum().item() == sum(len(w.tokens) - 1 for w in windows[:8])
    assert not batch.valid[:, 0].any()


def _rows(tmp_path, name, texts, row_group_size):
    pq.write_table(pa.table({"text": texts}), tmp_path / name, row_group_size=row_group_size)


@pytest.mark.parametrize("split", ["train", "val", "all"])
def test_shards_partition_the_split(tmp_path, split):
    # three files of uneven row groups, and one file whose held-out tail cuts a row group
    _rows(tmp_path, "s0.parquet", [f"a{i}" for i in range(7)], 3)
    _rows(tmp_path, "s1.parquet", [f"b{i}" for i in range(5)], 2)
    _rows(tmp_path, "s2.parquet", [f"c{i}" for i in range(4)], 3)
    (tmp_path / "single").mkdir()
    _rows(tmp_path / "single", "only.parquet", [f"d{i}" for i in range(40)], 6)
    (tmp_path / "t.txt").write_text("\n\n".join(f"t{i}" for i in range(23)))
    for corpus in (tmp_path, tmp_path / "single", tmp_path / "t.txt"):
        whole = list(iter_documents(corpus, split))
        for world in (1, 2, 3):
            shares = [list(iter_shard_documents(corpus, split, r, world)) for r in range(world)]
            merged = sorted(pair for share in shares for pair in share)
            assert merged == list(enumerate(whole)), (corpus, world)
            if world > 1 and corpus == tmp_path:
                assert all(shares), "every rank gets some row groups"


def test_parquet_shards_stride_row_groups(tmp_path):
    _rows(tmp_path, "s0.parquet", [f"a{i}" for i in range(6)], 2)  # groups a0-1, a2-3, a4-5
    _rows(tmp_path, "s1.parquet", ["held out"], 1)
    rank1 = [doc for _, doc in iter_shard_documents(tmp_path, "train", 1, 2)]
    assert rank1 == ["a2", "a3"]
    with pytest.raises(ValueError, match="rank 2"):
        list(iter_shard_documents(tmp_path, "train", 2, 2))


def test_null_parquet_text_is_named(tmp_path):
    pq.write_table(pa.table({"text": ["ok", None, "ok"]}), tmp_path / "n.parquet")
    with pytest.raises(ValueError, match=r"n.parquet: row 1 has no text"):
        list(iter_documents(tmp_path / "n.parquet", "all"))
