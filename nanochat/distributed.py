"""
torchrun support: one process per rank, `torch.distributed` underneath (NCCL on GPUs, gloo on
CPU). Without torchrun's environment (RANK / WORLD_SIZE / LOCAL_RANK) everything here is a
single-process no-op, so every command runs the same code with or without a launcher.

    ctx = init_distributed("cpu")   # reads torchrun's env; ctx.rank, ctx.world, ctx.device
    try:
        ...work on ctx.rank's share...
        agree(ctx, error)           # every rank learns whether any rank failed, and why
    finally:
        shutdown()

Notable choices:
- A rank's failure must not leave the other ranks waiting forever in a collective: work that
  has no collectives inside (mining's pass) reports its outcome through `agree` at the next
  meeting point, so every rank raises the same clear RankFailure naming the failed rank(s).
- The process group is created with the device of this rank (`cuda:LOCAL_RANK`) so NCCL binds
  it eagerly; CPU runs use gloo.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from nanochat.common import autodetect_device


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class RankFailure(RuntimeError):
    """Some rank failed; raised on every rank so all exit non-zero with the same message."""


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


# Ranks meet after long stretches of work of their own (the end of a mining pass, rank 0's
# store write and render), so a collective may wait hours for a live rank; torchrun tears the
# group down when a rank dies, so the long timeout never hides a dead one.
MEETING_TIMEOUT_S = 6 * 3600


def init_distributed(device: str | None = None, timeout_s: float = MEETING_TIMEOUT_S) -> DistContext:
    """Join torchrun's process group (once) and pick this rank's device. `device`: 'cpu',
    'cuda' or None (CUDA when available); a CUDA rank uses cuda:LOCAL_RANK."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return DistContext(device=autodetect_device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = autodetect_device(device)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"rank {rank}: LOCAL_RANK {local_rank} but only "
                               f"{torch.cuda.device_count()} CUDA device(s) on this node")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise RuntimeError(f"rank {rank}: torch.distributed runs on CUDA (NCCL) or CPU (gloo), "
                           f"not {dev.type}; pass --device cpu")
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistContext(rank, world, local_rank, dev)


def shutdown(clean: bool = True) -> None:
    """Leave the process group. After a clean finish the ranks leave together (a barrier
    first), so no rank closes its connections while a peer is still using them; after a
    failure there is nobody to wait for."""
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def broadcast_object(ctx: DistContext, obj, src: int = 0):
    """`obj` of rank `src` on every rank (picklable; small decisions, not tensors)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def agree(ctx: DistContext, error: BaseException | None) -> None:
    """Meeting point: every rank says whether it failed. If any did, every rank raises a
    RankFailure naming the failed ranks and their errors (the failed rank chains its own)."""
    if not ctx.enabled:
        if error is not None:
            raise error
        return
    mine = None if error is None else "".join(
        traceback.format_exception_only(type(error), error)).strip()
    outcomes: list = [None] * ctx.world
    dist.all_gather_object(outcomes, mine)
    failed = [(r, msg) for r, msg in enumerate(outcomes) if msg is not None]
    if failed:
        lines = "\n".join(f"  rank {r}: {msg}" for r, msg in failed)
        raise RankFailure(f"{len(failed)} of {ctx.world} rank(s) failed; no output was "
                          f"written:\n{lines}") from error


def rank_slice(n: int, ctx: DistContext) -> tuple[int, int]:
    """[start, end) of this rank's share of n items, in rank order, as even as possible."""
    per, extra = divmod(n, ctx.world)
    start = ctx.rank * per + min(ctx.rank, extra)
    return start, start + per + (ctx.rank < extra)
