"""
SAE trainer: several SAEs from one activation stream, resumable bit-exactly, exported in SAELens format.

    saes = train_saes(cfgs, TrainConfig(total_tokens=2_000_000), batches, "out/")

`batches` is any iterable of {hook_name: Tensor[B, d_in]} (one model forward feeds every SAE whose
hook it holds; one batch = one optimizer step for each SAE). Data-position protocol: if the object
has `state_dict()` / `load_state_dict(state)`, the trainer stores the former in each checkpoint and,
on resume, calls the latter once before iterating; `state_dict()` must describe the position after
the last batch handed out. Otherwise a resume re-iterates from the start and skips the batches
already consumed (exact only for a deterministic stream).

Phases (recipe §9): init (estimate the input scale s = sqrt(d_in)/E‖x‖ and b_dec from `init_tokens`
that are not trained on) → train → calibrate BatchTopK thresholds on held-out tokens → evaluate on
further held-out tokens → export each SAE to OUT/<name>/ (cfg.json, sae_weights.safetensors,
sparsity.safetensors, eval.json, training_state.pt). Resumable state lives in OUT/checkpoint.pt
(written atomically every `checkpoint_every` steps, after init and at the end of training): weights,
Adam moments, dead counters, BatchTopK θ-EMA, input scales, generator states, step/tokens and the
data position. Per-step recipe: unit-norm decoder rows with the parallel gradient projected out,
Adam with warmup and linear decay (schedule by tokens), grad-norm clipping, AuxK on latents dead for
`dead_tokens`, optional Anthropic resampling at `resample_steps`. Each SAE draws its init and its
resampling choices from its own generator, seeded by (seed, folder name), so an SAE trains the same
whichever other SAEs share the stream or the process.

Under torchrun (`ctx` with world > 1; see sae/distributed.py for the collectives):
- data-parallel (default): `batches` yields this rank's batch_size/world rows of every global batch
  (rank r's rows are rows [r·b, (r+1)·b) of it). Statistics, gradients, BatchTopK selection and
  threshold calibration are reduced over the ranks, so every rank holds the SAEs one process would
  train on the global batches. Rank 0 alone prints, writes the log, checkpoints (with every rank's
  data position) and exports.
- layer-parallel: `batches` yields global batches of the hooks this rank owns
  (sae.distributed.LayerExchange) and the rank trains cfgs[owned_range]. Rank 0 gathers the SAE
  states into the one checkpoint; each rank exports its own SAEs; rank 0 returns all of them.
A checkpoint records the world size and mode; resuming it under another one is refused. Ranks meet
(`nanochat.distributed.agree`) after reading the checkpoint and after exporting, so a failure there
raises the same RankFailure on every rank; a failure inside a collective surfaces as a RankFailure
on the surviving ranks.
"""

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import torch
from tqdm import tqdm

from nanochat.distributed import DistContext, agree, rank_slice
from sae.config import SAEConfig, TrainConfig
from sae.distributed import (all_gather_cat, all_reduce_, average_gradients, data_parallel_loss, gather_objects,
                             local_batch_size, owned_range, scatter_objects)
from sae.io import atomic_write_bytes, save_sae, save_sparsify, torch_bytes
from sae.metrics import SAEMetrics, decoder_max_cosine, log_density_histogram
from sae.models import SAE, BatchTopKSAE, LossContext, StepOut, build_sae

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "train_log.jsonl"
CHECKPOINT_VERSION = 2
# settings that may change between a run and its resume without changing the math
_RESUME_FREE = {"quiet", "log_every", "checkpoint_every", "device", "calibration_tokens", "eval_tokens",
                "export_sparsify"}
SINGLE = DistContext()  # the reductions of a lone process: no-ops


@dataclass
class SAERun:
    """One SAE's training state (what train_step needs)."""
    sae: SAE
    optimizer: torch.optim.Adam
    lr: float
    tokens_since_fired: torch.Tensor  # [d_sae] int64
    data_stats: dict
    gen: torch.Generator  # init and resampling draws of this SAE


