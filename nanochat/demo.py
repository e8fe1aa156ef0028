"""
The embedded demo model: a small nanochat trained from scratch on text that every Python
install carries, so the atlas works on a machine with no nanochat checkpoint.

Built once and cached in nanochat's own on-disk layout, so it loads through exactly the
same code as a real checkpoint (`load_model_from_dir`, `resolve_model`):

    <cache>/demo/default/                 ($NANOCHAT_ATLAS_CACHE, default ~/.cache/nanochat-atlas)
        base_data/shard_00000.parquet ... one `text` column, row groups of 1024 docs;
                                          the last shard is the val split
        tokenizer/tokenizer.pkl, token_bytes.pt
        base_checkpoints/d20/model_<step:06d>.pt, meta_<step:06d>.json
        demo.json                         completion marker: config, stats, size + sha256 of every file

Notable choices:
- corpus: the standard library's .py sources (sorted walk; test suites, site-packages,
  generated codec tables and pydoc_data skipped) plus every pydoc topic, shuffled with a fixed
  seed before sharding so train and val look alike. It depends on the Python version, which
  the meta records.
- tokenizer: rustbpe on the train split, as nanochat's tok_train (documents cropped to 10k chars).
- model: nanochat's GPT, 20 layers x 128 wide (head_dim 64), so layers such as 4, 10, 16 exist.
  AdamW with nanochat's three learning rates (embedding, unembedding, matrices), short linear
  warmup, linear warmdown to 0, gradient clipping at 1.0.
- data: BOS-aligned windows (`nanochat.dataset.iter_windows`) of seq_len + 1 tokens, tokenized
  once into a (rows, seq_len + 1) tensor; padding targets are ignored (-1). Epoch e visits the
  rows in the permutation seeded by (seed, e), so the batch at a step is a pure function of the
  step: that is what makes resuming exact.
- building: everything is written into `<dir>.build/` and renamed into place at the end. The
  training state is saved there every ~60 s (`train_state.pt`), so an interrupted build resumes
  where it stopped when the same config is built again.
- reuse: `demo.json` lists each file's size and sha256; a missing, partial or corrupt cache,
  or one built from another config, is rebuilt with a message. Each config has its own
  directory: a preset's name (`default`, `tiny`), else `d<depth>w<width>v<vocab>-<hash>`.
  NANOCHAT_ATLAS_DEMO=tiny makes every command fall back to the tiny preset (seconds to
  build) instead: for tests and CI.
- the validation loss is reported beside a unigram baseline (train token frequencies,
  add-one smoothed) in the same units: nats/token and bits/byte (nanochat's `token_bytes`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.common import autocast, autodetect_device, get_atlas_cache_dir, set_threads
from nanochat.dataset import iter_documents, iter_windows
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer

MARKER = "demo.json"
FORMAT_VERSION = 1
TRAIN_STATE = "train_state.pt"
BUILD_STATE = "build.json"
TOKENIZER_DOC_CAP = 10_000  # nanochat's tok_train crops documents like this
ROW_GROUP_SIZE = 1024       # nanochat's shards hold 1024 documents per row group
# settings that change how fast a build runs, not what it produces
RUNTIME_FIELDS = ("device", "threads", "checkpoint_every_s")
# stdlib directories left out of the corpus: test suites (huge, repetitive), third-party
# packages, generated codec tables, and pydoc_data (its topics are added as documents)
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
             "encodings", "pydoc_data"}


@dataclass(frozen=True)
class DemoConfig:
    # model
    depth: int = 20
    n_embd: int = 128
    n_head: int | None = None      # None: n_embd // 64 heads (head_dim 64)
    vocab_size: int = 4096
    seq_len: int = 256
    # training
    # ~300k tokens: about 4-5 minutes on 2 idle CPU cores, from CPU-time measurements
    # (bench/RESULTS_demo.md); a busy machine takes longer
    tokens: int = 300_000          # steps = tokens / (batch_size x seq_len); `steps` overrides
    steps: int | None = None
    batch_size: int = 4            # rows of seq_len tokens per step: more steps beat bigger ones here
    # AdamW learning rates, from a sweep at depth 4 (bench/RESULTS_demo.md): the unembedding
    # wants a much higher lr than the block matrices in a run this short
    lr: float = 0.002              # block matrices
    embedding_lr: float = 0.1
    unembedding_lr: float = 0.03
    warmup_steps: int = 20
    warmdown_frac: float = 0.5     # the last half of the steps decays linearly to 0
    grad_clip: float = 1.0
    seed: int = 0
    eval_tokens: int = 32_768      # val tokens for the loss and the unigram baseline
    # corpus
    data: str | None = None        # another corpus (.parquet/.txt/.jsonl file or dir); None: stdlib
    max_corpus_chars: int | None = None
    val_fraction: float = 0.05     # of the stdlib documents (a --data corpus has its own split)
    train_shards: int = 4
    # runtime only (not part of the cache key)
    device: str | None = None      # None: CUDA, else MPS, else CPU
    threads: int | None = None     # None: all cores, or 1 while that is faster (see nanochat.common.pick_threads)
    checkpoint_every_s: float = 60.0

    @property
    def heads(self) -> int:
        return self.n_head or max(1, self.n_embd // 64)

    @property
    def model_tag(self) -> str:
        return f"d{self.depth}"

    @property
    def model_id(self) -> str:
        return f"nanochat-demo-{self.model_tag}"

    def validate(self) -> None:
        if self.depth < 1 or self.n_embd < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise ValueError(f"depth, width, batch size must be >= 1 and seq_len >= 2: {self}")
        if self.n_embd % self.heads or (self.n_embd // self.heads) % 2:
            raise ValueError(f"width {self.n_embd} with {self.heads} heads: the head dim must "
                             f"be a whole, even number")
        if self.vocab_size < 256 + 9 + 1:
            raise ValueError(f"vocab_size {self.vocab_size} is too small: 256 byte tokens + 9 "
                             f"special tokens + at least one merge")
        if (self.steps is not None and self.steps < 1) or self.tokens < 1:
            raise ValueError(f"steps / tokens must be >= 1 (steps={self.steps}, tokens={self.tokens})")
        if not 0 < self.val_fraction < 1 or self.train_shards < 1 or not 0 <= self.warmdown_frac <= 1:
            raise ValueError(f"val_fraction {self.val_fraction} must be in (0, 1), warmdown_frac "
                             f"{self.warmdown_frac} in [0, 1], train_shards {self.train_shards} >= 1")

    def num_steps(self) -> int:
        return self.steps or max(1, math.ceil(self.tokens / (self.batch_size * self.seq_len)))

    def identity(self) -> dict:
        """Every setting that changes the result; this is the cache key."""
        d = asdict(self)
        for k in RUNTIME_FIELDS:
            d.pop(k)
        d["format"] = FORMAT_VERSION
        return d

    def dirname(self) -> str:
        for name, preset in PRESETS.items():
            if self.identity() == preset.identity():
                return name
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()
        return f"d{self.depth}w{self.n_embd}v{self.vocab_size}-{digest[:10]}"


PRESETS = {
    "default": DemoConfig(),
    # builds in seconds: for tests, and for CI runs of the whole pipeline
    # (NANOCHAT_ATLAS_DEMO=tiny); one thread, as a tiny model gains nothing from more
    "tiny": DemoConfig(depth=4, n_embd=32, vocab_size=300, seq_len=64, steps=60, batch_size=8,
                       lr=0.01, unembedding_lr=0.01, warmup_steps=5, eval_tokens=4096,
                       max_corpus_chars=300_000, train_shards=2, threads=1),
}


def preset_config(name: str | None = None) -> DemoConfig:
    """A named config; without a name, $NANOCHAT_ATLAS_DEMO's, else the default."""
    name = name or os.environ.get("NANOCHAT_ATLAS_DEMO") or "default"
    if name not in PRESETS:
        raise ValueError(f"unknown demo preset {name!r} (from NANOCHAT_ATLAS_DEMO or --preset); "
                         f"expected one of {sorted(PRESETS)}")
    return PRESETS[name]


