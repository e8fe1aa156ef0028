"""
Sparse TopK kernels, kept apart from the models, each with the plain dense reference beside it.

After TopK selection only B·k of the B·n pre-activations matter, so everything after the encoder
GEMM can cost O(B·k·d) instead of O(B·n·d) (sparsify's FusedEncoder / embedding-bag decoder):

- `topk_encode`: forward is GEMM + ReLU + topk (ReLU before selection, so a token with fewer than k
  positive pre-activations gets zeros, never negative codes). Its backward never builds a dense
  B×n gradient: dW_enc is an embedding-bag over the input rows, grouped by latent (9× faster on
  CPU than gather + index_add, which materialises a B·k×d temporary), dx an embedding-bag over
  W_encᵀ, db_enc a scatter-add.
- `batch_topk_encode`: the same for BatchTopK (top k·B over the whole batch), returning the
  selection as flat (rows, cols) pairs sorted by row.
- `sparse_decode`: x̂ = Σ_j v_j·W_dec[i_j] via embedding_bag with per_sample_weights, whose backward
  is sparse in the codes and a row scatter-add into dW_dec.

The dense references (`dense_topk_encode`, `dense_decode`) are ordinary autograd code; the tests
check that both paths give the same values and gradients, and bench/bench_sae_train.py times them.
"""

import torch
import torch.nn.functional as F

def topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int):
    """(values [B,k], indices [B,k]) of ReLU(x @ W_enc + b_enc), with a sparse backward."""
    return _TopKEncode.apply(x, W_enc, b_enc, k)


def batch_topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int):
    """BatchTopK selection: (values [m], rows [m], cols [m]) with m = k·B, sorted by row."""
    return _BatchTopKEncode.apply(x, W_enc, b_enc, k)


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                  offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Σ values·W_dec[indices] per token (no bias). indices/values are [B,k], or flat with offsets."""
    return F.embedding_bag(indices, W_dec, offsets, mode="sum", per_sample_weights=values)


def dense_topk_encode(x, W_enc, b_enc, k: int):
    """Reference for topk_encode: autograd through a dense B×n pre-activation."""
    return torch.relu(torch.addmm(b_enc, x, W_enc)).topk(k, dim=-1, sorted=False)


def dense_decode(values, indices, W_dec, d_sae: int | None = None) -> torch.Tensor:
    """Reference for sparse_decode: scatter into dense codes, then one GEMM."""
    n = d_sae if d_sae is not None else W_dec.shape[0]
    codes = values.new_zeros(values.shape[0], n).scatter(1, indices, values)
    return codes @ W_dec


def row_offsets(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Bag offsets for embedding_bag from sorted row ids (empty bags allowed)."""
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cumsum(counts, 0) - counts


def encoder_grads(ctx, x, W_enc, rows, cols, grad):
    """Gradients of Σ grad·pre[rows, cols] w.r.t. (x, W_enc, b_enc), without a B×n tensor.

    Both big ones are embedding-bags: dW_encᵀ[j] = Σ grad·x[row] over the pairs that selected latent
    j (pairs grouped by a stable sort on cols), dx[b] = Σ grad·W_enc[:, col] over token b's pairs."""
    n = W_enc.shape[1]
    grad_x = grad_W = grad_b = None
    if ctx.needs_input_grad[1]:
        order = torch.argsort(cols, stable=True)
        grad_W = F.embedding_bag(rows[order], x, row_offsets(cols[order], n), mode="sum",
                                 per_sample_weights=grad[order]).t()
    if ctx.needs_input_grad[2]:
        grad_b = W_enc.new_zeros(n).index_add_(0, cols, grad)
    if ctx.needs_input_grad[0]:
        grad_x = F.embedding_bag(cols, W_enc.t().contiguous(), row_offsets(rows, x.shape[0]), mode="sum",
                                 per_sample_weights=grad)
    return grad_x, grad_W, grad_b


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k):
        pre = torch.addmm(b_enc, x, W_enc).relu_()
        values, indices = pre.topk(k, dim=-1, sorted=False)
        ctx.save_for_backward(x, W_enc, values, indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):
        x, W_enc, values, indices = ctx.saved_tensors
        B, k = indices.shape
        grad = (grad_values * (values > 0)).reshape(-1)  # ReLU'
        rows = torch.arange(B, device=x.device).repeat_interleave(k)
        return (*encoder_grads(ctx, x, W_enc, rows, indices.reshape(-1), grad), None)


def batch_selection(ctx, x, W_enc, values, flat, n: int):
    """The tail of a BatchTopK forward: selected flat indices of the [B, n] pre-activations ->
    (values, rows, cols) sorted by row, saved for `batch_selection_grads`."""
    flat, order = flat.sort()
    values = values[order]
    rows, cols = flat // n, flat % n
    ctx.save_for_backward(x, W_enc, values, rows, cols)
    ctx.mark_non_differentiable(rows, cols)
    return values, rows, cols


def batch_selection_grads(ctx, grad_values):
    """(grad x, grad W_enc, grad b_enc) of a BatchTopK forward that ended in `batch_selection`."""
    x, W_enc, values, rows, cols = ctx.saved_tensors
    return encoder_grads(ctx, x, W_enc, rows, cols, grad_values * (values > 0))  # ReLU'


class _BatchTopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k):
        pre = torch.addmm(b_enc, x, W_enc).relu_()
        values, flat = pre.view(-1).topk(k * pre.shape[0], sorted=False)
        return batch_selection(ctx, x, W_enc, values, flat, pre.shape[1])

    @staticmethod
    def backward(ctx, grad_values, _grad_rows, _grad_cols):
        return (*batch_selection_grads(ctx, grad_values), None)
