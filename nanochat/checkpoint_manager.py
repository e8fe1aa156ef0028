"""
Load and save checkpoints in nanochat's on-disk layout, with nanochat's public API.

    <base>/base_checkpoints/<tag>/model_<step:06d>.pt   plain state dict
    <base>/base_checkpoints/<tag>/meta_<step:06d>.json  {"model_config": {...}, ...}
    <base>/tokenizer/{tokenizer.pkl, token_bytes.pt}

Choices, each fixing something nanochat's own Oct-2025 loader got wrong or left loose:
- steps are compared as integers (`model_(\\d+)\\.pt$`), never as strings
- `_orig_mod.` is stripped as a true prefix, not with str.lstrip
- every floating tensor is cast to one compute dtype (a CUDA-trained bf16 wte loads on CPU)
- keys are strict; the nanochat format ("era") is read from the keys and shapes
  (`formats.py`): Oct-2025 loads into `GPT`, the 2026 formats into `GPT2026`, and an
  unknown or ambiguous one is refused with the keys found, never loaded silently wrong
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from nanochat.common import get_base_dir
from nanochat.formats import detect_era
from nanochat.gpt import GPT, rotary_tables
from nanochat.gpt2026 import GPT2026
from nanochat.gpt2026 import rotary_tables as rotary_tables_2026
from nanochat.tokenizer import Tokenizer

SOURCE_DIRS = {
    "base": "base_checkpoints",
    "mid": "mid_checkpoints",
    "sft": "chatsft_checkpoints",
    "rl": "chatrl_checkpoints",
}
_STEP_RE = re.compile(r"^model_(\d+)\.pt$")
_TAG_RE = re.compile(r"d(\d+)")


def load_model(source: str, device, phase: str, model_tag: str | None = None,
               step: int | None = None):
    """nanochat's API: (model, tokenizer, meta) from $NANOCHAT_BASE_DIR/<source dir>."""
    if source not in SOURCE_DIRS:
        raise ValueError(f"unknown source {source!r}; expected one of {sorted(SOURCE_DIRS)}")
    checkpoints_dir = get_base_dir() / SOURCE_DIRS[source]
    if model_tag is None:
        model_tag = find_largest_model(checkpoints_dir)
    return load_model_from_dir(checkpoints_dir / model_tag, device, phase, step=step)


def load_model_from_dir(checkpoint_dir, device, phase: str = "eval", step: int | None = None,
                        tokenizer_dir=None, dtype: torch.dtype = torch.float32):
    """
    (model, tokenizer, meta) from one checkpoint directory, or from a `model_<step>.pt` file
    with its `meta_<step>.json` beside it. The tokenizer is looked up next to the checkpoint
    (nanochat's `<base>/tokenizer`, found by walking up) unless given.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint_dir.is_file():
        m = _STEP_RE.match(checkpoint_dir.name)
        if not m:
            raise ValueError(f"not a nanochat model file (model_<step>.pt): {checkpoint_dir}")
        step = int(m.group(1))
        checkpoint_dir = checkpoint_dir.parent
    if step is None:
        step = find_last_step(checkpoint_dir)
    state_dict, meta = load_checkpoint(checkpoint_dir, step)
    model = build_model(state_dict, meta, device, phase, dtype=dtype,
                        where=str(checkpoint_dir / f"model_{step:06d}.pt"))
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else find_tokenizer_dir(checkpoint_dir)
    tokenizer = Tokenizer.from_directory(tok_dir)
    if tokenizer.get_vocab_size() != model.config.vocab_size:
        raise ValueError(f"tokenizer {tok_dir} has {tokenizer.get_vocab_size()} tokens but the "
                         f"model's vocab_size is {model.config.vocab_size}")
    meta = dict(meta, checkpoint_dir=str(checkpoint_dir), step=meta.get("step", step))
    return model, tokenizer, meta


def find_largest_model(checkpoints_dir) -> str:
    """The tag with the largest d<N>; else the most recently modified directory."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        raise FileNotFoundError(f"no checkpoints directory: {checkpoints_dir}")
    tags = [p for p in checkpoints_dir.iterdir() if p.is_dir()]
    if not tags:
        raise FileNotFoundError(f"no model directories in {checkpoints_dir}")
    numbered = [(int(m.group(1)), p.name) for p in tags if (m := _TAG_RE.match(p.name))]
    if numbered:
        return max(numbered)[1]
    return max(tags, key=lambda p: p.stat().st_mtime).name


