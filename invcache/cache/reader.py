"""Read taps of the valid images of a cache as a torch dataset, shard-sized blocks at a time.

Each epoch visits the complete shards in an order drawn from (seed, epoch), reads every
requested tap of a shard as one block (zarr decodes a whole shard at once; random
``oindex`` reads of sharded arrays are very slow), and passes rows through a bounded
shuffle buffer. Shards are split between DDP ranks and then between DataLoader workers.
Under DDP every rank yields the same number of samples (ranks that run out of shards
start over on theirs), so every rank takes the same number of optimizer steps.
Samples are the stored dtypes (float16, uint8); cast them on the device.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch

from invcache.cache import schema as S
from invcache.cache.store import Cache


class CacheSamples(torch.utils.data.IterableDataset):
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
    ) -> None:
        self.location, self.taps = str(location), list(taps)
        self.shuffle, self.seed, self.epoch, self.buffer_size = shuffle, seed, epoch, buffer_size
        self.rank, self.world = rank, world
        self.equal_shares = world > 1 if equal_shares is None else equal_shares
        cache = Cache.open(self.location)
        complete = cache.complete_shards()
        valid = cache.array(S.VALID)[:]
        self.shard_size = cache.shard_size
        self.valid_rows = {
            s: np.flatnonzero(valid[slice(*cache.shard_bounds(s))]) for s in np.flatnonzero(complete).tolist()
        }
        self.total = sum(len(rows) for rows in self.valid_rows.values())

    def __len__(self) -> int:
        """Samples this rank yields per epoch."""
        if self.equal_shares:
            return self.total // self.world
        return sum(len(self.valid_rows[s]) for s in self._rank_shards())

    def _rank_shards(self) -> list[int]:
        shards = list(self.valid_rows)
        if self.shuffle:
            shards = np.random.default_rng([self.seed, self.epoch]).permutation(shards).tolist()
        return shards[self.rank::self.world]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        shards = self._rank_shards()[worker::workers]
        quota = None
        if self.equal_shares:
            per_rank = self.total // self.world
            quota = per_rank // workers + (1 if worker < per_rank % workers else 0)
            if quota and not any(len(self.valid_rows[s]) for s in shards):
                # more workers than shards, or only empty ones: draw from every shard instead
                shards = list(self.valid_rows)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        cache = Cache.open(self.location)
        samples = self._samples(cache, itertools.cycle(shards) if quota else iter(shards), rng)
        if quota is not None:
            samples = itertools.islice(samples, quota)
        yield from self._shuffled(samples, rng) if self.shuffle else samples

    def _samples(self, cache: Cache, shards: Iterator[int], rng: np.random.Generator) -> Iterator[dict]:
        for shard in shards:
            rows = self.valid_rows[shard]
            if not len(rows):
                continue
            blocks = {tap: cache.read_shard(tap, shard, complete=True) for tap in self.taps}
            ids = cache.read_shard(S.IMAGE_ID, shard)
            for row in rng.permutation(rows) if self.shuffle else rows:
                sample = {tap: torch.from_numpy(np.ascontiguousarray(block[row])) for tap, block in blocks.items()}
                sample[S.IMAGE_ID] = int(ids[row])
                yield sample

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