def default_cache_dir() -> Path:
    return get_atlas_cache_dir() / "demo"


def ensure_demo(cache_dir=None, config: DemoConfig | None = None, quiet: bool = False,
                force: bool = False) -> Path:
    """
    The demo's base dir (laid out like $NANOCHAT_BASE_DIR), built on first use and reused
    after. `cache_dir` (default $NANOCHAT_ATLAS_CACHE/demo) holds one directory per config;
    `config` defaults to the preset named by $NANOCHAT_ATLAS_DEMO, else the default one.
    """
    config = config or preset_config()
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return ensure_demo_at(root / config.dirname(), config, quiet=quiet, force=force, owned=True)


def ensure_demo_at(path, config: DemoConfig | None = None, quiet: bool = False,
                   force: bool = False, owned: bool = False) -> Path:
    """
    Build the demo into exactly `path` unless a verified build of `config` is already there.
    A directory that is not a demo build (no demo.json) is only replaced when `owned`.
    """
    config = config or DemoConfig()
    config.validate()
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(path):
        problem = check_demo(path, config)
        if problem is None and not force:
            return path
        if path.exists() and not owned and not (path / MARKER).exists() and \
                (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"{path} exists and is not a demo build (no {MARKER}); "
                                  f"refusing to overwrite it")
        if path.exists():
            _say(quiet, f"demo model at {path}: {'--force given' if force else problem}; rebuilding")
        else:
            _say(quiet, f"building the demo model into {path} (once; the default demo takes "
                        f"about 5 minutes on 2 CPU cores)")
        build_dir = path.with_name(path.name + ".build")
        if force and build_dir.exists():
            shutil.rmtree(build_dir)
        build_demo(build_dir, config, quiet=quiet)
        if path.exists():
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            shutil.rmtree(old)
        os.replace(build_dir, path)
    return path


