"""
Activation streaming for SAE training: corpus → model → shuffled batches of token activations.

One model forward (inference mode, bf16 autocast on CUDA only, stopped after the deepest requested
block) captures every requested hook point at once, so the SAEs of several layers train from a
single pass. BOS and padding positions are dropped through the batch's `valid` mask; batches come
out as {hook_name: Tensor[batch_size, d_in] fp32}.

Notable choices:
- Shuffling happens in *generations*: a generation is the next `buffer_tokens` (or slightly more)
  valid tokens of the corpus, held in one preallocated buffer and served in a random order
  (the permutation is seeded by (seed, generation index)). Batches are consecutive slices of the
  concatenation of generations, so a batch may straddle two of them and nothing is wasted. Memory
  is the buffer, whatever the number of training tokens.
- Exact resume without saving the buffer: a generation depends only on where it starts in the
  corpus (pass, document, position in the document) and on its index, so `state_dict()` holds
  those plus the offset inside it; `load_state_dict()` replays that one generation (at most
  `buffer_tokens` of forwards) and continues bit-for-bit. Forward batches never cross a
  generation boundary, so the replayed forwards have the very same shapes.
- A corpus with fewer tokens than requested is cycled with a message, never an error.
- An optional on-disk cache (`build_cache` / `ActivationCache`) stores the activations of the
  first N tokens, in corpus order, as one memory-mapped .npy per hook (fp16 or fp32) plus the
  token ids, each file written atomically. It is keyed by a fingerprint of model, corpus, split,
  window length and N, so repeated sweeps reuse it; hooks missing from an existing cache are added.
  A stream over the cache shuffles in generations exactly like the model-backed stream.
- Under torchrun each rank streams a disjoint share (`rank`, `world`): of the corpus, the parquet
  row groups (or text documents) g with g % world == rank (nanochat's striding), positions still
  in global document ids; of a cache, the contiguous rank-th 1/world of its tokens. A rank's
  stream is an ordinary stream of its share, with its own shuffle buffer and resumable state.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from nanochat.common import autocast, compute_dtype
from nanochat.dataset import iter_batches, iter_indexed_windows, iter_shard_documents, list_corpus_files
from sae.hooks import parse_hook_name, run_with_capture

STATE_VERSION = 1
CACHE_VERSION = 1
_BYTES_PER_DTYPE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass
class StreamConfig:
    hook_names: list[str]
    batch_size: int = 4096  # tokens per yielded batch
    buffer_tokens: int | None = None  # shuffle-buffer size in tokens; None: from buffer_mb
    buffer_mb: float = 1024.0  # memory budget of the buffer when buffer_tokens is None
    seq_len: int | None = None  # window length (BOS included); None: the model's sequence_len
    forward_windows: int = 8  # windows per model forward
    split: str = "train"
    seed: int = 0

    def __post_init__(self):
        self.hook_names = list(self.hook_names)
        if not self.hook_names:
            raise ValueError("StreamConfig.hook_names is empty: name at least one hook point")
        if len(set(self.hook_names)) != len(self.hook_names):
            raise ValueError(f"StreamConfig.hook_names has duplicates: {self.hook_names}")
        for key in ("batch_size", "forward_windows"):
            if getattr(self, key) <= 0:
                raise ValueError(f"StreamConfig.{key}={getattr(self, key)!r}: expected > 0")
        if self.buffer_tokens is not None and self.buffer_tokens <= 0:
            raise ValueError(f"StreamConfig.buffer_tokens={self.buffer_tokens!r}: expected > 0")

    def resolve_buffer_tokens(self, bytes_per_token: int) -> int:
        """buffer_tokens if set, else as many tokens as buffer_mb holds (at least one batch)."""
        if self.buffer_tokens is not None:
            return self.buffer_tokens
        return max(self.batch_size, int(self.buffer_mb * 2**20) // max(1, bytes_per_token))


def hook_dims(model, hook_names: list[str]) -> dict[str, int]:
    """Width of each hook point: n_embd, or 4·n_embd for the MLP hidden layer (hook_mlp_post)."""
    c = model.config
    return {n: (4 * c.n_embd if parse_hook_name(n, c.n_layer).kind == "hook_mlp_post" else c.n_embd)
            for n in hook_names}


# ----------------------------------------------------------------------------------------------
# The shuffled stream


class ActivationStream:
    """
    Infinite iterator of {hook_name: Tensor[batch_size, d_in] fp32}, shuffled in generations.
    `tokens_served` counts the tokens yielded so far; `peak_buffer_tokens` the largest buffer held.
    """

    def __init__(self, source, cfg: StreamConfig, buffer_tokens: int,
                 log: Callable[[str], None] | None = None):
        self.source = source
        self.log = log if log is not None else _log_stderr
        self.cfg = cfg
        self.buffer_tokens = buffer_tokens
        self.d_in = dict(source.dims)
        self.tokens_served = 0
        self.peak_buffer_tokens = 0
        self._generation = -1  # index of the generation in the buffer (-1: none yet)
        self._gen_start = source.start_position()
        self._gen_end = self._gen_start  # where the next generation starts
        self._offset = 0  # tokens of the current generation already served
        self._gen: _Generation | None = None

    def __iter__(self) -> "ActivationStream":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        parts: list[dict[str, torch.Tensor]] = []
        need = self.cfg.batch_size
        while need > 0:
            if self._gen is None:  # first batch, or first after load_state_dict: (re)build
                self._load_generation(max(self._generation, 0), self._gen_start)
            elif self._offset >= self._gen.n:
                self._load_generation(self._generation + 1, self._gen_end)
                self._offset = 0
            take = min(need, self._gen.n - self._offset)
            idx = self._gen.perm[self._offset:self._offset + take]
            parts.append({n: buf.index_select(0, idx) for n, buf in self._gen.acts.items()})
            self._offset += take
            need -= take
        self.tokens_served += self.cfg.batch_size
        if len(parts) == 1:
            return {n: t.float() for n, t in parts[0].items()}
        return {n: torch.cat([p[n] for p in parts]).float() for n in self.d_in}

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "identity": self._identity(),
            "generation": self._generation,
            "gen_start": self._gen_start,
            "gen_end": self._gen_end,
            "gen_tokens": self._gen.n if self._gen is not None else 0,
            "offset": self._offset,
            "tokens_served": self.tokens_served,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"activation stream state has version {state.get('version')!r}, "
                             f"expected {STATE_VERSION}")
        mine = self._identity()
        theirs = state.get("identity", {})
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise ValueError("cannot resume: the activation stream differs from the saved one in "
                             + ", ".join(f"{k} (saved {theirs.get(k)!r}, now {mine.get(k)!r})"
                                         for k in diff))
        self._generation = int(state["generation"])
        self._gen_start, self._gen_end = list(state["gen_start"]), list(state["gen_end"])
        self._offset = int(state["offset"])
        self.tokens_served = int(state["tokens_served"])
        self._gen = None
        if self._generation >= 0 and self._offset >= int(state["gen_tokens"]):
            # that generation was used up: the next one starts fresh, no replay needed
            self._generation, self._gen_start, self._offset = self._generation + 1, self._gen_end, 0

    def _identity(self) -> dict:
        c = self.cfg
        return {"hooks": list(c.hook_names), "batch_size": c.batch_size,
                "buffer_tokens": self.buffer_tokens, "seed": c.seed, "split": c.split,
                "forward_windows": c.forward_windows, "source": self.source.fingerprint()}

    def _load_generation(self, index: int, start) -> None:
        if self._gen is None:  # the first fill of this process: the wait before the first batch
            self.log(f"filling the shuffle buffer with {self.buffer_tokens:,} tokens of activations")
        acts, n, end = self.source.read(start, self.buffer_tokens)
        gen = torch.Generator().manual_seed(_mix_seed(self.cfg.seed, index))
        perm = torch.randperm(n, generator=gen).to(next(iter(acts.values())).device)
        self._gen = _Generation(acts, n, perm)
        self._generation, self._gen_start, self._gen_end = index, start, end
        self.peak_buffer_tokens = max(self.peak_buffer_tokens, n)


@dataclass
class _Generation:
    acts: dict[str, torch.Tensor]  # {hook: [>= n, d]} (the buffer; rows past n are unused)
    n: int
    perm: torch.Tensor  # [n] serving order


def _mix_seed(seed: int, index: int) -> int:
    h = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def corpus_stream(model, tokenizer, corpus, cfg: StreamConfig, device=None,
                  log: Callable[[str], None] | None = None, rank: int = 0,
                  world: int = 1) -> ActivationStream:
    """A shuffled stream of `model`'s activations on the `cfg.split` documents of `corpus`
    (rank `rank`'s share of them when `world` > 1)."""
    device = torch.device(device) if device is not None else model.get_device()
    source = CorpusActivations(model, tokenizer, corpus, cfg.hook_names, split=cfg.split,
                               seq_len=cfg.seq_len, forward_windows=cfg.forward_windows,
                               device=device, log=log, rank=rank, world=world)
    bytes_per_token = sum(source.dims.values()) * _BYTES_PER_DTYPE[source.dtype]
    buffer_tokens = cfg.resolve_buffer_tokens(bytes_per_token)
    source.allocate(buffer_tokens)
    return ActivationStream(source, cfg, buffer_tokens, log=log)


def cached_stream(cache: "ActivationCache", cfg: StreamConfig, device="cpu",
                  log: Callable[[str], None] | None = None, rank: int = 0,
                  world: int = 1) -> ActivationStream:
    """A shuffled stream over an on-disk cache (see `build_cache`), or rank `rank`'s share of it."""
    source = CachedActivations(cache, cfg.hook_names, torch.device(device), log=log, rank=rank,
                               world=world)
    bytes_per_token = sum(source.dims.values()) * 4
    buffer_tokens = min(cfg.resolve_buffer_tokens(bytes_per_token), source.end - source.start)
    return ActivationStream(source, cfg, buffer_tokens, log=log)


# ----------------------------------------------------------------------------------------------
# Sources: where a generation's tokens come from


class CorpusActivations:
    """
    Runs the model over BOS-aligned windows of a corpus split and keeps the valid tokens.
    A position is [pass, document index, document position of the next window's first token];
    positions past a document's end simply move on to the next document. With `world` > 1 only
    rank `rank`'s share of the documents is read (document indices stay those of the whole split).
    """

    def __init__(self, model, tokenizer, corpus, hook_names: list[str], split: str = "train",
                 seq_len: int | None = None, forward_windows: int = 8, device=None,
                 log: Callable[[str], None] | None = None, rank: int = 0, world: int = 1):
        self.model = model
        self.tokenizer = tokenizer
        self.corpus = Path(corpus)
        self.files = list_corpus_files(self.corpus)
        self.hook_names = list(hook_names)
        self.dims = hook_dims(model, self.hook_names)
        self.split = split
        self.seq_len = int(seq_len or model.config.sequence_len)
        if not 2 <= self.seq_len <= model.config.sequence_len * 10:
            raise ValueError(f"seq_len={self.seq_len}: expected 2..{model.config.sequence_len * 10} "
                             f"(the model's rotary cache)")
        self.forward_windows = forward_windows
        self.device = torch.device(device) if device is not None else model.get_device()
        self.dtype = compute_dtype(self.device)
        self.log = log if log is not None else _log_stderr
        self.bos = tokenizer.get_bos_token_id()
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        self.rank, self.world = rank, world
        self._buffers: dict[str, torch.Tensor] | None = None
        self._capacity = 0
        self._live: tuple[list, Iterator] | None = None  # (position it is at, window iterator)

    def start_position(self) -> list:
        return [0, 0, 1]

    def fingerprint(self) -> dict:
        fp = {"kind": "corpus", "corpus": str(self.corpus.resolve()), "split": self.split,
              "seq_len": self.seq_len}
        return fp if self.world == 1 else {**fp, "rank": self.rank, "world": self.world}

    def allocate(self, buffer_tokens: int) -> None:
        """Preallocate the buffer: buffer_tokens plus the overshoot of one forward batch."""
        self._capacity = buffer_tokens + self.forward_windows * self.seq_len
        self._buffers = {n: torch.empty(self._capacity, d, dtype=self.dtype, device=self.device)
                         for n, d in self.dims.items()}

    def read(self, start: list, min_tokens: int):
        """Fill the buffer with >= min_tokens valid tokens from `start`: (acts, n, end)."""
        if self._buffers is None:
            self.allocate(min_tokens)
        n, position = 0, start
        for acts, _ids, position in self.iter_forwards(start):
            m = next(iter(acts.values())).shape[0]
            for name, a in acts.items():
                self._buffers[name][n:n + m] = a
            n += m
            if n >= min_tokens:
                break
        return self._buffers, n, position

    def iter_forwards(self, start: list) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor, list]]:
        """Forever: ({hook: [n_valid, d]}, token ids [n_valid], position after this forward)."""
        position = list(start)
        windows = self._windows_from(position)
        full_pass, seen = position[1:] == [0, 1], False
        while True:
            group = []
            for w in windows:
                group.append(w)
                if len(group) == self.forward_windows:
                    break
            if not group:  # this pass is over: cycle
                if full_pass and not seen:
                    share = "" if self.world == 1 else (
                        f", in the share of rank {self.rank} of {self.world} (parquet row groups, "
                        f"or text documents, are dealt to ranks in turn: the split needs at least "
                        f"{self.world} of them; use fewer ranks or a larger corpus)")
                    raise ValueError(f"corpus {self.corpus} ({self.split} split) has no tokens "
                                     f"besides BOS{share}: nothing to train on")
                position = [position[0] + 1, 0, 1]
                _log_cycle(self.log, f"corpus {self.corpus} ({self.split} split)", position[0])
                windows = self._windows_from(position)
                full_pass, seen = True, False
                continue
            seen = True
            last = group[-1]
            position = [position[0], last.doc_id, last.pos0 + len(last.tokens) - 1]
            batch = next(iter_batches(group, len(group), self.bos))
            idx, valid = batch.idx.to(self.device), batch.valid.to(self.device)
            with torch.inference_mode(), autocast(self.device):
                acts = run_with_capture(self.model, idx, self.hook_names)
                out = {n: a[valid].to(self.dtype) for n, a in acts.items()}
            yield out, idx[valid], list(position)

    def _windows_from(self, position: list):
        _, doc, pos0 = position
        docs = ((i, text) for i, text in iter_shard_documents(self.corpus, self.split, self.rank,
                                                                self.world) if i >= doc)
        for w in iter_indexed_windows(docs, self.tokenizer, self.seq_len):
            if w.doc_id == doc and w.pos0 < pos0:
                continue
            yield w


