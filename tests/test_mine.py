"""
Mining end to end on a tiny nanochat model with two real SAEs (TopK on layer 0, ReLU on layer 1),
checked against a brute-force pass that keeps the full activation matrix of every SAE.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

import atlas.mine as mine_mod
from atlas.mine import MineConfig, find_saes, mine_features
from atlas.tokens_display import visible_token
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.dataset import iter_batches, iter_documents, iter_windows
from nanochat.gpt import GPT, GPTConfig
from nanochat.model_source import resolve_corpus, resolve_model
from nanochat.tokenizer import Tokenizer
from sae import SAEConfig, build_sae, load_sae, save_sae
from sae.hooks import run_with_capture
from scripts import mine_features as cli

DOCS = Path(__file__).resolve().parents[1] / "docs" / "store.md"
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
CFG = MineConfig(tokens=None, seq_len=32, batch_tokens=256, chunk_tokens=700, label_negatives=256)
WORDS = ("the of and to in is that for it as with was on be by this are from at or an not but "
         "def return self import class").split()


@dataclass
class Tiny:
    root: Path
    checkpoint: Path
    corpus: Path
    sae_dir: Path
    source: object


def build_tiny(root: Path, n_docs: int = 120, vocab: int = 320) -> Tiny:
    """A 2-layer model in nanochat's layout, its tokenizer, a 2-file corpus and two SAEs."""
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) + (str(rng.randint(0, 20)) if rng.random() < 0.1 else "")
                     for _ in range(rng.randint(5, 90))) for _ in range(n_docs)]
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "a.txt").write_text("\n\n".join(docs[: n_docs // 2]) + "\n")
    (corpus / "b.txt").write_text("\n\n".join(docs[n_docs // 2:]) + "\n")
    Tokenizer.train_from_iterator(iter(docs), vocab).save(root / "tokenizer")
    cfg = GPTConfig(sequence_len=32, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    model = GPT(cfg)
    model.init_weights(seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # nanochat's init zeroes these; random values make later layers non-trivial
        for name, p in model.named_parameters():
            if name == "lm_head.weight" or name.endswith("c_proj.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    checkpoint = root / "base_checkpoints" / "d2"
    save_checkpoint(checkpoint, 10, model.state_dict(), {"step": 10, "model_config": cfg.__dict__})
    source = resolve_model(checkpoint)
    for layer, arch in ((0, "topk"), (1, "relu")):
        c = SAEConfig(d_in=32, d_sae=64, architecture=arch, k=4 if arch == "topk" else None,
                      hook_name=f"blocks.{layer}.hook_resid_post", model_id=source.model_id,
                      checkpoint=str(checkpoint))
        sae = build_sae(c, torch.Generator().manual_seed(layer))
        if arch == "relu":
            with torch.no_grad():
                sae.b_enc.fill_(-0.3)  # some latents never fire: dead features are covered
        save_sae(sae, root / "saes" / c.hook_name)
    (root / "saes" / "blocks.0.hook_resid_post" / "eval.json").write_text(json.dumps(
        {"metrics": {"fvu": 0.5, "l0": 4.0}, "val": {"fvu": 0.25, "delta_ce": 0.125, "kl": 0.0625,
                                                    "ce_recovered": 0.75, "dead_fraction": 0.0}}))
    return Tiny(root, checkpoint, corpus, root / "saes", source)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def mined(tiny):
    store = tiny.root / "features.duckdb"
    out = mine_features(find_saes(tiny.sae_dir), tiny.source, tiny.corpus, store, CFG, quiet=True)
    return store, out


@dataclass
class Brute:
    codes: dict            # sae_id -> [n_tokens, d_sae] float32
    keys: list             # (doc_id, token_pos) per mined token, in corpus order
    tokens: np.ndarray     # token id per mined token
    row: dict              # (doc_id, token_pos) -> row
    where: dict            # (doc_id, token_pos) -> (window tokens, index in the window)
    saes: dict             # sae_id -> SAE


@pytest.fixture(scope="module")
def brute(tiny) -> Brute:
    """The same batches as the miner, kept whole: every code of every mined token."""
    model, tok = tiny.source.model, tiny.source.tokenizer
    saes = {p.name: load_sae(p) for p in find_saes(tiny.sae_dir)}
    windows = list(iter_windows(iter_documents(tiny.corpus, "val"), tok, CFG.seq_len))
    codes = {k: [] for k in saes}
    keys, tokens, where = [], [], {}
    for w in windows:
        for t in range(1, len(w.tokens)):
            keys.append((w.doc_id, w.pos0 + t - 1))
            tokens.append(w.tokens[t])
            where[keys[-1]] = (w.tokens, t)
    for batch in iter_batches(windows, CFG.batch_tokens // CFG.seq_len, tok.get_bos_token_id()):
        flat = batch.valid.reshape(-1).nonzero().squeeze(1)
        with torch.no_grad():
            acts = run_with_capture(model, batch.idx, sorted({s.cfg.hook_name for s in saes.values()}))
            for k, s in saes.items():
                codes[k].append(s.encode(acts[s.cfg.hook_name].reshape(batch.idx.numel(), -1)[flat]))
    codes = {k: torch.cat(v).numpy() for k, v in codes.items()}
    return Brute(codes, keys, np.array(tokens), {k: i for i, k in enumerate(keys)}, where, saes)


def q(store, sql, params=None):
    con = duckdb.connect(str(store), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


# ----------------------------------------------------------------------------- exactness

def test_counts_densities_and_maxima_are_exact(mined, brute):
    store, out = mined
    n = len(brute.keys)
    assert out["tokens"] == n and out["documents"] == 60
    for sae_id, M in brute.codes.items():
        rows = q(store, "SELECT feature, count, density, max_act, mean_act, min_act FROM features "
                        "WHERE sae_id = ? ORDER BY feature", [sae_id])
        assert [r[0] for r in rows] == list(range(M.shape[1]))  # dead ones included
        count = (M > 0).sum(0)
        assert [r[1] for r in rows] == count.tolist()
        assert [r[2] for r in rows] == (count / n).tolist()
        assert np.array([r[3] for r in rows], np.float32).tolist() == M.max(0).tolist()
        mean = np.where(count > 0, M.sum(0, dtype=np.float64) / np.maximum(count, 1), 0)
        np.testing.assert_allclose([r[4] for r in rows], mean, rtol=1e-5)
        nz_min = np.where(M > 0, M, np.inf).min(0)
        assert [r[5] for r in rows] == np.where(count > 0, nz_min, 0).astype(np.float32).tolist()
    assert q(store, "SELECT sum(mine_tokens) FROM saes")[0][0] == 2 * n
    assert sum(1 for c in (brute.codes["blocks.1.hook_resid_post"] > 0).sum(0) if c == 0) > 0


def test_top_examples_are_the_exact_top_k_of_the_whole_pass(mined, brute):
    store, _ = mined
    for sae_id, M in brute.codes.items():
        got = q(store, "SELECT feature, rank, doc_id, token_pos, act FROM examples "
                       "WHERE sae_id = ? AND kind = 'top' ORDER BY feature, rank", [sae_id])
        by_feature = {}
        for f, rank, doc, pos, act in got:
            by_feature.setdefault(f, []).append((rank, (doc, pos), act))
        for f in range(M.shape[1]):
            col = M[:, f]
            rows = np.nonzero(col > 0)[0]
            expect = sorted(((-col[r], brute.keys[r]) for r in rows))[:CFG.top_k]  # ties: earliest
            have = by_feature.get(f, [])
            assert [r for r, _, _ in have] == list(range(1, len(have) + 1))
            assert [(key, np.float32(act)) for _, key, act in have] == [(k, -v) for v, k in expect]


def test_example_windows_are_the_model_context_with_per_token_acts(mined, brute):
    store, _ = mined
    rows = q(store, "SELECT sae_id, feature, doc_id, token_pos, act, token_ids, acts, center "
                    "FROM examples")
    assert rows and all(r[3] > 0 for r in rows)  # BOS (position 0) is never an example
    for sae_id, f, doc, pos, act, token_ids, acts, center in rows:
        window, t = brute.where[(doc, pos)]
        lo = max(0, t - CFG.ctx_before)
        assert token_ids == list(window[lo:t + CFG.ctx_after + 1])
        assert center == t - lo and acts[center] == act
        expect = [0.0 if i == 0 else float(brute.codes[sae_id][brute.row[(doc, pos - t + i)], f])
                  for i in range(lo, lo + len(token_ids))]
        assert acts == expect


def test_activation_histograms_are_exact(mined, brute):
    store, _ = mined
    for sae_id, M in brute.codes.items():
        hists = {f: (e, c) for f, e, c in q(store, "SELECT feature, edges, counts FROM histograms "
                                                  "WHERE sae_id = ? AND kind = 'activation'", [sae_id])}
        for f in range(M.shape[1]):
            vals = M[:, f][M[:, f] > 0].astype(np.float64)
            if len(vals) == 0:
                assert f not in hists
                continue
            edges, counts = hists[f]
            assert sum(counts) == len(vals) and len(edges) == len(counts) + 1
            assert edges[0] == 0 and edges[-2] < vals.max() <= edges[-1]
            assert counts == np.histogram(vals, edges)[0].tolist()
    vocab_size = q(store, "SELECT count(*) FROM vocab")[0][0]
    for (total,) in q(store, "SELECT list_sum(counts) FROM histograms WHERE kind = 'logit'"):
        assert total == vocab_size


def test_interval_examples_are_real_activations_in_their_quantile_bins(mined, brute):
    store, _ = mined
    F, nb = CFG.quantile_bins, CFG.n_bins
    for sae_id, M in brute.codes.items():
        bins = {}
        for f, b, lo, hi, frac in q(store, "SELECT feature, bin, lo, hi, frac FROM interval_bins "
                                           "WHERE sae_id = ?", [sae_id]):
            bins.setdefault(f, {})[b] = (lo, hi, frac)
        examples = q(store, "SELECT feature, bin, rank, doc_id, token_pos, act FROM examples "
                            "WHERE sae_id = ? AND kind = 'interval' ORDER BY feature, bin, rank", [sae_id])
        seen, per_bin = set(), {}
        for f, b, rank, doc, pos, act in examples:
            assert act == M[brute.row[(doc, pos)], f] > 0
            lo, hi, _ = bins[f][b]
            assert lo <= act <= hi and 1 <= rank <= CFG.per_bin and (f, doc, pos) not in seen
            seen.add((f, doc, pos))
            per_bin[(f, b)] = per_bin.get((f, b), 0) + 1
        for f in range(M.shape[1]):
            vals = M[:, f][M[:, f] > 0].astype(np.float64)
            if len(vals) == 0:
                assert f not in bins
                continue
            # the exact fine histogram over [0, 2^e], and its first boundaries reaching j/nb
            R = 2.0 ** np.ceil(np.log2(vals.max()))
            fine = np.minimum(np.floor(vals / (R / F)), F - 1).astype(int)
            cum = np.cumsum(np.bincount(fine, minlength=F))
            b = [int(np.searchsorted(cum, j * len(vals) / nb)) + 1 for j in range(1, nb)]
            edges = np.clip([vals.min()] + [bj * R / F for bj in b] + [vals.max()], vals.min(), vals.max())
            assert [bins[f][j][:2] for j in range(nb)] == [
                (np.float32(edges[j]), np.float32(edges[j + 1])) for j in range(nb)]
            in_bin = np.searchsorted(b, fine, side="right")
            assert [bins[f][j][2] for j in range(nb)] == (np.bincount(in_bin, minlength=nb) / len(vals)).tolist()
            for j in range(nb):  # a bin shows per_bin examples unless the sample is short
                assert per_bin.get((f, j), 0) <= min(CFG.per_bin, int((in_bin == j).sum()))


def test_logit_effects_equal_the_direct_matmul(mined, tiny):
    store, _ = mined
    W_U = tiny.source.model.lm_head.weight.detach()
    for sae_id, sae in ((p.name, load_sae(p)) for p in find_saes(tiny.sae_dir)):
        E = (sae.W_dec.detach() @ W_U.t()).numpy()
        rows = q(store, "SELECT feature, rank, token_id, value FROM logit_effects "
                        "WHERE sae_id = ? AND kind = 'raw' ORDER BY feature, rank", [sae_id])
        assert len(rows) == E.shape[0] * 20
        assert not q(store, "SELECT 1 FROM logit_effects WHERE kind = 'gain_corrected'")  # gain 1
        for f, rank, token, value in rows:
            order = np.argsort(-E[f]) if rank > 0 else np.argsort(E[f])
            assert token == order[abs(rank) - 1]
            assert value == pytest.approx(E[f, token], abs=1e-6)


def test_decoder_and_coactivation_neighbours(mined, brute):
    store, _ = mined
    for sae_id, M in brute.codes.items():
        W = brute.saes[sae_id].W_dec.detach().numpy()
        W = W / np.linalg.norm(W, axis=1, keepdims=True)
        cos = W @ W.T
        np.fill_diagonal(cos, -np.inf)
        A = (M > 0).astype(np.int64)
        both = A.T @ A
        either = A.sum(0)[:, None] + A.sum(0)[None, :] - both
        jac = np.where(both > 0, both / np.maximum(either, 1), 0.0)
        np.fill_diagonal(jac, 0)
        rows = q(store, "SELECT feature, kind, rank, other_feature, value FROM neighbors "
                        "WHERE sae_id = ? ORDER BY feature, kind, rank", [sae_id])
        got = {}
        for f, kind, rank, other, value in rows:
            got.setdefault((f, kind), []).append((other, value))
        for f in range(M.shape[1]):
            dec = got[(f, "decoder_cos")]
            assert [o for o, _ in dec] == np.argsort(-cos[f], kind="stable")[:CFG.n_neighbors].tolist()
            np.testing.assert_allclose([v for _, v in dec], np.sort(cos[f])[::-1][:CFG.n_neighbors], atol=1e-5)
            co = got.get((f, "coactivation"), [])
            expect = np.sort(jac[f][jac[f] > 0])[::-1][:CFG.n_neighbors]
            np.testing.assert_allclose([v for _, v in co], expect, rtol=1e-12)
            assert all(jac[f, o] == pytest.approx(v) for o, v in co)


def test_reverse_index_and_token_counts(mined, brute):
    store, _ = mined
    counts = np.bincount(brute.tokens, minlength=q(store, "SELECT count(*) FROM vocab")[0][0])
    assert dict(q(store, "SELECT token_id, count FROM token_counts")) == \
        {t: int(c) for t, c in enumerate(counts) if c}
    bos = q(store, "SELECT token_id FROM vocab WHERE display = '<|bos|>'")[0][0]
    assert counts[bos] == 0
    for sae_id, M in brute.codes.items():
        rows = q(store, "SELECT token_id, feature, count, mean_act, frac, rank FROM token_features "
                        "WHERE sae_id = ? ORDER BY token_id, rank", [sae_id])
        assert rows
        by_token = {}
        for t, f, c, mean, frac, rank in rows:
            fired = M[brute.tokens == t, f]
            fired = fired[fired > 0]
            assert c == len(fired) and mean == pytest.approx(fired.mean(), rel=1e-5)
            assert frac == c / counts[t]
            by_token.setdefault(t, []).append((rank, c))
        for t, got in by_token.items():
            per_feature = (M[brute.tokens == t] > 0).sum(0)
            expect = sorted(per_feature[per_feature > 0].tolist(), reverse=True)[:CFG.token_top]
            assert [c for _, c in got] == expect and [r for r, _ in got] == list(range(1, len(got) + 1))


def test_position_profile_and_lineage(mined, brute):
    store, _ = mined
    position = np.array([brute.where[k][1] for k in brute.keys])  # in the model's window
    bucket = np.floor(np.log2(position)).astype(int)
    tokens = np.bincount(bucket)
    for sae_id, M in brute.codes.items():
        rows = q(store, "SELECT feature, pos_lo, pos_hi, count, mean_act, density FROM position_profile "
                        "WHERE sae_id = ?", [sae_id])
        got = {(f, lo): (hi, c, mean, dens) for f, lo, hi, c, mean, dens in rows}
        expect = {}
        for f in range(M.shape[1]):
            for b in np.unique(bucket[M[:, f] > 0]):
                fired = M[(bucket == b) & (M[:, f] > 0), f]
                expect[(f, 1 << b)] = (2 << b, len(fired), fired.mean(), len(fired) / tokens[b])
        assert got.keys() == expect.keys()
        for key, (hi, c, mean, dens) in expect.items():
            assert got[key][:2] == (hi, c) and got[key][3] == dens
            assert got[key][2] == pytest.approx(mean, rel=1e-5)
    W = {k: s.W_dec.detach().numpy() for k, s in brute.saes.items()}
    W = {k: w / np.linalg.norm(w, axis=1, keepdims=True) for k, w in W.items()}
    for a, b in (("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"),
                 ("blocks.1.hook_resid_post", "blocks.0.hook_resid_post")):
        cos = W[a] @ W[b].T
        rows = q(store, "SELECT feature, rank, other_feature, value FROM lineage WHERE sae_id = ? "
                        "AND other_sae_id = ? ORDER BY feature, rank", [a, b])
        assert len(rows) == cos.shape[0] * CFG.n_lineage
        for f, rank, other, value in rows:
            assert other == np.argsort(-cos[f], kind="stable")[rank - 1]
            assert value == pytest.approx(cos[f, other], abs=1e-5)


# ----------------------------------------------------------------------------- contents

def test_vocab_meta_and_sae_rows(mined, tiny):
    store, out = mined
    tok = tiny.source.tokenizer
    vocab = q(store, "SELECT token_id, token_bytes, display FROM vocab ORDER BY token_id")
    assert len(vocab) == tok.get_vocab_size()
    assert all(bytes(b) == tok.token_bytes(i) and d == visible_token(tok.token_bytes(i)) for i, b, d in vocab)
    meta = {k: json.loads(v) for k, v in q(store, "SELECT key, value FROM meta")}
    assert meta["model"]["model_id"] == "nanochat-d2" and meta["model"]["step"] == 10
    assert meta["model"]["n_layer"] == 2 and meta["model"]["vocab_size"] == 320
    assert meta["model"]["parameters"] == sum(p.numel() for p in tiny.source.model.parameters())
    assert meta["corpus"]["split"] == "val" and meta["corpus"]["files"] == ["b.txt"]
    assert meta["corpus"]["tokens"] == out["tokens"] and meta["corpus"]["seq_len"] == 32
    assert meta["build"]["fingerprint"] == out["fingerprint"]
    assert set(meta["build"]["versions"]) >= {"torch", "duckdb", "numpy", "python"}
    saes = q(store, "SELECT sae_id, layer, hook, arch, d_in, d_sae, k, fvu, delta_ce, kl, ce_recovered, "
                    "dead_frac, l0 FROM saes ORDER BY layer")
    assert saes[0] == ("blocks.0.hook_resid_post", 0, "hook_resid_post", "topk", 32, 64, 4,
                       0.25, 0.125, 0.0625, 0.75, 0.0, 4.0)  # eval.json's held-out section first
    assert saes[1][:7] == ("blocks.1.hook_resid_post", 1, "hook_resid_post", "relu", 32, 64, None)


def test_labels_flags_and_scores(mined, brute):
    store, _ = mined
    rows = q(store, "SELECT sae_id, feature, count, label, label_rule, label_f1, label_precision, "
                    "label_recall, flags FROM features")
    for sae_id, f, count, label, rule, f1, p, r, flags in rows:
        if count == 0:
            assert label is None and f1 is None and flags == ["dead"]
            continue
        assert label and rule in {"position", "max_token", "max_token_bigram", "max_token_class",
                                  "next_token", "next_token_class", "logit_class", "context_class",
                                  "context_pmi", "logit_top3"}
        assert 0 <= f1 <= 1 and 0 <= p <= 1 and 0 <= r <= 1
        assert ("weak_label" in flags) == (f1 < 0.5)
    assert any(r[4] == "max_token" for r in rows)


def test_docs_sql_examples_run(mined):
    store, _ = mined
    blocks = re.findall(r"```sql\n(.*?)```", DOCS.read_text(), re.S)
    assert len(blocks) >= 10
    for sql in blocks:
        assert q(store, sql), f"no rows from:\n{sql}"


# ----------------------------------------------------------------------------- resume, rerun

def dump(store) -> dict:
    con = duckdb.connect(str(store), read_only=True)
    try:
        tables = [t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in sorted(tables)}
    finally:
        con.close()


def test_interrupted_run_resumes_to_the_same_store(mined, tiny, monkeypatch):
    store, out = mined
    path = tiny.root / "resumed.duckdb"
    real = mine_mod._Run.process
    calls = {"n": 0}

    def crash_after_some_batches(self, *args):
        calls["n"] += 1
        if calls["n"] > 9:
            raise KeyboardInterrupt  # the process dies mid-pass
        return real(self, *args)

    monkeypatch.setattr(mine_mod._Run, "process", crash_after_some_batches)
    with pytest.raises(KeyboardInterrupt):
        mine_features(find_saes(tiny.sae_dir), tiny.source, tiny.corpus, path, CFG, quiet=True)
    assert (tiny.root / "resumed.duckdb.mine-state" / "rank0-of-1.pt").exists()
    assert not path.exists()
    monkeypatch.setattr(mine_mod._Run, "process", real)
    again = mine_features(find_saes(tiny.sae_dir), tiny.source, tiny.corpus, path, CFG, quiet=True)
    assert 0 < again["resumed_from"] < out["tokens"] and again["tokens"] == out["tokens"]
    assert not (tiny.root / "resumed.duckdb.mine-state").exists()
    assert dump(path) == dump(store)


def test_rerun_with_the_same_inputs_changes_nothing(mined, tiny):
    store, out = mined
    before = hashlib.sha256(store.read_bytes()).hexdigest()
    again = mine_features(find_saes(tiny.sae_dir), tiny.source, tiny.corpus, store, CFG, quiet=True)
    assert again["skipped"] and again["fingerprint"] == out["fingerprint"]
    assert hashlib.sha256(store.read_bytes()).hexdigest() == before


def test_a_failed_write_leaves_the_store_as_it_was(mined, tiny, monkeypatch):
    store, _ = mined
    path = tiny.root / "atomic.duckdb"
    shutil.copy(store, path)
    before = dump(path)
    real_insert = mine_mod._insert

    def fail_midway(con, table, data):
        if table == "histograms":
            raise RuntimeError("disk full")
        real_insert(con, table, data)

    monkeypatch.setattr(mine_mod, "_insert", fail_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        mine_features(find_saes(tiny.sae_dir), tiny.source, tiny.corpus, path,
                      replace(CFG, tokens=500, force=True), quiet=True)
    assert dump(path) == before


# ----------------------------------------------------------------------------- errors, CLI

def test_clear_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_saes(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no SAE folders"):
        find_saes(tiny.corpus)
    c = SAEConfig(d_in=16, d_sae=8, architecture="relu", hook_name="blocks.1.hook_resid_post",
                  model_id=tiny.source.model_id)
    wrong = save_sae(build_sae(c), tmp_path / "wrong_width")
    with pytest.raises(ValueError, match=r"wrong_width.*d_in is 16.*width 32"):
        mine_features([wrong], tiny.source, tiny.corpus, tmp_path / "x.duckdb", CFG, quiet=True)
    other = save_sae(build_sae(replace(c, d_in=32, model_id="nanochat-d20")), tmp_path / "other")
    with pytest.raises(ValueError, match="trained on model 'nanochat-d20'"):
        mine_features([other], tiny.source, tiny.corpus, tmp_path / "x.duckdb", CFG, quiet=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("some text\n")
    (empty / "b.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty corpus.*'val' split"):
        mine_features(find_saes(tiny.sae_dir), tiny.source, empty, tmp_path / "x.duckdb", CFG, quiet=True)


def test_cli(tiny, tmp_path, capsys):
    store = tmp_path / "cli.duckdb"
    assert cli.main(["--sae_dir", str(tiny.sae_dir), "--checkpoint", str(tiny.checkpoint),
                     "--data", str(tiny.corpus), "--store", str(store), "--tokens", "600", "--batch-tokens", "256",
                     "--seq-len", "32", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(store)
    assert q(store, "SELECT corpus_tokens FROM (SELECT (value::JSON ->> 'tokens')::INT AS corpus_tokens "
                    "FROM meta WHERE key = 'corpus')")[0][0] == 600
    assert cli.main(["--sae-dir", str(tmp_path / "missing"), "--checkpoint", str(tiny.checkpoint),
                     "--quiet"]) == 2
    assert "SAE directory not found" in capsys.readouterr().err


def test_gain_corrected_logits_on_a_2026_model(tmp_path):
    checkpoint = FIXTURES / "nanochat_head_d4" / "base_checkpoints" / "d4"
    if not checkpoint.exists():
        pytest.skip(f"nanochat fixtures not found at {FIXTURES}")
    source = resolve_model(checkpoint)
    gain = source.model.residual_gain(0)
    assert gain != 1.0
    c = SAEConfig(d_in=256, d_sae=32, architecture="topk", k=4, hook_name="blocks.0.hook_resid_post",
                  model_id=source.model_id, checkpoint=str(source.checkpoint_dir))
    save_sae(build_sae(c, torch.Generator().manual_seed(0)), tmp_path / "saes" / c.hook_name)
    store = tmp_path / "f.duckdb"
    mine_features(find_saes(tmp_path / "saes"), source, resolve_corpus(source), store,
                  MineConfig(tokens=512, batch_tokens=512), quiet=True)
    raw = {(f, t): v for f, t, v in q(store, "SELECT feature, token_id, value FROM logit_effects WHERE kind = 'raw'")}
    corrected = q(store, "SELECT feature, rank, token_id, value FROM logit_effects WHERE kind = 'gain_corrected' "
                         "ORDER BY feature, rank")
    assert len(corrected) == 32 * 20
    for f, rank, t, v in corrected:
        assert v == pytest.approx(raw[(f, t)] * gain, rel=1e-5)  # same tokens, scaled by g(L) > 0
