"""
Typed configs for SAEs and their training.

`SAEConfig` describes one SAE: its shape, architecture and where its input comes from. It travels
with the weights (cfg.json). `TrainConfig` describes one training run, shared by every SAE trained
from the same activation stream (one model forward can feed several SAEs).

Notable choices:
- `input_scale` is part of the SAE: encode multiplies its (raw) input by it, decode divides by it.
  Training estimates it so that E‖x·s‖ = sqrt(d_in); export folds it into the weights and resets it
  to 1, so a saved SAE takes raw model activations.
- Defaults are sized so that small CPU models (d_in ≈ 128) train in minutes; every default that
  depends on run length (lr, warmup, dead window) is derived by a `resolve_*` helper so the rule
  lives in one place.
"""

import math
import re
from dataclasses import asdict, dataclass, fields

ARCHITECTURES = ("topk", "batchtopk", "relu", "gated", "jumprelu")
JUMPRELU_SPARSITY_MODES = ("tanh", "step")
B_DEC_INITS = ("geometric_median", "mean", "zeros")

_LAYER_RE = re.compile(r"blocks\.(\d+)\.")


def layer_from_hook_name(hook_name: str) -> int | None:
    """'blocks.10.hook_resid_post' -> 10; None for hooks outside a block (e.g. 'hook_embed')."""
    m = _LAYER_RE.match(hook_name)
    return int(m.group(1)) if m else None


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    architecture: str  # one of ARCHITECTURES
    k: int | None = None  # active latents per token (topk) / mean per token (batchtopk)
    hook_name: str = ""  # TransformerLens-style, e.g. 'blocks.10.hook_resid_post'
    layer: int | None = None  # derived from hook_name when None
    model_id: str = ""  # e.g. 'nanochat-d20'
    checkpoint: str = ""  # the model checkpoint the activations came from
    train_tokens: int = 0  # tokens trained on (filled in by the trainer)
    name: str = ""  # output folder name; defaults to hook_name
    context_size: int = 0  # tokens per window the activations were taken from (0: unknown)
    dataset_path: str = ""
    apply_b_dec_to_input: bool = True  # encode (x - b_dec) rather than x
    input_scale: float = 1.0  # see module docstring; 1.0 once exported
    # sparsity penalties (relu, gated, jumprelu); ignored by topk/batchtopk
    l1_coefficient: float | None = None  # None: a width-aware default, see resolved_l1_coefficient
    jumprelu_sparsity: str = "tanh"  # 'tanh' (Anthropic 2025) or 'step' (true L0, DeepMind)
    jumprelu_bandwidth: float = 2.0  # STE kernel width, in normalised units (E‖x‖ = sqrt(d_in))
    jumprelu_init_threshold: float = 0.1
    jumprelu_tanh_c: float = 4.0
    jumprelu_preact_coefficient: float = 3e-6  # Anthropic's pre-activation loss on dead latents
    l0_target: float | None = None  # step mode: penalty l1_coefficient·(L0/l0_target - 1)²
    k_aux: int | None = None  # AuxK latents; None: d_in // 2
    trained_as: str = ""  # architecture before export converted it (batchtopk, gated -> jumprelu)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"SAEConfig.architecture={self.architecture!r}: expected one of {ARCHITECTURES}")
        for key in ("d_in", "d_sae"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise ValueError(f"SAEConfig.{key}={getattr(self, key)!r}: expected a positive int")
        if self.architecture in ("topk", "batchtopk"):
            if self.k is None or not 0 < self.k <= self.d_sae:
                raise ValueError(f"SAEConfig.k={self.k!r}: {self.architecture} needs 0 < k <= d_sae={self.d_sae}")
        if self.jumprelu_sparsity not in JUMPRELU_SPARSITY_MODES:
            raise ValueError(f"SAEConfig.jumprelu_sparsity={self.jumprelu_sparsity!r}: "
                             f"expected one of {JUMPRELU_SPARSITY_MODES}")
        if not (self.input_scale > 0 and math.isfinite(self.input_scale)):
            raise ValueError(f"SAEConfig.input_scale={self.input_scale!r}: expected a positive finite number")
        if self.layer is None:
            self.layer = layer_from_hook_name(self.hook_name)

    @property
    def folder_name(self) -> str:
        return self.name or self.hook_name or "sae"

    @property
    def resolved_l1_coefficient(self) -> float:
        """Default sparsity coefficients, for inputs normalised to E‖x‖ = sqrt(d_in).

        An L1 penalty trades against MSE gradients that grow like sqrt(d_in); a count-like penalty
        (tanh, L0) trades against a latent's share of ‖x‖², which grows like d_in. The constants
        recover planted dictionaries at about the true L0 (tests/test_sae_models.py); for real
        activations, sweep it (or use l0_target) to reach the L0 you want."""
        if self.l1_coefficient is not None:
            return self.l1_coefficient
        d = self.d_in
        return {"relu": 0.05 * math.sqrt(d), "gated": 0.2 * math.sqrt(d),
                "jumprelu": (1e-3 if self.jumprelu_sparsity == "tanh" else 3e-3) * d}.get(self.architecture, 0.0)

    @property
    def resolved_k_aux(self) -> int:
        return self.k_aux if self.k_aux is not None else max(1, self.d_in // 2)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise KeyError(f"SAEConfig: unknown keys {unknown}")
        return cls(**d)


@dataclass
class TrainConfig:
    total_tokens: int = 2_000_000  # training tokens per SAE (init/calibration/eval tokens are extra)
    batch_size: int = 4096  # tokens per step the data stream is expected to yield
    lr: float | None = None  # None: 2e-4/sqrt(d_sae/16384)·sqrt(batch_size/8192), per SAE
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 6.25e-10
    warmup_steps: int | None = None  # None: min(1000, 5% of the steps)
    decay_frac: float = 0.2  # linear decay to 0 over this final fraction of the tokens
    grad_clip: float = 1.0  # max global grad norm per SAE (0: off)
    sparsity_warmup_frac: float = 0.05  # linear warmup of l1_coefficient (relu, gated, jumprelu)
    auxk_alpha: float = 1 / 32  # AuxK weight (topk, batchtopk); 0 disables
    dead_tokens: int | None = None  # tokens without firing that make a latent dead; None: min(10M, 5% of total)
    resample_steps: tuple[int, ...] = ()  # Anthropic-style resampling of dead latents at these steps
    normalize: bool = True  # estimate input_scale so E‖x·s‖ = sqrt(d_in)
    b_dec_init: str = "geometric_median"  # or 'mean', 'zeros'
    init_tokens: int = 65_536  # tokens used to estimate the scale and b_dec (not trained on)
    calibration_tokens: int = 262_144  # held-out tokens to calibrate the BatchTopK threshold
    eval_tokens: int = 262_144  # held-out tokens for eval.json and sparsity.safetensors (0: skip)
    checkpoint_every: int = 200  # steps between resumable checkpoints (0: only at the end)
    log_every: int = 25  # steps between log lines in train_log.jsonl and progress-bar updates
    sparse_kernels: bool = True  # sparse TopK encoder backward + embedding_bag decoder
    export_sparsify: bool = False  # also write TopK SAEs in EleutherAI sparsify format
    device: str = "cpu"
    seed: int = 0
    quiet: bool = False

    def __post_init__(self):
        self.adam_betas = tuple(self.adam_betas)
        self.resample_steps = tuple(self.resample_steps)
        for key in ("total_tokens", "batch_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"TrainConfig.{key}={getattr(self, key)!r}: expected > 0")
        if self.b_dec_init not in B_DEC_INITS:
            raise ValueError(f"TrainConfig.b_dec_init={self.b_dec_init!r}: expected one of {B_DEC_INITS}")
        if not 0 <= self.decay_frac <= 1:
            raise ValueError(f"TrainConfig.decay_frac={self.decay_frac!r}: expected within [0, 1]")

    @property
    def total_steps(self) -> int:
        return math.ceil(self.total_tokens / self.batch_size)

    def resolve_lr(self, d_sae: int) -> float:
        # Gao et al.'s width fit at 8192 tokens/step, rescaled ∝ sqrt(batch) (recipe §9.7, §9.8)
        if self.lr is not None:
            return self.lr
        return 2e-4 / math.sqrt(d_sae / 16384) * math.sqrt(self.batch_size / 8192)

    def resolve_warmup_tokens(self) -> int:
        steps = self.warmup_steps if self.warmup_steps is not None else min(1000, max(1, self.total_steps // 20))
        return steps * self.batch_size

    def resolve_dead_tokens(self) -> int:
        if self.dead_tokens is not None:
            return self.dead_tokens
        return max(self.batch_size, min(10_000_000, self.total_tokens // 20))

    def lr_factor(self, tokens_seen: int) -> float:
        """Linear warmup, constant, then linear decay to 0 over the last decay_frac of the tokens."""
        warm = self.resolve_warmup_tokens()
        factor = min(1.0, (tokens_seen + self.batch_size) / warm) if warm > 0 else 1.0
        decay_start = self.total_tokens * (1 - self.decay_frac)
        if self.decay_frac > 0 and tokens_seen >= decay_start:
            factor *= max(0.0, (self.total_tokens - tokens_seen) / (self.total_tokens * self.decay_frac))
        return factor

    def sparsity_factor(self, tokens_seen: int) -> float:
        ramp = self.total_tokens * self.sparsity_warmup_frac
        return min(1.0, (tokens_seen + self.batch_size) / ramp) if ramp > 0 else 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        d["resample_steps"] = list(self.resample_steps)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise KeyError(f"TrainConfig: unknown keys {unknown}")
        return cls(**d)
