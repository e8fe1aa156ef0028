"""
Shared small helpers: where files live, which device to use, rank-0 printing.

- nanochat's own files live under $NANOCHAT_BASE_DIR (default ~/.cache/nanochat)
- our caches (the demo model, activation caches) under $NANOCHAT_ATLAS_CACHE
  (default ~/.cache/nanochat-atlas)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def get_base_dir() -> Path:
    """nanochat's base dir. Not created here: its absence means 'no nanochat on this machine'."""
    env = os.environ.get("NANOCHAT_BASE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nanochat"


def get_atlas_cache_dir() -> Path:
    env = os.environ.get("NANOCHAT_ATLAS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nanochat-atlas"


def autodetect_device(requested: str | None = None) -> torch.device:
    """CUDA if available, else MPS, else CPU; `requested` overrides."""
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 autocast on CUDA (as nanochat runs), fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def get_rank() -> int:
    return int(os.environ.get("RANK", 0))


def print0(*args, **kwargs) -> None:
    if get_rank() == 0:
        print(*args, **kwargs)
