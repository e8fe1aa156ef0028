"""sae.models / sae.sparse: architectures recover planted dictionaries; kernels match references."""

import pytest
import torch

from sae import SAEConfig, TrainConfig, build_sae, train_sae
from sae.metrics import batch_metrics
from sae.models import LossContext
from sae.sparse import (batch_topk_encode, dense_decode, dense_topk_encode, row_offsets, sparse_decode,
                        topk_encode)


@pytest.fixture(autouse=True)
def one_thread():
    """These SAEs are tiny: a second thread only adds barrier waits, which stall badly on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

D_IN, N_FEAT, D_SAE, P_ACTIVE = 32, 48, 96, 2.5 / 48


def planted_dictionary(seed=0):
    """48 unit directions in 32-d plus a constant offset (a mean the SAE must center away)."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(N_FEAT, D_IN, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    offset = torch.randn(D_IN, generator=g)
    return D, offset / offset.norm() * 3.0


def planted_batches(D, offset, seed, batch=512, n_batches=None):
    """Each feature fires independently (mean 2.5 per token) with magnitude U(0.5, 1.5), small noise."""
    g = torch.Generator().manual_seed(seed)
    i = 0
    while n_batches is None or i < n_batches:
        codes = (torch.rand(batch, N_FEAT, generator=g) < P_ACTIVE) * (torch.rand(batch, N_FEAT, generator=g) + 0.5)
        yield codes @ D + offset + 0.01 * torch.randn(batch, D_IN, generator=g)
        i += 1


def matched_fraction(D, W_dec, min_cos=0.9):
    cos = D @ (W_dec / W_dec.norm(dim=1, keepdim=True)).t()
    return float((cos.max(dim=1).values > min_cos).float().mean())


# explicit sparsity coefficients where the width-aware defaults are not the subject of the test
ARCH_SETTINGS = {
    "topk": {"k": 5},
    "batchtopk": {"k": 5},
    "relu": {},  # the default coefficient
    "gated": {"l1_coefficient": 1.0},
    "jumprelu": {"l1_coefficient": 0.03},
}


@pytest.mark.parametrize("arch", list(ARCH_SETTINGS))
def test_architecture_recovers_planted_dictionary(arch, tmp_path):
    D, offset = planted_dictionary()
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, hook_name="blocks.0.hook_resid_post",
                    **ARCH_SETTINGS[arch])
    tc = TrainConfig(total_tokens=400 * 512, batch_size=512, lr=5e-3, init_tokens=4096, calibration_tokens=16384,
                     eval_tokens=8192, quiet=True)
    sae = train_sae(cfg, tc, planted_batches(D, offset, seed=1), tmp_path)
    x = next(planted_batches(D, offset, seed=99, batch=8192))  # fresh data, raw units
    codes = sae.encode(x)
    m = batch_metrics(x, sae.decode(codes), codes)
    assert m["fvu"] < 0.1, m
    assert matched_fraction(D, sae.W_dec) >= 0.8
    assert bool((codes >= 0).all())
    if arch in ("topk", "batchtopk"):
        assert m["l0"] == pytest.approx(5, abs=0.6)
    assert sae.cfg.architecture == {"batchtopk": "jumprelu", "gated": "jumprelu"}.get(arch, arch)


def _random_topk_sae(arch="topk", seed=0, d=16, n=64, k=4):
    sae = build_sae(SAEConfig(d_in=d, d_sae=n, architecture=arch, k=k), torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
        sae.b_dec.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 2))
    return sae


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_kernels_match_dense_reference(arch):
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(5)) * 2
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True  # exercise AuxK too
    results = []
    for sparse in (True, False):
        sae = _random_topk_sae(arch)
        out = sae.training_loss(x, LossContext(dead=dead, sparsity_coef=0.0, auxk_alpha=1 / 32, sparse=sparse))
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (a, ga), (b, gb) = results
    assert torch.allclose(a.loss, b.loss, rtol=1e-5)
    assert torch.allclose(a.x_hat, b.x_hat, atol=1e-5)
    assert torch.equal(a.fired, b.fired)
    assert float(a.terms["auxk"]) > 0
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-5, rtol=1e-4), name