def find_last_step(checkpoint_dir) -> int:
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"no checkpoint directory: {checkpoint_dir}")
    steps = [int(m.group(1)) for p in checkpoint_dir.iterdir() if (m := _STEP_RE.match(p.name))]
    if not steps:
        raise FileNotFoundError(f"no model_<step>.pt files in {checkpoint_dir}")
    return max(steps)


def find_tokenizer_dir(checkpoint_dir) -> Path:
    """<checkpoint>/tokenizer, else the nearest ancestor's tokenizer/, else the base dir's."""
    checkpoint_dir = Path(checkpoint_dir).resolve()
    for d in [checkpoint_dir, *checkpoint_dir.parents]:
        if (d / "tokenizer" / "tokenizer.pkl").is_file():
            return d / "tokenizer"
    fallback = get_base_dir() / "tokenizer"
    if (fallback / "tokenizer.pkl").is_file():
        return fallback
    raise FileNotFoundError(f"no tokenizer/tokenizer.pkl found above {checkpoint_dir} "
                            f"or in {fallback}")


def load_checkpoint(checkpoint_dir, step: int):
    checkpoint_dir = Path(checkpoint_dir)
    model_path = checkpoint_dir / f"model_{step:06d}.pt"
    meta_path = checkpoint_dir / f"meta_{step:06d}.json"
    for p in (model_path, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint file missing: {p}")
    try:
        state_dict = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {model_path}: {e}") from e
    if not isinstance(state_dict, dict):
        raise ValueError(f"{model_path} is not a state dict (got {type(state_dict).__name__})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"cannot parse {meta_path}: {e}") from e
    if "model_config" not in meta:
        raise KeyError(f"{meta_path} has no 'model_config'")
    state_dict = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    return state_dict, meta


def build_model(state_dict: dict, meta: dict, device, phase: str = "eval",
                dtype: torch.dtype = torch.float32, where: str = "checkpoint") -> GPT | GPT2026:
    if phase not in ("eval", "train"):
        raise ValueError(f"phase must be 'eval' or 'train', got {phase!r}")
    era = detect_era(state_dict, meta, where=where)  # the model class and its constants
    try:
        config = era.config(meta["model_config"])
    except KeyError as e:
        raise KeyError(f"{where}: {e}") from None
    with torch.device("meta"):
        model = era.model_class(config)
    expected = set(model.state_dict().keys())
    found = set(state_dict.keys())
    if expected != found:
        raise KeyError(f"{where}: state dict keys do not match the model: "
                       f"missing {sorted(expected - found)[:8]}, "
                       f"unexpected {sorted(found - expected)[:8]}")
    for k, p in model.state_dict().items():
        if tuple(state_dict[k].shape) != tuple(p.shape):
            raise ValueError(f"{where}: {k} has shape {tuple(state_dict[k].shape)}, "
                             f"expected {tuple(p.shape)} from model_config")
    device = torch.device(device)
    cast = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
            for k, v in state_dict.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    # the rotary tables are not in the checkpoint: rebuild them on the real device
    if isinstance(model, GPT2026):
        cos, sin = rotary_tables_2026(config, model.rotary_seq_len, device=device)
    else:
        cos, sin = rotary_tables(model.rotary_seq_len, config.n_embd // config.n_head, device=device)
    model.cos, model.sin = cos, sin
    model.train(phase == "train")
    return model


def save_checkpoint(checkpoint_dir, step: int, model_state: dict, meta: dict) -> None:
    """Write model_<step>.pt and meta_<step>.json like nanochat, each atomically."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    model_path = checkpoint_dir / f"model_{step:06d}.pt"
    meta_path = checkpoint_dir / f"meta_{step:06d}.json"
    torch.save(model_state, str(model_path) + ".tmp")
    os.replace(str(model_path) + ".tmp", model_path)
    meta_path.with_suffix(".json.tmp").write_text(json.dumps(meta, indent=2))
    os.replace(meta_path.with_suffix(".json.tmp"), meta_path)
