"""The embedded demo model: built in nanochat's layout, loaded by the real loader, cached,
verified, rebuilt when damaged, resumed when interrupted, and used when no checkpoint exists.

Everything runs on the `tiny` preset (4 layers x 32 wide, vocab 300), which builds in seconds."""

import json
import shutil
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import torch

import nanochat.demo as demo
from nanochat.checkpoint_manager import load_model_from_dir
from nanochat.dataset import iter_documents
from nanochat.demo import PRESETS, DemoConfig, check_demo, ensure_demo, load_demo_info
from nanochat.model_source import resolve_model

TINY = PRESETS["tiny"]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model gains nothing from more threads, and on a busy machine they cost a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """$NANOCHAT_ATLAS_CACHE with one tiny demo built in it (shared by the tests below)."""
    root = tmp_path_factory.mktemp("atlas_cache")
    ensure_demo(cache_dir=root / "demo", config=TINY, quiet=True)
    return root


@pytest.fixture(scope="module")
def built(cache_root):
    return cache_root / "demo" / "tiny"


def _no_rebuild(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the demo was rebuilt although a verified build exists")
    monkeypatch.setattr(demo, "build_demo", fail)


def test_layout_is_nanochats(built):
    shards = sorted((built / "base_data").glob("*.parquet"))
    assert [p.name for p in shards] == ["shard_00000.parquet", "shard_00001.parquet",
                                        "shard_00002.parquet"]
    for p in shards:
        pf = pq.ParquetFile(p)
        assert pf.schema_arrow.names == ["text"]
        assert pf.metadata.row_group(0).num_rows <= 1024
    train, val = list(iter_documents(built / "base_data", "train")), \
        list(iter_documents(built / "base_data", "val"))
    assert train and val and not set(train) & set(val)
    assert sum(map(len, train + val)) >= TINY.max_corpus_chars  # documents up to the cap
    assert (built / "tokenizer" / "tokenizer.pkl").is_file()
    token_bytes = torch.load(built / "tokenizer" / "token_bytes.pt")
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (TINY.vocab_size,)
    ckpt = built / "base_checkpoints" / "d4"
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta_000060.json", "model_000060.pt"]
    # nothing of the build's own bookkeeping is left behind
    assert not list(built.rglob("*.tmp")) and not (built / demo.TRAIN_STATE).exists()
    assert not built.with_name("tiny.build").exists()


def test_loads_through_the_checkpoint_loader_and_beats_unigram(built):
    model, tokenizer, meta = load_model_from_dir(built / "base_checkpoints" / "d4", "cpu")
    assert set(meta["model_config"]) == {"sequence_len", "vocab_size", "n_layer", "n_head",
                                         "n_kv_head", "n_embd"}
    assert meta["model_config"]["n_layer"] == 4 and meta["model_config"]["n_embd"] == 32
    for key in ("step", "val_bpb", "user_config", "device_batch_size", "max_seq_len",
                "model_id", "val_loss", "unigram_val_loss", "unigram_val_bpb", "python_version"):
        assert key in meta, key
    assert meta["model_id"] == "nanochat-demo-d4" and meta["step"] == 60
    assert meta["val_loss"] < meta["unigram_val_loss"] - 0.1
    assert meta["val_bpb"] < meta["unigram_val_bpb"]
    # the saved weights are the evaluated ones: re-scoring the val split reproduces the meta
    token_bytes = torch.load(built / "tokenizer" / "token_bytes.pt")
    rows = demo.eval_rows(built, tokenizer, TINY)
    loss, bpb = demo.evaluate(model, rows, token_bytes, 8, "cpu")
    assert loss == pytest.approx(meta["val_loss"], abs=1e-3)
    assert bpb == pytest.approx(meta["val_bpb"], abs=1e-3)


def test_second_call_reuses_the_verified_build(built, cache_root, monkeypatch):
    model_file = built / "base_checkpoints" / "d4" / "model_000060.pt"
    mtime = model_file.stat().st_mtime_ns
    _no_rebuild(monkeypatch)
    assert ensure_demo(cache_dir=cache_root / "demo", config=TINY, quiet=True) == built
    assert model_file.stat().st_mtime_ns == mtime
    info = load_demo_info(built)
    assert info["config"] == TINY.identity() and "base_checkpoints/d4/model_000060.pt" in info["files"]


def test_truncated_model_is_detected_and_rebuilt(built, tmp_path, capsys):
    root = tmp_path / "demo"
    shutil.copytree(built, root / "tiny")
    model_file = root / "tiny" / "base_checkpoints" / "d4" / "model_000060.pt"
    with open(model_file, "r+b") as f:
        f.truncate(model_file.stat().st_size // 2)
    assert "model_000060.pt" in check_demo(root / "tiny", TINY)
    assert ensure_demo(cache_dir=root, config=TINY) == root / "tiny"
    assert "rebuilding" in capsys.readouterr().err
    assert check_demo(root / "tiny", TINY) is None
    # the same config gives the same model, bit for bit
    a = torch.load(model_file)
    b = torch.load(built / "base_checkpoints" / "d4" / "model_000060.pt")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_other_config_builds_elsewhere_and_stale_marker_is_rejected(built):
    other = replace(TINY, seed=1)
    assert other.dirname() not in ("tiny", "default") and other.dirname().startswith("d4w32v300-")
    assert DemoConfig().dirname() == "default"
    assert "seed" in check_demo(built, other)


def test_interrupted_build_resumes_to_the_same_model(built, tmp_path, monkeypatch):
    config = replace(TINY, checkpoint_every_s=0.0)  # save the training state after every step
    real = demo.lr_multiplier

    def crash_at_step_25(step, n_steps, cfg):
        if step == 25:
            raise KeyboardInterrupt
        return real(step, n_steps, cfg)

    monkeypatch.setattr(demo, "lr_multiplier", crash_at_step_25)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo(cache_dir=tmp_path, config=config, quiet=True)
    build_dir = tmp_path / "tiny.build"
    assert not (tmp_path / "tiny").exists()
    assert torch.load(build_dir / demo.TRAIN_STATE)["step"] == 25
    assert set(json.loads((build_dir / demo.BUILD_STATE).read_text())["stages"]) == {"corpus", "tokenizer"}

    monkeypatch.setattr(demo, "lr_multiplier", real)
    seen = []
    monkeypatch.setattr(demo, "write_corpus", lambda *a, **k: seen.append("corpus"))
    path = ensure_demo(cache_dir=tmp_path, config=config, quiet=True)
    assert seen == []  # finished stages are not redone
    assert check_demo(path, TINY) is None and not build_dir.exists()
    a = torch.load(path / "base_checkpoints" / "d4" / "model_000060.pt")
    b = torch.load(built / "base_checkpoints" / "d4" / "model_000060.pt")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_resolve_model_falls_back_to_the_demo(cache_root, tmp_path, monkeypatch):
    empty = tmp_path / "no_nanochat"
    empty.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(empty))
    monkeypatch.setenv("NANOCHAT_ATLAS_CACHE", str(cache_root))
    monkeypatch.setenv("NANOCHAT_ATLAS_DEMO", "tiny")
    _no_rebuild(monkeypatch)
    source = resolve_model(quiet=True)
    assert source.kind == "demo" and source.model_id == "nanochat-demo-d4"
    assert source.checkpoint_dir == cache_root / "demo" / "tiny" / "base_checkpoints" / "d4"
    assert source.data_dir == cache_root / "demo" / "tiny" / "base_data"
    assert source.model.config.n_layer == 4


def test_bad_settings_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="head dim"):
        replace(TINY, n_embd=30, n_head=4).validate()
    with pytest.raises(ValueError, match="vocab_size"):
        replace(TINY, vocab_size=200).validate()
    monkeypatch.setenv("NANOCHAT_ATLAS_DEMO", "huge")
    with pytest.raises(ValueError, match="NANOCHAT_ATLAS_DEMO"):
        ensure_demo(cache_dir=tmp_path)
    # a directory that is not a demo build is never overwritten
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a demo build"):
        demo.ensure_demo_at(out, TINY, quiet=True)
    assert (out / "notes.txt").read_text() == "keep me"


def test_base_train_cli(tmp_path, capsys):
    from scripts.base_train import main
    out = tmp_path / "run"
    assert main(["--preset", "tiny", "--steps", "30", "--out", str(out), "--quiet",
                 "--batch_size", "4"]) == 0
    text = capsys.readouterr().out
    assert "val loss" in text and "unigram baseline" in text and str(out) in text
    meta = json.loads((out / "base_checkpoints" / "d4" / "meta_000030.json").read_text())
    assert meta["device_batch_size"] == 4 and meta["step"] == 30
    assert main(["--preset", "tiny", "--width", "30", "--heads", "4", "--out", str(out)]) == 2


def test_thread_count_is_set_or_picked(monkeypatch):
    from nanochat import common
    assert common.set_threads(3) == 3 and torch.get_num_threads() == 3
    picked = common.set_threads(None)  # all cores, or 1 when the machine is too busy for more
    assert picked in (1, common.core_count()) and torch.get_num_threads() == picked
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's (or torchrun's) choice is kept
    assert common.auto_threads(torch.device("cpu")) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert common.auto_threads(torch.device("cpu")) in (1, common.core_count())
