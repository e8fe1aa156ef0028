"""
Mine SAE features into the DuckDB feature store: one pass over held-out text for every SAE.

    corpus (held-out split) -> BOS-aligned windows -> batches
      -> one model forward per batch, stopped after the deepest hooked block, capturing every
         SAE's hook point at once
      -> each SAE encodes the batch's non-BOS tokens; the non-zero (token, latent, activation)
         triplets update that SAE's mergeable statistics (atlas/stats.py)
    end of pass -> tables from the statistics, plus decoder geometry (logit effects through the
    unembedding, decoder-cosine neighbours) and rule-based labels (atlas/labels.py), written to
    the store in one transaction.

Notable choices:
- Exact where it can be: top-k examples are the exact top activations of the whole pass (ties:
  earliest position); densities, counts and histogram counts are exact integers; the activation
  histogram has exact bins over [0, 2^e] (see stats.ActivationHistogram).
- Interval examples are a uniform random sample of the non-zero activations (a bottom-k priority
  sample keyed by a hash of the position), binned at the end into `n_bins` quantile bins whose
  edges sit on the boundaries of an exact 1024-bin histogram (`quantile_bins`): each edge is the
  first boundary with at least j/n_bins of the activations below it, so edges are within one fine
  bin of the true quantiles and `frac` (the bin's share of the non-zero activations) is exact.
  Each bin's examples are a uniform sample of that bin; a bin may hold fewer than `per_bin`
  examples when few sampled activations fall in it (`interval_oversample` makes that rare).
- Windows come from the model's own BOS-aligned windows: `ctx_before` tokens before and
  `ctx_after` after the activating token, clipped at the window's ends, BOS included where
  reached (its activation is 0: BOS is never encoded nor counted). `token_pos` is the document
  position (BOS = 0).
- Resumable: every `chunk_tokens` the whole state (statistics + stream position) is saved to
  `<store>.mine-state/rank<r>-of-<world>.pt` atomically, and once more at the end of the pass; a
  rerun with the same inputs (fingerprint of SAE weights, model file, corpus files and settings)
  and the same number of ranks resumes there and ends with the same store as an uninterrupted
  run. The state is removed once the store is written; a store whose meta already holds this
  fingerprint is left alone.
- torchrun (`ctx`): rank r mines its share of the split (`iter_shard_documents`: row groups or
  documents dealt out in turn, document ids those of the whole split) and of the token budget.
  After each step (setup, where every rank must see the same inputs; loading the saved state;
  the pass; merging and writing) the ranks meet (`_together`, `agree`), so a failure on any rank
  is raised on every rank and nothing is merged or written after it. Rank 0 receives every
  rank's statistics, one rank and one SAE at a time, merges them (exactly: stats.py) and alone
  writes the store. Over the whole split the store is the one a single process writes:
  statistics are order-independent, sums included (fixed point, stats.to_fixed).
- Coactivation neighbours rank other latents by the Jaccard index of their firing sets over the
  whole pass, from d_sae x d_sae int32 counts of co-firing among each token's `coactivation_top`
  (64) strongest latents: exact for TopK SAEs with k <= 64 and any token with at most 64 active
  latents; the cap bounds a cost that grows with the square of the active count. Above
  `coactivation_max_features` latents (1 GiB of counts at 16k) they are skipped and the meta
  says so.
- Logit effects are W_dec[f] @ W_U^T with W_U = lm_head.weight[:vocab] (kind 'raw'); for MLP
  hidden-layer hooks (hook_mlp_post) the direction is first mapped through c_proj. When the model
  reports a residual gain g != 1 for the SAE's layer (2026 nanochat: residual scalars and
  backout), 'gain_corrected' = raw x g is stored too; every hook of block L (resid_pre/mid/post,
  attn_out, mlp_out, mlp_post) writes into the stream that reaches resid_post(L), so all use g(L).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from itertools import dropwhile
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from atlas import labels as L
from atlas import store
from atlas.stats import SaeStats, TokenCounts, position_keys, split_keys
from atlas.tokens_display import visible_token
from nanochat.common import autocast
from nanochat.dataset import (iter_batches, iter_indexed_windows, iter_shard_documents,
                              list_corpus_files)
from nanochat.distributed import DistContext, RankFailure, agree, broadcast_object, rank_slice
from sae.hooks import parse_hook_name, run_with_capture
from sae.io import CFG_FILE, SPARSIFY_WEIGHTS_FILE, WEIGHTS_FILE, load_sae

STATE_VERSION = 2  # 2: fixed-point sums, one state file per rank
PER_SAE_TABLES = ("saes", "features", "examples", "interval_bins", "logit_effects", "histograms",
                  "neighbors", "token_features", "position_profile", "lineage")
ULTRA_LOW_DENSITY = 1e-5
DENSE_DENSITY = 0.1


@dataclass
class MineConfig:
    tokens: int | None = 4_000_000  # non-BOS tokens to mine (None: the whole held-out split)
    split: str = "val"              # which split of the corpus ('val' = held out)
    seq_len: int | None = None      # window length; None: the SAEs' context_size, else the model's
    batch_tokens: int = 16_384      # tokens per forward (padded windows x seq_len)
    chunk_tokens: int = 2_000_000   # tokens between resumable state saves
    top_k: int = 20                 # top examples per latent
    n_bins: int = 5                 # interval (quantile) bins
    per_bin: int = 5                # examples per interval bin
    interval_oversample: int = 3    # sampled windows per latent = n_bins x per_bin x this
    ctx_before: int = 24            # window tokens before the activating token
    ctx_after: int = 8              # window tokens after it
    hist_bins: int = 64             # activation histogram bins shown (power of two)
    quantile_bins: int = 1024       # exact histogram bins behind the quantile edges (power of two)
    logit_hist_bins: int = 50       # logit-effect histogram bins
    n_logits: int = 10              # top positive / negative logit tokens
    n_neighbors: int = 10           # neighbours per latent and kind
    n_lineage: int = 3              # nearest features in each adjacent layer's SAE
    token_top: int = 10             # features kept per vocabulary token (token_features)
    label_negatives: int = 1024     # random positions sampled as label-scoring negatives
    coactivation_max_features: int = 16_384  # wider SAEs skip coactivation (d² int32 counts)
    coactivation_top: int = 64      # pairs counted among each token's strongest active latents
    check_model: bool = True        # refuse SAEs trained on another model/checkpoint
    seed: int = 0
    force: bool = False             # mine even if the store already holds this fingerprint

    def __post_init__(self):
        if self.tokens is not None and self.tokens <= 0:
            raise ValueError(f"MineConfig.tokens={self.tokens}: expected a positive count or None")
        for key in ("batch_tokens", "chunk_tokens", "top_k", "n_bins", "per_bin",
                    "interval_oversample", "n_logits", "token_top"):
            if getattr(self, key) <= 0:
                raise ValueError(f"MineConfig.{key}={getattr(self, key)}: expected > 0")
        for key in ("hist_bins", "quantile_bins"):
            n = getattr(self, key)
            if n < 2 or n & (n - 1):
                raise ValueError(f"MineConfig.{key}={n}: expected a power of two >= 2")
        if self.quantile_bins < self.hist_bins:
            raise ValueError(f"MineConfig.quantile_bins={self.quantile_bins} must be >= "
                             f"hist_bins={self.hist_bins}")
        if self.ctx_before < 0 or self.ctx_after < 0:
            raise ValueError("MineConfig.ctx_before/ctx_after must be >= 0")

    @property
    def window(self) -> int:
        return self.ctx_before + 1 + self.ctx_after


def find_saes(sae_dir) -> list[Path]:
    """SAE folders under sae_dir (itself, or any folder below): SAELens folders (cfg.json +
    sae_weights.safetensors); sparsify folders only where there are none (sae_train's
    --export-sparsify writes sparsify copies of the same SAEs next to them). Hidden folders
    (temporaries of atomic writes) are skipped."""
    root = Path(sae_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"SAE directory not found: {root}")
    folders = [p.parent for p in sorted(root.rglob(CFG_FILE))
               if not any(part.startswith(".") for part in p.parent.relative_to(root).parts)]
    found = [f for f in folders if (f / WEIGHTS_FILE).exists()] or \
        [f for f in folders if (f / SPARSIFY_WEIGHTS_FILE).exists()]
    if not found:
        raise FileNotFoundError(f"no SAE folders ({CFG_FILE} + {WEIGHTS_FILE}) in {root}")
    return found


def mine_features(sae_paths: list[Path], source, corpus: Path, store_path: Path,
                  cfg: MineConfig, quiet: bool = False, ctx: DistContext | None = None) -> dict:
    """Mine every SAE in one pass over `corpus` (its cfg.split) and write `store_path`.

    `ctx` (nanochat.distributed.init_distributed under torchrun; default: one process): each
    rank mines its share, rank 0 merges every rank's statistics and alone writes the store and
    prints. A failure on any rank raises RankFailure on every rank, and nothing is written.

    Returns a summary, the same on every rank: store, sae_ids, fingerprint, ranks, skipped,
    written (whether this rank wrote the store), tokens, documents, seconds, pass_seconds (the
    streaming pass of the slowest rank), finalize_seconds (merge, tables, labels, writing),
    tokens_per_s (of the pass, all ranks together), resumed_from (tokens already mined by an
    interrupted run, all ranks together)."""
    ctx = ctx or DistContext()
    quiet = quiet or not ctx.is_main  # only rank 0 talks
    t0 = time.time()
    store_path = Path(store_path)
    state_dir = store_path.with_name(store_path.name + ".mine-state")
    model, tokenizer = source.model, source.tokenizer
    saes, corpus, corpus_files, seq_len, fingerprint, current = _together(
        ctx, _prepare, sae_paths, source, corpus, store_path, cfg, ctx)
    current = _same_inputs(ctx, fingerprint, current)
    summary = {"store": str(store_path), "sae_ids": [s.sae_id for s in saes],
               "fingerprint": fingerprint, "ranks": ctx.world}
    if current:
        _log(quiet, f"{store_path} is up to date with these inputs (fingerprint {fingerprint[:12]})")
        return {**summary, "skipped": True, "written": False, "tokens": None, "documents": None,
                "seconds": 0.0, "pass_seconds": 0.0, "finalize_seconds": 0.0,
                "tokens_per_s": None, "resumed_from": None}

    run = _together(ctx, _Run, saes, cfg, seq_len, tokenizer.get_vocab_size(), model.get_device(), ctx)
    resumed = _together(ctx, run.load, state_dir, fingerprint, cfg.force, quiet)
    for p in run.stale_states(state_dir):  # after the meeting: every rank has looked
        p.unlink(missing_ok=True)
    if resumed:
        who = "" if ctx.world == 1 else f"rank 0 of {ctx.world}: "
        _log(quiet, f"resuming from {state_dir}: {who}{resumed:,} tokens already mined")
    _together(ctx, run.mine, model, tokenizer, corpus, state_dir, fingerprint, quiet)
    t_final = time.time()
    totals = _together(ctx, _finish, run, source, corpus, corpus_files, seq_len, store_path,
                       state_dir, fingerprint, cfg, quiet)
    totals = broadcast_object(ctx, totals)
    if not ctx.is_main:  # rank 0 removed the state dir it sees; ranks on other nodes see their own
        run.state_file(state_dir).unlink(missing_ok=True)
        _remove_if_empty(state_dir)
    seconds = time.time() - t0
    _log(quiet, f"mined {totals['tokens']:,} tokens of {totals['documents']:,} documents for "
                f"{len(saes)} SAE(s) in {seconds:.1f}s -> {store_path}")
    return {**summary, **totals, "skipped": False, "written": ctx.is_main, "seconds": seconds,
            "finalize_seconds": time.time() - t_final,
            "tokens_per_s": (totals["tokens"] - totals["resumed_from"]) / max(totals["pass_seconds"], 1e-9)}


def _prepare(sae_paths, source, corpus, store_path: Path, cfg: MineConfig, ctx: DistContext):
    """SAEs, corpus, window length, fingerprint, and whether the store is already current (rank
    0's view: the store lives where rank 0 writes it)."""
    saes = _load_saes([Path(p) for p in sae_paths], source, cfg, source.model.get_device())
    corpus = Path(corpus)
    corpus_files = list_corpus_files(corpus)
    seq_len = _seq_len(cfg, saes, source.model)
    fingerprint = _fingerprint(saes, source, corpus_files, seq_len, cfg, ctx.world)
    current = ctx.is_main and not cfg.force and \
        _store_is_current(store_path, fingerprint, [s.sae_id for s in saes])
    return saes, corpus, corpus_files, seq_len, fingerprint, current


def _finish(run: "_Run", source, corpus: Path, corpus_files, seq_len: int, store_path: Path,
            state_dir: Path, fingerprint: str, cfg: MineConfig, quiet: bool) -> dict | None:
    """Rank 0: merge every rank's statistics, build the tables and write the store (then drop
    the saved state). Other ranks: send their statistics. Returns rank 0's totals."""
    counters = run.merge_ranks()
    if not run.ctx.is_main:
        return None
    tokens = sum(c["n_tokens"] for c in counters)
    if tokens == 0:
        raise ValueError(f"empty corpus: the {cfg.split!r} split of {corpus} has no tokens to mine")
    model, tokenizer = source.model, source.tokenizer
    vocab = L.Vocab(tokenizer.all_token_bytes(), tokenizer.get_bos_token_id(),
                    run.token_counts.count.cpu().tolist())
    lineage = _lineage(run.saes, cfg)
    tables = [{**_sae_tables(s, run, model, tokenizer, vocab, cfg), "lineage": lineage[s.sae_id]}
              for s in run.saes]
    meta = _meta(source, corpus, corpus_files, seq_len, run, cfg, fingerprint)
    _write_store(store_path, tables, _vocab_table(tokenizer), run.token_counts.count.cpu().numpy(),
                 meta, source)
    shutil.rmtree(state_dir, ignore_errors=True)
    return {"tokens": run.n_tokens, "documents": run.n_docs,
            "resumed_from": sum(c["resumed_from"] for c in counters),
            "pass_seconds": max(c["pass_seconds"] for c in counters)}


# ----------------------------------------------------------------------------- ranks

def _together(ctx: DistContext, fn, *args):
    """fn(*args) on every rank, then a meeting point: if it failed on any rank, every rank
    raises (one process: the error itself). A failed rank says so at once, since the others
    may take long to reach the meeting point."""
    try:
        out, error = fn(*args), None
    except Exception as e:
        out, error = None, e
        if ctx.enabled:
            print(f"rank {ctx.rank}: {type(e).__name__}: {e} (stopping at the next meeting point)",
                  file=sys.stderr)
    agree(ctx, error)
    return out


def _same_inputs(ctx: DistContext, fingerprint: str, current: bool) -> bool:
    """Check that every rank mines the same inputs (shares of different corpora would merge into
    nonsense); rank 0's view of the store decides for all."""
    if not ctx.enabled:
        return current
    views: list = [None] * ctx.world
    dist.all_gather_object(views, (fingerprint, current))
    differ = [r for r, (fp, _) in enumerate(views) if fp != views[0][0]]
    if differ:
        raise RankFailure(f"rank(s) {differ} see other inputs than rank 0 (SAE weights, model "
                          f"file, corpus files or settings differ); every rank must read the "
                          f"same files. Nothing was mined.")
    return bool(views[0][1])


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # absent, or other ranks' files still there
        pass


# ----------------------------------------------------------------------------- SAEs

@dataclass
class _Sae:
    sae_id: str
    path: Path
    sae: torch.nn.Module
    hook: str           # full hook name, e.g. blocks.4.hook_resid_post
    kind: str           # hook kind, e.g. hook_resid_post
    layer: int
    cfg_json: str
    evals: dict


def _load_saes(paths: list[Path], source, cfg: MineConfig, device) -> list[_Sae]:
    if not paths:
        raise ValueError("no SAEs to mine")
    model = source.model
    out = []
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"SAE directory not found: {path}")
        sae = load_sae(path, device=str(device)).eval()
        c = sae.cfg
        try:
            point = parse_hook_name(c.hook_name, model.config.n_layer)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        width = model.config.n_embd * (4 if point.kind == "hook_mlp_post" else 1)
        if c.d_in != width:
            raise ValueError(f"{path}: the SAE's d_in is {c.d_in} but {c.hook_name} of "
                             f"{source.model_id} has width {width}")
        if cfg.check_model:
            _check_trained_on(path, c, source)
        out.append(_Sae("", path, sae, c.hook_name, point.kind, point.layer,
                        (path / CFG_FILE).read_text(), _read_evals(path)))
    hooks = [s.hook for s in out]
    for s in out:
        s.sae_id = s.hook if hooks.count(s.hook) == 1 else s.path.name
    ids = [s.sae_id for s in out]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"several SAEs would get the sae_id(s) {dup}; give SAEs of the same hook "
                         f"distinct folder names")
    return out