def test_topk_encoder_backward_matches_autograd_per_tensor():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 8, generator=g, requires_grad=True)
    W = torch.randn(8, 32, generator=g, requires_grad=True)
    b = torch.randn(32, generator=g, requires_grad=True)
    token_w, latent_w = torch.randn(50, 1, generator=g), torch.randn(32, generator=g)
    v1, i1 = topk_encode(x, W, b, 3)
    v2, i2 = dense_topk_encode(x, W, b, 3)
    assert torch.equal(i1.sort(dim=1).values, i2.sort(dim=1).values)
    # a loss that weights each (token, latent) pair, independent of the order within a row
    grads1 = torch.autograd.grad((v1 * token_w * latent_w[i1]).sum(), (x, W, b))
    grads2 = torch.autograd.grad((v2 * token_w * latent_w[i2]).sum(), (x, W, b))
    for g1, g2 in zip(grads1, grads2):
        assert torch.allclose(g1, g2, atol=1e-5)


def test_batch_topk_selection_keeps_k_per_token_on_average():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    sae = _random_topk_sae("batchtopk").requires_grad_(False)
    values, rows, cols = batch_topk_encode(sae.encoder_input(x), sae.W_enc, sae.b_enc, 4)
    assert values.numel() == 4 * 64
    assert bool((rows[1:] >= rows[:-1]).all())  # sorted by token for embedding_bag offsets
    pre = torch.relu(sae.pre_acts(x))
    assert torch.equal(values, pre[rows, cols])
    assert float(values.min()) >= float(pre.flatten().topk(4 * 64).values.min())
    counts = torch.bincount(rows, minlength=64)
    assert counts.float().std() > 0  # the per-token budget varies
    out = sparse_decode(values, cols, sae.W_dec, row_offsets(rows, 64))
    codes = torch.zeros(64, 64).index_put((rows, cols), values)
    assert torch.allclose(out, codes @ sae.W_dec, atol=1e-5)


def test_dense_and_sparse_decode_agree():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 8, generator=g)
    values = torch.rand(10, 5, generator=g)
    indices = torch.stack([torch.randperm(40, generator=g)[:5] for _ in range(10)])
    assert torch.allclose(sparse_decode(values, indices, W), dense_decode(values, indices, W), atol=1e-6)


def test_topk_encode_applies_relu_before_selection():
    sae = _random_topk_sae("topk", k=4)
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)  # every pre-activation negative
    x = torch.randn(5, 16)
    assert torch.equal(sae.encode(x), torch.zeros(5, 64))
    values, indices = sae.encode_topk(x)
    assert values.shape == (5, 4) and bool((values == 0).all())


def test_topk_encode_and_encode_topk_agree():
    sae = _random_topk_sae("topk", k=4)
    x = torch.randn(3, 7, 16)  # leading dims are kept
    codes = sae.encode(x)
    assert codes.shape == (3, 7, 64)
    assert bool(((codes > 0).sum(-1) <= 4).all())
    values, indices = sae.encode_topk(x)
    assert torch.equal(torch.zeros_like(codes).scatter(-1, indices, values), codes)


def test_batchtopk_inference_is_batch_independent():
    sae = _random_topk_sae("batchtopk")
    sae.threshold.fill_(0.3)
    x = torch.randn(32, 16)
    assert torch.allclose(sae.encode(x)[5], sae.encode(x[5:6])[0], atol=1e-6)  # GEMM rounding only
    codes = sae.encode(x)
    assert bool(((codes == 0) | (codes > 0.3)).all())


def test_batchtopk_threshold_ema_seeds_then_tracks():
    sae = _random_topk_sae("batchtopk").requires_grad_(False)
    x = torch.randn(128, 16)
    ctx = LossContext(dead=None, sparsity_coef=0.0, auxk_alpha=0.0, sparse=True)
    values, _, _ = batch_topk_encode(sae.encoder_input(x), sae.W_enc, sae.b_enc, 4)
    sae.training_loss(x, ctx)
    first = float(values[values > 0].min())
    assert float(sae.threshold) == pytest.approx(first)
    sae.training_loss(x * 2, ctx)
    values2, _, _ = batch_topk_encode(sae.encoder_input(x * 2), sae.W_enc, sae.b_enc, 4)
    assert float(sae.threshold) == pytest.approx(0.99 * first + 0.01 * float(values2[values2 > 0].min()))


