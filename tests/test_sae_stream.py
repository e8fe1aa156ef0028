"""Activation streaming: BOS excluded, shuffled, bounded memory, cycling, exact resume, disk cache."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from nanochat.dataset import iter_batches, iter_documents, iter_windows
from nanochat.model_source import resolve_model
from sae.activations import (ActivationCache, CorpusActivations, StreamConfig, build_cache,
                             cached_stream, corpus_stream, model_fingerprint)
from sae.config import SAEConfig, TrainConfig
from sae.io import load_sae
from sae.trainer import train_saes

D4 = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nanochat_d4"
HOOKS = ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_post"]
SEQ = 32


@pytest.fixture(scope="module")
def src():
    if not D4.exists():
        pytest.skip(f"nanochat fixtures not found at {D4} (they sit beside the checkout as ../shared/fixtures)")
    return resolve_model(D4 / "base_checkpoints" / "d4", "cpu", quiet=True)


def write_corpus(path: Path, n_docs: int = 24) -> Path:
    docs = [f"def function_{i}(x, y):\n    total = x * {i} + y\n    return total - {i % 7}" for i in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def stream_for(src, corpus, logs=None, **kw):
    cfg = dict(hook_names=HOOKS, batch_size=96, buffer_tokens=300, seq_len=SEQ, forward_windows=4)
    cfg.update(kw)
    return corpus_stream(src.model, src.tokenizer, corpus, StreamConfig(**cfg),
                         log=(logs.append if logs is not None else lambda m: None))


def one_pass(src, corpus, hooks=HOOKS):
    """Everything the source yields in its first pass over the train split, unshuffled."""
    source = CorpusActivations(src.model, src.tokenizer, corpus, hooks, seq_len=SEQ, forward_windows=4,
                               log=lambda m: None)
    acts, ids = {h: [] for h in hooks}, []
    for out, tok, pos in source.iter_forwards(source.start_position()):
        if pos[0] > 0:  # wrapped into the second pass
            break
        for h in hooks:
            acts[h].append(out[h])
        ids.append(tok)
    return {h: torch.cat(v) for h, v in acts.items()}, torch.cat(ids)


def test_stream_excludes_bos_and_padding(src, tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    acts, ids = one_pass(src, corpus)
    windows = list(iter_windows(iter_documents(corpus, "train"), src.tokenizer, SEQ))
    n_valid = sum(int(b.valid.sum()) for b in iter_batches(windows, 4, src.tokenizer.get_bos_token_id()))
    assert ids.numel() == n_valid == sum(len(w.tokens) - 1 for w in windows)
    assert acts[HOOKS[0]].shape == (n_valid, 256) and acts[HOOKS[1]].shape == (n_valid, 1024)
    assert not (ids == src.tokenizer.get_bos_token_id()).any()
    # the BOS residual (position 0) is not among the rows: its norm is an outlier
    with torch.no_grad():
        bos_row = src.model(torch.tensor([[src.tokenizer.get_bos_token_id()]]), stop_after_layer=1)[0, 0]
    assert not any(torch.allclose(bos_row, row) for row in acts[HOOKS[0]])


def test_batches_are_a_shuffle_of_the_tokens(src, tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    acts, _ = one_pass(src, corpus)
    n = acts[HOOKS[0]].shape[0]
    stream = stream_for(src, corpus, buffer_tokens=n)  # forwards never straddle passes: gen 0 = pass 1
    first = next(stream)
    assert set(first) == set(HOOKS) and all(t.dtype == torch.float32 for t in first.values())
    assert first[HOOKS[0]].shape == (96, 256) and first[HOOKS[1]].shape == (96, 1024)
    assert stream.peak_buffer_tokens == n
    served = torch.cat([first[HOOKS[0]]] + [next(stream)[HOOKS[0]] for _ in range(n // 96)])[:n]
    proj = torch.randn(256, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.sort(served @ proj).values, torch.sort(acts[HOOKS[0]] @ proj).values)
    assert not torch.equal(served, acts[HOOKS[0]])  # not in corpus order


def test_memory_is_bounded_as_tokens_grow(src, tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    stream = stream_for(src, corpus)
    bound = 300 + 4 * SEQ  # buffer + the overshoot of one forward batch
    peaks = []
    for n_batches in (5, 40):
        while stream.tokens_served < n_batches * 96:
            next(stream)
        peaks.append(stream.peak_buffer_tokens)
    assert peaks[0] <= bound and peaks[1] <= bound
    assert stream.tokens_served >= 40 * 96 > 10 * 300  # many generations went through the same buffer
    assert all(buf.shape[0] == bound for buf in stream.source._buffers.values())


def test_small_corpus_is_cycled_with_a_message(src, tmp_path):
    corpus = write_corpus(tmp_path / "c.txt", n_docs=6)
    logs = []
    stream = stream_for(src, corpus, logs=logs)
    n_train_tokens = one_pass(src, corpus)[1].numel()
    for _ in range(4 * n_train_tokens // 96 + 1):  # into the 5th pass
        next(stream)
    passes = [m for m in logs if "exhausted" in m]
    assert ["pass 2" in passes[0], "pass 4" in passes[1], len(passes)] == [True, True, 2]  # 3 and 5 are quiet


def test_corpus_without_tokens_is_an_error(src, tmp_path):
    corpus = tmp_path / "empty.jsonl"
    corpus.write_text('{"text": ""}\n' * 4)
    with pytest.raises(ValueError, match="no tokens besides BOS"):
        next(stream_for(src, corpus))


@pytest.mark.parametrize("consumed", [0, 2, 3, 7])
def test_resume_continues_bit_for_bit(src, tmp_path, consumed):
    corpus = write_corpus(tmp_path / "c.txt")
    a = stream_for(src, corpus)
    for _ in range(consumed):
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(6)]
    b = stream_for(src, corpus)
    b.load_state_dict(state)
    for want in expected:
        got = next(b)
        assert all(torch.equal(got[h], want[h]) for h in HOOKS)
    assert b.tokens_served == a.tokens_served


def test_resume_refuses_a_different_stream(src, tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    a = stream_for(src, corpus)
    next(a)
    with pytest.raises(ValueError, match="batch_size"):
        stream_for(src, corpus, batch_size=64).load_state_dict(a.state_dict())


def test_cache_round_trips_and_is_reused(src, tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    acts, ids = one_pass(src, corpus)
    fp = model_fingerprint(src.checkpoint_dir, src.step, src.model_id)
    logs = []
    cache = build_cache(src.model, src.tokenizer, corpus, HOOKS[:1], 500, tmp_path / "cache", fp,
                        seq_len=SEQ, dtype="float32", forward_windows=4, quiet=True, log=logs.append)
    assert np.array_equal(cache.token_ids(), ids[:500].numpy())
    assert np.array_equal(cache.array(HOOKS[0]), acts[HOOKS[0]][:500].numpy())
    assert not list(cache.path.glob("*.tmp*"))  # temp files were renamed into place
    mtime = os.stat(cache.path / f"{HOOKS[0]}.npy").st_mtime_ns
    # the same fingerprint is reused; a missing hook is added beside the existing one
    again = build_cache(src.model, src.tokenizer, corpus, HOOKS, 500, tmp_path / "cache", fp,
                        seq_len=SEQ, dtype="float32", forward_windows=4, quiet=True, log=logs.append)
    assert again.path == cache.path and sorted(again.hooks) == sorted(HOOKS)
    assert os.stat(cache.path / f"{HOOKS[0]}.npy").st_mtime_ns == mtime
    assert np.array_equal(again.array(HOOKS[1]), acts[HOOKS[1]][:500].numpy())
    assert build_cache(src.model, src.tokenizer, corpus, HOOKS, 500, tmp_path / "cache", fp, seq_len=SEQ,
                       dtype="float32", quiet=True, log=logs.append).path == cache.path
    assert any("reusing" in m for m in logs)
    # another token count is another cache; fp16 halves the bytes
    half = build_cache(src.model, src.tokenizer, corpus, HOOKS[:1], 400, tmp_path / "cache", fp,
                       seq_len=SEQ, dtype="float16", quiet=True, log=logs.append)
    assert half.path != cache.path and half.array(HOOKS[0]).dtype == np.float16
    assert np.allclose(half.array(HOOKS[0]), acts[HOOKS[0]][:400].numpy(), rtol=1e-3, atol=1e-2)
    assert ActivationCache(half.path).n_tokens == 400


def test_cached_stream_serves_the_cache_and_resumes(src, tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    fp = model_fingerprint(src.checkpoint_dir, src.step, src.model_id)
    cache = build_cache(src.model, src.tokenizer, corpus, HOOKS, 500, tmp_path / "cache", fp,
                        seq_len=SEQ, dtype="float32", quiet=True, log=lambda m: None)
    cfg = StreamConfig(HOOKS, batch_size=96, buffer_tokens=200, seed=3)
    logs = []
    s = cached_stream(cache, cfg, log=logs.append)
    rows = torch.cat([next(s)[HOOKS[0]] for _ in range(6)])  # 576 tokens > 500: wraps around
    assert any("exhausted" in m for m in logs)
    proj = torch.randn(256, generator=torch.Generator().manual_seed(0))
    cached = torch.from_numpy(np.array(cache.array(HOOKS[0])))
    assert torch.equal(torch.sort(rows[:400] @ proj).values, torch.sort(cached[:400] @ proj).values)
    state = s.state_dict()
    expected = [next(s) for _ in range(4)]
    t = cached_stream(cache, cfg, log=lambda m: None)
    t.load_state_dict(state)
    for want in expected:
        got = next(t)
        assert all(torch.equal(got[h], want[h]) for h in HOOKS)
    with pytest.raises(KeyError, match="blocks.3.hook_resid_post"):
        cached_stream(cache, StreamConfig(["blocks.3.hook_resid_post"]))


class _Interrupt(Exception):
    pass


class _Tap:
    """Passes a stream through, counting batches; raises after `stop_after` of them (a killed run)."""

    def __init__(self, stream, stop_after=None):
        self.stream, self.stop_after, self.pulled = stream, stop_after, 0

    def __iter__(self):
        for batch in self.stream:
            if self.pulled == self.stop_after:
                raise _Interrupt()
            self.pulled += 1
            yield batch

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)


def test_interrupted_then_resumed_training_equals_uninterrupted(src, tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    cfgs = [SAEConfig(d_in=256, d_sae=512, architecture="batchtopk", k=8, hook_name=HOOKS[0]),
            SAEConfig(d_in=1024, d_sae=512, architecture="topk", k=8, hook_name=HOOKS[1])]
    train_cfg = TrainConfig(total_tokens=96 * 12, batch_size=96, init_tokens=96, calibration_tokens=192,
                            eval_tokens=96, checkpoint_every=4, quiet=True)

    full = _Tap(stream_for(src, corpus))
    train_saes(cfgs, train_cfg, full, tmp_path / "full")
    with pytest.raises(_Interrupt):  # init takes 1 batch, then 6 steps; last checkpoint at step 4
        train_saes(cfgs, train_cfg, _Tap(stream_for(src, corpus), stop_after=7), tmp_path / "cut")
    resumed = _Tap(stream_for(src, corpus))
    train_saes(cfgs, train_cfg, resumed, tmp_path / "cut", resume=True)

    assert resumed.pulled == full.pulled - 1 - 4  # it continued from step 4, not from scratch
    for h in HOOKS:
        a, b = load_sae(tmp_path / "full" / h), load_sae(tmp_path / "cut" / h)
        for name, p in a.state_dict().items():
            assert torch.equal(p, b.state_dict()[name]), f"{h}: {name}"
