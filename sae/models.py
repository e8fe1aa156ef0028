"""
SAE architectures behind one small interface.

Every model is an nn.Module with `cfg`, `W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`,
`b_dec [d_in]` (SAELens layout; row i of W_dec is latent i's direction) and:
- `encode(x[..., d_in]) -> codes[..., d_sae]`: dense, non-negative, zero for inactive latents;
- `decode(codes) -> x_hat`, `forward(x) -> x_hat`;
- `training_loss(x, ctx) -> StepOut` on *normalised* inputs (x·input_scale), used by the trainer;
- `export() -> SAE`: the inference form in raw units (input scale and decoder norms folded in).
`TopKSAE.encode_topk(x) -> (values, indices)` is the sparse encode, [..., k] each.

Architectures (recipe §1):
- topk: z = TopK(ReLU((x - b_dec)W_enc + b_enc)), unit-norm decoder, loss ‖x - x̂‖² + α·AuxK.
- batchtopk: top k·B activations over the whole batch in training; `threshold` (a uniform θ, an EMA
  of the batch's smallest kept activation, recalibrated after training) is used at inference, so
  encodings never depend on the batch. Exported as a JumpReLU with that θ for every latent.
- relu: ReLU + L1 weighted by decoder norms (Anthropic April 2024), decoder unconstrained (init
  norm 0.1), norms folded at export.
- gated: gate and magnitude paths sharing W_enc (magnitude rows scaled by exp(r_mag)), L1 on the gate
  and the frozen-decoder auxiliary loss (Rajamanoharan et al. 2024); unit-norm decoder. `b_enc` is
  the gate bias. Exported exactly as the equivalent JumpReLU (θ = b_mag - exp(r_mag)·b_gate).
- jumprelu: f = π·1[π > θ] with a raw fp32 θ (clamped ≥ 0 after each step) and straight-through
  pseudo-derivatives (rectangle kernel). 'tanh' sparsity (Anthropic Jan 2025: λ·Σ tanh(c·f·‖W_dec‖)
  plus a pre-activation loss on dead latents, STE also into π, unconstrained decoder) or 'step'
  (DeepMind: λ·L0, optional L0 target, unit-norm decoder).
Inference forms are topk, jumprelu and relu; a JumpReLU encodes ReLU(π)·1[π > θ] like SAELens, which
also covers the negative θ a converted Gated SAE may have.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from sae.config import SAEConfig
from sae.sparse import (batch_topk_encode, dense_decode, dense_topk_encode, row_offsets, sparse_decode,
                        topk_encode)


@dataclass
class LossContext:
    """What a training step knows besides the batch."""
    dead: torch.Tensor | None  # [d_sae] bool, latents that have not fired within the dead window
    sparsity_coef: float  # l1_coefficient after warmup (relu, gated, jumprelu)
    auxk_alpha: float  # AuxK weight (topk, batchtopk)
    sparse: bool  # sparse TopK kernels instead of the dense reference path


@dataclass
class StepOut:
    loss: torch.Tensor
    x_hat: torch.Tensor  # detached, normalised units
    fired: torch.Tensor  # [d_sae] bool: fired on some token of the batch
    l0: torch.Tensor  # mean active latents per token (detached scalar)
    terms: dict  # detached scalar loss components, for logging


class SAE(nn.Module):
    """Parameters, scaling and the dense decode shared by every architecture."""

    architecture = ""
    inference_architecture = ""  # what export() turns it into
    unit_norm_decoder = True  # hard unit-norm constraint (else the norm lives in the penalty)
    latent_params = {"W_enc": 1, "b_enc": 0, "W_dec": 0}  # parameter -> its latent dimension

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        if cfg.architecture != self.architecture:
            raise ValueError(f"{type(self).__name__} needs architecture {self.architecture!r}, "
                             f"got {cfg.architecture!r}")
        self.cfg = cfg
        d, n = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.empty(d, n))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.empty(n, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None):
        # uniform directions (Kaiming-uniform up to scale), rescaled; tied init W_enc = W_decᵀ
        init_norm = 1.0 if self.unit_norm_decoder else 0.1
        with torch.no_grad():
            self.W_dec.copy_(torch.rand(self.W_dec.shape, generator=generator) * 2 - 1)
            self.W_dec.mul_(init_norm / self.W_dec.norm(dim=1, keepdim=True))
            self.W_enc.copy_(self.W_dec.t())

    # ---- public interface (raw activations in, raw reconstructions out) ----

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_normed(self._scale_in(x))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        x_hat = codes.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        return x_hat / self.cfg.input_scale if self.cfg.input_scale != 1.0 else x_hat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # ---- shared pieces ----

    def _scale_in(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        return x * self.cfg.input_scale if self.cfg.input_scale != 1.0 else x

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder_input(x) @ self.W_enc + self.b_enc

    def decode_normed(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.W_dec + self.b_dec

    def encode_normed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_loss(self, x: torch.Tensor, ctx: LossContext) -> StepOut:
        raise NotImplementedError

    @torch.no_grad()
    def post_step(self):
        """Re-impose constraints after an optimizer step."""
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_grad(self):
        """Remove the gradient component parallel to each (unit) decoder row before the step."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            W, g = self.W_dec, self.W_dec.grad
            g.sub_((g * W).sum(dim=1, keepdim=True) * W)

    @torch.no_grad()
    def reset_latents(self, idx: torch.Tensor, dec_rows: torch.Tensor, enc_cols: torch.Tensor):
        """Resampling: give latents idx new decoder rows / encoder columns ([len(idx), d_in] each)."""
        self.W_dec[idx] = dec_rows
        self.W_enc[:, idx] = enc_cols.t()
        self.b_enc[idx] = 0.0

    def export(self) -> "SAE":
        """Inference form in raw units: fold input_scale, then decoder norms (recipe §2.1, §5.3).

        Returns self when already in that form, so exporting twice changes no bit."""
        if self.is_inference_form():
            return self
        W_enc, b_enc, W_dec, b_dec, threshold = self._inference_params()
        s = self.cfg.input_scale
        W_enc, W_dec, b_dec = W_enc * s, W_dec / s, b_dec / s
        norms = W_dec.norm(dim=1)
        norms = torch.where(norms > 1e-8, norms, torch.ones_like(norms))
        if self.inference_architecture == "topk":
            norms = norms.mean().expand_as(norms)  # a uniform rescale keeps the top-k selection
        W_dec = W_dec / norms[:, None]
        W_enc, b_enc = W_enc * norms[None, :], b_enc * norms
        converted = self.inference_architecture != self.cfg.architecture
        trained_as = self.cfg.architecture if converted else self.cfg.trained_as
        cfg = replace(self.cfg, architecture=self.inference_architecture, input_scale=1.0, trained_as=trained_as)
        sae = build_sae(cfg, torch.Generator())  # its init is overwritten; leave the global RNG alone
        tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        if threshold is not None:
            tensors["threshold"] = threshold * norms
        sae.load_state_dict({k: v.detach().contiguous().float() for k, v in tensors.items()})
        return sae.to(self.W_enc.device)

    def _inference_params(self):
        return self.W_enc, self.b_enc, self.W_dec, self.b_dec, None

    def is_inference_form(self) -> bool:
        if self.cfg.architecture != self.inference_architecture or self.cfg.input_scale != 1.0:
            return False
        norms = self.W_dec.detach().norm(dim=1)
        return bool((((norms - 1).abs() < 1e-5) | (norms <= 1e-8)).all())  # zero rows stay unfolded


