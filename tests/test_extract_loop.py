"""The extraction loop's stages alone: rows land in their shards, whole shards come out once, order is checked."""

import numpy as np
import pytest
import torch

from invcache.cache import schema as S
from invcache.cache.store import Cache
from invcache.errors import InvcacheError
from invcache.extraction.loop import ShardAssembler, ShardWriters, run_extraction


def batch(rows, ids, valid=None):
    n = len(rows)
    return {
        "row": torch.as_tensor(rows), "image_id": torch.as_tensor(ids, dtype=torch.int64),
        "valid": torch.as_tensor(valid if valid is not None else [True] * n),
        "orig_size": torch.ones((n, 2), dtype=torch.int32), "error": [""] * n,
    }


@pytest.fixture
def cache(tmp_path):
    return Cache.create(tmp_path / "c", num_images=7, tap_shapes={"enc.0": (2, 3), "input": (4, 4, 3)}, shard_size=3)


def test_rows_arriving_out_of_order_make_each_shard_whole_exactly_once(cache):
    ids = [10, 11, 12, 13, 14, 15, 16]
    assembler = ShardAssembler(cache, ids, {"enc.0": (2, 3)})
    rows_seen = []

    def place(rows, valid=None):
        values = np.stack([np.full((2, 3), r, np.float16) for r in rows])
        done = assembler.place(batch(rows, [ids[r] for r in rows], valid), {"enc.0": values})
        rows_seen.extend(done)
        return [b.shard for b in done]

    assert place([6, 3]) == [2]                      # the short last shard (row 6) is whole at once
    assert place([4, 0, 1]) == []
    assert place([5, 2], valid=[False, True]) == [1, 0]
    assert not assembler.pending
    by_shard = {b.shard: b for b in rows_seen}
    np.testing.assert_array_equal(by_shard[0].taps["enc.0"][:, 0, 0], [0, 1, 2])
    np.testing.assert_array_equal(by_shard[1].taps["enc.0"][:, 0, 0], [3, 4, 0])  # row 5 invalid: zeros
    assert list(by_shard[1].meta[S.VALID]) == [True, True, False]
    assert list(by_shard[1].meta[S.IMAGE_ID]) == [13, 14, 15]


def test_a_row_that_is_not_the_expected_image_is_refused(cache):
    assembler = ShardAssembler(cache, [10, 11, 12, 13, 14, 15, 16], {"enc.0": (2, 3)})
    with pytest.raises(InvcacheError, match="row 1 is id 99, the cache expects 11"):
        assembler.place(batch([0, 1], [10, 99]), {"enc.0": np.zeros((2, 2, 3), np.float16)})


def test_writers_write_whole_shards_and_sum_the_valid_inputs(cache):
    rng = np.random.default_rng(0)
    assembler = ShardAssembler(cache, list(range(7)), {"enc.0": (2, 3), "input": (4, 4, 3)})
    inputs = rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    valid = np.array([True, False, True, True, True, False, True])
    with ShardWriters(cache, writers=2) as writers:
        for rows in ([0, 1, 2, 3], [4, 5, 6]):
            arrays = {"enc.0": np.ones((len(rows), 2, 3), np.float16), "input": inputs[rows]}
            for buffer in assembler.place(batch(rows, rows, valid[rows].tolist()), arrays):
                writers.submit(buffer)
        totals = writers.drain()
    assert cache.complete_shards().all()
    assert totals.input_count == valid.sum()
    np.testing.assert_array_equal(totals.input_sum, inputs[valid].astype(np.uint64).sum(axis=0))
    stored = cache.array("input")[:]
    np.testing.assert_array_equal(stored[valid], inputs[valid])
    assert not stored[~valid].any()