def check_demo(path, config: DemoConfig) -> str | None:
    """None if `path` holds a complete build of `config`, else what is wrong with it."""
    path = Path(path)
    marker = path / MARKER
    if not path.is_dir():
        return "not built yet"
    if not marker.is_file():
        return f"{MARKER} is missing (an incomplete build)"
    try:
        info = json.loads(marker.read_text())
        files, built_config = info["files"], info["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"{MARKER} is unreadable ({e})"
    if built_config != config.identity():
        changed = sorted(k for k in set(built_config) | set(config.identity())
                         if built_config.get(k) != config.identity().get(k))
        return f"built with other settings ({', '.join(changed)})"
    for rel, expect in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != expect["size"]:
            return f"{rel} has {f.stat().st_size} bytes, expected {expect['size']}"
        if _sha256(f) != expect["sha256"]:
            return f"{rel} does not match its recorded sha256"
    return None


def load_demo_info(path) -> dict:
    """The completion marker of a built demo: config, corpus and training stats, file hashes."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"not a demo build (no {MARKER}): {path}")
    return json.loads(marker.read_text())


# -----------------------------------------------------------------------------
# the build: corpus -> tokenizer -> model, each stage recorded so a rerun skips it

def build_demo(build_dir, config: DemoConfig, quiet: bool = False) -> dict:
    """Build every file of the demo into `build_dir`, resuming a previous partial build of the
    same config found there. Returns the marker's contents."""
    build_dir = Path(build_dir)
    state_path = build_dir / BUILD_STATE
    state = _read_json(state_path)
    if state is None or state.get("config") != config.identity():
        if build_dir.exists():
            _say(quiet, f"discarding the partial build in {build_dir} (other settings, or too "
                        f"little done to resume)")
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True)
        state = {"config": config.identity(), "stages": {}}
        _write_json(state_path, state)
    else:
        _say(quiet, f"resuming the partial demo build in {build_dir} "
                    f"(done: {', '.join(state['stages']) or 'nothing yet'})")
    t_start = time.time()
    stages = state["stages"]
    if "corpus" not in stages:
        stages["corpus"] = write_corpus(build_dir / "base_data", config, quiet)
        _write_json(state_path, state)
    if "tokenizer" not in stages:
        t0 = time.time()
        _say(quiet, f"training a {config.vocab_size}-token BPE tokenizer on the train split")
        docs = (d[:TOKENIZER_DOC_CAP] for d in iter_documents(build_dir / "base_data", "train"))
        Tokenizer.train_from_iterator(docs, config.vocab_size).save(build_dir / "tokenizer")
        stages["tokenizer"] = {"seconds": round(time.time() - t0, 2)}
        _write_json(state_path, state)
    if "model" not in stages:
        stages["model"] = train_demo_model(build_dir, config, stages["corpus"], quiet)
        _write_json(state_path, state)
    info = {
        "format": FORMAT_VERSION,
        "model_id": config.model_id,
        "config": config.identity(),
        "corpus": stages["corpus"],
        "tokenizer": stages["tokenizer"],
        "training": stages["model"],
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "files": _file_manifest(build_dir),
    }
    _write_json(build_dir / MARKER, info)
    state_path.unlink()
    _say(quiet, f"demo build finished in {time.time() - t_start:.0f} s (this session)")
    return info


