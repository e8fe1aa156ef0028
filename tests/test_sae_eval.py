"""Spliced SAE evaluation: identity and zero SAEs hit the ends of the scale; a hand computation agrees."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanochat.dataset import iter_documents, iter_windows
from nanochat.gpt import SOFTCAP, norm
from nanochat.model_source import resolve_model
from sae.config import SAEConfig
from sae.evaluator import EvalConfig, evaluate_saes, write_eval_json
from sae.models import build_sae

D4 = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nanochat_d4"
HOOK = "blocks.1.hook_resid_post"
SEQ = 16
D = 256


@pytest.fixture(scope="module")
def src():
    if not D4.exists():
        pytest.skip(f"nanochat fixtures not found at {D4} (they sit beside the checkout as ../shared/fixtures)")
    return resolve_model(D4 / "base_checkpoints" / "d4", "cpu", quiet=True)


@pytest.fixture
def corpus(tmp_path):
    # 20 documents; the val split of a single file is its last 10%: 2 documents, several windows each
    docs = [f"for item_{i} in range({i}):\n    print(item_{i} * {i}, 'value', item_{i} + 1)\n    count += {i}"
            for i in range(20)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


def identity_sae(hook=HOOK, d=D):
    """A real ReLU SAE whose reconstruction is exact: codes [relu(x), relu(-x)], decoder [I; -I]."""
    sae = build_sae(SAEConfig(d_in=d, d_sae=2 * d, architecture="relu", hook_name=hook))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae


def zero_sae(hook=HOOK, d=D):
    sae = build_sae(SAEConfig(d_in=d, d_sae=2 * d, architecture="relu", hook_name=hook, name="zero"))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
    return sae


def random_topk_sae(hook=HOOK, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    sae = build_sae(SAEConfig(d_in=d, d_sae=4 * d, architecture="topk", k=16, hook_name=hook,
                              name=f"topk{seed}"), g)
    with torch.no_grad():
        sae.W_enc.mul_(0.05)
        sae.b_dec.normal_(0, 1.0, generator=g)
    return sae


def evaluate(src, corpus, saes, **kw):
    cfg = EvalConfig(**{"n_tokens": 10_000, "seq_len": SEQ, "batch_windows": 3, **kw})
    return evaluate_saes(src.model, src.tokenizer, corpus, saes, cfg, quiet=True)


def test_identity_sae_changes_nothing(src, corpus):
    (r,) = evaluate(src, corpus, [identity_sae()])
    assert abs(r["delta_ce"]) <= 1e-6 and r["kl"] <= 1e-6
    assert r["ce_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert r["fvu"] <= 1e-10 and r["cossim"] == pytest.approx(1.0)
    assert r["ce_zero_ablation"] > r["ce_clean"] + 0.1  # ablating the residual hurts


def test_zero_sae_recovers_nothing(src, corpus):
    (r,) = evaluate(src, corpus, [zero_sae()])
    assert r["ce_recovered"] == pytest.approx(0.0, abs=1e-9)
    assert r["ce_spliced"] == pytest.approx(r["ce_zero_ablation"], abs=1e-9)
    assert r["kl"] == pytest.approx(r["kl_zero_ablation"], abs=1e-9) and r["kl"] > 0
    assert r["l0"] == 0 and r["dead_fraction"] == 1.0


def _by_hand(model, windows, sae, layer):
    """Per-window forwards written out here (no hooks): CE/KL sums over non-BOS inputs, recon data."""
    ce_clean = ce_sae = kl = 0.0
    n = 0
    xs, xhats, codes = [], [], []
    for w in windows:
        idx = torch.tensor([w.tokens])
        T = idx.shape[1]
        cos_sin = model.cos[:, :T], model.sin[:, :T]
        outs = []
        for splice in (False, True):
            x = norm(model.transformer.wte(idx))
            for i, block in enumerate(model.transformer.h):
                x = block(x, cos_sin)
                if i == layer and splice:
                    x = x.clone()
                    c = sae.encode(x[0, 1:])
                    xs.append(x[0, 1:].clone())
                    codes.append(c)
                    xhats.append(sae.decode(c))
                    x[0, 1:] = xhats[-1]
            logits = model.lm_head(norm(x)).float()
            outs.append(F.log_softmax(SOFTCAP * torch.tanh(logits / SOFTCAP), -1)[0])
        clean, spliced = outs
        for t in range(1, T - 1):  # position 0 is BOS; the last position has no target
            target = w.tokens[t + 1]
            ce_clean -= float(clean[t, target])
            ce_sae -= float(spliced[t, target])
            kl += float((clean[t].exp() * (clean[t] - spliced[t])).sum())
            n += 1
    return ce_clean / n, ce_sae / n, kl / n, n, torch.cat(xs), torch.cat(xhats), torch.cat(codes)


def test_matches_a_hand_computation(src, corpus):
    sae = random_topk_sae()
    (r,) = evaluate(src, corpus, [sae], zero_ablation=False)
    windows = list(iter_windows(iter_documents(corpus, "val"), src.tokenizer, SEQ))
    assert len(windows) >= 4 and any(w.pos0 > 1 for w in windows)  # continuation windows included
    with torch.no_grad():
        ce_clean, ce_sae, kl, n, x, x_hat, codes = _by_hand(src.model, windows, sae, layer=1)
    assert r["n_ce_tokens"] == n and r["n_tokens"] == x.shape[0] == sum(len(w.tokens) - 1 for w in windows)
    assert r["ce_clean"] == pytest.approx(ce_clean, abs=1e-4)
    assert r["ce_spliced"] == pytest.approx(ce_sae, abs=1e-4)
    assert r["delta_ce"] == pytest.approx(ce_sae - ce_clean, abs=1e-4) and r["delta_ce"] > 0.01
    assert r["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-5)
    x, x_hat = x.double(), x_hat.double()
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert r["fvu"] == pytest.approx(fvu, rel=1e-5)
    assert r["l0"] == pytest.approx(float((codes > 0).sum(1).double().mean()))
    assert "ce_recovered" not in r


def test_several_saes_in_one_pass_equal_one_at_a_time(src, corpus):
    saes = [random_topk_sae(seed=1), random_topk_sae("blocks.2.hook_resid_post", seed=2), zero_sae()]
    together = evaluate(src, corpus, saes, n_tokens=20)
    for sae, r in zip(saes, together):
        (alone,) = evaluate(src, corpus, [sae], n_tokens=20)
        assert r["sae"] == alone["sae"]
        for key in ("ce_clean", "ce_spliced", "kl", "ce_zero_ablation", "fvu", "l0", "n_tokens"):
            assert r[key] == pytest.approx(alone[key], rel=1e-9, abs=1e-12), key
    everything = evaluate(src, corpus, saes[:1])[0]["n_tokens"]
    assert 20 <= together[0]["n_tokens"] < everything  # stops after the batch that reaches the budget


def test_bad_saes_are_refused_with_names(src, corpus):
    with pytest.raises(ValueError, match=r"d_in=64.*256 wide"):
        evaluate(src, corpus, [random_topk_sae(d=64)])
    with pytest.raises(ValueError, match="out of range"):
        evaluate(src, corpus, [random_topk_sae("blocks.9.hook_resid_post")])


def test_write_eval_json_merges_atomically(tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps({"metrics": {"fvu": 0.2}, "sae": "x"}))
    write_eval_json(tmp_path, {"delta_ce": 0.05, "ce_recovered": float("nan")})
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["metrics"] == {"fvu": 0.2} and report["sae"] == "x"
    assert report["val"] == {"delta_ce": 0.05, "ce_recovered": None}
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]