def _check_trained_on(path: Path, c, source) -> None:
    if c.model_id and c.model_id != source.model_id:
        raise ValueError(f"{path}: this SAE was trained on model {c.model_id!r}, but the model "
                         f"being mined is {source.model_id!r} ({source.checkpoint_dir}); pass "
                         f"--checkpoint for the SAE's model")
    if not c.checkpoint:
        return
    ours = Path(source.checkpoint_dir)
    model_file = ours / f"model_{source.step:06d}.pt"
    theirs = Path(c.checkpoint).expanduser()
    same = (theirs.exists() and theirs.resolve() in (ours.resolve(), model_file.resolve())) or \
        theirs.parts[-2:] in (ours.parts[-2:], model_file.parts[-2:])
    if not same:
        raise ValueError(f"{path}: this SAE was trained on checkpoint {c.checkpoint}, but the "
                         f"model being mined is {model_file}; pass --checkpoint for the SAE's "
                         f"model (or --no-check-model to mine anyway)")


def _read_evals(path: Path) -> dict:
    """fvu, l0, dead_frac, delta_ce, kl, ce_recovered from eval.json: the held-out "val" section
    (sae.evaluator) first, then the trainer's "metrics", then the top level."""
    f = path / "eval.json"
    if not f.exists():
        return {}
    try:
        raw = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{f}: expected a JSON object")
    aliases = {"fvu": ("fvu",), "l0": ("l0",), "dead_frac": ("dead_frac", "dead_fraction"),
               "delta_ce": ("delta_ce",), "kl": ("kl",), "ce_recovered": ("ce_recovered",)}
    scopes = [raw.get("val"), raw.get("metrics"), raw]
    out = {}
    for key, names in aliases.items():
        for scope in scopes:
            if not isinstance(scope, dict):
                continue
            hit = next((scope[n] for n in names if isinstance(scope.get(n), (int, float))), None)
            if hit is not None:
                out[key] = float(hit) if math.isfinite(hit) else None
                break
    return out


