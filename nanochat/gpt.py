"""
The nanochat GPT, Oct-2025 family (karpathy/nanochat at 8892470), reimplemented.

Numerically identical to nanochat's own forward pass, so trained checkpoints load as-is:
- token embedding followed by a parameter-free RMSNorm; no positional embedding
- rotary embeddings, split-halves layout, nanochat's -theta sign convention,
  cos/sin computed in fp32 then rounded to bf16 (as nanochat stores them)
- QK norm (parameter-free RMSNorm over the head dim), applied after rotary
- grouped-query attention through SDPA's enable_gqa
- relu^2 MLP, no biases anywhere, untied lm_head
- logits softcapped at 15 (computed in fp32)
Additions for interpretability work, none of which change the numerics:
- `stop_after_layer`: return the residual after block L, skipping later blocks and lm_head
- a KV cache whose decode path yields the same logits as a full forward
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        names = {f.name for f in fields(cls)}
        missing = names - set(d)
        if missing:
            raise KeyError(f"model_config is missing {sorted(missing)}")
        return cls(**{k: int(d[k]) for k in names})


SOFTCAP = 15.0
ROPE_BASE = 10000.0


def norm(x: torch.Tensor) -> torch.Tensor:
    # eps=None: torch uses finfo(dtype).eps, exactly like nanochat
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H, D); nanochat rotates by -theta (the transpose of the textbook formula)
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3).to(x.dtype)


def rotary_tables(seq_len: int, head_dim: int, base: float = ROPE_BASE, device=None):
    channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (base ** (channel_range / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    cos, sin = freqs.cos().bfloat16(), freqs.sin().bfloat16()
    return cos[None, :, None, :], sin[None, :, None, :]


class KVCache:
    """Preallocated keys/values for all layers: (L, 2, B, Hkv, T_max, D)."""

    def __init__(self, batch_size: int, num_heads: int, seq_len: int, head_dim: int,
                 num_layers: int, dtype=torch.float32, device=None):
        self.kv = torch.zeros(num_layers, 2, batch_size, num_heads, seq_len, head_dim,
                              dtype=dtype, device=device)
        self.num_layers = num_layers
        self.pos = 0

    def get_pos(self) -> int:
        return self.pos

    def reset(self) -> None:
        self.pos = 0

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.kv.size(4):
            raise ValueError(f"KV cache full: {t1} positions > capacity {self.kv.size(4)}")
        self.kv[layer_idx, 0, :, :, t0:t1] = k
        self.kv[layer_idx, 1, :, :, t0:t1] = v
        if layer_idx == self.num_layers - 1:
            self.pos = t1  # advance only once every layer has written this chunk
        return self.kv[layer_idx, 0, :, :, :t1], self.kv[layer_idx, 1, :, :, :t1]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = config.n_embd // config.n_head
        if config.n_embd % config.n_head or config.n_head % config.n_kv_head:
            raise ValueError(f"n_embd={config.n_embd}, n_head={config.n_head}, "
                             f"n_kv_head={config.n_kv_head} do not divide evenly")
        self.c_q = nn.Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_embd, self.n_embd, bias=False)

    def forward(self, x, cos_sin, kv_cache=None):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        Tq, Tk = q.size(2), k.size(2)
        gqa = self.n_head != self.n_kv_head
        if kv_cache is None or Tq == Tk:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif Tq == 1:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=gqa)
        else:
            # a chunk after a prefix: the whole prefix is visible, causal within the chunk
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache=None):
        x = x + self.attn(norm(x), cos_sin, kv_cache)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # nanochat precomputes 10x the training length; the tables are not in the checkpoint
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = rotary_tables(self.rotary_seq_len, config.n_embd // config.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def init_weights(self, seed: int | None = None) -> None:
        """nanochat's init: scaled normal Linears, unit-normal wte, zero output projections."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("wte.weight"):
                nn.init.normal_(p, mean=0.0, std=1.0, generator=gen)
            elif name == "lm_head.weight" or name.endswith("c_proj.weight"):
                nn.init.zeros_(p)
            else:
                fan_out, fan_in = p.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(p, mean=0.0, std=std, generator=gen)

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def residual_gain(self, layer: int) -> float:
        """Gain from a write into resid_post(layer) to the final norm's input: always 1 here
        (no residual scalars or backout in this format; see GPT2026.residual_gain)."""
        if not 0 <= layer < self.config.n_layer:
            raise ValueError(f"layer {layer} out of range 0..{self.config.n_layer - 1}")
        return 1.0

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        c = self.config
        return KVCache(batch_size, c.n_kv_head, max_len, c.n_embd // c.n_head, c.n_layer,
                       dtype=self.transformer.wte.weight.dtype, device=self.get_device())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, loss_reduction: str = "mean",
                stop_after_layer: int | None = None):
        """
        Softcapped logits (B, T, V), or the cross-entropy loss when `targets` is given
        (ignore_index=-1). With `stop_after_layer=L`, returns the residual stream after
        block L (B, T, C) without running later blocks or lm_head.
        """
        B, T = idx.size()
        t0 = kv_cache.get_pos() if kv_cache is not None else 0
        if t0 + T > self.cos.size(1):
            raise ValueError(f"sequence of {t0 + T} tokens exceeds the rotary cache "
                             f"({self.cos.size(1)} = 10 x sequence_len)")
        if stop_after_layer is not None and not 0 <= stop_after_layer < self.config.n_layer:
            raise ValueError(f"stop_after_layer={stop_after_layer} out of range "
                             f"0..{self.config.n_layer - 1}")
        if stop_after_layer is not None and kv_cache is not None:
            raise ValueError("stop_after_layer cannot be combined with a KV cache "
                             "(the cache advances only after the last layer)")
        cos_sin = self.cos[:, t0:t0 + T], self.sin[:, t0:t0 + T]
        x = norm(self.transformer.wte(idx))
        for i, block in enumerate(self.transformer.h):
            x = block(x, cos_sin, kv_cache)
            if i == stop_after_layer:
                return x
        x = norm(x)
        logits = self.lm_head(x).float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)