def test_shard_blocks_are_reused_and_a_reused_block_leaves_nothing_of_its_last_shard(tmp_path):
    cache = Cache.create(tmp_path / "c", num_images=14, tap_shapes={"enc.0": (2, 3), "input": (4, 4, 3)},
                         shard_size=3)
    rng = np.random.default_rng(1)
    inputs = rng.integers(1, 256, (14, 4, 4, 3), dtype=np.uint8)  # no zero pixel: a stale row would show
    enc = rng.standard_normal((14, 2, 3)).astype(np.float16) + 8
    valid = rng.random(14) > 0.3
    assembler = ShardAssembler(cache, list(range(14)), {"enc.0": (2, 3), "input": (4, 4, 3)})
    taken = []
    take = assembler.storage.take
    assembler.storage.take = lambda: taken.append(block := take()) or block
    with ShardWriters(cache, writers=1) as writers:
        for rows in ([0, 1], [2, 3, 4], [5], [6, 7, 8, 9], [10, 11, 12, 13]):
            for buffer in assembler.place(batch(rows, rows, valid[rows].tolist()),
                                          {"enc.0": enc[rows], "input": inputs[rows]}):
                writers.submit(buffer)
        writers.drain()
    assert len(taken) == 5 and len({id(block) for block in taken}) < 5, "the blocks of written shards come back"
    np.testing.assert_array_equal(cache.array("input")[:][valid], inputs[valid])
    np.testing.assert_array_equal(cache.array("enc.0")[:][valid], enc[valid])
    assert not cache.array("input")[:][~valid].any() and not cache.array("enc.0")[:][~valid].any()


def test_a_row_that_arrives_twice_is_refused(cache):
    assembler = ShardAssembler(cache, [10, 11, 12, 13, 14, 15, 16], {"enc.0": (2, 3)})
    assembler.place(batch([0, 1], [10, 11]), {"enc.0": np.zeros((2, 2, 3), np.float16)})
    with pytest.raises(InvcacheError, match="row 1 arrived twice"):
        assembler.place(batch([1, 2], [11, 12]), {"enc.0": np.zeros((2, 2, 3), np.float16)})
    assembler.place(batch([2], [12]), {"enc.0": np.zeros((1, 2, 3), np.float16)})  # shard 0 whole
    with pytest.raises(InvcacheError, match=r"row 0 arrived twice \(its shard 0 is whole already\)"):
        assembler.place(batch([0], [10]), {"enc.0": np.zeros((1, 2, 3), np.float16)})


class FakeModel(torch.nn.Module):
    """Returns ``enc.0`` rows filled with each image's first pixel, so placement can be checked per row."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images, taps):
        return {"enc.0": images[:, :1, :1, :1].float().expand(-1, 2, 3, 1)[..., 0]}


def loop_batches(rows_per_batch, ids, inputs):
    for rows in rows_per_batch:
        yield {**batch(rows, [ids[r] for r in rows]), "input": torch.from_numpy(inputs[rows])}


def test_the_placer_thread_writes_every_shard_and_reports_progress_per_batch(cache, monkeypatch):
    monkeypatch.setattr("invcache.extraction.loop.forward_taps",
                        lambda model, images, taps, amp: {**model(images, taps), "input": images})
    inputs = np.random.default_rng(1).integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    seen = []
    totals = run_extraction(cache, loop_batches([[0, 1], [2, 3, 4], [5, 6]], list(range(7)), inputs), list(range(7)),
                            FakeModel(), ["enc.0", "input"], None, 2, lambda images, raw: seen.append(images))
    assert seen == [2, 3, 2] and totals.input_count == 7 and cache.complete_shards().all()
    np.testing.assert_array_equal(cache.array("input")[:], inputs)
    np.testing.assert_array_equal(cache.array("enc.0")[:][:, 0, 0], inputs[:, 0, 0, 0].astype(np.float16))


def test_an_error_in_the_placer_thread_reaches_the_caller_and_nothing_hangs(cache, monkeypatch):
    monkeypatch.setattr("invcache.extraction.loop.forward_taps",
                        lambda model, images, taps, amp: {**model(images, taps), "input": images})
    inputs = np.zeros((7, 4, 4, 3), np.uint8)
    wrong_ids = [0, 1, 2, 99, 4, 5, 6]  # row 3 is another image than the cache expects
    many = [[0, 1], [2, 3], [4], [5], [6]] + [[6]] * 20  # more batches than the placer's queue holds
    with pytest.raises(InvcacheError, match="row 3 is id 99, the cache expects 3"):
        run_extraction(cache, loop_batches(many, wrong_ids, inputs), list(range(7)), FakeModel(),
                       ["enc.0", "input"], None, 2)

    def failing():
        yield from loop_batches([[0, 1]], list(range(7)), inputs)
        raise OSError("the source broke")

    with pytest.raises(OSError, match="the source broke"):  # the main thread's own error, not the placer's
        run_extraction(cache, failing(), list(range(7)), FakeModel(), ["enc.0", "input"], None, 2)