def train_saes(cfgs: list[SAEConfig], train_cfg: TrainConfig, batches: Iterable[dict], out_dir,
               resume: bool = False, ctx: DistContext | None = None, layer_parallel: bool = False) -> list[SAE]:
    """Train one SAE per config on the shared stream; returns the exported (inference-form) SAEs.

    `ctx`: this rank under torchrun (None: a single process). Under layer-parallelism only rank 0's
    list holds every SAE; the other ranks return the SAEs they trained."""
    ctx = ctx if ctx is not None else replace(SINGLE, device=torch.device(train_cfg.device))
    out = Path(out_dir)
    names = [c.folder_name for c in cfgs]
    if len(set(names)) != len(names):
        raise ValueError(f"train_saes: SAE folder names must be unique, got {names}; set SAEConfig.name")
    layer_parallel = layer_parallel and ctx.enabled
    sync = SINGLE if layer_parallel or not ctx.enabled else ctx  # what the SAE math reduces over
    lo, hi = owned_range(len(cfgs), ctx) if layer_parallel else (0, len(cfgs))
    local_b = local_batch_size(train_cfg.batch_size, sync)
    ckpt_path = out / CHECKPOINT_FILE
    say = (lambda msg: None) if train_cfg.quiet or not ctx.is_main else (lambda msg: print(msg, file=sys.stderr))
    device = torch.device(train_cfg.device)
    t_start = time.time()

    # rank 0 reads the checkpoint (it alone writes it) and deals every rank its share
    parts, error = [None] * ctx.world, None
    if ctx.is_main:
        try:
            parts = _deal_checkpoint(ckpt_path, resume, cfgs, train_cfg, ctx, layer_parallel, say)
        except Exception as e:  # every rank must hear of it, not wait in the next collective
            error = e
    agree(ctx, error)
    part = scatter_objects(parts, ctx, "loading the checkpoint")

    if part is not None:
        runs = [_restore_run(entry, train_cfg, device) for entry in part["saes"]]
        step, tokens, consumed, wall = part["step"], part["tokens"], part["batches_consumed"], part["wall_s"]
        it = _resume_stream(batches, part, say)
        say(f"resuming {out} at step {step} ({tokens:,} tokens)")
    else:
        it = iter(batches)
        runs = [new_run(cfg, train_cfg, device) for cfg in cfgs[lo:hi]]
        consumed = _init_from_data(runs, it, train_cfg, device, sync)
        step, tokens, wall = 0, 0, 0.0
        _save_checkpoint(ckpt_path, runs, train_cfg, batches, step, tokens, consumed, wall, ctx, layer_parallel)
    if ctx.is_main:
        _truncate_log(out / LOG_FILE, step)

    dead_tokens = train_cfg.resolve_dead_tokens()
    bar = tqdm(total=train_cfg.total_tokens, initial=min(tokens, train_cfg.total_tokens), unit="tok",
               unit_scale=True, disable=True if train_cfg.quiet or not ctx.is_main else None,
               desc="train SAEs", dynamic_ncols=True)
    while tokens < train_cfg.total_tokens:
        try:
            batch = next(it)
        except StopIteration:
            say(f"activation stream ended after {tokens:,} of {train_cfg.total_tokens:,} tokens; finishing early")
            break
        consumed += 1
        xs = [_hook_batch(batch, r.sae.cfg.hook_name, device) for r in runs]
        b = xs[0].shape[0]
        if any(x.shape[0] != b for x in xs):
            raise ValueError(f"batch {consumed}: hooks yield different token counts {[x.shape[0] for x in xs]}")
        if sync.enabled and b != local_b:
            raise ValueError(f"batch {consumed}: rank {sync.rank} got {b} tokens; data-parallel training needs "
                             f"batch_size/world = {train_cfg.batch_size}/{sync.world} = {local_b} on every rank")
        logs = []
        for r, x in zip(runs, xs):
            x = x * r.sae.cfg.input_scale
            res = train_step(r, x, train_cfg, tokens, dead_tokens, sync)
            if (step + 1) % train_cfg.log_every == 0:
                logs.append((r, x, res))
        step += 1
        tokens += b * sync.world
        bar.update(min(b * sync.world, train_cfg.total_tokens - bar.n))
        if step in train_cfg.resample_steps:
            for r, x in zip(runs, xs):
                pool = all_gather_cat(x * r.sae.cfg.input_scale, sync, "resampling")  # the global batch
                n = _resample_dead(r, pool, dead_tokens, r.gen)
                say(f"step {step}: resampled {n} dead latents of {r.sae.cfg.folder_name}")
        if logs:
            _log_step(out / LOG_FILE, bar, step, tokens, logs, dead_tokens, ctx, sync)
        if train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0:
            _save_checkpoint(ckpt_path, runs, train_cfg, batches, step, tokens, consumed,
                             wall + time.time() - t_start, ctx, layer_parallel)
    bar.close()
    wall += time.time() - t_start
    _save_checkpoint(ckpt_path, runs, train_cfg, batches, step, tokens, consumed, wall, ctx, layer_parallel)

    # held-out phases: the stream continues past the training tokens
    # every rank draws the same batches (layer-parallel ranks pull them together), so whether the
    # calibration phase runs depends on all the SAEs, not only this rank's
    calibrate = any(c.architecture == "batchtopk" for c in cfgs)
    thresholds = _calibrate_thresholds(runs, it, train_cfg, device, say, sync, calibrate)
    evals = _evaluate(runs, it, train_cfg, device, say, sync)
    writes = ctx.is_main or layer_parallel  # data-parallel ranks hold identical SAEs: rank 0 writes them
    exported, error = [], None
    try:
        for r, ev in zip(runs, evals):
            exported.append(_export(r, ev, thresholds, train_cfg, out, step, tokens, wall, dead_tokens, writes))
    except Exception as e:
        error = e
    agree(ctx, error)
    if layer_parallel:
        exported = _gather_saes(exported, ctx, device)
    say(f"wrote {len(cfgs)} SAE folder(s) under {out}")
    return exported