class CachedActivations:
    """Reads contiguous token ranges of an ActivationCache, wrapping around at its end; with
    `world` > 1, of the rank-th contiguous 1/world of its tokens."""

    def __init__(self, cache: "ActivationCache", hook_names: list[str], device,
                 log: Callable[[str], None] | None = None, rank: int = 0, world: int = 1):
        missing = [n for n in hook_names if n not in cache.hooks]
        if missing:
            raise KeyError(f"activation cache {cache.path} has no {missing}; it holds "
                           f"{sorted(cache.hooks)}")
        self.cache = cache
        self.hook_names = list(hook_names)
        self.dims = {n: cache.hooks[n]["d"] for n in hook_names}
        self.device = device
        self.log = log if log is not None else _log_stderr
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        N = cache.n_tokens
        self.rank, self.world = rank, world
        self.start, self.end = rank * N // world, (rank + 1) * N // world
        if self.end <= self.start:
            raise ValueError(f"activation cache {cache.path} holds {N} tokens: too few to give each "
                             f"of {world} ranks a share")

    def start_position(self) -> list:
        return [0, self.start]  # [pass, token offset]

    def fingerprint(self) -> dict:
        fp = {"kind": "cache", "cache": self.cache.key}
        return fp if self.world == 1 else {**fp, "rank": self.rank, "world": self.world}

    def read(self, start: list, min_tokens: int):
        cycle, offset = start
        N = self.end
        pieces, n = [], 0
        while n < min_tokens:
            if offset == N:  # more is needed than the share holds: cycle
                cycle, offset = cycle + 1, self.start
                what = f"activation cache {self.cache.path} ({self.cache.n_tokens:,} tokens)" \
                    if self.world == 1 else (f"rank {self.rank}'s share of activation cache "
                                             f"{self.cache.path} ({N - self.start:,} tokens)")
                _log_cycle(self.log, what, cycle)
            take = min(min_tokens - n, N - offset)
            pieces.append((offset, offset + take))
            n, offset = n + take, offset + take
        acts = {}
        for name in self.hook_names:
            arr = self.cache.array(name)
            acts[name] = torch.cat([torch.from_numpy(np.array(arr[a:b])) for a, b in pieces]).to(
                self.device, torch.float32)
        return acts, n, [cycle, offset]