def _seq_len(cfg: MineConfig, saes: list[_Sae], model) -> int:
    if cfg.seq_len is not None:
        return cfg.seq_len
    sizes = {s.sae.cfg.context_size for s in saes}
    if len(sizes) == 1 and (size := sizes.pop()) and size >= 2:
        return min(size, model.config.sequence_len)
    return model.config.sequence_len


# ----------------------------------------------------------------------------- the pass

class _Run:
    """One rank's statistics of every SAE plus where its stream stands; saved and loaded as one
    file per rank."""

    def __init__(self, saes, cfg: MineConfig, seq_len: int, vocab_size: int, device,
                 ctx: DistContext):
        self.saes, self.cfg, self.seq_len, self.device, self.ctx = saes, cfg, seq_len, device, ctx
        self.vocab_size = vocab_size
        self.budget = None  # this rank's share of the token budget
        if cfg.tokens is not None:
            start, end = rank_slice(cfg.tokens, ctx)
            self.budget = end - start
        self.stats = {s.sae_id: self._new_stats(s) for s in saes}
        self.token_counts = TokenCounts(vocab_size, device)
        self.n_tokens = 0
        self.n_docs = 0
        self.last_window: tuple[int, int] | None = None  # (doc_id, pos0) of the last window done
        self.resumed_from = 0
        self.pass_seconds = 0.0

    def _new_stats(self, s) -> SaeStats:
        cfg = self.cfg
        return SaeStats(
            s.sae.cfg.d_sae, self.vocab_size, cfg.window, cfg.top_k,
            cfg.n_bins * cfg.per_bin * cfg.interval_oversample, cfg.label_negatives,
            cfg.quantile_bins,
            cfg.coactivation_top if s.sae.cfg.d_sae <= cfg.coactivation_max_features else None,
            cfg.seed, self.device)

    def mine(self, model, tokenizer, corpus, state_dir: Path, fingerprint: str, quiet: bool):
        """The pass of this rank, then its state saved: a failed merge or write, rerun, goes
        straight to merging."""
        t = time.time()
        self.stream(model, tokenizer, corpus, state_dir, fingerprint, quiet)
        self.pass_seconds = time.time() - t
        if self.n_tokens:
            self.save(state_dir, fingerprint)

    def stream(self, model, tokenizer, corpus, state_dir: Path, fingerprint: str, quiet: bool):
        """Mine from where the state stands to this rank's budget or the end of its share."""
        cfg, budget = self.cfg, self.budget
        if budget is not None and self.n_tokens >= budget:
            return
        batch_windows = max(1, cfg.batch_tokens // self.seq_len)
        hooks = sorted({s.hook for s in self.saes})
        docs = iter_shard_documents(corpus, cfg.split, self.ctx.rank, self.ctx.world)
        last = self.last_window
        if last is not None:
            docs = dropwhile(lambda d: d[0] < last[0], docs)
        windows = iter_indexed_windows(docs, tokenizer, self.seq_len)
        if last is not None:
            windows = dropwhile(lambda w: (w.doc_id, w.pos0) <= last, windows)
        bar = _progress(budget, self.n_tokens, quiet,
                        "mining" if self.ctx.world == 1 else f"mining (rank 0 of {self.ctx.world})")
        since_save = 0
        try:
            for batch in iter_batches(windows, batch_windows, tokenizer.get_bos_token_id()):
                left = None if budget is None else budget - self.n_tokens
                n = self.process(model, hooks, batch, left)
                self.last_window = (int(batch.doc_ids[-1]), int(batch.pos0[-1]))
                bar.update(n)
                since_save += n
                if budget is not None and self.n_tokens >= budget:
                    break
                if since_save >= cfg.chunk_tokens:
                    self.save(state_dir, fingerprint)
                    since_save = 0
        finally:
            bar.close()

    @torch.inference_mode()
    def process(self, model, hooks: list[str], batch, budget: int | None) -> int:
        """One batch through the model and every SAE; returns the tokens mined."""
        b = _Batch.build(batch, budget, self.cfg, self.device)
        if b.n == 0:
            return 0
        with autocast(self.device):
            acts = run_with_capture(model, b.idx, hooks)
        self.token_counts.update(b.token)
        for s in self.saes:
            x = acts[s.hook].reshape(b.idx.numel(), -1)[b.flat].float()
            codes, rows, group, value = _encode(s.sae, x)
            self.stats[s.sae_id].update(
                b.key, b.token, b.position, rows, group, value,
                windows=lambda r, f, codes=codes: b.windows(r, f, codes),
                active=lambda r, codes=codes: codes[r] > 0)
        self.n_tokens += b.n
        self.n_docs = max(self.n_docs, b.last_doc + 1)
        return b.n

    # -------------------------------------------------------------- merging ranks

    def counters(self) -> dict:
        return {"n_tokens": self.n_tokens, "n_docs": self.n_docs,
                "resumed_from": self.resumed_from, "pass_seconds": self.pass_seconds}

    def merge_ranks(self) -> list[dict]:
        """Rank 0 receives the other ranks' statistics, one rank and one SAE at a time (so it
        holds its own state plus one SAE's of one other rank), and merges them into its own;
        the other ranks send theirs. Returns every rank's counters (rank 0) or [its own]."""
        ctx = self.ctx
        if not ctx.enabled:
            return [self.counters()]
        if not ctx.is_main:
            _send(self.counters())
            _send(self.token_counts.state_dict())
            for s in self.saes:
                _send(self.stats[s.sae_id].state_dict())
            return [self.counters()]
        counters = [self.counters()]
        for r in range(1, ctx.world):
            counters.append(_recv(r))
            other = TokenCounts(self.vocab_size, self.device)
            other.load_state_dict(_recv(r))
            self.token_counts.merge(other)
            for s in self.saes:
                other = self._new_stats(s)
                other.load_state_dict(_recv(r))
                self.stats[s.sae_id].merge(other)
                del other
        self.n_tokens = sum(c["n_tokens"] for c in counters)
        self.n_docs = max(c["n_docs"] for c in counters)  # doc ids are global
        return counters

    # -------------------------------------------------------------- state

    def state_file(self, state_dir: Path) -> Path:
        return state_dir / f"rank{self.ctx.rank}-of-{self.ctx.world}.pt"

    def _state_key(self, fingerprint: str) -> str:
        """A state resumes only the same rank of a run of the same inputs and world size."""
        return f"{fingerprint}/rank{self.ctx.rank}-of-{self.ctx.world}"

    def save(self, state_dir: Path, fingerprint: str) -> None:
        state = {"version": STATE_VERSION, "key": self._state_key(fingerprint),
                 "n_tokens": self.n_tokens, "n_docs": self.n_docs, "last_window": self.last_window,
                 "token_counts": self.token_counts.state_dict(),
                 "stats": {k: v.state_dict() for k, v in self.stats.items()}}
        state_dir.mkdir(parents=True, exist_ok=True)
        f = self.state_file(state_dir)
        tmp = f.with_name(f.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, f)

    def stale_states(self, state_dir: Path) -> list[Path]:
        """Saved states of runs with another number of ranks: they cannot be resumed."""
        return sorted(p for p in state_dir.glob("*.pt") if not p.name.endswith(f"-of-{self.ctx.world}.pt"))

    def load(self, state_dir: Path, fingerprint: str, force: bool, quiet: bool) -> int:
        """Load this rank's saved state of the same inputs; returns the tokens it had mined (0:
        none)."""
        f = self.state_file(state_dir)
        stale = self.stale_states(state_dir)
        if stale:
            _log(quiet, f"{state_dir} holds the state of a run with another number of ranks "
                        f"({', '.join(p.name for p in stale)}); this run has {self.ctx.world}, "
                        f"so it starts over")
        if force or not f.exists():
            return 0
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception:  # a state from an older build or a truncated disk: start over
            return 0
        if state.get("version") != STATE_VERSION or state.get("key") != self._state_key(fingerprint):
            return 0
        self.token_counts.load_state_dict(state["token_counts"])
        for k, v in self.stats.items():
            v.load_state_dict(state["stats"][k])
        self.n_tokens, self.n_docs = int(state["n_tokens"]), int(state["n_docs"])
        self.last_window = tuple(state["last_window"]) if state["last_window"] else None
        self.resumed_from = self.n_tokens
        return self.n_tokens


def _send(obj) -> None:
    dist.send_object_list([obj], dst=0)


def _recv(rank: int):
    box = [None]
    dist.recv_object_list(box, src=rank)
    return box[0]


def _encode(sae, x: torch.Tensor):
    """Dense codes and their non-zero (row, latent, value) triplets, rows ascending and latents
    ascending within a row. A TopK SAE's sparse encode already says where its non-zeros are, so
    the dense codes are not scanned (the dense codes are built exactly as its `encode` does)."""
    if hasattr(sae, "encode_topk"):
        values, indices = sae.encode_topk(x)
        indices, order = indices.sort(dim=1)
        values = values.gather(1, order).float()
        codes = torch.zeros(x.shape[0], sae.cfg.d_sae, dtype=values.dtype,
                            device=x.device).scatter_(1, indices, values)
        keep = (values > 0).reshape(-1)
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(indices.shape[1])
        return codes, rows[keep], indices.reshape(-1)[keep], values.reshape(-1)[keep]
    codes = sae.encode(x).float()
    rows, group = (codes > 0).nonzero(as_tuple=True)
    return codes, rows, group, codes[rows, group]


@dataclass
class _Batch:
    """A padded batch with its mined positions: flat indices into (B, T), their keys and tokens."""
    idx: torch.Tensor       # (B, T) token ids on the device
    grid: torch.Tensor      # (B, T) index of each mined token into the flat arrays, else -1
    flat: torch.Tensor      # (N,) mined positions as flat indices into (B, T)
    key: torch.Tensor       # (N,) doc_id << 32 | token_pos
    token: torch.Tensor     # (N,) token ids
    position: torch.Tensor  # (N,) position in the model's window (1..T-1)
    n: int
    last_doc: int
    before: int
    after: int

    @classmethod
    def build(cls, batch, budget: int | None, cfg: MineConfig, device) -> "_Batch":
        valid = batch.valid.reshape(-1)
        if budget is not None and int(valid.sum()) > budget:
            valid = valid & (torch.cumsum(valid, 0) <= budget)
        flat = valid.nonzero().squeeze(1)
        B, T = batch.idx.shape
        row, t = flat // T, flat % T
        doc = batch.doc_ids[row]
        key = position_keys(doc, batch.pos0[row] + t - 1)
        grid = torch.full((B * T,), -1, dtype=torch.int64)
        grid[flat] = torch.arange(flat.numel())
        idx = batch.idx.to(device)
        return cls(idx, grid.view(B, T).to(device), flat.to(device), key.to(device),
                   idx.reshape(-1)[flat.to(device)], t.to(device), flat.numel(),
                   int(doc.max()) if flat.numel() else -1, cfg.ctx_before, cfg.ctx_after)

    def windows(self, rows: torch.Tensor, feats: torch.Tensor | None, codes: torch.Tensor) -> dict:
        """Token windows around mined tokens `rows` and latent `feats`' activations on them."""
        B, T = self.idx.shape
        offsets = torch.arange(-self.before, self.after + 1, device=rows.device)
        pos = self.flat[rows]
        b = (pos // T)[:, None]
        t = (pos % T)[:, None] + offsets
        tc = t.clamp(0, T - 1)
        g = self.grid[b, tc]
        mined = (t >= 0) & (t < T) & (g >= 0)
        inside = mined | (t == 0)  # BOS opens every window and is shown, never encoded
        tokens = torch.where(inside, self.idx[b, tc], -1).to(torch.int32)
        if feats is None:
            return {"tokens": tokens}
        acts = torch.where(mined, codes[g.clamp(min=0), feats[:, None]], 0.0)
        return {"tokens": tokens, "acts": acts}


def _progress(total, initial, quiet, desc: str = "mining"):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc=desc,
                dynamic_ncols=True, disable=quiet or not sys.stderr.isatty())


# ----------------------------------------------------------------------------- tables

def _sae_tables(s: _Sae, run: _Run, model, tokenizer, vocab: L.Vocab,
                cfg: MineConfig) -> dict[str, pa.Table]:
    """Every per-SAE table of the store (lineage aside, which needs all SAEs)."""
    st = run.stats[s.sae_id]
    top = _slot_examples(st.top, "top", None, cfg)
    bins, intervals = _interval_examples(st, cfg)
    logits, logit_hist, label_logits = _logit_effects(s, model, tokenizer.get_vocab_size(), cfg)
    histograms = pa.concat_tables([_activation_histograms(st, cfg.hist_bins), logit_hist])
    tables = {
        "saes": _saes_row(s, run, model),
        "features": _feature_table(st, _labels(st, top, intervals, label_logits, vocab, cfg)),
        "examples": _concat_examples([top, intervals]),
        "interval_bins": bins,
        "logit_effects": logits,
        "histograms": histograms,
        "neighbors": _neighbors(s, st, cfg),
        "token_features": _token_features(st, run.token_counts, cfg),
        "position_profile": _position_profile(st),
    }
    return {name: t if name == "saes" else _with_sae(t, s.sae_id) for name, t in tables.items()}


def _feature_table(st: SaeStats, labels: dict) -> pa.Table:
    count = st.moments.count.cpu().numpy()
    d = len(count)
    total = st.moments.total().cpu().numpy()
    mean = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    density = count / max(st.n_tokens, 1)
    flags = []
    for f in range(d):
        fl = ["dead"] if count[f] == 0 else []
        if 0 < density[f] < ULTRA_LOW_DENSITY:
            fl.append("ultra_low_density")
        if density[f] > DENSE_DENSITY:
            fl.append("dense")
        flags.append(fl + labels["flags"][f])
    return pa.table({
        "feature": pa.array(np.arange(d, dtype=np.int32)),
        "density": pa.array(density.astype(np.float64)),
        "count": pa.array(count.astype(np.int64)),
        "max_act": pa.array(st.moments.max.cpu().numpy().astype(np.float32)),
        "mean_act": pa.array(mean.astype(np.float32)),
        "min_act": pa.array(np.where(count > 0, st.moments.min.cpu().numpy(), 0.0).astype(np.float32)),
        "label": pa.array(labels["label"], pa.string()),
        "label_rule": pa.array(labels["rule"], pa.string()),
        "label_f1": pa.array(labels["f1"], pa.float64()),
        "label_precision": pa.array(labels["precision"], pa.float64()),
        "label_recall": pa.array(labels["recall"], pa.float64()),
        "flags": pa.array(flags, pa.list_(pa.string())),
    })


def _slot_examples(slots, kind: str, bins, cfg: MineConfig, keep=None) -> dict:
    """Rows of filled slots (feature-major, rank order) as numpy arrays; `keep` masks slots."""
    mask = slots.filled.cpu().numpy() if keep is None else keep
    feat, slot = np.nonzero(mask)
    key = slots.key.cpu().numpy()[feat, slot]
    doc, pos = split_keys(torch.from_numpy(key))
    tokens = slots.ranked("tokens").cpu().numpy()[feat, slot]
    acts = slots.ranked("acts").cpu().numpy()[feat, slot]
    inside = tokens >= 0
    center = cfg.ctx_before - (~inside[:, :cfg.ctx_before]).sum(1)
    rank = slot + 1 if bins is None else bins["rank"][feat, slot]
    return {"feature": feat.astype(np.int32), "kind": kind, "rank": rank.astype(np.int32),
            "bin": None if bins is None else bins["bin"][feat, slot].astype(np.int32),
            "doc_id": doc.numpy().astype(np.int64), "token_pos": pos.numpy().astype(np.int32),
            "act": slots.value.cpu().numpy()[feat, slot].astype(np.float32),
            "tokens": tokens, "acts": acts, "inside": inside, "center": center.astype(np.int32)}


def _interval_examples(st: SaeStats, cfg: MineConfig) -> tuple[pa.Table, dict]:
    """Quantile bins on the fine histogram's boundaries; per bin, the first per_bin sampled windows."""
    h, nb = st.hist, cfg.n_bins
    bounds = h.quantile_boundaries(nb).cpu()  # [d, nb-1] fine-bin boundaries
    width = h.width().cpu()
    cum = h.counts.cpu().cumsum(1, dtype=torch.int64)
    n = cum[:, -1:]
    below = cum.gather(1, (bounds - 1).clamp(min=0)) * (bounds >= 1)  # activations below each edge
    frac = (torch.cat([torch.zeros_like(n), below, n], 1).diff(dim=1).double()
            / n.clamp(min=1).double())
    lo_act, hi_act = st.moments.min.cpu().double(), st.moments.max.cpu().double()
    edges = torch.cat([lo_act[:, None], bounds.double() * width[:, None], hi_act[:, None]], 1)
    edges = torch.maximum(torch.minimum(edges, hi_act[:, None]), lo_act[:, None])
    live = (n[:, 0] > 0).numpy()
    feat = np.repeat(np.nonzero(live)[0], nb)
    b = np.tile(np.arange(nb), int(live.sum()))
    bins_table = pa.table({
        "feature": pa.array(feat.astype(np.int32)), "bin": pa.array(b.astype(np.int32)),
        "lo": pa.array(edges[:, :-1].numpy()[feat, b].astype(np.float32)),
        "hi": pa.array(edges[:, 1:].numpy()[feat, b].astype(np.float32)),
        "frac": pa.array(frac.numpy()[feat, b])})
    # a sampled activation's bin follows from its fine bin, exactly as the histogram counted it;
    # the sample's slots are in priority order, so rank within (feature, bin) is a running count
    samples = st.samples
    sfilled = samples.filled.cpu()
    d, k = sfilled.shape
    fine = h.bin_index(torch.arange(d, device=h.exp.device).repeat_interleave(k),
                       samples.value.reshape(-1)).view(d, k).cpu()
    sbin = (fine[:, :, None] >= bounds[:, None, :]).sum(-1)
    onehot = torch.nn.functional.one_hot(sbin, nb) * sfilled[:, :, None]
    rank = onehot.cumsum(1).gather(2, sbin[:, :, None]).squeeze(2)
    keep = (sfilled & (rank <= cfg.per_bin)).numpy()
    ex = _slot_examples(samples, "interval", {"bin": sbin.numpy(), "rank": rank.numpy()}, cfg,
                        keep=keep)
    order = np.lexsort((ex["rank"], ex["bin"], ex["feature"]))
    ex = {k: (v[order] if isinstance(v, np.ndarray) else v) for k, v in ex.items()}
    return bins_table, ex


def _concat_examples(parts: list[dict]) -> pa.Table:
    tables = []
    for p in parts:
        n = len(p["feature"])
        tables.append(pa.table({
            "feature": pa.array(p["feature"]), "kind": pa.array([p["kind"]] * n, pa.string()),
            "rank": pa.array(p["rank"]),
            "bin": pa.array(p["bin"] if p["bin"] is not None else [None] * n, pa.int32()),
            "doc_id": pa.array(p["doc_id"]), "token_pos": pa.array(p["token_pos"]),
            "act": pa.array(p["act"]),
            "token_ids": _list_column(p["tokens"], p["inside"], pa.int32()),
            "acts": _list_column(p["acts"], p["inside"], pa.float32()),
            "center": pa.array(p["center"])}))
    return pa.concat_tables(tables)


def _list_column(values: np.ndarray, mask: np.ndarray, typ) -> pa.Array:
    lengths = mask.sum(1)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[mask], typ))