def train_sae(cfg: SAEConfig, train_cfg: TrainConfig, batches: Iterable, out_dir, resume: bool = False,
              ctx: DistContext | None = None) -> SAE:
    """Single-SAE convenience: batches may yield plain tensors [B, d_in] or {hook_name: tensor} dicts."""
    return train_saes([cfg], train_cfg, _AsDicts(batches, cfg.hook_name), out_dir, resume, ctx)[0]


class _AsDicts:
    """Wraps a stream of tensors as {hook_name: tensor}, forwarding the data-position protocol."""

    def __init__(self, batches, hook_name):
        self._batches, self._hook = batches, hook_name

    def __iter__(self):
        for b in self._batches:
            yield b if isinstance(b, dict) else {self._hook: b}

    def __getattr__(self, name):
        if name in ("state_dict", "load_state_dict"):
            return getattr(self._batches, name)
        raise AttributeError(name)


def train_step(r: SAERun, x: torch.Tensor, train_cfg: TrainConfig, tokens_seen: int, dead_tokens: int,
               sync: DistContext = SINGLE) -> StepOut:
    """One optimizer step of one SAE on a normalised batch x [B, d_in] (the trainer's inner loop).
    Under data-parallelism x is this rank's share and `sync` the group the step reduces over."""
    for group in r.optimizer.param_groups:
        group["lr"] = r.lr * train_cfg.lr_factor(tokens_seen)
    ctx = LossContext(dead=r.tokens_since_fired >= dead_tokens,
                      sparsity_coef=r.sae.cfg.resolved_l1_coefficient * train_cfg.sparsity_factor(tokens_seen),
                      auxk_alpha=train_cfg.auxk_alpha, sparse=train_cfg.sparse_kernels)
    res = data_parallel_loss(r.sae, x, ctx, sync) if sync.enabled else r.sae.training_loss(x, ctx)
    r.optimizer.zero_grad(set_to_none=True)
    res.loss.backward()
    if sync.enabled:
        res = replace(res, fired=average_gradients(r.sae, res.fired, sync))
    r.sae.project_decoder_grad()
    if train_cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(r.sae.parameters(), train_cfg.grad_clip)
    r.optimizer.step()
    r.sae.post_step()
    r.tokens_since_fired += x.shape[0] * sync.world
    r.tokens_since_fired.masked_fill_(res.fired, 0)
    return res


# ---- init ----

