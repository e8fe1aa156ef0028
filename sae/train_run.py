"""
One SAE training run end to end, as a function: model + corpus → activation stream → trainer →
SAELens folders → spliced evaluation on held-out text. `scripts/sae_train.py` is its CLI and
`build_atlas` calls `run_training` directly.

    result = run_training(RunConfig(layers=[4, 10, 16], tokens=500_000, out="atlas_out/saes"))
    result.sae_dirs  # {hook_name: Path}, e.g. atlas_out/saes/blocks.10.hook_resid_post

Notable choices:
- The model comes from `nanochat.model_source.resolve_model` (explicit checkpoint, else the latest
  base model under $NANOCHAT_BASE_DIR, else the demo model) and the text from the train split of
  its corpus (or `data`); the spliced evaluation uses the val split of the same corpus.
- One stream feeds every SAE (one forward per batch for all layers). The stream is consumed in this
  order: input-norm estimation (`init_tokens`), training, BatchTopK threshold calibration, the
  trainer's held-out metrics; so a `cache_activations` cache holds exactly that many tokens.
- Held-out token budgets (calibration, trainer eval) shrink with short runs, so a tiny run is not
  dominated by them: each is min(its default, max(one batch, tokens / 8)).
- The default batch is 4096 tokens, halved (down to 1024) while a run would take fewer than
  MIN_STEPS optimizer steps: on the demo model (500k tokens, the CPU default) 4096-token batches
  give only 122 steps, and 1024-token ones reach about half the FVU (0.046 -> 0.02) and a fifth
  of the dead latents for the same tokens (bench/RESULTS_sae_quality.md).
- The default shuffle buffer is as many tokens as `buffer_mb` holds, at most 2^22, and at most a
  quarter of the stream, so even a short run mixes several generations.
- Under torchrun (`ctx` from `nanochat.distributed.init_distributed`) every rank forwards its own
  share of the corpus (row-group striding) with batch_size/world tokens per step; `batch_size`,
  `tokens` and the buffer rule's stream size stay global, the buffer memory is per rank.
  Data-parallel by default (every rank holds every SAE); `layer_parallel` gives each rank the SAEs of
  a block of layers and sends it those layers' activations of the global batch (sae/distributed.py).
  Rank 0 resolves the model first (so a demo build or download happens once), builds any
  activation cache, prints, and runs the spliced evaluation; all ranks return the same RunResult.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from nanochat.common import autodetect_device, get_atlas_cache_dir
from nanochat.distributed import DistContext, agree
from sae.activations import (ActivationCache, StreamConfig, build_cache, cached_stream, corpus_stream,
                             hook_dims, model_fingerprint)
from sae.config import ARCHITECTURES, SAEConfig, TrainConfig
from sae.distributed import LayerExchange, broadcast_object, local_batch_size, owned_range
from sae.evaluator import EvalConfig, evaluate_saes, write_eval_json
from sae.hooks import HOOK_KINDS, hook_name, parse_hook_name

MAX_DEFAULT_BUFFER_TOKENS = 1 << 22


@dataclass
class RunConfig:
    layers: list[int] | None = None  # None: n_layer/4, n_layer/2, 3·n_layer/4
    hook: str = "resid_post"  # hook kind, with or without 'hook_' (see sae.hooks.HOOK_KINDS)
    architecture: str = "batchtopk"
    width: int | None = None  # latents per SAE; None: expansion · d_in
    expansion: float = 8.0
    k: int = 32
    l1_coefficient: float | None = None  # relu / gated / jumprelu sparsity weight; None: SAEConfig's
    tokens: int | None = None  # training tokens per SAE; None: 500k on CPU (the demo in ~3 min), 50M on CUDA
    batch_size: int | None = None  # tokens per optimizer step; None: see default_batch_size
    lr: float | None = None  # None: 2e-4/sqrt(width/16384)·sqrt(batch/8192)
    checkpoint: str | None = None  # nanochat checkpoint dir or model_<step>.pt; None: see module doc
    data: str | None = None  # corpus file or dir; None: the model's own corpus
    out: str = "atlas_out/saes"
    resume: bool = False
    device: str | None = None  # None: CUDA, else MPS, else CPU
    seq_len: int | None = None  # window length; None: the model's sequence_len
    forward_windows: int = 8  # windows per model forward
    buffer_tokens: int | None = None  # shuffle buffer; None: see module doc
    buffer_mb: float = 1024.0
    cache_activations: bool = False  # keep the stream's activations on disk for repeated sweeps
    cache_dir: str | None = None  # None: $NANOCHAT_ATLAS_CACHE/activations
    cache_dtype: str = "float16"
    eval_tokens: int | None = None  # val-split tokens for the spliced evaluation (0: skip); None: 16k CPU, 1M CUDA
    seed: int = 0
    quiet: bool = False
    layer_parallel: bool = False  # under torchrun: each rank trains some layers' SAEs (else data-parallel)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r}: expected one of {ARCHITECTURES}")
        kind = self.hook if self.hook.startswith("hook_") else f"hook_{self.hook}"
        if kind not in HOOK_KINDS:
            raise ValueError(f"hook {self.hook!r}: expected one of "
                             f"{', '.join(k.removeprefix('hook_') for k in HOOK_KINDS)}")
        for key in ("tokens", "batch_size", "k"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)!r}: expected > 0")
        if self.width is None and not self.expansion > 0:
            raise ValueError(f"expansion={self.expansion!r}: expected > 0")


@dataclass
class RunResult:
    out_dir: Path
    sae_dirs: dict[str, Path]  # hook name -> SAE folder
    evals: dict[str, dict]  # hook name -> spliced val metrics ({} when eval_tokens == 0)
    model: str  # the model's description
    corpus: Path
    cache_dir: Path | None


def run_training(cfg: RunConfig, source=None, log: Callable[[str], None] | None = None,
                 ctx: DistContext | None = None) -> RunResult:
    """Train one SAE per layer on one stream, export, evaluate. `source`: a loaded ModelSource;
    `ctx`: this rank under torchrun (None: a single process on cfg.device)."""
    from nanochat.model_source import resolve_corpus
    ctx = ctx if ctx is not None else DistContext(device=autodetect_device(cfg.device))
    say = (lambda msg: None) if cfg.quiet or not ctx.is_main else (log or _print_stderr)
    device = ctx.device
    on_gpu = device.type == "cuda"
    tokens = cfg.tokens or (50_000_000 if on_gpu else 500_000)
    eval_tokens = cfg.eval_tokens if cfg.eval_tokens is not None else (1 << 20 if on_gpu else 16_384)
    cfg = replace(cfg, batch_size=cfg.batch_size or default_batch_size(tokens, ctx.world))
    local_batch = local_batch_size(cfg.batch_size, ctx)
    if source is None:
        source = _resolve_model_in_turn(cfg, device, ctx)
    model, tokenizer = source.model, source.tokenizer
    corpus = resolve_corpus(source, cfg.data)
    n_layer = model.config.n_layer
    layers = cfg.layers if cfg.layers else default_layers(n_layer)
    hooks = [hook_name(layer, cfg.hook) for layer in layers]
    for h in hooks:
        parse_hook_name(h, n_layer)  # clear error naming the valid layers
    if len(set(hooks)) != len(hooks):
        raise ValueError(f"layers {layers} repeat a layer")
    layer_parallel = cfg.layer_parallel and ctx.enabled
    if layer_parallel:
        owned_range(len(hooks), ctx)  # at least one layer per rank, or a clear error
    dims = hook_dims(model, hooks)
    seq_len = int(cfg.seq_len or model.config.sequence_len)

    sae_cfgs = [_sae_config(cfg, h, dims[h], source, corpus, seq_len) for h in hooks]
    train_cfg = _train_config(cfg, tokens, device)
    stream_tokens = stream_token_budget(train_cfg)
    bytes_per_token = sum(dims.values()) * 4
    buffer_tokens = cfg.buffer_tokens or max(local_batch, min(
        int(cfg.buffer_mb * 2**20) // bytes_per_token, MAX_DEFAULT_BUFFER_TOKENS,
        stream_tokens // (4 * ctx.world)))
    stream_cfg = StreamConfig(hooks, batch_size=local_batch, buffer_tokens=buffer_tokens,
                              seq_len=seq_len, forward_windows=cfg.forward_windows, split="train",
                              seed=cfg.seed)
    out = Path(cfg.out)

    say(f"model:   {source.describe()}")
    say(f"corpus:  {corpus} (train split for training, val split for evaluation)")
    say(f"SAEs:    {cfg.architecture}, {len(hooks)} hook(s) {', '.join(hooks)}; d_in "
        f"{sorted(set(dims.values()))}, width {sae_cfgs[0].d_sae}"
        + (f", k {cfg.k}" if cfg.architecture in ("topk", "batchtopk") else ""))
    say(f"tokens:  {train_cfg.total_tokens:,} training + {stream_tokens - train_cfg.total_tokens:,} "
        f"init/calibration/held-out per SAE, batch {cfg.batch_size}, lr "
        f"{train_cfg.resolve_lr(sae_cfgs[0].d_sae):.3g}, shuffle buffer {buffer_tokens:,} tokens, "
        f"window {seq_len}, device {device}")
    if ctx.enabled:
        say(f"ranks:   {ctx.world}, {'layer' if layer_parallel else 'data'}-parallel; each forwards "
            f"{local_batch} tokens per step of its share of the corpus")
    say(f"output:  {out}" + (" (resuming)" if cfg.resume else ""))

    cache_path = None
    if cfg.cache_activations:
        cache_path = _cache_in_turn(cfg, source, corpus, hooks, stream_tokens, seq_len, device, ctx, say)
        stream = cached_stream(ActivationCache(cache_path), stream_cfg, device=device, log=say,
                               rank=ctx.rank, world=ctx.world)
    else:
        stream = corpus_stream(model, tokenizer, corpus, stream_cfg, device=device, log=say,
                               rank=ctx.rank, world=ctx.world)
    if layer_parallel:
        stream = LayerExchange(stream, hooks, ctx)

    from sae.trainer import train_saes
    saes = train_saes(sae_cfgs, train_cfg, stream, out, resume=cfg.resume, ctx=ctx,
                      layer_parallel=layer_parallel)
    sae_dirs = {c.hook_name: out / c.folder_name for c in sae_cfgs}

    # the spliced evaluation runs on rank 0, which holds every SAE; the others wait for its result
    evals: dict[str, dict] = {}
    error = None
    if eval_tokens > 0 and ctx.is_main:
        try:
            results = evaluate_saes(model, tokenizer, corpus, saes,
                                    EvalConfig(n_tokens=eval_tokens, seq_len=seq_len), device=device,
                                    quiet=cfg.quiet)
            for sae, r in zip(saes, results):
                write_eval_json(sae_dirs[sae.cfg.hook_name], r)
                evals[sae.cfg.hook_name] = r
        except Exception as e:
            error = e
    agree(ctx, error)
    evals = broadcast_object(evals, ctx, "sharing the evaluation")
    result = RunResult(out, sae_dirs, evals, source.describe(), Path(corpus), cache_path)
    for line in summary_lines(result):
        say(line)
    return result


def _resolve_model_in_turn(cfg: RunConfig, device, ctx: DistContext):
    """Rank 0 resolves the model first (a demo build happens once, a bad --checkpoint fails on every
    rank alike), then the others load it."""
    from nanochat.model_source import resolve_model
    source, error = None, None
    if ctx.is_main:
        try:
            source = resolve_model(cfg.checkpoint, device, quiet=cfg.quiet)
        except Exception as e:
            error = e
    agree(ctx, error)
    if not ctx.is_main:
        try:
            source = resolve_model(cfg.checkpoint, device, quiet=True)
        except Exception as e:
            error = e
    agree(ctx, error)
    return source


def _cache_in_turn(cfg: RunConfig, source, corpus, hooks, stream_tokens, seq_len, device, ctx, say) -> Path:
    """Rank 0 builds (or reuses) the activation cache of the whole stream; every rank gets its path
    and reads its share of it (so the cache must sit on a filesystem every rank sees)."""
    path, error = None, None
    if ctx.is_main:
        try:
            root = Path(cfg.cache_dir) if cfg.cache_dir else get_atlas_cache_dir() / "activations"
            path = build_cache(source.model, source.tokenizer, corpus, hooks, stream_tokens, root,
                               model_fingerprint(source.checkpoint_dir, source.step, source.model_id),
                               split="train", seq_len=seq_len, dtype=cfg.cache_dtype,
                               forward_windows=cfg.forward_windows, device=device, quiet=cfg.quiet,
                               log=say).path
        except Exception as e:
            error = e
    agree(ctx, error)
    return Path(broadcast_object(str(path) if path else None, ctx, "sharing the cache path"))


MIN_STEPS = 400


def default_batch_size(tokens: int, world: int = 1) -> int:
    """4096, halved down to 1024 while `tokens` would give fewer than MIN_STEPS steps; a multiple
    of `world` (the batch is global and split evenly over the ranks)."""
    batch = 4096
    while batch > 1024 and tokens // batch < MIN_STEPS:
        batch //= 2
    return math.ceil(batch / world) * world


def default_layers(n_layer: int) -> list[int]:
    """n/4, n/2, 3n/4 (distinct, in range)."""
    return sorted({min(n_layer - 1, max(0, round(n_layer * f))) for f in (0.25, 0.5, 0.75)})


def stream_token_budget(train_cfg: TrainConfig) -> int:
    """Tokens the trainer draws from the stream: each phase takes whole batches."""
    B = train_cfg.batch_size
    phases = (max(1, train_cfg.init_tokens), train_cfg.total_tokens,
              train_cfg.calibration_tokens, train_cfg.eval_tokens)
    return sum(math.ceil(n / B) * B for n in phases)


def summary_lines(result: RunResult) -> list[str]:
    lines = ["results:"]
    for h, d in result.sae_dirs.items():
        e = result.evals.get(h)
        stats = (f"  FVU {e['fvu']:.3f}  L0 {e['l0']:.1f}  ΔCE {e['delta_ce']:+.4f} nats  "
                 f"KL {e['kl']:.4f}") if e else ""
        lines.append(f"  {d}{stats}")
    lines.append(f"each holds cfg.json, sae_weights.safetensors, sparsity.safetensors, eval.json, "
                 f"training_state.pt; resumable state: {result.out_dir / 'checkpoint.pt'}")
    if result.cache_dir:
        lines.append(f"activation cache: {result.cache_dir}")
    return lines


def _sae_config(cfg: RunConfig, hook: str, d_in: int, source, corpus, seq_len: int) -> SAEConfig:
    width = cfg.width or max(1, round(cfg.expansion * d_in))
    extra = {} if cfg.l1_coefficient is None else {"l1_coefficient": cfg.l1_coefficient}
    k = cfg.k if cfg.architecture in ("topk", "batchtopk") else None
    if k is not None and k > width:
        raise ValueError(f"k={k} exceeds the SAE width {width}")
    return SAEConfig(d_in=d_in, d_sae=width, architecture=cfg.architecture, k=k, hook_name=hook,
                     model_id=source.model_id, checkpoint=str(source.checkpoint_dir),
                     context_size=seq_len, dataset_path=str(corpus), **extra)


def _train_config(cfg: RunConfig, tokens: int, device: torch.device) -> TrainConfig:
    defaults = TrainConfig()
    held_out = lambda default: min(default, max(cfg.batch_size, tokens // 8))  # noqa: E731
    return TrainConfig(total_tokens=tokens, batch_size=cfg.batch_size, lr=cfg.lr, device=str(device),
                       seed=cfg.seed, quiet=cfg.quiet, init_tokens=held_out(defaults.init_tokens),
                       calibration_tokens=held_out(defaults.calibration_tokens),
                       eval_tokens=held_out(defaults.eval_tokens))


def _print_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
