"""Shuffled batches of a cache's taps, gathered from whole decoded shards into preallocated buffers.

What training reads. Each epoch lists the valid rows of the complete shards as one sequence:
the shards in an order drawn from (seed, epoch), cut into windows of ``ceil(shuffle_window /
shard_size)`` consecutive shards, and the rows of each window permuted together from the same
draw (storage order, one shard per window, with ``shuffle=False``). A window is what a shuffle
buffer would hold, but whole: any two rows of a window are equally likely to meet in a batch,
rows of different windows never do, and the windows themselves come in a random order. With the
defaults (1024 rows, shards of 256) a batch of 128 is drawn from 4 random shards of the
cache; a window as large as the cache is a full shuffle.

Every rank builds the same sequence and takes a contiguous part of it, as
:class:`invcache.cache.reader.CacheSamples` does (there are no DataLoader workers here, only
ranks):

- with equal shares (the default under DDP, ``world > 1``) the sequence is padded to a multiple
  of ``world`` by repeating its first rows, at most ``world - 1`` of them, and rank ``r`` takes
  the ``r``-th of ``world`` blocks of ``ceil(valid / world)`` rows, so every rank takes the
  same number of steps;
- without equal shares (evaluation) the blocks differ in size by at most one and every valid
  row is read exactly once.

A rank cuts its block into batches of ``batch_size`` consecutive rows (the last one partial
unless ``drop_last``); the rows of one batch come in storage order, which changes nothing a
batch computes but lets each shard's rows be gathered in one call. The batches are thus a
function of (seed, epoch, shuffle window, shard size, batch size, rank, world) alone;
``decode_threads`` and ``prefetch`` change only the speed.

A producer thread decodes whole shards (``Cache.decode_shard``: one read of the file, every
chunk's crc32c and the shard's digest checked) in a pool of ``decode_threads`` threads, the
windows the current batch reads and the next ones, and gathers each batch with one
``numpy.take`` per (shard, tap) into one of ``prefetch + 1`` preallocated batch buffers (pinned
with ``pin_memory``: by default when ``device``, where the consumer copies batches to, is a CUDA
device, or without ``device`` when CUDA is available). File reads, Blosc, crc32c and the
gathers release the GIL; no Python runs per sample. Memory: the decoded shards of the window in
use, of one more while a batch straddles two, and of the ``ceil(decode_threads / shards per window)``
windows read ahead; and the batch buffers. Shards decode into buffers that are reused once released,
and the reader keeps them and the batch buffers for its next epoch (:meth:`CacheBatches.set_epoch`:
one reader serves a whole run), since a new buffer costs a page fault per 4 KiB on its first write.

A batch is a dict of the requested taps (stored dtypes: float16, uint8; ``dec.0`` is zeros)
and ``image_id`` (int64), tensors that **are the reader's buffers**: valid until the next batch
is asked for (``clone()`` what must outlive it). Where they are pinned, the copies the consumer
enqueued on the current stream of ``device`` before asking for the next batch are waited for
before a buffer is refilled, so ``batch[tap].to(device, non_blocking=True)`` is safe.
"""

from __future__ import annotations

import math
import operator
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from invcache.cache import schema as S
from invcache.cache.store import Cache
from invcache.settings import PREFETCH_BATCHES, SHUFFLE_WINDOW, default_decode_threads
from invcache.taps import DECODER_INPUT

Batch = dict[str, torch.Tensor]


@dataclass
class _Plan:
    """One rank's epoch: its rows and the groups of shards ("units") decoded for them, in order of use."""

    rows: np.ndarray  # global rows, in order: batch b is rows[b * batch_size:(b + 1) * batch_size]
    units: list[list[int]]  # the shards each unit decodes (a window's shards that this rank reads)
    unit_last_batch: np.ndarray  # per unit, the last batch that reads it (then it is released)
    batch_last_unit: np.ndarray  # per batch, the last unit it reads
    batches: int


