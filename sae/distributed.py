"""
The collectives SAE training needs under torchrun, so that every rank holds the SAEs a single
process would have trained on the concatenated global batch.

Two ways to split the work (`sae.trainer.train_saes(..., ctx, layer_parallel=...)`):
- data-parallel: every rank holds every SAE and a 1/world slice of each global batch. After the
  backward pass the gradients are averaged (`average_gradients`, one all-reduce per SAE per step
  that also ORs the "fired" masks, so dead counters agree). Losses that are per-token means need
  nothing more; the batch-level parts of the recipe are computed over the global batch here:
  BatchTopK keeps the top k·B activations of the *global* batch (`GlobalBatchTopK`: a threshold
  found from every rank's local top k·B candidates), its θ-EMA sees the global minimum kept
  activation, and AuxK is normalised by the global residual variance (`data_parallel_loss`).
- layer-parallel: each rank owns the SAEs of a contiguous block of hooks (`owned_range`) and trains
  them as a single process would; `LayerExchange` turns every rank's local slice of all hooks into
  the global batch of the hooks it owns (one all_to_all per step).

Every collective goes through `_collective`, which turns a peer's death (gloo's "connection closed",
NCCL's abort) into a RankFailure naming the phase, so a failing rank never leaves the others with an
opaque backend traceback. Ranks must reach the same collectives in the same order: every branch
around one depends only on state that is identical across ranks (step, dead masks, configs).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
import torch.distributed as dist

from nanochat import distributed as nanochat_distributed
from nanochat.distributed import DistContext, RankFailure, rank_slice
from sae.models import SAE, BatchTopKSAE, LossContext, StepOut, TopKSAE, fired_from_selection, mse_loss, auxk_loss
from sae.sparse import batch_selection, batch_selection_grads, row_offsets, sparse_decode


@contextlib.contextmanager
def _collective(ctx: DistContext, what: str):
    try:
        yield
    except RankFailure:
        raise
    except RuntimeError as e:  # DistBackendError and gloo's connection errors are RuntimeErrors
        raise RankFailure(f"rank {ctx.rank} of {ctx.world}: a peer rank failed during {what} "
                          f"(see that rank's error above); {type(e).__name__}: {e}") from e


def all_reduce_(t: torch.Tensor, ctx: DistContext, what: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce (a no-op in a single process); returns t."""
    if ctx.enabled:
        with _collective(ctx, what):
            dist.all_reduce(t, op=op)
    return t


def all_gather_cat(t: torch.Tensor, ctx: DistContext, what: str) -> torch.Tensor:
    """Every rank's t (same shape everywhere) concatenated along dim 0, in rank order."""
    if not ctx.enabled:
        return t
    parts = [torch.empty_like(t) for _ in range(ctx.world)]
    with _collective(ctx, what):
        dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def gather_objects(obj, ctx: DistContext, what: str) -> list | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere; [obj] in a single process."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world if ctx.is_main else None
    with _collective(ctx, what):
        dist.gather_object(obj, out, dst=0)
    return out


def scatter_objects(objs: list | None, ctx: DistContext, what: str):
    """Rank r receives objs[r] (objs is only read on rank 0)."""
    if not ctx.enabled:
        return objs[0]
    got = [None]
    with _collective(ctx, what):
        dist.scatter_object_list(got, objs if ctx.is_main else None, src=0)
    return got[0]


def broadcast_object(obj, ctx: DistContext, what: str):
    """Rank 0's obj on every rank; a peer's failure while `what` becomes a RankFailure."""
    with _collective(ctx, what):
        return nanochat_distributed.broadcast_object(ctx, obj)


def owned_range(n_saes: int, ctx: DistContext) -> tuple[int, int]:
    """[start, end) of the SAEs (in config order) this rank trains under layer-parallelism."""
    if n_saes < ctx.world:
        raise ValueError(f"layer-parallel training needs at least one SAE per rank: {n_saes} SAE(s) "
                         f"for {ctx.world} ranks; train more layers, use fewer ranks, or drop "
                         f"--layer-parallel (data-parallel works for any count)")
    return rank_slice(n_saes, ctx)