def test_gated_exports_to_an_equivalent_jumprelu():
    g = torch.Generator().manual_seed(0)
    sae = build_sae(SAEConfig(d_in=16, d_sae=48, architecture="gated"), g)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5, generator=g)
        sae.r_mag.normal_(0, 0.5, generator=g)
        sae.b_mag.normal_(0, 0.5, generator=g)
        sae.b_dec.normal_(0, 0.5, generator=g)
    x = torch.randn(500, 16, generator=g)
    exported = sae.export()
    assert exported.cfg.architecture == "jumprelu" and exported.cfg.trained_as == "gated"
    assert torch.allclose(exported.encode(x), sae.encode(x), atol=1e-5)
    assert torch.allclose(exported(x), sae(x), atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "gated", "jumprelu"])
def test_export_folds_scale_and_decoder_norms(arch):
    g = torch.Generator().manual_seed(1)
    cfg = SAEConfig(d_in=16, d_sae=48, architecture=arch, k=6 if arch in ("topk", "batchtopk") else None,
                    input_scale=0.37)
    sae = build_sae(cfg, g)
    with torch.no_grad():
        sae.b_dec.normal_(0, 1, generator=g)
        sae.b_enc.normal_(0, 0.2, generator=g)
        if not sae.unit_norm_decoder:  # the norm lives in the penalty: make it uneven
            sae.W_dec.mul_(torch.rand(48, 1, generator=g) + 0.5)
    if arch == "batchtopk":
        sae.threshold.fill_(0.5)
    x = torch.randn(300, 16, generator=g) * 5 + 2
    exported = sae.export()
    assert exported.cfg.input_scale == 1.0
    assert torch.allclose(exported.W_dec.norm(dim=1), torch.ones(48), atol=1e-5)
    assert torch.allclose(exported(x), sae(x), atol=1e-4, rtol=1e-4)
    assert torch.equal(exported.encode(x) > 0, sae.encode(x) > 0)
    assert exported.export() is exported  # already in inference form


def test_decoder_gradient_projection_and_renormalisation():
    sae = _random_topk_sae("topk")
    x = torch.randn(64, 16)
    sae.training_loss(x, LossContext(None, 0.0, 0.0, True)).loss.backward()
    sae.project_decoder_grad()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(64), atol=1e-5)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.post_step()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)


def test_jumprelu_pseudo_derivatives():
    cfg = SAEConfig(d_in=2, d_sae=2, architecture="jumprelu", jumprelu_bandwidth=0.5,
                    jumprelu_sparsity="step", l1_coefficient=1.0)
    sae = build_sae(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
        sae.b_dec.zero_()
        sae.threshold.copy_(torch.tensor([1.0, 1.0]))
    # latent 0 sits 0.1 above θ (inside the kernel), latent 1 far below it
    x = torch.tensor([[1.1, -3.0]])
    out = sae.training_loss(x, LossContext(None, 1.0, 0.0, True))
    out.loss.backward()
    # mse is 9 (latent 1's input is lost); L0 = 1
    assert float(out.terms["mse"]) == pytest.approx(9.0)
    assert float(out.terms["sparsity"]) == pytest.approx(1.0)
    # ∂mse/∂θ0 via f: mse grad wrt f0 is 0 (exact reconstruction) → only the L0 STE: -(1/ε)·K = -2
    assert sae.threshold.grad[0].item() == pytest.approx(-2.0)
    assert sae.threshold.grad[1].item() == pytest.approx(0.0)
    assert torch.equal(sae.encode(x), torch.tensor([[1.1, 0.0]]))
    sae.threshold.data.fill_(-0.5)
    sae.post_step()
    assert bool((sae.threshold >= 0).all())


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="architecture"):
        SAEConfig(d_in=4, d_sae=8, architecture="vanilla")
    with pytest.raises(ValueError, match="k=None"):
        SAEConfig(d_in=4, d_sae=8, architecture="topk")
    with pytest.raises(ValueError, match="d_sae"):
        SAEConfig(d_in=4, d_sae=0, architecture="relu")
    assert SAEConfig(d_in=4, d_sae=8, architecture="relu", hook_name="blocks.12.hook_resid_post").layer == 12
    with pytest.raises(KeyError, match="bogus"):
        SAEConfig.from_dict({"d_in": 4, "d_sae": 8, "architecture": "relu", "bogus": 1})
