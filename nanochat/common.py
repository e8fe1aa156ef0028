"""
Shared small helpers: where files live, which device and how many CPU threads to use.

- nanochat's own files live under $NANOCHAT_BASE_DIR (default ~/.cache/nanochat)
- our caches (the demo model, activation caches) under $NANOCHAT_ATLAS_CACHE
  (default ~/.cache/nanochat-atlas)
"""

from __future__ import annotations

import os
import time
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


def set_threads(threads: int | None) -> int:
    """Set torch's CPU thread count: `threads`, or `pick_threads()` when None."""
    threads = threads or pick_threads()
    torch.set_num_threads(threads)
    return threads


def pick_threads() -> int:
    """All cores, unless one thread is faster right now. On a machine whose cores are busy
    with other processes, a multi-threaded op waits at every barrier for its descheduled
    threads: we measured 2 threads at 3.5x slower than 1 for this model on a loaded 2-core
    box, against 1.7x faster when it is idle. A median of a few small matmul timings decides
    (about 0.1 s)."""
    cores = core_count()
    if cores == 1:
        return 1
    a, b = torch.randn(1024, 128), torch.randn(128, 512)  # the size of the model's own matmuls

    def timed(n: int) -> float:
        torch.set_num_threads(n)
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(4):
                a @ b
            runs.append(time.perf_counter() - t)
        return sorted(runs)[len(runs) // 2]

    return cores if timed(cores) < timed(1) else 1


def core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def auto_threads(device: torch.device) -> int | None:
    """On a CPU, unless OMP_NUM_THREADS says otherwise (torchrun sets it for its ranks), pick
    the thread count for the work about to start (`pick_threads`); returns it, or None."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    return set_threads(None)