def _activation_histograms(st: SaeStats, n_bins: int) -> pa.Table:
    """Display histograms: the fine bins summed n_bins-fold, trailing empty bins dropped."""
    h = st.hist
    counts = h.coarsened(n_bins).cpu().numpy()
    exp = h.exp.cpu().numpy()
    live = np.nonzero(exp != h.NO_DATA)[0]
    used = counts[live] > 0
    n_used = n_bins - np.argmax(used[:, ::-1], axis=1)  # bins up to the last non-empty one
    width = np.ldexp(1.0, exp[live].astype(np.int32)) / n_bins
    edge_mask = np.arange(n_bins + 1)[None, :] <= n_used[:, None]
    edges = np.arange(n_bins + 1)[None, :] * width[:, None]
    count_mask = np.arange(n_bins)[None, :] < n_used[:, None]
    return pa.table({
        "feature": pa.array(live.astype(np.int32)),
        "kind": pa.array(["activation"] * len(live), pa.string()),
        "edges": _list_column(edges, edge_mask, pa.float64()),
        "counts": _list_column(counts[live], count_mask, pa.int64())})


@torch.inference_mode()
def _logit_effects(s: _Sae, model, vocab_size: int, cfg: MineConfig):
    """(logit_effects rows, logit histograms, top positive token ids per latent for labels)."""
    W_U = model.lm_head.weight[:vocab_size].float()
    dirs = s.sae.W_dec.float()
    if s.kind == "hook_mlp_post":
        dirs = dirs @ model.transformer.h[s.layer].mlp.c_proj.weight.float().t()
    gain_fn = getattr(model, "residual_gain", None)
    gain = float(gain_fn(s.layer)) if callable(gain_fn) else 1.0
    kinds = [("raw", 1.0)] + ([("gain_corrected", gain)] if gain != 1.0 else [])
    d = dirs.shape[0]
    n = min(cfg.n_logits, vocab_size)
    nb = cfg.logit_hist_bins
    step = max(1, (1 << 25) // vocab_size)
    rows = {k: [] for k in ("feature", "rank", "token_id", "value", "kind")}
    hist = {"feature": [], "edges": [], "counts": []}
    label_tokens = np.zeros((d, n), dtype=np.int64)
    for start in range(0, d, step):
        E = dirs[start:start + step] @ W_U.t()
        feats = torch.arange(start, start + E.shape[0], device=E.device)
        for kind, g in kinds:
            Eg = E * g if g != 1.0 else E
            pos = Eg.topk(n, dim=1)
            neg = Eg.topk(n, dim=1, largest=False)
            if kind == kinds[-1][0]:
                label_tokens[start:start + E.shape[0]] = pos.indices.cpu().numpy()
            ranks = torch.arange(1, n + 1).repeat(E.shape[0]).numpy()
            for vals, ids, sign in ((pos.values, pos.indices, 1), (neg.values, neg.indices, -1)):
                rows["feature"].append(feats[:, None].expand_as(ids).reshape(-1).cpu().numpy())
                rows["rank"].append(sign * ranks)
                rows["token_id"].append(ids.reshape(-1).cpu().numpy())
                rows["value"].append(vals.reshape(-1).cpu().numpy())
                rows["kind"] += [kind] * ids.numel()
        lo, hi = E.min(1).values, E.max(1).values
        span = (hi - lo).clamp(min=1e-30)
        b = ((E - lo[:, None]) / span[:, None] * nb).floor().long().clamp_(0, nb - 1)
        r = torch.arange(E.shape[0], device=E.device)[:, None] * nb
        counts = torch.bincount((r + b).reshape(-1), minlength=E.shape[0] * nb).view(-1, nb)
        frac = torch.arange(nb + 1, device=E.device, dtype=torch.float64) / nb
        edges = lo.double()[:, None] + (hi - lo).double()[:, None] * frac
        hist["feature"].append(feats.cpu().numpy())
        hist["edges"].append(edges.cpu().numpy())
        hist["counts"].append(counts.cpu().numpy())
    logits = pa.table({
        "feature": pa.array(np.concatenate(rows["feature"]).astype(np.int32)),
        "rank": pa.array(np.concatenate(rows["rank"]).astype(np.int32)),
        "token_id": pa.array(np.concatenate(rows["token_id"]).astype(np.int32)),
        "value": pa.array(np.concatenate(rows["value"]).astype(np.float32)),
        "kind": pa.array(rows["kind"], pa.string())})
    feats = np.concatenate(hist["feature"]).astype(np.int32)
    edges, counts = np.concatenate(hist["edges"]), np.concatenate(hist["counts"])
    hists = pa.table({
        "feature": pa.array(feats), "kind": pa.array(["logit"] * len(feats), pa.string()),
        "edges": _list_column(edges, np.ones(edges.shape, bool), pa.float64()),
        "counts": _list_column(counts, np.ones(counts.shape, bool), pa.int64())})
    return logits, hists, label_tokens


@torch.inference_mode()
def _neighbors(s: _Sae, st: SaeStats, cfg: MineConfig) -> pa.Table:
    W = s.sae.W_dec.float()
    W = W / W.norm(dim=1, keepdim=True).clamp(min=1e-12)
    d = W.shape[0]
    k = min(cfg.n_neighbors, d - 1)
    parts = []
    if k <= 0:
        return _neighbor_table([])
    step = max(1, (1 << 24) // d)
    coact = st.coact.symmetric() if st.coact is not None else None
    count = st.coact.count.double() if st.coact is not None else None
    for start in range(0, d, step):
        rows = torch.arange(start, min(d, start + step), device=W.device)
        diag = (torch.arange(len(rows), device=W.device), rows)
        sim = W[rows] @ W.t()
        sim[diag] = float("-inf")
        top = sim.topk(k, dim=1)
        parts.append(("decoder_cos", rows, top.values, top.indices, None))
        if coact is not None:
            c = coact[rows].double()
            jac = c / (count[rows][:, None] + count[None, :] - c).clamp(min=1)
            jac[diag] = -1.0
            jac[c == 0] = -1.0
            top = jac.topk(k, dim=1)
            parts.append(("coactivation", rows, top.values, top.indices, top.values > 0))
    return _neighbor_table(parts)


def _neighbor_table(parts) -> pa.Table:
    cols = {k: [] for k in ("feature", "kind", "rank", "other_feature", "value")}
    for kind, rows, values, ids, keep in parts:
        k = ids.shape[1]
        keep = torch.ones_like(ids, dtype=torch.bool) if keep is None else keep
        feat = rows[:, None].expand_as(ids)
        rank = torch.arange(1, k + 1, device=ids.device)[None, :].expand_as(ids)
        cols["feature"].append(feat[keep].cpu().numpy())
        cols["rank"].append(rank[keep].cpu().numpy())
        cols["other_feature"].append(ids[keep].cpu().numpy())
        cols["value"].append(values[keep].cpu().numpy())
        cols["kind"] += [kind] * int(keep.sum())
    cat = (lambda key, dt: np.concatenate(cols[key]).astype(dt) if cols[key] else np.zeros(0, dt))
    return pa.table({"feature": pa.array(cat("feature", np.int32)),
                     "kind": pa.array(cols["kind"], pa.string()),
                     "rank": pa.array(cat("rank", np.int32)),
                     "other_feature": pa.array(cat("other_feature", np.int32)),
                     "value": pa.array(cat("value", np.float64))})


def _token_features(st: SaeStats, token_counts: TokenCounts, cfg: MineConfig) -> pa.Table:
    top = st.token_features.top_per_row(cfg.token_top)
    occurrences = token_counts.count[top["row"]].double()
    return pa.table({
        "token_id": pa.array(top["row"].cpu().numpy().astype(np.int32)),
        "feature": pa.array(top["col"].cpu().numpy().astype(np.int32)),
        "count": pa.array(top["count"].cpu().numpy().astype(np.int64)),
        "mean_act": pa.array((top["sum"] / top["count"].double()).cpu().numpy().astype(np.float32)),
        "frac": pa.array((top["count"].double() / occurrences.clamp(min=1)).cpu().numpy()),
        "rank": pa.array((top["rank"] + 1).cpu().numpy().astype(np.int32))})


def _position_profile(st: SaeStats) -> pa.Table:
    p = st.positions
    count, total, tokens = p.count.cpu().long(), p.total().cpu(), p.tokens.cpu()
    feat, bucket = count.nonzero(as_tuple=True)
    c = count[feat, bucket]
    return pa.table({
        "feature": pa.array(feat.numpy().astype(np.int32)),
        "pos_lo": pa.array((1 << bucket).numpy().astype(np.int32)),
        "pos_hi": pa.array((2 << bucket).numpy().astype(np.int32)),
        "count": pa.array(c.numpy()),
        "mean_act": pa.array((total[feat, bucket] / c).numpy().astype(np.float32)),
        "density": pa.array((c.double() / tokens[bucket].double()).numpy())})


@torch.inference_mode()
def _lineage(saes: list[_Sae], cfg: MineConfig) -> dict[str, pa.Table]:
    """Per SAE, its features' nearest decoder directions in the SAEs of the nearest layer below
    and above (same input width, so the same space): the links of cross-layer chains."""
    empty = pa.table({"feature": pa.array([], pa.int32()), "other_sae_id": pa.array([], pa.string()),
                      "rank": pa.array([], pa.int32()), "other_feature": pa.array([], pa.int32()),
                      "value": pa.array([], pa.float64())})
    out = {}
    for a in saes:
        if cfg.n_lineage <= 0:
            out[a.sae_id] = _with_sae(empty, a.sae_id)
            continue
        layers = sorted({b.layer for b in saes if b.sae.cfg.d_in == a.sae.cfg.d_in and b.layer != a.layer})
        near = [max((x for x in layers if x < a.layer), default=None),
                min((x for x in layers if x > a.layer), default=None)]
        parts = []
        Wa = a.sae.W_dec.float()
        Wa = Wa / Wa.norm(dim=1, keepdim=True).clamp(min=1e-12)
        for b in (b for b in saes if b.layer in near and b.sae.cfg.d_in == a.sae.cfg.d_in):
            Wb = b.sae.W_dec.float().to(Wa.device)
            Wb = Wb / Wb.norm(dim=1, keepdim=True).clamp(min=1e-12)
            k = min(cfg.n_lineage, Wb.shape[0])
            step = max(1, (1 << 24) // Wb.shape[0])
            for start in range(0, Wa.shape[0], step):
                top = (Wa[start:start + step] @ Wb.t()).topk(k, dim=1)
                n = top.values.shape[0]
                parts.append(pa.table({
                    "feature": pa.array(np.repeat(np.arange(start, start + n), k).astype(np.int32)),
                    "other_sae_id": pa.array([b.sae_id] * (n * k), pa.string()),
                    "rank": pa.array(np.tile(np.arange(1, k + 1), n).astype(np.int32)),
                    "other_feature": pa.array(top.indices.reshape(-1).cpu().numpy().astype(np.int32)),
                    "value": pa.array(top.values.reshape(-1).cpu().double().numpy())}))
        out[a.sae_id] = _with_sae(pa.concat_tables(parts) if parts else empty, a.sae_id)
    return out


def _labels(st: SaeStats, top: dict, intervals: dict, logit_tokens: np.ndarray, vocab: L.Vocab,
            cfg: MineConfig) -> dict:
    d = logit_tokens.shape[0]
    by_feature_top = _windows_by_feature(top)
    by_feature_pos = _windows_by_feature(intervals)
    rnd = st.random
    r_filled = rnd.filled[0].cpu().numpy()
    r_tokens = rnd.ranked("tokens")[0].cpu().numpy()[r_filled]
    r_active = rnd.ranked("active")[0].cpu().numpy()[r_filled]
    r_pos = split_keys(rnd.key[0].cpu()[torch.from_numpy(r_filled)])[1].numpy()
    r_center = cfg.ctx_before - (r_tokens[:, :cfg.ctx_before] < 0).sum(1)
    negatives = [L.Window(t, c, p) for t, c, p in
                 zip(_token_lists(r_tokens), r_center.tolist(), r_pos.tolist())]
    out = {k: [None] * d for k in ("label", "rule", "f1", "precision", "recall")}
    out["flags"] = [[] for _ in range(d)]
    for f in range(d):
        label = L.label_feature(by_feature_top.get(f, []), logit_tokens[f].tolist(), vocab)
        if label is None:
            continue
        out["label"][f], out["rule"][f] = label.text, label.rule
        out["flags"][f] += list(label.flags)
        positives = by_feature_pos.get(f, [])
        neg_idx = np.flatnonzero(~r_active[:, f])[:len(positives)]
        score = L.score_label(label.predicate, positives, [negatives[i] for i in neg_idx], vocab)
        if score is not None:
            out["f1"][f], out["precision"][f], out["recall"][f] = score.f1, score.precision, score.recall
            if score.weak:
                out["flags"][f].append("weak_label")
    return out


def _windows_by_feature(ex: dict) -> dict[int, list[L.Window]]:
    out: dict[int, list[L.Window]] = {}
    for f, tokens, center, pos, act in zip(ex["feature"].tolist(), _token_lists(ex["tokens"]),
                                           ex["center"].tolist(), ex["token_pos"].tolist(),
                                           ex["act"].tolist()):
        out.setdefault(f, []).append(L.Window(tokens, center, pos, act))
    return out


def _token_lists(tokens: np.ndarray) -> list[tuple[int, ...]]:
    """Rows of a -1-padded [n, window] array as tuples of their token ids."""
    inside = tokens >= 0
    flat = tokens[inside].tolist()
    ends = np.cumsum(inside.sum(1)).tolist()
    return [tuple(flat[a:b]) for a, b in zip([0] + ends[:-1], ends)]


def _saes_row(s: _Sae, run: _Run, model) -> pa.Table:
    c = s.sae.cfg
    ev = s.evals
    return pa.table({
        "sae_id": [s.sae_id], "layer": pa.array([s.layer], pa.int32()), "hook": [s.kind],
        "arch": [c.architecture], "d_in": pa.array([c.d_in], pa.int32()),
        "d_sae": pa.array([c.d_sae], pa.int32()), "k": pa.array([c.k], pa.int32()),
        "model_id": [c.model_id or None], "checkpoint": [c.checkpoint or None],
        "train_tokens": pa.array([c.train_tokens or None], pa.int64()),
        **{k: pa.array([ev.get(k)], pa.float64())
           for k in ("fvu", "l0", "dead_frac", "delta_ce", "kl", "ce_recovered")},
        "mine_tokens": pa.array([run.stats[s.sae_id].n_tokens], pa.int64()),
        "sae_path": [str(s.path)], "cfg_json": [s.cfg_json]})


def _with_sae(table: pa.Table, sae_id: str) -> pa.Table:
    return table.add_column(0, "sae_id", pa.array([sae_id] * table.num_rows, pa.string()))


def _vocab_table(tokenizer) -> pa.Table:
    raw = tokenizer.all_token_bytes()
    return pa.table({"token_id": pa.array(np.arange(len(raw), dtype=np.int32)),
                     "token_bytes": pa.array(raw, pa.binary()),
                     "display": pa.array([visible_token(b) for b in raw], pa.string())})


# ----------------------------------------------------------------------------- store

def _write_store(store_path: Path, tables: list[dict], vocab: pa.Table, token_counts: np.ndarray,
                 meta: dict, source) -> None:
    """Replace these SAEs' rows, the vocab and the meta in one transaction."""
    store_path.parent.mkdir(parents=True, exist_ok=True)
    con = store.connect(store_path)
    try:
        _check_same_model(con, store_path, [t["saes"]["sae_id"][0].as_py() for t in tables], source)
        con.execute("BEGIN TRANSACTION")
        try:
            ids = [t["saes"]["sae_id"][0].as_py() for t in tables]
            for table in PER_SAE_TABLES:
                con.execute(f"DELETE FROM {table} WHERE sae_id IN (SELECT unnest(?))", [ids])
            for t in tables:
                for name in PER_SAE_TABLES:
                    _insert(con, name, t[name])
            con.execute("DELETE FROM vocab")
            _insert(con, "vocab", vocab)
            con.execute("DELETE FROM token_counts")
            nz = np.nonzero(token_counts)[0]
            _insert(con, "token_counts", pa.table({"token_id": pa.array(nz.astype(np.int32)),
                                                   "count": pa.array(token_counts[nz].astype(np.int64))}))
            for key, value in meta.items():
                con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, json.dumps(value)])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        con.close()


def _check_same_model(con, store_path: Path, ids: list[str], source) -> None:
    others = con.execute("SELECT sae_id FROM saes WHERE sae_id NOT IN (SELECT unnest(?))", [ids]).fetchall()
    row = con.execute("SELECT value FROM meta WHERE key = 'model'").fetchone()
    if not others or row is None:
        return
    model = json.loads(row[0])
    ours = str(source.checkpoint_dir)
    if model.get("checkpoint") not in (None, ours):
        raise ValueError(f"{store_path} holds SAEs of another model ({model.get('checkpoint')}); "
                         f"mine into a new --store or delete it")


def _insert(con, table: str, data: pa.Table) -> None:
    con.register("_mine_rows", data)
    try:
        names = ", ".join(data.column_names)
        con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM _mine_rows")
    finally:
        con.unregister("_mine_rows")


def _store_is_current(store_path: Path, fingerprint: str, sae_ids: list[str]) -> bool:
    if not store_path.exists():
        return False
    try:
        con = store.connect(store_path, read_only=True)
    except Exception:
        return False
    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'build'").fetchone()
        have = {r[0] for r in con.execute("SELECT sae_id FROM saes").fetchall()}
    except Exception:
        return False
    finally:
        con.close()
    if row is None:
        return False
    build = json.loads(row[0])
    return build.get("fingerprint") == fingerprint and set(sae_ids) <= have


# ----------------------------------------------------------------------------- provenance

def _fingerprint(saes: list[_Sae], source, corpus_files: list[Path], seq_len: int,
                 cfg: MineConfig, world: int) -> str:
    """sha256 over everything that changes the store's content: with a token budget, the number
    of ranks too (each mines its share from its own documents); over a whole split it does not."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("chunk_tokens", "force", "check_model")}
    parts = {
        "state_version": STATE_VERSION,
        "saes": [{"sae_id": s.sae_id, "cfg": s.cfg_json,
                  "weights": [_file_hash(f, full=True) for f in sorted(s.path.glob("*.safetensors"))]}
                 for s in saes],
        "model": {"model_id": source.model_id, "step": source.step,
                  "file": _file_hash(Path(source.checkpoint_dir) / f"model_{source.step:06d}.pt")},
        "corpus": [_file_hash(f) for f in corpus_files],
        "seq_len": seq_len, "settings": settings,
    }
    if cfg.tokens is not None:
        parts["ranks"] = world
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _file_hash(f: Path, full: bool = False) -> dict:
    """Name, size and sha256 (of the whole file, or of its first and last MiB when large)."""
    if not f.exists():
        return {"name": f.name, "missing": True}
    size = f.stat().st_size
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        if full or size <= 2 << 20:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(fh.read(1 << 20))
            fh.seek(size - (1 << 20))
            h.update(fh.read(1 << 20))
    return {"name": f.name, "size": size, "sha256": h.hexdigest()}


def _meta(source, corpus: Path, corpus_files, seq_len: int, run: _Run, cfg: MineConfig,
          fingerprint: str) -> dict:
    model = source.model
    c = model.config
    import duckdb
    import numpy
    split_files = corpus_files[-1:] if cfg.split == "val" and len(corpus_files) > 1 else corpus_files
    coact_skipped = [s.sae_id for s in run.saes if run.stats[s.sae_id].coact is None]
    return {
        "model": {
            "model_id": source.model_id, "source": source.kind, "class": type(model).__name__,
            "checkpoint": str(source.checkpoint_dir), "step": source.step,
            "n_layer": c.n_layer, "n_head": c.n_head, "n_kv_head": c.n_kv_head, "n_embd": c.n_embd,
            "sequence_len": c.sequence_len, "vocab_size": source.tokenizer.get_vocab_size(),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "corpus": {
            "name": f"{corpus.name} ({cfg.split} split)", "path": str(corpus), "split": cfg.split,
            "files": [f.name for f in split_files], "documents": run.n_docs, "tokens": run.n_tokens,
            "seq_len": seq_len, "bos_excluded": True,
        },
        "build": {
            "command": " ".join(sys.argv) if sys.argv and sys.argv[0] else None,
            "git_commit": _git_commit(),
            "fingerprint": fingerprint,
            "ranks": run.ctx.world,
            "settings": {k: v for k, v in asdict(cfg).items() if k != "force"},
            "coactivation_skipped": coact_skipped,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "duckdb": duckdb.__version__, "numpy": numpy.__version__,
                         "pyarrow": pa.__version__},
            "label_rules": "offline rule cascade (atlas/labels.py); F1 = detection on interval "
                           "samples vs random non-activating windows",
        },
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr)