@dataclass
class _Buffers:
    """What a reader allocates once and reuses: a new buffer costs a page fault per 4 KiB on its first write, about
    as much as reading the bytes into it."""

    slots: list[Batch]  # the batch buffers
    spare: dict[str, list[np.ndarray]] = field(default_factory=dict)  # per tap, shard buffers not in use
    copies: torch.cuda.Event | None = None  # the consumer's copies out of the slots, queued when the last epoch ended


class CacheBatches:
    """Batches of the valid images of a cache's complete shards for one epoch of one rank; ``len()`` batches."""

    def __init__(
        self,
        location: str,
        taps: list[str],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        shuffle_window: int = SHUFFLE_WINDOW,
        rank: int = 0,
        world: int = 1,
        equal_shares: bool | None = None,
        drop_last: bool = False,
        decode_threads: int | None = None,
        device: torch.device | str | None = None,
        pin_memory: bool | None = None,
        prefetch: int = PREFETCH_BATCHES,
    ) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        decode_threads = default_decode_threads() if decode_threads is None else decode_threads
        for name, value in (("batch_size", batch_size), ("decode_threads", decode_threads),
                            ("shuffle_window", shuffle_window), ("prefetch", prefetch)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        self.location, self.taps, self.batch_size = str(location), list(taps), batch_size
        self.shuffle, self.seed, self.epoch, self.shuffle_window = shuffle, seed, epoch, shuffle_window
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.equal_shares = world > 1 if equal_shares is None else equal_shares
        self.decode_threads, self.prefetch = decode_threads, prefetch
        # Pinned only where there is a CUDA device to copy to (as DataLoader's pin_memory).
        self.device = None if device is None else torch.device(device)
        if pin_memory is None:
            pin_memory = self.device.type == "cuda" if self.device is not None else torch.cuda.is_available()
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.cache = Cache.open(self.location)
        self.shard_size = self.cache.shard_size
        self.row_shapes = {tap: self.cache.tap_shape(tap)[1:] for tap in self.taps}
        self.stored_dtypes = {tap: self.cache.array(tap).dtype for tap in self.taps if tap != DECODER_INPUT}
        self.digests = {tap: self.cache.shard_digests(tap) for tap in self.stored_dtypes}  # read once, not per shard
        self.dtypes = {tap: torch.float16 if tap == DECODER_INPUT else _torch_dtype(self.cache.array(tap).dtype)
                       for tap in self.taps}
        complete = self.cache.complete_shards()
        valid = self.cache.valid
        self.image_ids = self.cache.image_ids
        # global rows of the valid images of each complete shard that has any
        self.valid_rows = {}
        for shard in np.flatnonzero(complete).tolist():
            start, stop = self.cache.shard_bounds(shard)
            rows = start + np.flatnonzero(valid[start:stop])
            if len(rows):
                self.valid_rows[shard] = rows
        self.total = sum(len(rows) for rows in self.valid_rows.values())
        self.window_shards = max(1, math.ceil(shuffle_window / self.shard_size)) if shuffle else 1
        self._kept: _Buffers | None = None  # batch slots and shard buffers, reused from epoch to epoch
        self._kept_lock = threading.Lock()  # iterations started on several threads take them once

    def set_epoch(self, epoch: int) -> None:
        """Read epoch ``epoch`` next (as DistributedSampler's): one reader for a whole run keeps its buffers."""
        self.epoch = epoch

    # -- the epoch's order ------------------------------------------------------------------

    def _rank_span(self) -> tuple[int, int]:
        """This rank's [start, stop) in the epoch's sequence; past ``total`` it wraps round to the start."""
        if self.equal_shares:
            per_rank = -(-self.total // self.world)
            return self.rank * per_rank, (self.rank + 1) * per_rank
        base, extra = divmod(self.total, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    @property
    def rows(self) -> int:
        """Rows this rank reads per epoch (the same on every rank under equal shares), ``drop_last`` applied."""
        start, stop = self._rank_span()
        rows = stop - start
        return rows // self.batch_size * self.batch_size if self.drop_last else rows

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank under equal shares)."""
        return -(-self.rows // self.batch_size)

    def epoch_order(self) -> tuple[np.ndarray, np.ndarray]:
        """(global row, window) of every valid row of the complete shards, in this epoch's order (every rank's)."""
        shards = np.array(list(self.valid_rows), dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.epoch]) if self.shuffle else None
        if rng is not None:
            shards = rng.permutation(shards)
        pieces, windows = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
        for window, first in enumerate(range(0, len(shards), self.window_shards)):
            rows = np.concatenate([self.valid_rows[s] for s in shards[first:first + self.window_shards].tolist()])
            pieces.append(rng.permutation(rows) if rng is not None else rows)
            windows.append(np.full(len(rows), window, np.int64))
        return np.concatenate(pieces), np.concatenate(windows)

    def _plan(self) -> _Plan:
        start, _ = self._rank_span()
        positions = start + np.arange(self.rows)
        if not len(positions):
            return _Plan(positions, [], np.empty(0, np.int64), np.empty(0, np.int64), 0)
        order, window = self.epoch_order()
        rows = order[positions % self.total]
        windows = int(window[-1]) + 1
        # the padding (positions past the end) reads the first windows again: units of their own
        unit_key = window[positions % self.total] + windows * (positions // self.total)
        cuts = np.flatnonzero(np.diff(unit_key)) + 1
        starts, stops = np.r_[0, cuts], np.r_[cuts, len(rows)]
        units = [np.unique(rows[a:b] // self.shard_size).tolist() for a, b in zip(starts, stops)]
        unit_of_row = np.repeat(np.arange(len(units)), stops - starts)
        batches = len(self)
        batch_ends = np.minimum(np.arange(1, batches + 1) * self.batch_size, len(rows))
        return _Plan(rows, units, (stops - 1) // self.batch_size, unit_of_row[batch_ends - 1], batches)

    # -- reading ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        plan = self._plan()
        if not plan.batches:
            return
        # this reader's buffers, unless another iteration of it holds them: that one's are its own
        with self._kept_lock:
            buffers, self._kept = self._kept, None
        buffers = buffers or _Buffers([self._buffers() for _ in range(self.prefetch + 1)])
        free: queue.SimpleQueue = queue.SimpleQueue()  # (slot, CUDA event to wait for) or None: stop
        ready: queue.SimpleQueue = queue.SimpleQueue()  # (slot, rows) or the exception that ended the producer
        for slot in buffers.slots:
            free.put((slot, buffers.copies))
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(plan, free, ready, stop, buffers.spare), daemon=True,
                                    name="invcache-batches")
        producer.start()
        held = None
        try:
            for _ in range(plan.batches):
                if held is not None:  # the consumer is done with it: refill once its device copies are
                    free.put((held, self._copies_done() if self.pin_memory else None))
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                held, n = item
                yield {name: tensor if n == self.batch_size else tensor[:n] for name, tensor in held.items()}
        finally:
            stop.set()
            free.put(None)
            producer.join()
            # kept for the next epoch; its first refills wait for the copies the consumer has queued so far
            buffers.copies = self._copies_done() if self.pin_memory else None
            with self._kept_lock:
                self._kept = buffers

    def _copies_done(self) -> torch.cuda.Event:
        """An event after the work queued so far on the current stream of ``device`` (the consumer's copies)."""
        cuda = self.device if self.device is not None and self.device.type == "cuda" else None
        return torch.cuda.current_stream(cuda).record_event()

    def _buffers(self) -> Batch:
        """One batch's buffers: a tensor per tap (``dec.0`` zeros, never written) and ``image_id``."""
        def empty(shape, dtype, zeros=False) -> torch.Tensor:
            make = torch.zeros if zeros else torch.empty
            return make((self.batch_size, *shape), dtype=dtype, pin_memory=self.pin_memory)

        buffers = {tap: empty(self.row_shapes[tap], self.dtypes[tap], zeros=tap == DECODER_INPUT) for tap in self.taps}
        buffers[S.IMAGE_ID] = empty((), torch.int64)
        return buffers

    def _produce(self, plan: _Plan, free: queue.SimpleQueue, ready: queue.SimpleQueue, stop: threading.Event,
                 spare: dict[str, list[np.ndarray]]) -> None:
        """Decode the units in order, a few ahead, into ``spare`` shard buffers (new ones where none is spare, kept
        when released), and gather every batch into a free slot; runs in its own thread."""
        stored = [tap for tap in self.taps if tap != DECODER_INPUT]
        ahead = max(1, math.ceil(self.decode_threads / self.window_shards))  # units decoding beyond the batch's
        live: dict[int, list] = {}  # shard -> [units holding it, {tap: Future of its decoded block}, {tap: buffer}]
        pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="invcache-decode")
        try:
            submitted = released = 0
            for batch in range(plan.batches):
                while submitted < len(plan.units) and submitted <= plan.batch_last_unit[batch] + ahead:
                    for shard in plan.units[submitted]:
                        if shard not in live:
                            live[shard] = self._submit(pool, shard, stored, spare)
                        live[shard][0] += 1
                    submitted += 1
                item = free.get()
                if item is None or stop.is_set():
                    return
                slot, event = item
                if event is not None:
                    event.synchronize()
                n = self._gather(plan, batch, live, {name: tensor.numpy() for name, tensor in slot.items()})
                ready.put((slot, n))
                while released < submitted and plan.unit_last_batch[released] <= batch:
                    for shard in plan.units[released]:
                        live[shard][0] -= 1
                        if not live[shard][0]:
                            for tap, buffer in live.pop(shard)[2].items():
                                spare.setdefault(tap, []).append(buffer)
                    released += 1
        except BaseException as exc:  # handed to the consumer, which raises it
            ready.put(exc)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for shard in live.values():  # no thread decodes into them any more
                for tap, buffer in shard[2].items():
                    spare.setdefault(tap, []).append(buffer)

    def _submit(self, pool: ThreadPoolExecutor, shard: int, taps: list[str],
                spare: dict[str, list[np.ndarray]]) -> list:
        """Start decoding ``shard``'s ``taps`` into spare buffers (new ones where none is spare): its ``live``
        record."""
        rows = operator.sub(*reversed(self.cache.shard_bounds(shard)))
        buffers = {tap: spare[tap].pop() if spare.get(tap) else
                   np.empty((self.shard_size, *self.row_shapes[tap]), self.stored_dtypes[tap]) for tap in taps}
        futures = {tap: pool.submit(self.cache.decode_shard, tap, shard, True, int(self.digests[tap][shard]),
                                    buffers[tap][:rows]) for tap in taps}
        return [0, futures, buffers]

    def _gather(self, plan: _Plan, batch: int, live: dict[int, list], slot: dict[str, np.ndarray]) -> int:
        """Copy batch ``batch``'s rows into ``slot`` (numpy views of its buffers), one take per (shard, tap); returns
        its number of rows."""
        rows = np.sort(plan.rows[batch * self.batch_size:(batch + 1) * self.batch_size])
        shards = rows // self.shard_size
        cuts = np.flatnonzero(np.diff(shards)) + 1
        local = rows - shards * self.shard_size
        for start, stop in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(rows)].tolist()):
            for tap, decoded in live[int(shards[start])][1].items():
                # numpy's take releases the GIL and runs in this thread alone (torch's would start an OpenMP
                # team here, competing with the decode threads); ``clip`` writes straight into ``out``
                np.take(decoded.result(), local[start:stop], axis=0, out=slot[tap][start:stop], mode="clip")
        np.take(self.image_ids, rows, out=slot[S.IMAGE_ID][:len(rows)], mode="clip")
        return len(rows)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


__all__ = ["Batch", "CacheBatches"]
