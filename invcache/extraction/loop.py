"""The extraction loop: batches in, whole shards out, with the device, the host and the writers overlapped.

Three stages, each usable alone:

- :func:`forward_to_host` queues the forward of a batch and a non-blocking device-to-host
  copy of its taps (pinned memory on CUDA), so the forward of batch i+1 runs while batch i
  is placed;
- :class:`ShardAssembler` places the rows of each batch into whole-shard buffers (checking
  that every row is the image the cache expects, and arrives once) and hands out each shard once
  it is whole; the buffers are blocks of a :class:`ShardStorage`, reused once a shard is written;
- :class:`ShardWriters` compresses and writes whole shards on a pool of threads, at most
  ``writers`` in flight, so memory stays bounded (one or two shards for a folder source,
  whose batches arrive in row order; up to one per DataLoader worker for webdataset).

- :class:`Placer` runs the assembler and hands whole shards to the writers on a thread of its
  own, once each batch's host copies have landed, so the main thread only launches work (the
  forward, the copies) and never copies rows or waits for the device.

:func:`run_extraction` composes them. DataLoader workers decode and resize
(:func:`loader_batches`), or the device path decodes on the model's device
(:func:`invcache.extraction.device_loader.device_batches`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from invcache.cache import schema as S
from invcache.cache.store import Cache
from invcache.errors import InvcacheError
from invcache.forward import forward_taps
from invcache.taps import INPUT


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


@dataclass
class HostBatch:
    """A batch's taps on their way to (or already in) host memory, fp16 except ``input``."""

    batch: dict
    taps: dict[str, torch.Tensor]
    ready: torch.cuda.Event | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """The taps as numpy arrays, once the device-to-host copies have landed."""
        if self.ready is not None:
            self.ready.synchronize()
        return {t: v.numpy() for t, v in self.taps.items()}


def forward_to_host(model, batch: dict, taps: list[str], amp: torch.dtype | None) -> HostBatch:
    """Queue the forward of one batch and the copies of its taps to the host (non-blocking on CUDA)."""
    out = forward_taps(model, batch["input"], taps, amp)
    host: dict[str, torch.Tensor] = {}
    for tap in taps:
        # ``input`` is the very batch the model was fed: from the CPU path it is on the host
        # already; from the device path it is copied back like the other taps
        values = batch["input"] if tap == INPUT else out[tap].to(torch.float16)
        if values.is_cuda:
            pinned = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            pinned.copy_(values, non_blocking=True)
            host[tap] = pinned
        else:
            host[tap] = values
    ready = None
    on_device = [t for t in out.values() if t.is_cuda]
    if on_device:
        # on the stream of the device the copies run on (cuda:1 need not be the current device)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(on_device[0].device))
    return HostBatch(batch, host, ready)


class ShardBuffer:
    """Rows of one shard gathered from batches until the shard is whole; its tap arrays are views of a
    :class:`ShardStorage` block, handed back by :meth:`release` once the shard is written."""

    def __init__(self, shard: int, start: int, stop: int, storage: ShardStorage) -> None:
        self.shard, self.start, self.rows = shard, start, stop - start
        self.storage = storage
        self.block = storage.take()
        self.taps = {t: array[:self.rows] for t, array in self.block.items()}
        self.meta = S.empty_bookkeeping(self.rows)
        self.arrived = np.zeros(self.rows, bool)

    @property
    def whole(self) -> bool:
        return bool(self.arrived.all())

    def release(self) -> None:
        """The shard is written: its block goes back to the storage for a later shard."""
        self.storage.give_back(self.block)
        self.taps = {}