def mse_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """‖x - x̂‖² summed over d_in, mean over tokens (recipe §9.6)."""
    return (x - x_hat).pow(2).sum(-1).mean()


def _fired_from_codes(codes: torch.Tensor) -> torch.Tensor:
    return (codes > 0).any(dim=0)


def fired_from_selection(latents: torch.Tensor, active: torch.Tensor, d_sae: int) -> torch.Tensor:
    """[d_sae] bool: latents selected with a positive value (a scatter, so no host sync)."""
    hits = torch.zeros(d_sae, device=latents.device).index_add_(0, latents.reshape(-1), active.reshape(-1).float())
    return hits > 0


def auxk_loss(sae: SAE, x_enc: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
    """AuxK (Gao et al.): reconstruct the detached residual from the top k_aux dead latents.

    Only the dead columns of W_enc are multiplied (a d×|D| GEMM), so no second B×n tensor is built.
    No b_dec in ê; normalised by the residual's variance; scaled by min(|D|/k_aux, 1).
    """
    if dead is None or not bool(dead.any()):
        return residual.new_zeros(())
    dead_idx = dead.nonzero().squeeze(1)
    k_aux = sae.cfg.resolved_k_aux
    k = min(k_aux, dead_idx.numel())
    pre = torch.addmm(sae.b_enc[dead_idx], x_enc, sae.W_enc[:, dead_idx]).relu()
    values, ids = pre.topk(k, dim=-1, sorted=False)
    e_hat = sparse_decode(values, dead_idx[ids], sae.W_dec)
    variance = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    return min(dead_idx.numel() / k_aux, 1.0) * (residual - e_hat).pow(2).sum(-1).mean() / variance


class TopKSAE(SAE):
    architecture = "topk"
    inference_architecture = "topk"

    def encode_topk(self, x: torch.Tensor):
        """Sparse encode: (values, indices), each [..., k]; values may be 0 (ReLU before selection)."""
        x = self._scale_in(x)
        pre = torch.relu(self.pre_acts(x))
        return pre.topk(self.cfg.k, dim=-1, sorted=False)

    def encode_normed(self, x):
        values, indices = torch.relu(self.pre_acts(x)).topk(self.cfg.k, dim=-1, sorted=False)
        codes = torch.zeros(*x.shape[:-1], self.cfg.d_sae, dtype=values.dtype, device=values.device)
        return codes.scatter(-1, indices, values)

    def training_loss(self, x, ctx):
        x_enc = self.encoder_input(x)
        if ctx.sparse:
            values, indices = topk_encode(x_enc, self.W_enc, self.b_enc, self.cfg.k)
            x_hat = sparse_decode(values, indices, self.W_dec) + self.b_dec
        else:
            values, indices = dense_topk_encode(x_enc, self.W_enc, self.b_enc, self.cfg.k)
            x_hat = dense_decode(values, indices, self.W_dec) + self.b_dec
        mse = mse_loss(x, x_hat)
        aux = auxk_loss(self, x_enc, (x - x_hat).detach(), ctx.dead) if ctx.auxk_alpha > 0 else mse.new_zeros(())
        active = values > 0
        fired = fired_from_selection(indices, active, self.cfg.d_sae)
        return StepOut(mse + ctx.auxk_alpha * aux, x_hat.detach(), fired, active.sum() / x.shape[0],
                       {"mse": mse.detach(), "auxk": aux.detach()})


class BatchTopKSAE(SAE):
    architecture = "batchtopk"
    inference_architecture = "jumprelu"
    threshold_ema_rate = 0.01  # SAELens topk_threshold_lr

    def __init__(self, cfg, generator=None):
        super().__init__(cfg, generator)
        # uniform inference threshold in normalised units; fp64 so EMA updates don't round away.
        # 0 means "not yet measured": the first batch seeds it (a kept activation is always > 0).
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))

    def encode_normed(self, x):
        acts = torch.relu(self.pre_acts(x))
        return acts * (acts > self.threshold.to(acts.dtype))

    def training_loss(self, x, ctx):
        x_enc = self.encoder_input(x)
        B, n = x.shape[0], self.cfg.d_sae
        if ctx.sparse:
            values, rows, cols = batch_topk_encode(x_enc, self.W_enc, self.b_enc, self.cfg.k)
            x_hat = sparse_decode(values, cols, self.W_dec, row_offsets(rows, B)) + self.b_dec
        else:
            acts = torch.relu(torch.addmm(self.b_enc, x_enc, self.W_enc))
            values, flat = acts.view(-1).topk(self.cfg.k * B, sorted=False)
            codes = torch.zeros_like(acts).view(-1).scatter(0, flat, values).view(B, n)
            x_hat = codes @ self.W_dec + self.b_dec
            cols = flat % n
        mse = mse_loss(x, x_hat)
        aux = auxk_loss(self, x_enc, (x - x_hat).detach(), ctx.dead) if ctx.auxk_alpha > 0 else mse.new_zeros(())
        active = values > 0
        fired = fired_from_selection(cols, active, n)
        self._update_threshold(values.detach().masked_fill(~active, float("inf")).min())
        return StepOut(mse + ctx.auxk_alpha * aux, x_hat.detach(), fired, active.sum() / B,
                       {"mse": mse.detach(), "auxk": aux.detach(), "threshold": self.threshold.clone()})

    @torch.no_grad()
    def _update_threshold(self, min_kept: torch.Tensor):
        """EMA of the smallest kept activation (inf when nothing was kept: no update); no host sync."""
        m, theta, r = min_kept.to(torch.float64), self.threshold, self.threshold_ema_rate
        new = torch.where(theta == 0, m, (1 - r) * theta + r * m)
        self.threshold.copy_(torch.where(torch.isinf(m), theta, new))

    def _inference_params(self):
        theta = self.threshold.to(self.W_enc.dtype).expand(self.cfg.d_sae)
        return self.W_enc, self.b_enc, self.W_dec, self.b_dec, theta


