"""
Mining under torchrun: 2 CPU ranks (gloo), launched as users launch them
(`python -m torch.distributed.run --standalone --nproc_per_node 2 -m scripts.mine_features ...`),
against one process over the same documents, on the tiny model and SAEs of test_mine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import atlas.mine as mine_mod
from atlas.stats import from_fixed, to_fixed
from nanochat.dataset import iter_file_documents
from scripts import mine_features as cli
from tests.test_mine import build_tiny, dump

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--tokens", "0", "--seq-len", "32", "--batch-tokens", "256", "--chunk-tokens", "700",
         "--device", "cpu"]  # gloo, even where a GPU is present


def torchrun(tiny, store: Path, corpus: Path | None = None) -> tuple[int, dict, dict]:
    """Mine with 2 ranks; returns torchrun's exit code, each rank's output (stdout and stderr)
    and each rank's stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--tee", "3", "-m", "scripts.mine_features", *args(tiny, store, corpus)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return out.returncode, by_rank(out.stdout + "\n" + out.stderr), by_rank(out.stdout)


def by_rank(text: str) -> dict[int, str]:
    """Each worker's lines (torchrun --tee prefixes them with [default<rank>]:)."""
    lines = {0: [], 1: []}
    for line in text.splitlines():
        for rank in lines:
            if line.startswith(f"[default{rank}]:"):
                lines[rank].append(line.split(":", 1)[1])
    return {rank: "\n".join(v) for rank, v in lines.items()}


def args(tiny, store: Path, corpus: Path | None = None) -> list[str]:
    return ["--sae-dir", str(tiny.sae_dir), "--checkpoint", str(tiny.checkpoint),
            "--data", str(corpus or tiny.corpus), "--store", str(store), *FLAGS]


def same_store(a: Path, b: Path) -> None:
    """Every table equal, row for row; in meta only the command line and the rank count differ."""
    da, db = dump(a), dump(b)
    assert da.keys() == db.keys()
    for table in da:
        if table != "meta":
            assert da[table] == db[table], table
    ma, mb = ({k: json.loads(v) for k, v in d["meta"]} for d in (da, db))
    for m in (ma, mb):
        del m["build"]["command"], m["build"]["ranks"]
    assert ma == mb


def test_fixed_point_sums_do_not_depend_on_order_or_split():
    g = torch.Generator().manual_seed(0)
    value = torch.rand(20_000, generator=g) * torch.logspace(-6, 3, 20_000)  # float32 activations
    group = torch.randint(0, 7, (20_000,), generator=g)
    one = torch.zeros(7, 2, dtype=torch.int64).index_add_(0, group, to_fixed(value))
    perm = torch.randperm(20_000, generator=g)
    a, b = perm[:5_000], perm[5_000:]  # two "ranks", each in its own order
    two = (torch.zeros(7, 2, dtype=torch.int64).index_add_(0, group[a], to_fixed(value[a]))
           + torch.zeros(7, 2, dtype=torch.int64).index_add_(0, group[b], to_fixed(value[b])))
    assert torch.equal(one, two)
    exact = torch.zeros(7, dtype=torch.float64).index_add_(0, group, value.double())
    assert torch.allclose(from_fixed(one), exact, rtol=1e-12, atol=20_000 * 2.0 ** -33)
    floats = [torch.zeros(7, dtype=torch.float64).index_add_(0, group[p], value[p].double())
              for p in (perm, perm.flip(0))]
    assert not torch.equal(*floats)  # what the fixed point avoids: float sums depend on order


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def reference(tiny) -> Path:
    """One process over the whole held-out split."""
    store = tiny.root / "one.duckdb"
    assert cli.main(args(tiny, store) + ["--quiet"]) == 0
    return store


def test_two_ranks_write_the_store_of_one_process_and_resume(tiny, reference, monkeypatch):
    store = tiny.root / "two.duckdb"
    state = tiny.root / "two.duckdb.mine-state"
    # a 1-process run interrupted midway leaves its state: a 2-rank run cannot resume it
    real, calls = mine_mod._Run.process, {"n": 0}

    def interrupted(self, *a):
        calls["n"] += 1
        if calls["n"] > 6:
            raise KeyboardInterrupt
        return real(self, *a)

    monkeypatch.setattr(mine_mod._Run, "process", interrupted)
    assert cli.main(args(tiny, store) + ["--quiet"]) == 130
    monkeypatch.undo()
    assert [p.name for p in state.iterdir()] == ["rank0-of-1.pt"]

    # a directory where the store goes: both passes end, then rank 0's write fails
    store.mkdir()
    code, out, _ = torchrun(tiny, store)
    assert code != 0
    assert "holds the state of a run with another number of ranks" in out[0] and "starts over" in out[0]
    for rank in (0, 1):
        assert "error: 1 of 2 rank(s) failed" in out[rank] and "rank 0:" in out[rank], out[rank]
    assert store.is_dir() and not any(store.iterdir())
    assert sorted(p.name for p in state.iterdir()) == ["rank0-of-2.pt", "rank1-of-2.pt"]

    # the rerun resumes every rank from the end of its pass and writes the 1-process store
    store.rmdir()
    code, out, stdout = torchrun(tiny, store)
    assert code == 0, out
    assert "resuming from" in out[0] and "mined 3,538 tokens of 60 documents" in out[0]
    assert "3,538 tokens, 60 documents, 0 tokens/s" in out[0]  # both ranks resumed: none mined again
    assert stdout == {0: str(store), 1: ""} and out[1] == ""  # only rank 0 speaks
    assert not state.exists()
    same_store(store, reference)


def parquet_corpus(tiny, folder: Path, bad_row: int | None) -> Path:
    """The same documents with the held-out file as parquet, 4 row groups of 15 (dealt to ranks
    0, 1, 0, 1); `bad_row` holds a null text."""
    folder.mkdir(exist_ok=True)
    shutil.copy(tiny.corpus / "a.txt", folder / "a.txt")
    docs: list = list(iter_file_documents(tiny.corpus / "b.txt"))
    if bad_row is not None:
        docs[bad_row] = None
    pq.write_table(pa.table({"text": pa.array(docs, pa.string())}), folder / "b.parquet",
                   row_group_size=15)
    return folder


def test_a_failing_rank_fails_every_rank_and_leaves_the_store(tiny, reference):
    corpus = parquet_corpus(tiny, tiny.root / "pq", bad_row=20)  # row group 1: rank 1's
    store = tiny.root / "previous.duckdb"
    shutil.copy(reference, store)
    before = hashlib.sha256(store.read_bytes()).hexdigest()
    code, out, _ = torchrun(tiny, store, corpus)
    assert code != 0
    assert "rank 1: ValueError" in out[1]  # the failed rank says so at once
    for rank in (0, 1):  # and every rank exits with the same error naming it
        assert "error: 1 of 2 rank(s) failed; no output was written" in out[rank], out[rank]
        assert "rank 1: ValueError" in out[rank] and "rank 0:" not in out[rank]
    assert hashlib.sha256(store.read_bytes()).hexdigest() == before
    assert not store.with_name(store.name + ".wal").exists()

    parquet_corpus(tiny, corpus, bad_row=None)  # fixed: the rerun mines it and writes the store
    code, out, _ = torchrun(tiny, store, corpus)
    assert code == 0, out
    one = tiny.root / "one_pq.duckdb"
    assert cli.main(args(tiny, one, corpus) + ["--quiet"]) == 0
    same_store(store, one)  # row-group striding: the same store as one process too