def sae_generator(seed: int, name: str) -> torch.Generator:
    """The generator of one SAE: seeded by (run seed, SAE folder name)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def new_run(cfg: SAEConfig, train_cfg: TrainConfig, device, gen: torch.Generator | None = None) -> SAERun:
    gen = gen if gen is not None else sae_generator(train_cfg.seed, cfg.folder_name)
    sae = build_sae(cfg, gen).to(device)
    lr = train_cfg.resolve_lr(cfg.d_sae)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=train_cfg.adam_betas, eps=train_cfg.adam_eps)
    return SAERun(sae, opt, lr, torch.zeros(cfg.d_sae, dtype=torch.int64, device=device), {}, gen)


@torch.no_grad()
def _init_from_data(runs: list[SAERun], it, train_cfg: TrainConfig, device, sync: DistContext = SINGLE) -> int:
    """Estimate input scale and b_dec from the first init_tokens of the (global) stream; returns batches used.

    A rank keeps the rows of its share whose index in the global stream is below init_tokens, so the
    statistics (all-reduced sums) are those of exactly the tokens a single process would use."""
    need = max(1, train_cfg.init_tokens)
    chunks = {id(r): [] for r in runs}
    index = []  # global stream index of every kept row
    seen, consumed = 0, 0
    while seen < need:
        try:
            batch = next(it)
        except StopIteration:
            if seen == 0:
                raise ValueError("train_saes: the activation stream is empty") from None
            break
        consumed += 1
        xs = [_hook_batch(batch, r.sae.cfg.hook_name, device) for r in runs]
        b = xs[0].shape[0]
        first = seen + sync.rank * b  # global index of this rank's first row
        keep = min(b, max(0, need - first))
        for r, x in zip(runs, xs):
            chunks[id(r)].append(x[:keep])
        index.append(torch.arange(first, first + keep, device=device))
        seen += b * sync.world
    index = torch.cat(index)
    for r in runs:
        x = torch.cat(chunks[id(r)])
        cfg = r.sae.cfg
        stats = all_reduce_(torch.stack([x.new_tensor(x.shape[0], dtype=torch.float64),
                                         x.norm(dim=-1).double().sum()]), sync, "the input-norm estimate")
        n, mean_norm = int(stats[0]), float(stats[1] / stats[0])
        if not math.isfinite(mean_norm) or mean_norm <= 0:
            raise ValueError(f"{cfg.hook_name}: activations have mean norm {mean_norm}; cannot normalise")
        scale = math.sqrt(cfg.d_in) / mean_norm if train_cfg.normalize else 1.0
        r.sae.cfg = replace(cfg, input_scale=scale)
        xn = x * scale
        sums = all_reduce_(torch.cat([xn.double().sum(0), xn.double().pow(2).sum(0)]), sync, "the input mean")
        mu = sums[:cfg.d_in] / n
        sigma = ((sums[cfg.d_in:] - n * mu.pow(2)) / max(n - 1, 1)).clamp_min(0).sqrt()
        r.data_stats = {"init_tokens": n, "mean_norm": mean_norm, "input_scale": scale,
                        "gamma_mean_over_std": float(mu.norm() / sigma.norm().clamp_min(1e-12))}
        if train_cfg.b_dec_init == "geometric_median":
            r.sae.b_dec.copy_(geometric_median(xn[index < 32768], sync=sync))
        elif train_cfg.b_dec_init == "mean":
            r.sae.b_dec.copy_(mu.float())
    return consumed


@torch.no_grad()
def geometric_median(x: torch.Tensor, iters: int = 100, tol: float = 1e-5, sync: DistContext = SINGLE) -> torch.Tensor:
    """Weiszfeld's algorithm, started at the mean; stops when a step moves < tol·(1 + ‖y‖).
    Under data-parallelism x is this rank's share of the points; the sums are all-reduced."""
    x = x.double()
    total = all_reduce_(torch.cat([x.sum(0), x.new_tensor([x.shape[0]])]), sync, "the geometric median")
    y = total[:-1] / total[-1]
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        s = all_reduce_(torch.cat([(w[:, None] * x).sum(0), w.sum().reshape(1)]), sync, "the geometric median")
        y_new = s[:-1] / s[-1]
        moved = float((y_new - y).norm())
        y = y_new
        if moved < tol * (1 + float(y.norm())):
            break
    return y.float()


# ---- per-step helpers ----

def _hook_batch(batch: dict, hook_name: str, device) -> torch.Tensor:
    if not isinstance(batch, dict):
        raise TypeError(f"train_saes: batches must yield {{hook_name: Tensor}} dicts, got {type(batch).__name__}")
    if hook_name not in batch:
        raise KeyError(f"activation batch has no {hook_name!r}; it holds {sorted(batch)}")
    x = batch[hook_name]
    return x.reshape(-1, x.shape[-1]).to(device=device, dtype=torch.float32)