# -----------------------------------------------------------------------------
# corpus

def stdlib_documents() -> list[str]:
    """The stdlib's .py sources (sorted walk) then the pydoc topics (sorted by name)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                docs.append((Path(dirpath) / name).read_text(encoding="utf-8", errors="replace"))
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    docs.extend(topics[k] for k in sorted(topics))
    return [d for d in docs if d.strip()]


def write_corpus(data_dir: Path, config: DemoConfig, quiet: bool = False) -> dict:
    """nanochat-style parquet shards: `train_shards` train shards, then one val shard."""
    if config.data:
        source = str(Path(config.data).expanduser().absolute())
        train = _take_chars(iter_documents(source, "train"), config.max_corpus_chars)
        val_cap = None if config.max_corpus_chars is None else \
            max(1, int(config.max_corpus_chars * config.val_fraction))
        val = _take_chars(iter_documents(source, "val"), val_cap)
    else:
        source = f"python {platform.python_version()} stdlib + pydoc topics"
        docs = stdlib_documents()
        random.Random(config.seed).shuffle(docs)
        docs = _take_chars(docs, config.max_corpus_chars)
        n_val = max(1, round(len(docs) * config.val_fraction))
        train, val = docs[:-n_val], docs[-n_val:]
    if not train or not val:
        raise ValueError(f"corpus {source}: {len(train)} train and {len(val)} val documents; "
                         f"both splits need at least one")
    n_shards = min(config.train_shards, len(train))
    bounds = [round(i * len(train) / n_shards) for i in range(n_shards + 1)]
    shards = [train[a:b] for a, b in zip(bounds, bounds[1:])] + [val]
    data_dir.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(shards):
        _write_shard(data_dir / f"shard_{i:05d}.parquet", shard)
    stats = {"source": source, "train_docs": len(train), "val_docs": len(val),
             "train_chars": sum(map(len, train)), "val_chars": sum(map(len, val)),
             "shards": len(shards)}
    _say(quiet, f"corpus: {source}: {stats['train_docs']} train docs "
                f"({stats['train_chars'] / 1e6:.1f}M chars), {stats['val_docs']} val docs "
                f"({stats['val_chars'] / 1e6:.2f}M chars) in {len(shards)} shards")
    return stats


def _take_chars(docs, max_chars: int | None) -> list[str]:
    out, total = [], 0
    for d in docs:
        if max_chars is not None and total >= max_chars:
            break
        if d.strip():
            out.append(d)
            total += len(d)
    return out


def _write_shard(path: Path, docs: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    tmp = path.with_name(path.name + ".tmp")
    # nanochat's shard writer settings (dev/repackage_data_reference.py)
    pq.write_table(pa.table({"text": docs}), tmp, row_group_size=ROW_GROUP_SIZE,
                   use_dictionary=False, compression="zstd", compression_level=3,
                   write_statistics=False)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# training

def train_demo_model(base_dir: Path, config: DemoConfig, corpus: dict, quiet: bool = False) -> dict:
    """Train, evaluate and save the model into base_dir/base_checkpoints/<tag>/."""
    device = autodetect_device(config.device)
    prev_threads = torch.get_num_threads()
    try:
        tokenizer = Tokenizer.from_directory(base_dir / "tokenizer")
        token_bytes = torch.load(base_dir / "tokenizer" / "token_bytes.pt", weights_only=True)
        t0 = time.time()
        train_rows = tokenize_rows(iter_documents(base_dir / "base_data", "train"), tokenizer,
                                   config.seq_len)
        val_rows = eval_rows(base_dir, tokenizer, config)
        _say(quiet, f"tokenized: {_n_targets(train_rows):,} train tokens in {len(train_rows):,} "
                    f"windows, {_n_targets(val_rows):,} val tokens ({time.time() - t0:.1f} s)")
        model_config = GPTConfig(sequence_len=config.seq_len, vocab_size=tokenizer.get_vocab_size(),
                                 n_layer=config.depth, n_head=config.heads,
                                 n_kv_head=config.heads, n_embd=config.n_embd)
        model, stats = train_model(model_config, train_rows, config, device,
                                   base_dir / TRAIN_STATE, quiet)
        val_loss, val_bpb = evaluate(model, val_rows, token_bytes, 4 * config.batch_size, device)
        uni_loss, uni_bpb = unigram_baseline(train_rows, val_rows, token_bytes,
                                             model_config.vocab_size)
    finally:
        torch.set_num_threads(prev_threads)
    stats.update(val_loss=round(val_loss, 4), val_bpb=round(val_bpb, 4),
                 unigram_val_loss=round(uni_loss, 4), unigram_val_bpb=round(uni_bpb, 4),
                 val_tokens=_n_targets(val_rows))
    meta = {
        # nanochat's base_train keys
        "step": stats["steps"],
        "val_bpb": stats["val_bpb"],
        "model_config": asdict(model_config),
        "user_config": dict(config.identity(), device=str(device), threads=stats["threads"]),
        "device_batch_size": config.batch_size,
        "max_seq_len": config.seq_len,
        # ours
        "model_id": config.model_id,
        "val_loss": stats["val_loss"],
        "unigram_val_loss": stats["unigram_val_loss"],
        "unigram_val_bpb": stats["unigram_val_bpb"],
        "train_tokens": stats["train_tokens"],
        "tokens_per_s": stats["tokens_per_s"],
        "train_seconds": stats["train_seconds"],
        "corpus": corpus,
        "python_version": platform.python_version(),
    }
    save_checkpoint(base_dir / "base_checkpoints" / config.model_tag, stats["steps"],
                    {k: v.detach().cpu() for k, v in model.state_dict().items()}, meta)
    (base_dir / TRAIN_STATE).unlink(missing_ok=True)
    _say(quiet, f"val loss {val_loss:.3f} nats/token = {val_bpb:.3f} bits/byte; unigram "
                f"baseline {uni_loss:.3f} nats/token = {uni_bpb:.3f} bits/byte")
    return stats


def tokenize_rows(docs, tokenizer, seq_len: int) -> torch.Tensor:
    """BOS-aligned windows of seq_len + 1 tokens as an int32 (rows, seq_len + 1) tensor,
    padded with -1. Row r trains inputs row[:-1] against targets row[1:]."""
    rows = [w.tokens + [-1] * (seq_len + 1 - len(w.tokens))
            for w in iter_windows(docs, tokenizer, seq_len + 1)
            if len(w.tokens) >= 2]  # an empty document has nothing to predict
    if not rows:
        raise ValueError("the corpus split yields no token windows")
    return torch.tensor(rows, dtype=torch.int32)


def eval_rows(base_dir, tokenizer, config: DemoConfig) -> torch.Tensor:
    """About `eval_tokens` val tokens in windows spread evenly over the whole val split: its
    documents differ a lot in bytes per token, so its first windows alone are a biased sample."""
    rows = tokenize_rows(iter_documents(Path(base_dir) / "base_data", "val"), tokenizer,
                         config.seq_len)
    n = min(len(rows), math.ceil(config.eval_tokens / config.seq_len))
    return rows[torch.linspace(0, len(rows) - 1, n).round().long()]


def train_model(model_config: GPTConfig, rows: torch.Tensor, config: DemoConfig, device,
                state_path: Path, quiet: bool = False):
    """AdamW on BOS-aligned windows; saves its state to `state_path` every
    `checkpoint_every_s` seconds and resumes from it. Sets torch's thread count (the caller
    restores it). Returns (model, stats)."""
    from tqdm import tqdm

    device = torch.device(device)
    threads = set_threads(config.threads)
    thread_steps: dict[int, int] = {}
    n_steps = config.num_steps()
    model = GPT(model_config)
    model.init_weights(seed=config.seed)
    model.to(device)
    # the same bf16-rounded values held as fp32: identical numbers, but the rotary multiply
    # no longer mixes dtypes, which is markedly slower on CPU (the buffers are not saved)
    model.cos, model.sin = model.cos.float(), model.sin.float()
    optimizer = make_optimizer(model, config, device)
    step, elapsed, tokens_seen, smooth_loss = 0, 0.0, 0, None
    if state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, tokens_seen = state["step"], state["elapsed"], state["tokens_seen"]
        smooth_loss = state["smooth_loss"]
        _say(quiet, f"resuming training at step {step}/{n_steps} from {state_path}")
    batches = EpochSampler(len(rows), config.batch_size, config.seed)
    _say(quiet, f"training {config.model_id}: {config.depth} layers x {config.n_embd} wide, "
                f"{config.heads} head{'s' if config.heads > 1 else ''}, vocab {model_config.vocab_size}, "
                f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params; {n_steps} steps "
                f"of {config.batch_size} x {config.seq_len} tokens on {device} ({threads} "
                f"thread{'s' if threads > 1 else ''}{'' if config.threads else ', rechecked every save'})")
    model.train()
    bar = tqdm(total=n_steps, initial=step, desc="demo model", unit="step",
               disable=quiet or None)
    t_last_save = time.time()
    t_segment, tokens_segment = time.time(), 0
    while step < n_steps:
        batch = rows[batches.indices(step)].to(device=device, dtype=torch.long)
        x, y = batch[:, :-1].clamp(min=0), batch[:, 1:]  # padded inputs sit after every target
        lr_mult = lr_multiplier(step, n_steps, config)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
        with autocast(device):
            loss = model(x, y)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        thread_steps[threads] = thread_steps.get(threads, 0) + 1
        n_tok = int((y >= 0).sum())
        tokens_seen += n_tok
        tokens_segment += n_tok
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training diverged at step {step} (loss {loss_value}); "
                                     f"lower the learning rates")
        smooth_loss = loss_value if smooth_loss is None else 0.9 * smooth_loss + 0.1 * loss_value
        now = time.time()
        bar.update(1)
        bar.set_postfix(loss=f"{smooth_loss:.3f}",
                        tok_s=f"{tokens_segment / max(now - t_segment, 1e-9):.0f}",
                        threads=threads, refresh=False)
        if now - t_last_save >= config.checkpoint_every_s or step == n_steps:
            # the final save too: an interruption during evaluation does not cost the training
            _save_train_state(state_path, model, optimizer, step,
                              elapsed + now - t_segment, tokens_seen, smooth_loss)
            t_last_save = time.time()
            threads = set_threads(config.threads)  # the machine's load may have changed
    bar.close()
    elapsed += time.time() - t_segment
    model.eval()
    return model, {"steps": n_steps, "train_tokens": tokens_seen,
                   "train_seconds": round(elapsed, 1),
                   "tokens_per_s": round(tokens_seen / max(elapsed, 1e-9)),
                   "final_train_loss": round(smooth_loss, 4),
                   "threads": max(thread_steps, key=thread_steps.get, default=threads),
                   "steps_per_thread_count": {str(k): v for k, v in sorted(thread_steps.items())},
                   "device": str(device)}


class EpochSampler:
    """Row indices for a step: epoch e visits every row once, in the order of a permutation
    seeded by (seed, e); batches run on across epoch boundaries."""

    def __init__(self, n_rows: int, batch_size: int, seed: int):
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def indices(self, step: int) -> torch.Tensor:
        start = step * self.batch_size
        out = []
        for j in range(start, start + self.batch_size):
            epoch, i = divmod(j, self.n_rows)
            out.append(int(self._perm(epoch)[i]))
        return torch.tensor(out)

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs
                del self._perms[min(self._perms)]
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n_rows, generator=gen)
        return self._perms[epoch]


def make_optimizer(model: GPT, config: DemoConfig, device) -> torch.optim.Optimizer:
    """AdamW with nanochat's three groups; betas and eps as nanochat's AdamW, no weight decay."""
    groups = [
        {"params": [model.transformer.wte.weight], "lr": config.embedding_lr},
        {"params": [model.lm_head.weight], "lr": config.unembedding_lr},
        {"params": [p for p in model.transformer.h.parameters()], "lr": config.lr},
    ]
    for g in groups:
        g["initial_lr"] = g["lr"]
    fused = torch.device(device).type in ("cpu", "cuda")  # one kernel per step, not one per tensor
    return torch.optim.AdamW(groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0,
                             fused=fused or None)


def lr_multiplier(step: int, n_steps: int, config: DemoConfig) -> float:
    """Linear warmup, constant, then a linear warmdown to 0 over the last warmdown_frac."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    warmdown = max(1, round(config.warmdown_frac * n_steps))
    if step >= n_steps - warmdown:
        return max(0.0, (n_steps - step) / warmdown)
    return 1.0