def local_batch_size(batch_size: int, ctx: DistContext) -> int:
    """Tokens per step on each rank under data-parallelism: the global batch split evenly."""
    if batch_size % ctx.world:
        raise ValueError(f"batch size {batch_size} does not split evenly over {ctx.world} ranks: "
                         f"the batch size is global, so it must be a multiple of the world size")
    return batch_size // ctx.world


# ---- data-parallel gradients ----

def average_gradients(sae: SAE, fired: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Average every parameter's gradient over the ranks (each rank's loss is a mean over its equal
    share of the batch, so the average is the gradient of the global batch) and OR the per-rank
    'fired' masks. One flat all-reduce; returns the global fired mask."""
    params = list(sae.parameters())
    for p in params:
        if p.grad is None:  # a parameter this batch did not reach still takes part in the sum
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params] + [fired.to(params[0].grad.dtype)])
    all_reduce_(flat, ctx, "the gradient all-reduce")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad)).div_(ctx.world)
        offset += n
    return flat[offset:] > 0


# ---- data-parallel losses: the batch-level parts of the recipe over the global batch ----

def data_parallel_loss(sae: SAE, x: torch.Tensor, loss_ctx: LossContext, ctx: DistContext) -> StepOut:
    """`sae.training_loss` for this rank's slice x of a global batch, with BatchTopK's selection and
    θ-EMA and AuxK's variance taken over the global batch. Other losses are per-token means already."""
    if isinstance(sae, BatchTopKSAE):
        return _batchtopk_loss(sae, x, loss_ctx, ctx)
    if isinstance(sae, TopKSAE) and loss_ctx.auxk_alpha > 0:
        res = sae.training_loss(x, replace(loss_ctx, auxk_alpha=0.0))
        aux = _global_auxk(sae, sae.encoder_input(x), (x - res.x_hat).detach(), loss_ctx.dead, ctx)
        return replace(res, loss=res.loss + loss_ctx.auxk_alpha * aux, terms={**res.terms, "auxk": aux.detach()})
    return sae.training_loss(x, loss_ctx)


def _batchtopk_loss(sae: BatchTopKSAE, x, loss_ctx, ctx) -> StepOut:
    x_enc = sae.encoder_input(x)
    B, n = x.shape[0], sae.cfg.d_sae
    values, rows, cols = GlobalBatchTopK.apply(x_enc, sae.W_enc, sae.b_enc, sae.cfg.k * B * ctx.world, ctx)
    x_hat = sparse_decode(values, cols, sae.W_dec, row_offsets(rows, B)) + sae.b_dec
    mse = mse_loss(x, x_hat)
    aux = (_global_auxk(sae, x_enc, (x - x_hat).detach(), loss_ctx.dead, ctx)
           if loss_ctx.auxk_alpha > 0 else mse.new_zeros(()))
    active = values > 0
    fired = fired_from_selection(cols, active, n)
    min_kept = values.detach().masked_fill(~active, float("inf")).min() if values.numel() else \
        torch.tensor(float("inf"), device=x.device)
    sae._update_threshold(all_reduce_(min_kept.reshape(1), ctx, "the BatchTopK θ update", dist.ReduceOp.MIN)[0])
    return StepOut(mse + loss_ctx.auxk_alpha * aux, x_hat.detach(), fired, active.sum() / B,
                   {"mse": mse.detach(), "auxk": aux.detach(), "threshold": sae.threshold.clone()})


def _global_auxk(sae: SAE, x_enc, residual, dead, ctx) -> torch.Tensor:
    """AuxK normalised by the residual variance of the global batch rather than of this slice."""
    if dead is None or not bool(dead.any()):  # dead is identical on every rank
        return residual.new_zeros(())
    local = auxk_loss(sae, x_enc, residual, dead)
    local_var = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    return local * (local_var / global_variance(residual, ctx))


