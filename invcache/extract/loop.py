"""The extraction loop: batches in, whole shards out, with the device, the host and the writers overlapped.

- DataLoader workers decode and resize (no pinning thread: uint8 batches are small and the
  copy to the device is not what limits a run);
- the forward of batch i+1 is queued on the device before the host copies batch i's taps
  (a non-blocking device-to-host copy into pinned memory, waited on one batch later);
- rows are gathered into whole-shard buffers; a full shard goes to a pool of writer threads
  while the loop continues; at most ``writers`` shards are being written while the next are
  filled (one or two for a folder source, whose batches arrive in row order; up to one per
  DataLoader worker for webdataset), so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from invcache.cache import schema as S
from invcache.cache.store import Cache
from invcache.errors import InvcacheError
from invcache.forward import forward_taps
from invcache.taps import INPUT


class ShardBuffer:
    """Rows of one shard gathered from batches until the shard is whole."""

    def __init__(self, shard: int, start: int, stop: int, tap_shapes: dict) -> None:
        self.shard, self.start, self.rows = shard, start, stop - start
        self.taps = {t: np.zeros((self.rows, *shape), S.tap_dtype(t)) for t, shape in tap_shapes.items()}
        self.meta = S.empty_bookkeeping(self.rows)
        self.filled = 0


def loader_batches(dataset, rows: list[int], batch_size: int, num_workers: int) -> Iterator[dict]:
    """Batches of the given dataset rows, in order, each with its ``row`` numbers."""
    if hasattr(dataset, "iter_rows"):
        yield from dataset.iter_rows(rows, batch_size, num_workers)
        return
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, rows), batch_size=batch_size, num_workers=num_workers,
        prefetch_factor=4 if num_workers else None,
    )
    position = 0
    for batch in loader:
        count = len(batch["image_id"])
        batch["row"] = torch.as_tensor(rows[position:position + count])
        position += count
        yield batch


def _start_host_copy(out: dict[str, torch.Tensor], batch: dict, taps: list[str]) -> tuple[dict, object]:
    """fp16 copies of the taps on the host; on CUDA non-blocking, with an event to wait on."""
    host, event = {}, None
    for tap in taps:
        if tap == INPUT:
            host[tap] = batch["input"]
            continue
        values = out[tap].to(torch.float16)
        if values.is_cuda:
            pinned = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            pinned.copy_(values, non_blocking=True)
            host[tap] = pinned
        else:
            host[tap] = values
    if any(t.is_cuda for t in out.values()):
        event = torch.cuda.Event()
        event.record()
    return host, event


def run_extraction(
    cache: Cache,
    batches: Iterator[dict],
    image_ids: Sequence[int],
    model,
    taps: list[str],
    amp: torch.dtype | None,
    writers: int,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Forward every batch, assemble whole shards, write them; returns the raw bytes written."""
    tap_shapes = {t: tuple(cache.array(t).shape[1:]) for t in taps}
    image_ids = np.asarray(image_ids, dtype=np.int64)
    buffers: dict[int, ShardBuffer] = {}
    in_flight: list[Future] = []
    raw_bytes = 0

    def finish(future: Future) -> None:
        nonlocal raw_bytes
        written, images = future.result()
        raw_bytes += written
        if progress:
            progress(images, written)

    def write(buffer: ShardBuffer) -> tuple[int, int]:
        return cache.write_shard(buffer.shard, buffer.taps, buffer.meta, codec_pool), buffer.rows

    def place(batch: dict, host: dict, event) -> None:
        if event is not None:
            event.synchronize()
        arrays = {t: v.numpy() for t, v in host.items()}
        valid = batch["valid"].numpy().astype(bool)
        batch_rows = batch["row"].numpy()
        batch_ids = batch["image_id"].numpy()
        expected = image_ids[batch_rows]
        if not np.array_equal(batch_ids, expected):
            i = int(np.flatnonzero(batch_ids != expected)[0])
            raise InvcacheError(
                f"image order changed: row {batch_rows[i]} is id {batch_ids[i]}, the cache expects {expected[i]}"
            )
        for first, last in _runs(batch_rows, cache.shard_size):
            shard = int(batch_rows[first]) // cache.shard_size
            if shard not in buffers:
                buffers[shard] = ShardBuffer(shard, *cache.shard_bounds(shard), tap_shapes)
            buffer = buffers[shard]
            rows = slice(int(batch_rows[first]) - buffer.start, int(batch_rows[last - 1]) - buffer.start + 1)
            for t in taps:
                buffer.taps[t][rows] = arrays[t][first:last]
                buffer.taps[t][rows][~valid[first:last]] = 0  # an unreadable image keeps all-zero rows
            buffer.meta[S.IMAGE_ID][rows] = batch_ids[first:last]
            buffer.meta[S.ORIG_SIZE][rows] = batch["orig_size"].numpy()[first:last]
            buffer.meta[S.VALID][rows] = valid[first:last]
            buffer.meta[S.FAILURE][rows] = batch["error"][first:last]
            buffer.filled += last - first
            if buffer.filled == buffer.rows:
                del buffers[shard]
                while len(in_flight) >= writers:
                    finish(in_flight.pop(0))
                in_flight.append(pool.submit(write, buffer))

    # Shard threads assemble and store shards; codec threads compress their images, so even the
    # last shard of a run is compressed by every thread rather than one.
    with ThreadPoolExecutor(max_workers=writers, thread_name_prefix="shard-writer") as pool, \
            ThreadPoolExecutor(max_workers=writers, thread_name_prefix="shard-codec") as codec_pool:
        previous = None
        for batch in batches:
            out = forward_taps(model, batch["input"], taps, amp)
            current = (batch, *_start_host_copy(out, batch, taps))
            if previous is not None:
                place(*previous)
            previous = current
        if previous is not None:
            place(*previous)
        for future in in_flight:
            finish(future)
    if buffers:
        raise InvcacheError(f"the source ended before shards {sorted(buffers)} were complete")
    return raw_bytes


def _runs(rows: np.ndarray, shard_size: int) -> Iterator[tuple[int, int]]:
    """[first, last) positions of the batch whose rows are consecutive and in one shard."""
    first = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1 or rows[i] // shard_size != rows[first] // shard_size:
            yield first, i
            first = i