def _log_cycle(log: Callable[[str], None], what: str, cycle: int) -> None:
    """Announce pass 2, then passes 4, 8, 16, ...: a tiny corpus must not flood the log."""
    n_pass = cycle + 1
    if n_pass & (n_pass - 1) == 0:
        log(f"{what} exhausted; starting pass {n_pass} over it")


def _log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# On-disk cache


class ActivationCache:
    """
    A finished cache folder: meta.json, token_ids.npy (int32 [N]) and one <hook>.npy ([N, d],
    float16 or float32) per hook, memory-mapped on read.
    """

    def __init__(self, path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"not an activation cache (no meta.json): {self.path}")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"cannot parse {meta_path}: {e}") from e
        if self.meta.get("version") != CACHE_VERSION:
            raise ValueError(f"{meta_path}: cache version {self.meta.get('version')!r}, "
                             f"expected {CACHE_VERSION}")
        self.key: str = self.meta["key"]
        self.n_tokens: int = int(self.meta["n_tokens"])
        self.hooks: dict[str, dict] = self.meta["hooks"]
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, hook: str) -> np.ndarray:
        if hook not in self.hooks:
            raise KeyError(f"activation cache {self.path} has no {hook!r}; it holds {sorted(self.hooks)}")
        if hook not in self._arrays:
            self._arrays[hook] = np.load(self.path / self.hooks[hook]["file"], mmap_mode="r")
        return self._arrays[hook]

    def token_ids(self) -> np.ndarray:
        return np.load(self.path / "token_ids.npy", mmap_mode="r")


