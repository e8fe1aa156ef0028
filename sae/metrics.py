"""
SAE reconstruction and sparsity metrics: pure functions on tensors, and a streaming accumulator.

Definitions (recipe §4), over tokens t, with μ the per-dimension mean of the evaluated tokens:
- fvu = Σ_t‖x_t - x̂_t‖² / Σ_t‖x_t - μ‖² (centered; primary). explained_variance = 1 - fvu.
- explained_variance_saelens = 1 - E‖e‖² / (E‖x‖² - ‖E[x]‖²), as SAELens 6.x's evaluator computes it
  (its ExplainedVarianceCalculator): the same quantity as 1 - fvu, but from raw second moments, so
  it shows the cancellation their number suffers when activations have a large mean. (SAELens's
  "explained_variance_legacy", a per-token ratio averaged over tokens, is not reproduced.)
- mse = E_t‖x_t - x̂_t‖² (summed over d); mse_per_dim = mse / d.
- l0 = E_t #{i: f_i > 0}; l1 = E_t Σ_i f_i.
- cossim = E_t cos(x_t, x̂_t); l2_ratio = E_t ‖x̂_t‖/‖x_t‖ (tokens with ‖x‖ < 1e-4 divide by 1, as
  SAELens does); relative_reconstruction_bias γ = E‖x̂‖² / E⟨x, x̂⟩ (Gated paper eq. 10; < 1 = shrinkage).
- density_i = fraction of tokens on which latent i fires; dead_fraction = mean(density == 0);
  dense_fraction_1pct / _10pct = mean(density > 0.01 / 0.1); log10 density = log10(density + 1e-10),
  which is what sparsity.safetensors holds.
Sums are kept in float64 and the centered variance is merged per batch (Chan et al.), so streaming
over many batches gives the same numbers as one pass over their concatenation.
"""

import torch

LOG_DENSITY_EPS = 1e-10


def batch_metrics(x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> dict:
    """All scalar metrics for one batch of tokens: x, x_hat [N, d_in], codes [N, d_sae]."""
    acc = SAEMetrics(codes.shape[-1])
    acc.update(x, x_hat, codes)
    return acc.compute()


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Centered fraction of variance unexplained of one batch (the batch mean stands in for μ)."""
    x = x.double()
    return float((x - x_hat.double()).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30))


def log10_density(fire_counts: torch.Tensor, n_tokens: int) -> torch.Tensor:
    return torch.log10(fire_counts.double() / max(n_tokens, 1) + LOG_DENSITY_EPS).float()


def log_density_histogram(log_density: torch.Tensor, bins: int = 50, lo: float = -10.0, hi: float = 0.0) -> dict:
    """Histogram of log10 densities over [lo, hi]; dead latents land in the first bin."""
    counts = torch.histc(log_density.double().clamp(lo, hi), bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


@torch.no_grad()
def decoder_max_cosine(W_dec: torch.Tensor, chunk: int = 4096) -> float:
    """Mean over latents of the largest |cosine| with any other decoder row (near-duplicates → 1)."""
    W = W_dec.float() / W_dec.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = W.shape[0]
    best = torch.empty(n)
    for s in range(0, n, chunk):
        sims = (W[s:s + chunk] @ W.t()).abs()
        sims[torch.arange(sims.shape[0]), torch.arange(s, s + sims.shape[0])] = -1.0  # not itself
        best[s:s + chunk] = sims.max(dim=1).values.cpu()
    return float(best.mean())


class SAEMetrics:
    """Streaming accumulator: update(x, x_hat, codes) per batch, compute() at the end."""

    def __init__(self, d_sae: int):
        self.d_sae = d_sae
        self.n_tokens = 0
        self.mean = None  # running per-dimension mean of x (float64)
        self.m2 = None  # running per-dimension Σ (x - mean)²
        self.fire_counts = torch.zeros(d_sae, dtype=torch.int64)
        self.sums = dict.fromkeys(("sq_x", "sq_err", "sq_xhat", "dot", "cos", "l2_ratio", "l0", "l1"), 0.0)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor):
        x, x_hat = x.reshape(-1, x.shape[-1]).double(), x_hat.reshape(-1, x_hat.shape[-1]).double()
        codes = codes.reshape(-1, codes.shape[-1])
        n = x.shape[0]
        if n == 0:
            return
        # Chan et al. parallel merge of per-dimension mean and M2
        b_mean = x.mean(0)
        b_m2 = (x - b_mean).pow(2).sum(0)
        if self.mean is None:
            self.mean, self.m2 = b_mean, b_m2
        else:
            total = self.n_tokens + n
            delta = b_mean - self.mean
            self.m2 = self.m2 + b_m2 + delta.pow(2) * (self.n_tokens * n / total)
            self.mean = self.mean + delta * (n / total)
        self.n_tokens += n
        norm_x, norm_xhat = x.norm(dim=-1), x_hat.norm(dim=-1)
        active = codes > 0
        s = self.sums
        s["sq_x"] += float(norm_x.pow(2).sum())
        s["sq_err"] += float((x - x_hat).pow(2).sum())
        s["sq_xhat"] += float(norm_xhat.pow(2).sum())
        s["dot"] += float((x * x_hat).sum())
        s["cos"] += float(((x * x_hat).sum(-1) / (norm_x * norm_xhat).clamp_min(1e-30)).sum())
        s["l2_ratio"] += float((norm_xhat / torch.where(norm_x < 1e-4, torch.ones_like(norm_x), norm_x)).sum())
        s["l0"] += float(active.sum())
        s["l1"] += float(codes.double().sum())
        self.fire_counts += active.sum(0).cpu()

    def density(self) -> torch.Tensor:
        return self.fire_counts.double() / max(self.n_tokens, 1)

    def log10_density(self) -> torch.Tensor:
        return log10_density(self.fire_counts, self.n_tokens)

    def compute(self) -> dict:
        if self.n_tokens == 0:
            raise ValueError("SAEMetrics.compute: no tokens were accumulated")
        n, s, d = self.n_tokens, self.sums, self.mean.numel()
        mean_sq_x = s["sq_x"] / n
        saelens_total = mean_sq_x - float(self.mean.double().pow(2).sum())
        density = self.density()
        fvu_ = s["sq_err"] / max(float(self.m2.sum()), 1e-30)
        return {
            "n_tokens": n,
            "fvu": fvu_,
            "explained_variance": 1 - fvu_,
            "explained_variance_saelens": 1 - (s["sq_err"] / n) / saelens_total if saelens_total != 0 else float("nan"),
            "mse": s["sq_err"] / n,
            "mse_per_dim": s["sq_err"] / (n * d),
            "l0": s["l0"] / n,
            "l1": s["l1"] / n,
            "cossim": s["cos"] / n,
            "l2_ratio": s["l2_ratio"] / n,
            "relative_reconstruction_bias": s["sq_xhat"] / s["dot"] if s["dot"] != 0 else float("nan"),
            "dead_fraction": float((density == 0).double().mean()),
            "dense_fraction_1pct": float((density > 0.01).double().mean()),
            "dense_fraction_10pct": float((density > 0.1).double().mean()),
        }