class ReLUSAE(SAE):
    architecture = "relu"
    inference_architecture = "relu"
    unit_norm_decoder = False

    def encode_normed(self, x):
        return torch.relu(self.pre_acts(x))

    def training_loss(self, x, ctx):
        f = torch.relu(self.pre_acts(x))
        x_hat = self.decode_normed(f)
        mse = mse_loss(x, x_hat)
        l1 = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        return StepOut(mse + ctx.sparsity_coef * l1, x_hat.detach(), _fired_from_codes(f.detach()),
                       (f > 0).sum() / x.shape[0], {"mse": mse.detach(), "l1": l1.detach()})


class GatedSAE(SAE):
    architecture = "gated"
    inference_architecture = "jumprelu"
    latent_params = {**SAE.latent_params, "r_mag": 0, "b_mag": 0}

    def __init__(self, cfg, generator=None):
        super().__init__(cfg, generator)
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))

    def _gate_and_mag(self, x):
        u = self.encoder_input(x) @ self.W_enc
        return u + self.b_enc, u * torch.exp(self.r_mag) + self.b_mag

    def encode_normed(self, x):
        pi_gate, pi_mag = self._gate_and_mag(x)
        return (pi_gate > 0) * torch.relu(pi_mag)

    def training_loss(self, x, ctx):
        pi_gate, pi_mag = self._gate_and_mag(x)
        f = (pi_gate > 0) * torch.relu(pi_mag)
        x_hat = self.decode_normed(f)
        mse = mse_loss(x, x_hat)
        gate = torch.relu(pi_gate)
        l1 = gate.sum(-1).mean()  # decoder rows are unit norm
        aux = mse_loss(x, gate @ self.W_dec.detach() + self.b_dec.detach())
        return StepOut(mse + ctx.sparsity_coef * l1 + aux, x_hat.detach(), _fired_from_codes(f.detach()),
                       (f > 0).sum() / x.shape[0], {"mse": mse.detach(), "l1": l1.detach(), "gate_aux": aux.detach()})

    @torch.no_grad()
    def reset_latents(self, idx, dec_rows, enc_cols):
        super().reset_latents(idx, dec_rows, enc_cols)
        self.r_mag[idx] = 0.0
        self.b_mag[idx] = 0.0

    def _inference_params(self):
        scale = torch.exp(self.r_mag)
        theta = self.b_mag - scale * self.b_enc
        return self.W_enc * scale[None, :], self.b_mag, self.W_dec, self.b_dec, theta


