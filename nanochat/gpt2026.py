"""
The nanochat GPT of the 2026 formats (karpathy/nanochat 2025-12-23 .. 92d63d4, 2026-07-03).

One class covers every 2026 era; `GPT2026Config` says which parts a checkpoint has and
which constants its era used (nanochat's meta records none of them, see formats.py).
Compared with the Oct-2025 GPT in gpt.py, the forward pass is:

    x  = norm(wte(idx))                                  # rows padded to a multiple of 64
    x  = smear(x)         [2026-03-14+]  x[t] += lambda*sigmoid(gate(x[t,:24]))*x[t-1]
    x0 = x
    for each block i:
        x = resid_lambdas[i]*x + x0_lambdas[i]*x0      [2026-01-11+]  (outside the block)
        x = h[i](x, ve_i, ...)   attention adds k*sigmoid(ve_gate(x[..., :c]))*value_embeds[i](idx)
                                 to v on alternating layers (the last one included) [2026-01-18+],
                                 q and k scaled after QK norm, sliding windows per layer
        x_backout = x if i == n_layer//2                [2026-03-14+]
    x = x - backout_lambda*x_backout
    logits = softcap*tanh(lm_head(norm(x))[..., :vocab_size]/softcap)

Notable choices:
- blocks are called as modules with the (mixed) residual first, so a forward pre-hook on
  `transformer.h[i]` sees the stream block i actually receives and a forward hook on it sees
  (and may replace) the block output that later mixing and backout use
- windows follow nanochat's SDPA fallback exactly: key j is visible from query i when
  j <= i and i - j <= window; a "long" layer's window is sequence_len (so it only bites
  beyond sequence_len, as in nanochat)
- a chunk decoded after a prefix smears its first token with the cached previous embedding,
  so any split of a sequence into KV-cache chunks gives the full forward's result
- rotary tables are fp32 values, rounded through bf16 for eras that stored them in bf16,
  and cast to the activation dtype at use
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.gpt import MLP, KVCache, apply_rotary_emb, norm

SMEAR_CHANNELS = 24  # nanochat's smear gate reads the first 24 channels of the embedding


@dataclass
class GPT2026Config:
    sequence_len: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    window_pattern: str = "L"       # tiled over layers; the last layer is always long
    padded_vocab_size: int = 0      # rows of wte/lm_head/value_embeds; 0 means vocab_size
    has_lambdas: bool = True        # resid_lambdas / x0_lambdas
    ve_gate_channels: int = 0       # 0: no value embeddings; else the gate's input width
    ve_gate_range: float = 2.0      # gate = ve_gate_range * sigmoid(...)
    has_smear: bool = False         # smear_gate / smear_lambda
    has_backout: bool = False       # backout_lambda
    rope_base: float = 10000.0
    qk_scale: float = 1.0           # applied to q and to k after QK norm
    softcap: float = 15.0
    short_window: int = 0           # the "S" window; 0 means sequence_len // 2
    rotary_bf16: bool = True        # tables rounded through bf16 (before 2026-03-04)
    era: str = ""                   # the nanochat format this config reproduces (formats.py)

    def __post_init__(self):
        if not self.padded_vocab_size:
            self.padded_vocab_size = self.vocab_size
        if not self.short_window:
            self.short_window = self.sequence_len // 2
        pattern = self.window_pattern.upper()
        if not pattern or set(pattern) - {"S", "L"}:
            raise ValueError(f"window_pattern {self.window_pattern!r} must be a non-empty "
                             f"string of S and L")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size {self.padded_vocab_size} < vocab_size "
                             f"{self.vocab_size}")
        if self.has_backout and not self.has_lambdas:
            raise ValueError("backout_lambda without resid/x0 lambdas is not a nanochat format")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def window_sizes(self) -> list[int]:
        """Per-layer left window (keys i-window..i are visible); the last layer is long."""
        pattern = self.window_pattern.upper()
        sizes = [self.short_window if pattern[i % len(pattern)] == "S" else self.sequence_len
                 for i in range(self.n_layer)]
        sizes[-1] = self.sequence_len
        return sizes

    def ve_layers(self) -> list[int]:
        """Layers with value embeddings: alternating, the last layer always included."""
        if not self.ve_gate_channels:
            return []
        return [i for i in range(self.n_layer) if i % 2 == (self.n_layer - 1) % 2]

    def nanochat_model_config(self) -> dict:
        """The `model_config` nanochat writes to meta_<step>.json for this model."""
        d = asdict(self)
        keys = ["sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"]
        if self.has_lambdas or self.window_pattern.upper().strip("L"):
            keys.append("window_pattern")  # the field arrived with the 2026-01-11 formats
        return {k: d[k] for k in keys}


def rotary_tables(config: GPT2026Config, seq_len: int, device=None):
    """cos/sin of shape (1, seq_len, 1, head_dim/2), fp32, with the era's rounding."""
    head_dim = config.head_dim
    channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (config.rope_base ** (channel_range / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    if config.rotary_bf16:
        cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
    return cos[None, :, None, :], sin[None, :, None, :]


class KVCache2026(KVCache):
    """The Oct-2025 cache plus the last normed embedding, which smear needs when decoding."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prev_embedding: torch.Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self.prev_embedding = None


def windowed_attention(q, k, v, window: int, enable_gqa: bool) -> torch.Tensor:
    """Causal SDPA over (B, H, T, D) where the Tq queries are the last Tq of the Tk keys and
    query i sees key j iff j <= i and i - j <= window (nanochat's sliding-window rule)."""
    Tq, Tk = q.size(2), k.size(2)
    if Tq == Tk and window >= Tq - 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    if Tq == 1:
        start = max(0, Tk - (window + 1))
        return F.scaled_dot_product_attention(q, k[:, :, start:], v[:, :, start:],
                                              enable_gqa=enable_gqa)
    row = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
    col = torch.arange(Tk, device=q.device)[None, :]
    mask = (col <= row) & (row - col <= window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2026Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        if config.n_embd % config.n_head or config.n_head % config.n_kv_head:
            raise ValueError(f"n_embd={config.n_embd}, n_head={config.n_head}, "
                             f"n_kv_head={config.n_kv_head} do not divide evenly")
        C = config.n_embd
        self.c_q = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)
        self.qk_scale = config.qk_scale
        self.ve_gate_channels = config.ve_gate_channels
        self.ve_gate_range = config.ve_gate_range
        has_ve = layer_idx in config.ve_layers()
        self.ve_gate = (nn.Linear(config.ve_gate_channels, self.n_kv_head, bias=False)
                        if has_ve else None)

    def forward(self, x, ve, cos_sin, window: int, kv_cache=None):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # value residual: a per-head gate read from the first channels of the block input
            gate = self.ve_gate_range * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + (gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)).to(v.dtype)
        cos, sin = (t.to(q.dtype) for t in cos_sin)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        y = windowed_attention(q, k, v, window, self.n_head != self.n_kv_head)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, config: GPT2026Config, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window: int, kv_cache=None):
        x = x + self.attn(norm(x), ve, cos_sin, window, kv_cache)
        x = x + self.mlp(norm(x))
        return x


class GPT2026(nn.Module):
    def __init__(self, config: GPT2026Config):
        super().__init__()
        self.config = config
        V, C = config.padded_vocab_size, config.n_embd
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(V, C),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(C, V, bias=False)
        if config.has_lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.has_smear:
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.has_backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim)
                                           for i in config.ve_layers()})
        self.window_sizes = config.window_sizes()
        self.backout_layer = config.n_layer // 2 if config.has_backout else None
        self.rotary_seq_len = config.sequence_len * 10  # nanochat precomputes 10x
        cos, sin = rotary_tables(config, self.rotary_seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """
        A random init in nanochat's style, for models we build ourselves (tests, benchmarks).
        Unlike nanochat, output projections and smear_lambda are not zero, so every path of
        an untrained model carries signal.
        """
        gen = torch.Generator(self.get_device()).manual_seed(seed) if seed is not None else None
        c, L = self.config, self.config.n_layer
        s = 3 ** 0.5 * c.n_embd ** -0.5
        nn.init.normal_(self.transformer.wte.weight, std=0.8, generator=gen)
        nn.init.normal_(self.lm_head.weight, std=c.n_embd ** -0.5, generator=gen)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s, generator=gen)
            nn.init.uniform_(block.attn.c_proj.weight, -s / 2, s / 2, generator=gen)
            bound = 0.5 * (4 * c.n_embd) ** -0.5
            nn.init.uniform_(block.mlp.c_proj.weight, -bound, bound, generator=gen)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, -0.5, 0.5, generator=gen)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s, generator=gen)
        if c.has_lambdas:
            for i in range(L):
                self.resid_lambdas[i] = 1.15 - 0.10 * i / max(L - 1, 1)
                self.x0_lambdas[i] = 0.20 - 0.15 * i / max(L - 1, 1)
        if c.has_smear:
            nn.init.uniform_(self.smear_gate.weight, -0.5, 0.5, generator=gen)
            self.smear_lambda.fill_(0.3)
        if c.has_backout:
            self.backout_lambda.fill_(0.2)
        self.cos, self.sin = rotary_tables(c, self.rotary_seq_len, device=self.get_device())

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache2026:
        c = self.config
        return KVCache2026(batch_size, c.n_kv_head, max_len, c.head_dim, c.n_layer,
                           dtype=self.transformer.wte.weight.dtype, device=self.get_device())

    def residual_gain(self, layer: int) -> float:
        """
        The scalar by which a write into resid_post(layer) reaches the final norm's input
        along the residual path: the product of later resid_lambdas, minus backout_lambda
        times the product up to the backout layer when the write precedes or is that layer.
        Writes into resid_pre/resid_mid(layer), attn_out and mlp_out of that block pass
        into resid_post(layer) unscaled, so they share this gain.
        """
        L = self.config.n_layer
        if not 0 <= layer < L:
            raise ValueError(f"layer {layer} out of range 0..{L - 1}")
        if not self.config.has_lambdas:
            return 1.0
        lam = self.resid_lambdas.detach().double().cpu()
        gain = lam[layer + 1:].prod().item()
        if self.backout_layer is not None and layer <= self.backout_layer:
            through = lam[layer + 1:self.backout_layer + 1].prod().item()
            gain -= self.backout_lambda.detach().double().item() * through
        return gain

    def _smear(self, x: torch.Tensor, kv_cache) -> torch.Tensor:
        """x[t] += smear_lambda*sigmoid(smear_gate(x[t, :24]))*x[t-1], on the normed embedding."""
        prev = kv_cache.prev_embedding if kv_cache is not None else None
        if kv_cache is not None:
            kv_cache.prev_embedding = x[:, -1:]
        lam = self.smear_lambda.to(x.dtype)
        if prev is not None:  # continuing a cached sequence: position 0 has a predecessor
            gate = lam * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
            return x + gate * torch.cat([prev, x[:, :-1]], dim=1)
        if x.size(1) == 1:
            return x
        # the gate is computed on positions 1.. only, as nanochat does: the same matmul
        # shape keeps the result bit-identical to nanochat's
        gate = lam * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_CHANNELS]))
        return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache2026 | None = None, loss_reduction: str = "mean",
                stop_after_layer: int | None = None):
        """
        Softcapped logits (B, T, vocab_size), or the cross-entropy loss when `targets` is
        given (ignore_index=-1). With `stop_after_layer=L`, returns the output of block L
        (B, T, C) without running later blocks, backout or lm_head.
        """
        c = self.config
        B, T = idx.size()
        t0 = kv_cache.get_pos() if kv_cache is not None else 0
        if t0 + T > self.cos.size(1):
            raise ValueError(f"sequence of {t0 + T} tokens exceeds the rotary cache "
                             f"({self.cos.size(1)} = 10 x sequence_len)")
        if stop_after_layer is not None and not 0 <= stop_after_layer < c.n_layer:
            raise ValueError(f"stop_after_layer={stop_after_layer} out of range "
                             f"0..{c.n_layer - 1}")
        cos_sin = self.cos[:, t0:t0 + T], self.sin[:, t0:t0 + T]
        x = norm(self.transformer.wte(idx))
        if c.has_smear:
            x = self._smear(x, kv_cache)
        x0 = x
        x_backout = None
        for i, block in enumerate(self.transformer.h):
            if c.has_lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i], kv_cache)
            if i == stop_after_layer:
                return x
            if i == self.backout_layer:
                x_backout = x
        if x_backout is not None:
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        x = norm(x)
        logits = self.lm_head(x)[..., :c.vocab_size].float()
        logits = c.softcap * torch.tanh(logits / c.softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)
