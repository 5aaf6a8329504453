"""torchrun awareness shared by extraction and training: the process group's lifetime, rank, device."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from invcache.errors import InvcacheError, UsageError
from invcache.settings import DIST_TIMEOUT_S

Result = TypeVar("Result")


@contextmanager
def process_group(timeout_s: float = DIST_TIMEOUT_S) -> Iterator[tuple[int, int]]:
    """Join torchrun's process group for the block and leave it afterwards; yields (rank, world size).

    Outside torchrun (``WORLD_SIZE`` unset or 1) it does nothing. A group that already exists
    is used and left alone; only a group this block created is torn down. An exception on one
    rank tears its group down on the way out, which fails the peers' pending collectives
    instead of leaving them at a barrier until ``timeout_s`` (torchrun also stops the other
    ranks when one exits with an error).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    created = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            # NCCL's object collectives (rank0_first) run on the current device: make it this rank's GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        created = True
    try:
        yield rank_and_world()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; under torchrun the process group must already be joined."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise UsageError(f"launched by torchrun (WORLD_SIZE={world}) without a process group: call this inside "
                         "`with invcache.distributed.process_group():` (the invcache command does)")
    return 0, 1


def rank0_first(first: Callable[[], Result], then: Callable[[], Result], rank: int, world: int) -> Result:
    """Rank 0 runs ``first``; once it has succeeded the other ranks run ``then``.

    A user error on rank 0 is re-raised on every rank, so none is left waiting at a barrier.
    """
    if world == 1:
        return first()
    outcome: list = [None]
    result = None
    if rank == 0:
        try:
            result = first()
        except InvcacheError as exc:
            outcome[0] = (isinstance(exc, UsageError), str(exc))
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        is_usage, message = outcome[0]
        raise (UsageError if is_usage else InvcacheError)(message)
    return result if rank == 0 else then()


def resolve_device(text: str | None, rank: int = 0) -> torch.device:
    """``--device`` (default: this rank's GPU, else the CPU); a bad or unavailable device is a UsageError."""
    if text is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"bad --device {text!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text}: no CUDA device is available here")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"bad --device {text!r}: expected cpu, cuda or cuda:N")
    return device


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


