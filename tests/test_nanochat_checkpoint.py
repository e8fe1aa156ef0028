"""Checkpoints load through nanochat's API and layout; variants load or are refused clearly."""

import json
import shutil

import pytest
import torch

from nanochat.checkpoint_manager import (find_largest_model, find_last_step, load_model,
                                         load_model_from_dir, save_checkpoint)
from nanochat.formats import UnsupportedFormatError
from nanochat.gpt import GPT, GPTConfig
from nanochat.model_source import resolve_model
from nanochat.tokenizer import Tokenizer


def make_base_dir(tmp_path, d4_dir):
    """A writable NANOCHAT_BASE_DIR holding the fixture's tokenizer, data and checkpoint."""
    base = tmp_path / "base"
    shutil.copytree(d4_dir / "tokenizer", base / "tokenizer")
    shutil.copytree(d4_dir / "base_data", base / "base_data")
    shutil.copytree(d4_dir / "base_checkpoints", base / "base_checkpoints")
    return base


def fixture_state(d4_dir):
    ckpt = d4_dir / "base_checkpoints" / "d4"
    return torch.load(ckpt / "model_000150.pt"), json.loads((ckpt / "meta_000150.json").read_text())


def test_load_model_api_uses_base_dir(tmp_path, d4_dir, d4_reference, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(make_base_dir(tmp_path, d4_dir)))
    model, tok, meta = load_model("base", "cpu", phase="eval")
    assert meta["step"] == 150 and not model.training
    with torch.no_grad():
        assert (model(d4_reference["input_ids"]) - d4_reference["logits"]).abs().max() <= 1e-4


def test_bf16_wte_and_orig_mod_prefix(tmp_path, d4_dir, d4_reference):
    sd, meta = fixture_state(d4_dir)
    sd = {"_orig_mod." + k: v for k, v in sd.items()}
    sd["_orig_mod.transformer.wte.weight"] = sd["_orig_mod.transformer.wte.weight"].bfloat16()
    ckpt = tmp_path / "base_checkpoints" / "d4"
    save_checkpoint(ckpt, 150, sd, meta)
    shutil.copytree(d4_dir / "tokenizer", tmp_path / "tokenizer")
    model, _, _ = load_model_from_dir(ckpt, "cpu")
    assert model.transformer.wte.weight.dtype == torch.float32
    with torch.no_grad():
        # bf16-rounded embeddings change logits a little, not a lot
        diff = (model(d4_reference["input_ids"]) - d4_reference["logits"]).abs().max().item()
    assert 0 < diff < 0.5


def test_picks_largest_tag_and_step(tmp_path, d4_dir, monkeypatch):
    base = make_base_dir(tmp_path, d4_dir)
    sd, meta = fixture_state(d4_dir)
    # d4 has steps 150 and 9 (the largest is 150, compared as integers)
    save_checkpoint(base / "base_checkpoints" / "d4", 9, sd, dict(meta, step=9))
    # d12 > d4 numerically even though "d12" < "d4" as strings
    save_checkpoint(base / "base_checkpoints" / "d12", 2000, sd, dict(meta, step=2000))
    save_checkpoint(base / "base_checkpoints" / "d12", 1000000, sd, dict(meta, step=1000000))
    assert find_largest_model(base / "base_checkpoints") == "d12"
    assert find_last_step(base / "base_checkpoints" / "d4") == 150
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    _, _, meta_loaded = load_model("base", "cpu", "eval")
    assert meta_loaded["step"] == 1000000
    _, _, meta_d4 = load_model("base", "cpu", "eval", model_tag="d4")
    assert meta_d4["step"] == 150
    _, _, meta_d4_9 = load_model("base", "cpu", "eval", model_tag="d4", step=9)
    assert meta_d4_9["step"] == 9


def test_checkpoint_file_path_is_accepted(d4_dir):
    model, _, meta = load_model_from_dir(d4_dir / "base_checkpoints" / "d4" / "model_000150.pt", "cpu")
    assert meta["step"] == 150 and model.config.n_layer == 4