def cache_fingerprint(model_fingerprint: dict, corpus, split: str, seq_len: int,
                      n_tokens: int, dtype: str) -> dict:
    files = [{"path": str(f.resolve()), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
             for f in list_corpus_files(corpus)]
    return {"model": model_fingerprint, "corpus": files, "split": split, "seq_len": seq_len,
            "n_tokens": n_tokens, "dtype": dtype}


def model_fingerprint(checkpoint_dir, step: int, model_id: str = "") -> dict:
    """Identity of a nanochat checkpoint file (path, size, mtime) for cache keys."""
    f = Path(checkpoint_dir) / f"model_{step:06d}.pt"
    st = f.stat() if f.is_file() else None
    return {"model_id": model_id, "file": str(f.resolve()), "step": step,
            "size": st.st_size if st else None, "mtime_ns": st.st_mtime_ns if st else None}


def build_cache(model, tokenizer, corpus, hook_names: list[str], n_tokens: int, cache_root,
                model_fp: dict, split: str = "train", seq_len: int | None = None,
                dtype: str = "float16", forward_windows: int = 8, device=None,
                quiet: bool = False, log: Callable[[str], None] | None = None) -> ActivationCache:
    """
    The cache of the first `n_tokens` valid tokens of `corpus`/`split` for `hook_names`: reused if
    one with the same fingerprint exists (hooks it lacks are added), else written.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"cache dtype must be 'float16' or 'float32', got {dtype!r}")
    if n_tokens <= 0:
        raise ValueError(f"cache n_tokens={n_tokens}: expected > 0")
    log = log if log is not None else _log_stderr
    seq_len = int(seq_len or model.config.sequence_len)
    fp = cache_fingerprint(model_fp, corpus, split, seq_len, n_tokens, dtype)
    key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_root) / f"{model_fp.get('model_id') or 'model'}-{split}-{n_tokens}-{key}"
    meta = {"version": CACHE_VERSION, "key": key, "fingerprint": fp, "n_tokens": n_tokens,
            "hooks": {}}
    if (path / "meta.json").is_file():
        existing = ActivationCache(path)
        if existing.key != key:
            raise ValueError(f"{path}/meta.json has key {existing.key}, expected {key}")
        meta = existing.meta
    missing = [n for n in hook_names if n not in meta["hooks"]]
    if not missing:
        log(f"reusing activation cache {path}")
        return ActivationCache(path)
    path.mkdir(parents=True, exist_ok=True)
    log(f"caching {n_tokens:,} tokens of activations for {', '.join(missing)} in {path}")
    dims = hook_dims(model, missing)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    tag = f".tmp{os.getpid()}"
    files = {n: f"{n}.npy" for n in missing}
    arrays = {n: np.lib.format.open_memmap(path / (files[n] + tag), mode="w+", dtype=np_dtype,
                                           shape=(n_tokens, dims[n])) for n in missing}
    ids = np.lib.format.open_memmap(path / ("token_ids.npy" + tag), mode="w+", dtype=np.int32,
                                    shape=(n_tokens,))
    source = CorpusActivations(model, tokenizer, corpus, missing, split=split, seq_len=seq_len,
                               forward_windows=forward_windows, device=device, log=log)
    bar = tqdm(total=n_tokens, unit="tok", desc="caching activations",
               disable=quiet or not sys.stderr.isatty())
    n = 0
    for acts, tok, _ in source.iter_forwards(source.start_position()):
        m = min(tok.shape[0], n_tokens - n)
        for name, a in acts.items():
            arrays[name][n:n + m] = a[:m].float().cpu().numpy()
        ids[n:n + m] = tok[:m].cpu().numpy()
        n += m
        bar.update(m)
        if n >= n_tokens:
            break
    bar.close()
    for arr in (*arrays.values(), ids):
        arr.flush()
    del arrays
    ids_path = path / "token_ids.npy"
    if ids_path.is_file():  # a cache of other hooks exists: the same tokens must have come out
        if not np.array_equal(np.load(ids_path, mmap_mode="r"), ids):
            raise ValueError(f"{ids_path}: token ids differ from a fresh pass over {corpus}; "
                             f"delete {path} and rebuild")
        del ids
        os.remove(path / ("token_ids.npy" + tag))
    else:
        del ids
        os.replace(path / ("token_ids.npy" + tag), ids_path)
    for name in missing:
        os.replace(path / (files[name] + tag), path / files[name])
        meta["hooks"][name] = {"d": dims[name], "file": files[name], "dtype": dtype}
    tmp = path / f"meta.json{tag}"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, path / "meta.json")
    return ActivationCache(path)