class ShardStorage:
    """Whole-shard blocks of every tap, reused from shard to shard (thread-safe: the placer takes, the shard
    writers give back). A new block of hundreds of MB costs a page fault per 4 KiB as its rows are first
    written, more than placing the rows; a reused one does not. As many blocks exist as shards are ever
    pending and being written at once, as many as new ones would take at that moment."""

    def __init__(self, shard_size: int, tap_shapes: dict) -> None:
        self.shard_size, self.tap_shapes = shard_size, tap_shapes
        self._free: queue.SimpleQueue[dict[str, np.ndarray]] = queue.SimpleQueue()

    def take(self) -> dict[str, np.ndarray]:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            return {t: np.empty((self.shard_size, *shape), S.tap_dtype(t)) for t, shape in self.tap_shapes.items()}

    def give_back(self, block: dict[str, np.ndarray]) -> None:
        self._free.put(block)


class ShardAssembler:
    """Places batch rows into their shards' buffers; returns each shard once all its rows have arrived."""

    def __init__(self, cache: Cache, image_ids: Sequence[int], tap_shapes: dict) -> None:
        self.cache = cache
        self.image_ids = np.asarray(image_ids, dtype=np.int64)
        self.storage = ShardStorage(cache.shard_size, tap_shapes)
        self.pending: dict[int, ShardBuffer] = {}
        self.whole: set[int] = set()  # shards handed out: a row of one arriving again is an error, not a new shard

    def place(self, batch: dict, arrays: dict[str, np.ndarray]) -> list[ShardBuffer]:
        valid = batch["valid"].numpy().astype(bool)
        batch_rows = batch["row"].numpy()
        batch_ids = batch["image_id"].numpy()
        expected = self.image_ids[batch_rows]
        if not np.array_equal(batch_ids, expected):
            i = int(np.flatnonzero(batch_ids != expected)[0])
            raise InvcacheError(
                f"image order changed: row {batch_rows[i]} is id {batch_ids[i]}, the cache expects {expected[i]}"
            )
        whole = []
        for first, last in _runs(batch_rows, self.cache.shard_size):
            shard = int(batch_rows[first]) // self.cache.shard_size
            if shard in self.whole:
                raise InvcacheError(f"row {int(batch_rows[first])} arrived twice (its shard {shard} is whole already)")
            if shard not in self.pending:
                self.pending[shard] = ShardBuffer(shard, *self.cache.shard_bounds(shard), self.storage)
            buffer = self.pending[shard]
            rows = slice(int(batch_rows[first]) - buffer.start, int(batch_rows[last - 1]) - buffer.start + 1)
            if buffer.arrived[rows].any():  # its block is reused: every row must be written exactly once
                raise InvcacheError(f"row {buffer.start + rows.start + int(np.argmax(buffer.arrived[rows]))} "
                                    "arrived twice")
            for tap, values in arrays.items():
                buffer.taps[tap][rows] = values[first:last]
                buffer.taps[tap][rows][~valid[first:last]] = 0  # an unreadable image keeps all-zero rows
            buffer.meta[S.IMAGE_ID][rows] = batch_ids[first:last]
            buffer.meta[S.ORIG_SIZE][rows] = batch["orig_size"].numpy()[first:last]
            buffer.meta[S.VALID][rows] = valid[first:last]
            buffer.meta[S.FAILURE][rows] = batch["error"][first:last]
            buffer.arrived[rows] = True
            if buffer.whole:
                whole.append(self.pending.pop(shard))
                self.whole.add(shard)
        return whole


@dataclass
class ExtractionTotals:
    """What one process's loop wrote: raw bytes, and the valid ``input`` rows' pixel sum for the mean image."""

    raw_bytes: int = 0
    input_sum: np.ndarray | None = None
    input_count: int = 0