@pytest.mark.parametrize("extra", [
    {"resid_lambdas": torch.ones(4)},
    {"value_embeds.1.weight": torch.zeros(4096, 256)},
    {"backout_lambda": torch.zeros(1)},
])
def test_newer_format_is_refused_with_keys(tmp_path, d4_dir, extra):
    sd, meta = fixture_state(d4_dir)
    sd.update(extra)
    save_checkpoint(tmp_path / "ck", 1, sd, meta)
    shutil.copytree(d4_dir / "tokenizer", tmp_path / "tokenizer")
    with pytest.raises(UnsupportedFormatError) as e:
        load_model_from_dir(tmp_path / "ck", "cpu")
    assert next(iter(extra)).split(".")[0] in str(e.value)


def test_window_pattern_is_refused(tmp_path, d4_dir):
    sd, meta = fixture_state(d4_dir)
    meta["model_config"]["window_pattern"] = "SSSL"
    save_checkpoint(tmp_path / "ck", 1, sd, meta)
    shutil.copytree(d4_dir / "tokenizer", tmp_path / "tokenizer")
    with pytest.raises(UnsupportedFormatError, match="window_pattern"):
        load_model_from_dir(tmp_path / "ck", "cpu")


def test_tiny_checkpoint_round_trip(tmp_path):
    """Always runs: a checkpoint written by our code loads back bit-exactly."""
    cfg = GPTConfig(sequence_len=16, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    model = GPT(cfg)
    model.init_weights(seed=3)
    meta = {"step": 5, "model_config": cfg.__dict__}
    save_checkpoint(tmp_path / "base_checkpoints" / "d2", 5, model.state_dict(), meta)
    text = " ".join(f"word{i} w{i % 7}x{i % 5}" for i in range(400))
    tok = Tokenizer.train_from_iterator(iter([text] * 3), 300)
    tok.save(tmp_path / "tokenizer")
    loaded, tok2, meta2 = load_model_from_dir(tmp_path / "base_checkpoints" / "d2", "cpu")
    idx = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model.eval()(idx))
    assert tok2.get_vocab_size() == 300


def test_missing_and_bad_files_are_named(tmp_path, d4_dir):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_model_from_dir(tmp_path / "nope", "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_<step>.pt"):
        load_model_from_dir(tmp_path / "empty", "cpu")
    sd, meta = fixture_state(d4_dir)
    save_checkpoint(tmp_path / "ck", 1, sd, meta)
    (tmp_path / "ck" / "meta_000001.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta_000001.json"):
        load_model_from_dir(tmp_path / "ck", "cpu")
    (tmp_path / "ck" / "meta_000001.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta_000001.json"):
        load_model_from_dir(tmp_path / "ck", "cpu")
    (tmp_path / "ck" / "model_000001.pt").write_bytes(b"truncated")
    (tmp_path / "ck" / "meta_000001.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="model_000001.pt"):
        load_model_from_dir(tmp_path / "ck", "cpu")


def test_missing_key_is_named(tmp_path, d4_dir):
    sd, meta = fixture_state(d4_dir)
    del sd["transformer.h.2.mlp.c_fc.weight"]
    save_checkpoint(tmp_path / "ck", 1, sd, meta)
    shutil.copytree(d4_dir / "tokenizer", tmp_path / "tokenizer")
    with pytest.raises(KeyError, match="transformer.h.2.mlp.c_fc.weight"):
        load_model_from_dir(tmp_path / "ck", "cpu")


def test_resolve_model_prefers_explicit_then_base_dir(tmp_path, d4_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(make_base_dir(tmp_path, d4_dir)))
    src = resolve_model()
    assert src.kind == "nanochat" and src.model_id == "nanochat-d4"
    assert src.data_dir == tmp_path / "base" / "base_data"
    src2 = resolve_model(d4_dir / "base_checkpoints" / "d4")
    assert src2.kind == "explicit" and src2.data_dir == d4_dir / "base_data"
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        resolve_model(tmp_path / "missing")
