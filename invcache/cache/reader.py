"""Read taps of the valid images of a cache as a torch dataset, shard-sized blocks at a time.

Each epoch lists the valid rows of the complete shards as one sequence: shard by shard, the
shards in an order drawn from (seed, epoch) and the rows of each shard permuted from the same
draw (storage order for both when ``shuffle=False``). Every rank and worker builds the same
sequence, then takes its part of it:

- with equal shares (the default under DDP, ``world > 1``) the sequence is padded to a
  multiple of ``world`` by repeating its first rows, at most ``world - 1`` of them, and rank
  ``r`` takes the ``r``-th of ``world`` equal contiguous blocks, ``ceil(valid / world)`` rows.
  Every rank so takes the same number of optimizer steps, and every valid row is read once
  per epoch but for the padding;
- without equal shares (evaluation) rank ``r`` takes the ``r``-th contiguous block of a split
  as even as possible (sizes differ by at most one), and every valid row is read exactly once.

A rank's rows are split the same way into contiguous blocks, one per DataLoader worker; ranks
with the same number of rows give their workers the same numbers, so per-worker batching
yields the same number of batches on every rank. Contiguous blocks keep shard locality: a rank
reads about ``shards / world`` shards. A worker reads every requested tap of each shard it
needs once, as one block (zarr decodes a whole shard at once; random ``oindex`` reads of
sharded arrays are very slow), yields the rows it owns, and with ``shuffle=True`` passes them
through a bounded shuffle buffer drawn from (seed, epoch, rank, worker). With
``decode_threads`` above 1 the next shards decode in that many threads while the current one is
yielded (Blosc releases the GIL, so they decode in parallel without worker processes or their
transfers of batches); the order of the samples does not change. Samples are the stored dtypes
(float16, uint8); cast them on the device.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from invcache.cache import schema as S
from invcache.cache.store import Cache


class CacheSamples(torch.utils.data.IterableDataset):
    """The valid images of a cache's complete shards: dicts of tap tensors plus ``image_id`` (int)."""

    def __init__(
        self,
        location: str,
        taps: list[str],
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        buffer_size: int = 1024,
        rank: int = 0,
        world: int = 1,
        equal_shares: bool | None = None,
        decode_threads: int = 1,
    ) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        if decode_threads < 1:
            raise ValueError(f"decode_threads must be at least 1, not {decode_threads}")
        self.decode_threads = decode_threads
        self.location, self.taps = str(location), list(taps)
        self.shuffle, self.seed, self.epoch, self.buffer_size = shuffle, seed, epoch, buffer_size
        self.rank, self.world = rank, world
        self.equal_shares = world > 1 if equal_shares is None else equal_shares
        cache = Cache.open(self.location)
        complete = cache.complete_shards()
        valid = cache.valid
        # valid rows of each complete shard, counted from the shard's start
        self.valid_rows = {
            s: np.flatnonzero(valid[slice(*cache.shard_bounds(s))]) for s in np.flatnonzero(complete).tolist()
        }
        self.total = sum(len(rows) for rows in self.valid_rows.values())

    def __len__(self) -> int:
        """Samples this rank yields per epoch (the same on every rank under equal shares)."""
        start, stop = self._rank_span()
        return stop - start

    def batches(self, batch_size: int, num_workers: int, drop_last: bool = False) -> int:
        """How many batches a DataLoader over this dataset yields: each worker batches its own rows."""
        rows = len(self)
        sizes = [_split(rows, max(num_workers, 1), w) for w in range(max(num_workers, 1))]
        per_worker = [stop - start for start, stop in sizes]
        if drop_last:
            return sum(n // batch_size for n in per_worker)
        return sum(-(-n // batch_size) for n in per_worker)

    def _rank_span(self) -> tuple[int, int]:
        """This rank's [start, stop) in the epoch's sequence; past ``total`` it wraps round to the start."""
        if self.equal_shares:
            per_rank = -(-self.total // self.world)
            return self.rank * per_rank, (self.rank + 1) * per_rank
        return _split(self.total, self.world, self.rank)

    def _epoch_order(self) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row in shard) of every valid row of the complete shards, in this epoch's order.

        Drawn from (seed, epoch) alone, so every rank and worker lists the same sequence.
        """
        shards = list(self.valid_rows)
        rows = [self.valid_rows[s] for s in shards]
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            shards = rng.permutation(shards).tolist()
            rows = [rng.permutation(self.valid_rows[s]) for s in shards]
        shard_of = np.repeat(np.array(shards, dtype=np.int64), [len(r) for r in rows])
        return shard_of, np.concatenate([np.empty(0, np.int64), *rows])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rank_start, rank_stop = self._rank_span()
        start, stop = _split(rank_stop - rank_start, workers, worker)
        if start == stop:
            return
        shard_of, rows = self._epoch_order()
        positions = (rank_start + np.arange(start, stop)) % self.total  # the wrap is the padding
        # A worker's block is contiguous, so each shard's rows are one run, except that padding
        # may come back to the first shard: grouping by shard still reads each shard once.
        wanted: dict[int, list[int]] = {}
        for shard, row in zip(shard_of[positions].tolist(), rows[positions].tolist()):
            wanted.setdefault(shard, []).append(row)
        samples = self._samples(Cache.open(self.location), wanted)
        if self.shuffle:
            samples = self._shuffled(samples, np.random.default_rng([self.seed, self.epoch, self.rank, worker]))
        yield from samples

    def _samples(self, cache: Cache, wanted: dict[int, list[int]]) -> Iterator[dict]:
        for rows, (blocks, ids) in zip(wanted.values(), self._decoded(cache, list(wanted))):
            for row in rows:
                sample = {tap: torch.from_numpy(np.ascontiguousarray(block[row])) for tap, block in blocks.items()}
                sample[S.IMAGE_ID] = int(ids[row])
                yield sample

    def _decoded(self, cache: Cache, shards: list[int]) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """Each shard's tap blocks and image ids, in order; the next ``decode_threads`` shards decode meanwhile."""
        def decode(shard: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
            return ({tap: cache.read_shard(tap, shard, complete=True) for tap in self.taps},
                    cache.read_shard(S.IMAGE_ID, shard))

        if self.decode_threads == 1 or len(shards) < 2:
            yield from map(decode, shards)
            return
        yield decode(shards[0])  # here first: it opens the arrays and codecs the threads then share
        with ThreadPoolExecutor(self.decode_threads) as pool:
            ahead = deque(pool.submit(decode, shard) for shard in shards[1:1 + self.decode_threads])
            for shard in shards[1 + self.decode_threads:]:
                done = ahead.popleft().result()
                ahead.append(pool.submit(decode, shard))
                yield done
            while ahead:
                yield ahead.popleft().result()

    def _shuffled(self, samples: Iterator[dict], rng: np.random.Generator) -> Iterator[dict]:
        buffer: list[dict] = []
        for sample in samples:
            if len(buffer) < self.buffer_size:
                buffer.append(sample)
                continue
            i = int(rng.integers(len(buffer)))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer


def _split(total: int, parts: int, part: int) -> tuple[int, int]:
    """[start, stop) of one of ``parts`` contiguous blocks covering ``total`` items; the first ones take one more."""
    base, extra = divmod(total, parts)
    start = part * base + min(part, extra)
    return start, start + base + (part < extra)
