"""torchrun awareness shared by extraction and training: process group, rank, device."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from invcache.errors import InvcacheError, UsageError

Result = TypeVar("Result")


def init_distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        # Ranks legitimately wait on each other for long (a resumed extraction whose shards on
        # one rank are already complete), so the collective timeout is generous.
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=12))
    return dist.get_rank(), dist.get_world_size()


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


def finish(world: int) -> None:
    if world > 1:
        dist.destroy_process_group()
