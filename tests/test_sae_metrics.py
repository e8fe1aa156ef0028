"""sae.metrics: every metric equals a hand computation; streaming equals one pass."""

import math

import pytest
import torch

from sae.metrics import (SAEMetrics, batch_metrics, decoder_max_cosine, fvu, log10_density,
                         log_density_histogram)

# three tokens in 2-d, a 4-latent code
X = torch.tensor([[1.0, 2.0], [3.0, 0.0], [-1.0, 1.0]])
X_HAT = torch.tensor([[1.0, 1.0], [2.0, 0.0], [-1.0, 2.0]])
CODES = torch.tensor([[0.5, 0.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


def test_batch_metrics_match_hand_computation():
    m = batch_metrics(X, X_HAT, CODES)
    # errors: (0,1), (1,0), (0,-1) -> squared norms 1, 1, 1
    assert m["n_tokens"] == 3
    assert m["mse"] == pytest.approx(1.0)
    assert m["mse_per_dim"] == pytest.approx(0.5)
    # mean (1, 1); centered squared norms: (0,1)->1, (2,-1)->5, (-2,0)->4 -> total 10
    assert m["fvu"] == pytest.approx(3 / 10)
    assert m["explained_variance"] == pytest.approx(0.7)
    # SAELens 6.x EV: E‖x‖² = (5 + 9 + 2)/3 = 16/3, ‖E[x]‖² = 2, so the total is 10/3 (= the
    # centered variance) and EV = 1 - 1/(10/3) = 0.7, the same as 1 - fvu
    assert m["explained_variance_saelens"] == pytest.approx(1 - 1 / (16 / 3 - 2))
    assert m["explained_variance_saelens"] == pytest.approx(m["explained_variance"])
    assert m["l0"] == pytest.approx(3 / 3)
    assert m["l1"] == pytest.approx(3.5 / 3)
    cos = [3 / (math.sqrt(5) * math.sqrt(2)), 6 / (3 * 2), 3 / (math.sqrt(2) * math.sqrt(5))]
    assert m["cossim"] == pytest.approx(sum(cos) / 3)
    ratios = [math.sqrt(2) / math.sqrt(5), 2 / 3, math.sqrt(5) / math.sqrt(2)]
    assert m["l2_ratio"] == pytest.approx(sum(ratios) / 3)
    # γ = E‖x̂‖² / E⟨x, x̂⟩ = (2 + 4 + 5) / (3 + 6 + 3)
    assert m["relative_reconstruction_bias"] == pytest.approx(11 / 12)
    # densities: latent0 2/3, latent1 1/3, latents 2-3 never
    assert m["dead_fraction"] == pytest.approx(0.5)
    assert m["dense_fraction_1pct"] == pytest.approx(0.5)
    assert m["dense_fraction_10pct"] == pytest.approx(0.5)


def test_l2_ratio_guards_tiny_inputs_like_saelens():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    x_hat = torch.tensor([[0.5, 0.0], [2.0, 0.0]])
    m = batch_metrics(x, x_hat, torch.ones(2, 1))
    assert m["l2_ratio"] == pytest.approx((0.5 / 1.0 + 2.0) / 2)


def test_fvu_function_is_the_batch_centered_fvu():
    assert fvu(X, X_HAT) == pytest.approx(0.3)


def test_streaming_equals_single_pass():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 8, generator=g) * 3 + 5  # a large mean stresses the variance merge
    x_hat = x + 0.3 * torch.randn(1000, 8, generator=g)
    codes = torch.relu(torch.randn(1000, 16, generator=g) - 1.5)
    acc = SAEMetrics(16)
    bounds = [0, 137, 500, 500, 501, 1000]  # uneven batches, including an empty one
    for s, e in zip(bounds, bounds[1:]):
        acc.update(x[s:e], x_hat[s:e], codes[s:e])
    streamed, whole = acc.compute(), batch_metrics(x, x_hat, codes)
    for key, value in whole.items():
        assert streamed[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert torch.equal(acc.fire_counts, (codes > 0).sum(0))


def test_log10_density_and_histogram():
    counts = torch.tensor([0, 1, 10, 100])
    logd = log10_density(counts, 100)
    assert torch.allclose(logd, torch.tensor([-10.0, -2.0, -1.0, 0.0]), atol=1e-6)
    h = log_density_histogram(logd, bins=10, lo=-10, hi=0)
    assert len(h["edges"]) == 11 and sum(h["counts"]) == 4
    assert h["counts"][0] == 1  # the dead latent lands in the first bin
    assert h["counts"][8] == 1  # density 0.01
    assert h["counts"][-1] == 2  # densities 0.1 and 1 (the last bin is closed)


def test_decoder_max_cosine():
    W = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])  # rows 0 and 1 are duplicates
    assert decoder_max_cosine(W) == pytest.approx((1 + 1 + 0) / 3)
    assert decoder_max_cosine(W, chunk=1) == pytest.approx((1 + 1 + 0) / 3)


def test_compute_without_tokens_is_an_error():
    with pytest.raises(ValueError, match="no tokens"):
        SAEMetrics(4).compute()