class ShardWriters:
    """Writes whole shards on ``writers`` threads; blocks the caller while ``writers`` shards are in flight.

    Shard threads assemble and store shards; codec threads compress their images, so even the
    last shard of a run is compressed by every thread rather than one.
    """

    def __init__(self, cache: Cache, writers: int) -> None:
        self.cache, self.writers = cache, writers
        self.totals = ExtractionTotals()
        self._in_flight: list[Future] = []
        self._shard_pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="shard-writer")
        self._codec_pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="shard-codec")

    def __enter__(self) -> ShardWriters:
        return self

    def __exit__(self, *exc) -> None:
        self._shard_pool.shutdown(wait=True)
        self._codec_pool.shutdown(wait=True)

    def submit(self, buffer: ShardBuffer) -> None:
        while len(self._in_flight) >= self.writers:
            self._collect(self._in_flight.pop(0))
        self._in_flight.append(self._shard_pool.submit(self._write, buffer))

    def drain(self) -> ExtractionTotals:
        while self._in_flight:
            self._collect(self._in_flight.pop(0))
        return self.totals

    def _write(self, buffer: ShardBuffer) -> tuple[int, np.ndarray | None, int]:
        written = self.cache.write_shard(buffer.shard, buffer.taps, buffer.meta, self._codec_pool)
        valid = buffer.meta[S.VALID]
        input_sum = S.sum_images(buffer.taps[INPUT], valid) if INPUT in buffer.taps else None
        buffer.release()
        return written, input_sum, int(valid.sum()) if input_sum is not None else 0

    def _collect(self, future: Future) -> None:
        written, input_sum, count = future.result()
        totals = self.totals
        totals.raw_bytes += written
        if input_sum is not None:
            totals.input_sum = input_sum if totals.input_sum is None else totals.input_sum + input_sum
            totals.input_count += count


class Placer:
    """Places each batch's rows into its shards and submits whole shards, on its own thread, in batch order.

    At most ``depth`` batches wait for it (their host copies in flight), so a slow writer holds the
    main thread back rather than letting batches pile up in memory. An error in the thread (an image
    the cache does not expect, a failed write) is raised in the main thread at its next :meth:`put`
    or at :meth:`close`; the thread goes on taking batches without placing them, so ``put`` never
    blocks on it.
    """

    def __init__(self, assembler: ShardAssembler, writers: ShardWriters,
                 progress: Callable[[int, int], None] | None, depth: int = 2) -> None:
        self.assembler, self.writers, self.progress = assembler, writers, progress
        self._queue: queue.Queue[HostBatch | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-placer", daemon=True)
        self._thread.start()

    def put(self, host: HostBatch) -> None:
        self._raise()
        self._queue.put(host)

    def close(self, check: bool = True) -> None:
        """Wait until every batch put is placed and its whole shards submitted; raise the thread's error
        (``check=False``: not, when the main thread is raising an error of its own)."""
        self._queue.put(None)
        self._thread.join()
        if check:
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (host := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep taking batches so that put never waits on a thread that stopped placing
            try:
                arrays = host.arrays()
                for buffer in self.assembler.place(host.batch, arrays):
                    self.writers.submit(buffer)
                if self.progress:
                    self.progress(len(host.batch["image_id"]), sum(a.nbytes for a in arrays.values()))
            except BaseException as exc:  # noqa: BLE001 - raised again in the main thread
                self._error = exc


def run_extraction(
    cache: Cache,
    batches: Iterator[dict],
    image_ids: Sequence[int],
    model,
    taps: list[str],
    amp: torch.dtype | None,
    writers: int,
    progress: Callable[[int, int], None] | None = None,
) -> ExtractionTotals:
    """Forward every batch, assemble whole shards, write them; ``progress(images, raw_bytes)`` per batch."""
    assembler = ShardAssembler(cache, image_ids, {t: tuple(cache.array(t).shape[1:]) for t in taps})
    with ShardWriters(cache, writers) as shard_writers:
        placer = Placer(assembler, shard_writers, progress)
        try:
            for batch in batches:
                placer.put(forward_to_host(model, batch, taps, amp))
        except BaseException:
            placer.close(check=False)
            raise
        placer.close()
        totals = shard_writers.drain()
    if assembler.pending:
        raise InvcacheError(f"the source ended before shards {sorted(assembler.pending)} were complete")
    return totals


def _runs(rows: np.ndarray, shard_size: int) -> Iterator[tuple[int, int]]:
    """[first, last) positions of the batch whose rows are consecutive and in one shard."""
    first = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1 or rows[i] // shard_size != rows[first] // shard_size:
            yield first, i
            first = i
