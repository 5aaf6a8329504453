"""The process group belongs to the caller's context manager, never to a library call."""

import pytest
import torch.distributed as dist

from invcache.distributed import process_group, rank_and_world
from invcache.errors import UsageError


def test_outside_torchrun_the_context_is_a_single_process_and_creates_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with process_group() as (rank, world):
        assert (rank, world) == (0, 1) and not dist.is_initialized()
    assert rank_and_world() == (0, 1)


def test_a_library_call_under_torchrun_without_the_context_says_what_to_do(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="process_group"):
        rank_and_world()