@torch.no_grad()
def _resample_dead(r: SAERun, x: torch.Tensor, dead_tokens: int, gen: torch.Generator) -> int:
    """Anthropic (Towards Monosemanticity) resampling, with the current batch as the input pool.

    Dead latents get the direction of an input drawn ∝ its squared reconstruction loss (measured from
    b_dec, since that is what the decoder adds to); encoder columns get 0.2 × the mean alive encoder
    norm; b_enc = 0; their Adam moments are zeroed."""
    sae = r.sae
    dead = r.tokens_since_fired >= dead_tokens
    idx = dead.nonzero().squeeze(1)
    if idx.numel() == 0:
        return 0
    loss = (x - sae.decode_normed(sae.encode_normed(x))).pow(2).sum(-1)
    probs = loss.pow(2).cpu().double()
    if not bool(probs.sum() > 0):
        probs = torch.ones_like(probs)
    pick = torch.multinomial(probs, idx.numel(), replacement=True, generator=gen).to(x.device)
    dirs = x[pick] - sae.b_dec
    dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
    alive = ~dead
    enc_norm = float(sae.W_enc[:, alive].norm(dim=0).mean()) if bool(alive.any()) else 1.0
    dec_norm = 1.0 if sae.unit_norm_decoder or not bool(alive.any()) else float(sae.W_dec[alive].norm(dim=1).mean())
    sae.reset_latents(idx, dirs * dec_norm, dirs * (0.2 * enc_norm))
    params = dict(sae.named_parameters())
    for name, dim in sae.latent_params.items():
        state = r.optimizer.state.get(params[name], {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].index_fill_(dim, idx, 0.0)
    r.tokens_since_fired[idx] = 0
    return idx.numel()


@torch.no_grad()
def _log_step(path: Path, bar, step, tokens, logs, dead_tokens, ctx: DistContext, sync: DistContext):
    """One train_log.jsonl line per SAE; batch FVU, L0 and losses over the global batch."""
    lines, post = [], []  # lines: (record, progress-bar tag)
    for r, x, res in logs:
        cfg = r.sae.cfg
        keys = sorted(res.terms)
        xd, err = x.double(), (x - res.x_hat).double()
        stats = torch.cat([torch.stack([res.loss.detach().double(), res.l0.double(),
                                        *[res.terms[k].double().reshape(()) for k in keys]]),
                           torch.stack([err.pow(2).sum(), xd.pow(2).sum(), xd.new_tensor(x.shape[0])]),
                           xd.sum(0)])
        all_reduce_(stats, sync, "logging")
        means = (stats[:2 + len(keys)] / sync.world).tolist()  # every rank's share has the same size
        sq_err, sq_x, n = stats[2 + len(keys):5 + len(keys)].tolist()
        centered = sq_x - float(stats[5 + len(keys):].pow(2).sum()) / n
        rec = {"step": step, "tokens": tokens, "sae": cfg.folder_name, "fvu": sq_err / max(centered, 1e-30),
               "l0": means[1], "dead_fraction": float((r.tokens_since_fired >= dead_tokens).double().mean()),
               "loss": means[0], **dict(zip(keys, means[2:])), "lr": r.optimizer.param_groups[0]["lr"]}
        lines.append((rec, f"L{cfg.layer}" if cfg.layer is not None else cfg.folder_name))
    if ctx.enabled and not sync.enabled:  # layer-parallel: every rank logs its own SAEs
        gathered = gather_objects(lines, ctx, "logging")
        lines = [rec for part in gathered for rec in part] if ctx.is_main else []
    if not ctx.is_main:
        return
    for rec, tag in lines:
        post.append(f"{tag} fvu {rec['fvu']:.3f} L0 {rec['l0']:.1f} dead {rec['dead_fraction']:.1%}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("\n".join(json.dumps(rec) for rec, _ in lines) + "\n")
    bar.set_postfix_str(" | ".join(post), refresh=False)


def _truncate_log(path: Path, step: int):
    """Drop log lines past `step` (written before an interruption, about to be redone)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())


# ---- checkpoints ----

def _cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _run_entry(r: SAERun) -> dict:
    return _cpu({"cfg": r.sae.cfg.to_dict(), "state_dict": r.sae.state_dict(), "optimizer": r.optimizer.state_dict(),
                 "tokens_since_fired": r.tokens_since_fired, "data_stats": r.data_stats, "lr": r.lr,
                 "generator": r.gen.get_state()})


def _save_checkpoint(path, runs, train_cfg, batches, step, tokens, consumed, wall, ctx: DistContext = SINGLE,
                     layer_parallel: bool = False):
    """Rank 0 writes one checkpoint: the SAEs (gathered from their owners under layer-parallelism)
    and every rank's data position."""
    state_fn = getattr(batches, "state_dict", None)
    mine = {"data_state": state_fn() if callable(state_fn) else None,
            "saes": [_run_entry(r) for r in runs] if (ctx.is_main or layer_parallel) else []}
    parts = gather_objects(mine, ctx, "checkpointing")
    if not ctx.is_main:
        return
    ckpt = {
        "version": CHECKPOINT_VERSION, "world": ctx.world, "layer_parallel": layer_parallel,
        "step": step, "tokens": tokens, "batches_consumed": consumed, "wall_s": wall,
        "train_cfg": train_cfg.to_dict(),
        "data_state": parts[0]["data_state"] if ctx.world == 1 else [p["data_state"] for p in parts],
        "saes": [entry for p in parts for entry in p["saes"]],
    }
    atomic_write_bytes(path, torch_bytes(ckpt))


def _describe_layout(world: int, layer_parallel: bool) -> str:
    if world == 1:
        return "a single process"
    return f"{world} ranks, {'layer' if layer_parallel else 'data'}-parallel"


def _deal_checkpoint(path: Path, resume: bool, cfgs, train_cfg, ctx: DistContext, layer_parallel: bool, say) -> list:
    """Rank 0: each rank's share of the checkpoint to resume ([None] * world for a fresh run)."""
    if path.exists() and not resume:
        raise FileExistsError(f"{path} exists: pass resume=True to continue that run, or use another out_dir")
    if not path.exists():
        if resume:
            say(f"no checkpoint in {path.parent}: starting a fresh run")
        return [None] * ctx.world
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt.get('version')} is not {CHECKPOINT_VERSION}")
    then, now = (ckpt["world"], ckpt["layer_parallel"]), (ctx.world, layer_parallel)
    if then != now:
        raise ValueError(f"{path} was written by {_describe_layout(*then)}; this run is {_describe_layout(*now)}. "
                         f"A run resumes only with the same number of ranks and the same mode (each rank's "
                         f"data position is part of the checkpoint); rerun it that way, or start afresh in "
                         f"another output directory")
    try:
        saved_tc = TrainConfig.from_dict(ckpt["train_cfg"]).to_dict()
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: unreadable train_cfg in the checkpoint ({e})") from e
    now_tc = train_cfg.to_dict()
    changed = sorted(k for k in now_tc if k not in _RESUME_FREE and saved_tc[k] != now_tc[k])
    if changed:
        raise ValueError(f"{path}: TrainConfig differs from the checkpoint in {changed}; "
                         "resume needs the same settings")
    if len(ckpt["saes"]) != len(cfgs):
        raise ValueError(f"{path}: checkpoint has {len(ckpt['saes'])} SAEs, {len(cfgs)} were requested")
    for cfg, saved in zip(cfgs, ckpt["saes"]):
        a = cfg.to_dict()
        b = replace(SAEConfig.from_dict(saved["cfg"]), input_scale=cfg.input_scale).to_dict()
        if a != b:
            diff = sorted(k for k in a if a[k] != b[k])
            raise ValueError(f"{path}: SAE {cfg.folder_name!r} config differs from the checkpoint in {diff}")
    parts = []
    for rank in range(ctx.world):
        lo, hi = rank_slice(len(cfgs), replace(ctx, rank=rank)) if layer_parallel else (0, len(cfgs))
        parts.append({"step": ckpt["step"], "tokens": ckpt["tokens"], "batches_consumed": ckpt["batches_consumed"],
                      "wall_s": ckpt["wall_s"], "saes": ckpt["saes"][lo:hi],
                      "data_state": ckpt["data_state"] if ctx.world == 1 else ckpt["data_state"][rank]})
    return parts


def _restore_run(saved: dict, train_cfg: TrainConfig, device) -> SAERun:
    run = new_run(SAEConfig.from_dict(saved["cfg"]), train_cfg, device, torch.Generator())  # overwritten next
    run.sae.load_state_dict(saved["state_dict"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.tokens_since_fired = saved["tokens_since_fired"].to(device)
    run.data_stats, run.lr = saved["data_stats"], saved["lr"]
    run.gen.set_state(saved["generator"])
    return run


def _resume_stream(batches, ckpt, say):
    load_fn = getattr(batches, "load_state_dict", None)
    if ckpt["data_state"] is not None and callable(load_fn):
        load_fn(ckpt["data_state"])
        return iter(batches)
    if ckpt["data_state"] is not None:
        raise ValueError("checkpoint holds a data position but the stream has no load_state_dict()")
    it = iter(batches)
    for i in range(ckpt["batches_consumed"]):
        try:
            next(it)
        except StopIteration:
            raise ValueError(f"resume: the stream ended after {i} batches, the checkpoint consumed "
                             f"{ckpt['batches_consumed']}") from None
    say(f"skipped {ckpt['batches_consumed']} batches to reach the checkpoint's data position")
    return it


# ---- held-out phases ----

class ThresholdCalibrator:
    """Finds the uniform θ at which a BatchTopK SAE's mean L0 equals k on the data it sees.

    One pass: counts of positive activations in 8192 geometric bins spanning 2^±12 around the
    training EMA (0.3% wide), then log-linear interpolation inside the bin where the count of
    activations above θ crosses k·tokens. Counts add up, so ranks merge them with one all-reduce."""

    bins = 8192
    span = 2.0 ** 12

    def __init__(self, sae: BatchTopKSAE):
        self.sae = sae
        ema = float(sae.threshold)
        self.center = ema if ema > 0 else 1.0
        self.counts = torch.zeros(self.bins + 2, dtype=torch.int64)
        self.n_tokens = 0

    @torch.no_grad()
    def update(self, x_normed: torch.Tensor):
        lo, log_range = math.log(self.center / self.span), math.log(self.span ** 2)
        rows = max(1, (1 << 22) // self.sae.cfg.d_sae)
        for s in range(0, x_normed.shape[0], rows):
            acts = torch.relu(self.sae.pre_acts(x_normed[s:s + rows]))
            pos = acts[acts > 0]
            b = ((torch.log(pos) - lo) / log_range * self.bins).floor().clamp(-1, self.bins).long() + 1
            self.counts += torch.bincount(b, minlength=self.bins + 2).cpu()
        self.n_tokens += x_normed.shape[0]

    def merge(self, sync: DistContext, device) -> None:
        """Sum the counts of every rank (a no-op in a single process)."""
        if not sync.enabled:
            return
        both = torch.cat([self.counts, torch.tensor([self.n_tokens])]).to(device)
        all_reduce_(both, sync, "the BatchTopK threshold calibration")
        self.counts, self.n_tokens = both[:-1].cpu(), int(both[-1])

    def threshold(self) -> float | None:
        """θ, or None if it falls outside the binned range (then the EMA is kept)."""
        target = self.sae.cfg.k * self.n_tokens
        if self.n_tokens == 0 or int(self.counts.sum()) < target:
            return 0.0 if self.n_tokens else None  # fewer positives than k per token: keep them all
        above = int(self.counts[-1])
        if above >= target:
            return None
        edge = lambda i: self.center / self.span * self.span ** (2 * i / self.bins)  # noqa: E731
        for i in range(self.bins, 0, -1):  # bin i covers [edge(i-1), edge(i))
            c = int(self.counts[i])
            if above + c >= target:
                frac = (target - above) / c
                return edge(i) * (edge(i - 1) / edge(i)) ** frac
            above += c
        return None


def _take_tokens(it, n_tokens: int, world: int = 1):
    """Yield batches until n_tokens tokens of the global stream (this rank's rows × world, counted on
    the first hook) have been handed out."""
    seen = 0
    while seen < n_tokens:
        try:
            batch = next(it)
        except StopIteration:
            return
        first = next(iter(batch.values()))
        seen += first.numel() // first.shape[-1] * world
        yield batch


def _calibrate_thresholds(runs, it, train_cfg, device, say, sync: DistContext = SINGLE,
                          calibrate: bool = True) -> dict:
    """Calibrate this rank's BatchTopK SAEs; `calibrate`: whether any SAE of the run needs the phase."""
    calibrators = {id(r): ThresholdCalibrator(r.sae) for r in runs if isinstance(r.sae, BatchTopKSAE)}
    if not calibrate or train_cfg.calibration_tokens <= 0:
        return {}
    for batch in _take_tokens(it, train_cfg.calibration_tokens, sync.world):
        for r in runs:
            if id(r) in calibrators:
                calibrators[id(r)].update(_hook_batch(batch, r.sae.cfg.hook_name, device) * r.sae.cfg.input_scale)
    result = {}
    for r in runs:
        if id(r) not in calibrators:
            continue
        cal, ema = calibrators[id(r)], float(r.sae.threshold)
        cal.merge(sync, device)
        theta = cal.threshold()
        if theta is None:
            say(f"{r.sae.cfg.folder_name}: could not calibrate the threshold on {cal.n_tokens} tokens; "
                f"keeping the EMA {ema:.4g}")
            theta = ema
        r.sae.threshold.fill_(theta)
        result[id(r)] = {"threshold_ema": ema, "threshold_calibrated": theta, "calibration_tokens": cal.n_tokens}
    return result


@torch.no_grad()
def _evaluate(runs, it, train_cfg, device, say, sync: DistContext = SINGLE) -> list[SAEMetrics | None]:
    """Held-out metrics of the exported SAEs; under data-parallelism merged on rank 0 (None elsewhere)."""
    if train_cfg.eval_tokens <= 0:
        return [None] * len(runs)
    exported = [r.sae.export() for r in runs]
    accs = [SAEMetrics(r.sae.cfg.d_sae) for r in runs]
    for batch in _take_tokens(it, train_cfg.eval_tokens, sync.world):
        for sae, acc in zip(exported, accs):
            x = _hook_batch(batch, sae.cfg.hook_name, device)
            codes = sae.encode(x)
            acc.update(x, sae.decode(codes), codes)
    if sync.enabled:
        states = [gather_objects(_cpu(vars(acc)), sync, "the held-out evaluation") for acc in accs]
        if not sync.is_main:
            return [None] * len(runs)
        accs = [_merge_metrics(parts, acc.d_sae) for parts, acc in zip(states, accs)]
    if accs[0].n_tokens == 0:
        say("no held-out tokens left in the stream: skipping evaluation (no eval.json metrics, no sparsity file)")
        return [None] * len(runs)
    return accs


def _merge_metrics(states: list[dict], d_sae: int) -> SAEMetrics:
    """One SAEMetrics from several ranks' accumulators (Chan et al.'s merge of mean and M2)."""
    acc = SAEMetrics(d_sae)
    for s in states:
        n = s["n_tokens"]
        if n == 0:
            continue
        if acc.mean is None:
            acc.mean, acc.m2 = s["mean"], s["m2"]
        else:
            total = acc.n_tokens + n
            delta = s["mean"] - acc.mean
            acc.m2 = acc.m2 + s["m2"] + delta.pow(2) * (acc.n_tokens * n / total)
            acc.mean = acc.mean + delta * (n / total)
        acc.n_tokens += n
        acc.fire_counts += s["fire_counts"]
        acc.sums = {k: acc.sums[k] + s["sums"][k] for k in acc.sums}
    return acc


def _export(r: SAERun, acc, thresholds, train_cfg, out: Path, step, tokens, wall, dead_tokens,
            write: bool = True) -> SAE:
    r.sae.cfg = replace(r.sae.cfg, train_tokens=tokens)
    sae = r.sae.export()
    if not write:
        return sae
    training = {"steps": step, "tokens": tokens, "wall_s": round(wall, 3),
                "tokens_per_s": tokens / wall if wall > 0 else None,
                "lr": r.lr, "dead_window_tokens": dead_tokens,
                "dead_fraction_train": float((r.tokens_since_fired >= dead_tokens).double().mean()),
                **r.data_stats, **thresholds.get(id(r), {})}
    report = {"sae": sae.cfg.folder_name, "hook_name": sae.cfg.hook_name, "layer": sae.cfg.layer,
              "architecture": r.sae.cfg.architecture, "exported_as": sae.cfg.architecture,
              "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k, "training": training,
              "decoder_max_cosine": decoder_max_cosine(sae.W_dec)}
    sparsity = None
    if acc is not None:
        report["metrics"] = acc.compute()
        sparsity = acc.log10_density()
        report["log10_density_histogram"] = log_density_histogram(sparsity)
    state = {"cfg": r.sae.cfg.to_dict(), "train_cfg": train_cfg.to_dict(), "state_dict": r.sae.state_dict(),
             "optimizer": r.optimizer.state_dict(), "tokens_since_fired": r.tokens_since_fired.cpu(),
             "step": step, "tokens": tokens, "data_stats": r.data_stats}
    extra = {"train_tokens": tokens}
    if acc is not None:
        extra.update(fvu=report["metrics"]["fvu"], l0=report["metrics"]["l0"])
    folder = out / sae.cfg.folder_name
    save_sae(sae, folder, sparsity=sparsity, extra=extra,
             extra_files={"eval.json": json.dumps(report, indent=2).encode(), "training_state.pt": torch_bytes(state)})
    if train_cfg.export_sparsify and sae.cfg.architecture == "topk":
        save_sparsify(sae, out / "sparsify" / sae.cfg.folder_name)
    return sae


def _gather_saes(mine: list[SAE], ctx: DistContext, device) -> list[SAE]:
    """Layer-parallel: every owner's exported SAEs, in config order, on rank 0 (others keep theirs)."""
    parts = gather_objects([(s.cfg.to_dict(), _cpu(s.state_dict())) for s in mine], ctx, "collecting the SAEs")
    if not ctx.is_main:
        return mine
    saes = []
    for cfg, state in (item for part in parts for item in part):
        sae = build_sae(SAEConfig.from_dict(cfg), torch.Generator())  # its init is overwritten
        sae.load_state_dict(state)
        saes.append(sae.to(device))
    return saes