@torch.inference_mode()
def evaluate(model: GPT, rows: torch.Tensor, token_bytes: torch.Tensor, batch_size: int,
             device) -> tuple[float, float]:
    """(loss in nats/token, bits/byte) on `rows`; bits/byte as nanochat's evaluate_bpb:
    targets with zero bytes (special tokens) are left out of both sums."""
    device = torch.device(device)
    sum_loss, n_tokens, sum_nats, sum_bytes = 0.0, 0, 0.0, 0
    token_bytes = token_bytes.to(device)
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size].to(device=device, dtype=torch.long)
        x, y = batch[:, :-1].clamp(min=0), batch[:, 1:].reshape(-1)
        with autocast(device):
            losses = model(x, batch[:, 1:], loss_reduction="none").float()
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], 0)
        sum_loss += losses[valid].sum().item()
        n_tokens += int(valid.sum())
        sum_nats += losses[nbytes > 0].sum().item()
        sum_bytes += int(nbytes.sum())
    return sum_loss / n_tokens, sum_nats / (math.log(2) * sum_bytes)


def unigram_baseline(train_rows: torch.Tensor, val_rows: torch.Tensor, token_bytes: torch.Tensor,
                     vocab_size: int) -> tuple[float, float]:
    """The train split's add-one-smoothed token frequencies scored on the val targets:
    (nats/token, bits/byte), the same units and tokens as `evaluate`."""
    train_targets = train_rows[:, 1:].reshape(-1).long()
    counts = torch.bincount(train_targets[train_targets >= 0], minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    y = val_rows[:, 1:].reshape(-1).long()
    y = y[y >= 0]
    nats = -logp[y]
    nbytes = token_bytes.long()[y]
    return nats.mean().item(), nats[nbytes > 0].sum().item() / (math.log(2) * nbytes.sum().item())


# -----------------------------------------------------------------------------
# helpers

def _save_train_state(path: Path, model, optimizer, step, elapsed, tokens_seen, smooth_loss):
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "elapsed": elapsed, "tokens_seen": tokens_seen, "smooth_loss": smooth_loss}, tmp)
    os.replace(tmp, path)


def _n_targets(rows: torch.Tensor) -> int:
    return int((rows[:, 1:] >= 0).sum())


def _file_manifest(base_dir: Path) -> dict:
    files = sorted(p for p in base_dir.rglob("*")
                   if p.is_file() and p.name not in (MARKER, BUILD_STATE))
    return {p.relative_to(base_dir).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in files}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


@contextlib.contextmanager
def _build_lock(path: Path):
    """One builder per directory: a second process waits, then finds the finished build."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; builds are still atomic renames
        yield
        return
    with open(path.with_name(path.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)