def global_variance(r: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """E‖r - r̄‖² over the rows of every rank's r (float64 sums, one all-reduce)."""
    r = r.double()
    stats = torch.cat([r.sum(0), r.pow(2).sum().reshape(1), r.new_tensor([r.shape[0]])])
    all_reduce_(stats, ctx, "the AuxK variance")
    n = stats[-1]
    mean = stats[:-2] / n
    return ((stats[-2] / n) - mean.pow(2).sum()).clamp_min(1e-12).float()


class GlobalBatchTopK(torch.autograd.Function):
    """BatchTopK selection over the global batch: (values, rows, cols) of this rank's share of the
    top `n_keep` activations of all ranks, sorted by row, with the sparse backward of
    sae.sparse.batch_topk_encode. The global top n_keep is a subset of the union of the ranks'
    local top n_keep, so gathering those candidates gives the exact threshold θ (the n_keep-th
    largest); each rank then keeps its candidates ≥ θ."""

    @staticmethod
    def forward(fctx, x, W_enc, b_enc, n_keep: int, ctx: DistContext):
        pre = torch.addmm(b_enc, x, W_enc).relu_()
        cand, flat = pre.view(-1).topk(min(n_keep, pre.numel()), sorted=False)
        pool = all_gather_cat(cand, ctx, "the BatchTopK selection")
        theta = pool.topk(n_keep, sorted=False).values.min()
        keep = (cand >= theta).nonzero().squeeze(1)
        return batch_selection(fctx, x, W_enc, cand[keep], flat[keep], pre.shape[1])

    @staticmethod
    def backward(fctx, grad_values, _grad_rows, _grad_cols):
        return (*batch_selection_grads(fctx, grad_values), None, None)


# ---- layer-parallel: every rank's slice of all hooks -> the global batch of the owned hooks ----

class LayerExchange:
    """
    Wraps this rank's activation stream ({hook: [b, d]} for every hook, b = batch/world) and yields
    {owned hook: [batch, d]}: the global batch, rank r's slice at rows [r·b, (r+1)·b), exactly
    the order a data-parallel split would use. One all_to_all_single per batch moves each hook's
    slices to its owner only. Forwards the stream's data-position protocol.
    """

    def __init__(self, stream, hook_names: list[str], ctx: DistContext):
        self.stream, self.hooks, self.ctx = stream, list(hook_names), ctx
        starts = [rank_slice(len(self.hooks), replace(ctx, rank=r)) for r in range(ctx.world)]
        self.owned = [self.hooks[a:b] for a, b in starts]  # owned[r]: the hooks rank r trains
        if any(not o for o in self.owned):
            owned_range(len(self.hooks), ctx)  # raises the clear error

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        local = next(self.stream)
        missing = [h for h in self.hooks if h not in local]
        if missing:
            raise KeyError(f"activation batch has no {missing}; it holds {sorted(local)}")
        b = next(iter(local.values())).shape[0]
        dims = {h: local[h].shape[-1] for h in self.hooks}
        send = torch.cat([local[h].reshape(-1) for owned in self.owned for h in owned])
        in_splits = [sum(b * dims[h] for h in owned) for owned in self.owned]
        mine = self.owned[self.ctx.rank]
        per_rank = sum(b * dims[h] for h in mine)
        recv = send.new_empty(per_rank * self.ctx.world)
        with _collective(self.ctx, "the layer-parallel activation exchange"):
            dist.all_to_all_single(recv, send, [per_rank] * self.ctx.world, in_splits)
        recv = recv.view(self.ctx.world, per_rank)
        out, offset = {}, 0
        for h in mine:
            n = b * dims[h]
            out[h] = recv[:, offset:offset + n].reshape(self.ctx.world * b, dims[h])
            offset += n
        return out

    def __getattr__(self, name):
        if name in ("state_dict", "load_state_dict"):
            return getattr(self.stream, name)
        raise AttributeError(name)