class JumpReLUSAE(SAE):
    architecture = "jumprelu"
    inference_architecture = "jumprelu"
    latent_params = {**SAE.latent_params, "threshold": 0}

    def __init__(self, cfg, generator=None):
        super().__init__(cfg, generator)
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), float(cfg.jumprelu_init_threshold)))

    @property
    def unit_norm_decoder(self):
        return self.cfg.jumprelu_sparsity == "step"

    def encode_normed(self, x):
        pre = self.pre_acts(x)
        return torch.relu(pre) * (pre > self.threshold)

    def training_loss(self, x, ctx):
        cfg = self.cfg
        pre = self.pre_acts(x)
        tanh_mode = cfg.jumprelu_sparsity == "tanh"
        f = _JumpReLU.apply(pre, self.threshold, cfg.jumprelu_bandwidth, tanh_mode)
        x_hat = self.decode_normed(f)
        mse = mse_loss(x, x_hat)
        terms = {"mse": mse.detach()}
        if tanh_mode:
            norms = self.W_dec.norm(dim=1)
            sparsity = torch.tanh(cfg.jumprelu_tanh_c * f * norms).sum(-1).mean()
            loss = mse + ctx.sparsity_coef * sparsity
            if ctx.dead is not None and bool(ctx.dead.any()):
                d = ctx.dead
                preact = (torch.relu(self.threshold[d] - pre[:, d]) * norms[d]).sum(-1).mean()
                loss = loss + cfg.jumprelu_preact_coefficient * preact
                terms["preact"] = preact.detach()
        else:
            l0 = _Step.apply(pre, self.threshold, cfg.jumprelu_bandwidth).sum(-1).mean()
            sparsity = (l0 / cfg.l0_target - 1) ** 2 if cfg.l0_target else l0
            loss = mse + ctx.sparsity_coef * sparsity
        terms["sparsity"] = sparsity.detach()
        return StepOut(loss, x_hat.detach(), _fired_from_codes(f.detach()), (f > 0).sum() / x.shape[0], terms)

    @torch.no_grad()
    def post_step(self):
        super().post_step()
        self.threshold.clamp_(min=0.0)

    @torch.no_grad()
    def reset_latents(self, idx, dec_rows, enc_cols):
        super().reset_latents(idx, dec_rows, enc_cols)
        self.threshold[idx] = self.cfg.jumprelu_init_threshold

    def _inference_params(self):
        return self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """f = π·1[π > θ]. Pseudo-derivatives: ∂f/∂θ = -(θ/ε)·K((π-θ)/ε); ∂f/∂π = 1[π > θ], plus
    (θ/ε)·K in 'tanh' mode, where Anthropic lets the STE reach the input too."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth, ste_to_input):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        ste = (theta / ctx.bandwidth) * _rectangle((pre - theta) / ctx.bandwidth) * grad
        grad_pre = grad * (pre > theta)
        if ctx.ste_to_input:
            grad_pre = grad_pre + ste
        return grad_pre, -ste.reshape(-1, theta.shape[-1]).sum(0), None, None


class _Step(torch.autograd.Function):
    """H(π - θ), with ∂H/∂θ = -(1/ε)·K((π-θ)/ε) and no gradient to π (DeepMind)."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        g = -(1.0 / ctx.bandwidth) * _rectangle((pre - theta) / ctx.bandwidth) * grad
        return None, g.reshape(-1, theta.shape[-1]).sum(0), None


MODEL_CLASSES = {cls.architecture: cls for cls in (TopKSAE, BatchTopKSAE, ReLUSAE, GatedSAE, JumpReLUSAE)}


def build_sae(cfg: SAEConfig, generator: torch.Generator | None = None) -> SAE:
    """A freshly initialised SAE of cfg.architecture (fp32, CPU); None draws from the global RNG."""
    return MODEL_CLASSES[cfg.architecture](cfg, generator)
