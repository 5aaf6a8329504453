"""Batches for the device decode path: files read in threads, decoded in batches on the model's device.

The counterpart of :func:`invcache.extraction.loop.loader_batches` (DataLoader worker
processes decoding with PIL). Here a few threads read each image's bytes and prepare it
(:meth:`DeviceDecoder.prepare`: header checks, and the CPU path for files the device does not
get), at most ``ahead`` images in front of the batch being decoded, so memory stays bounded;
the calling thread decodes each batch on the device (:meth:`DeviceDecoder.batch`). A COCO
folder's files are read by the threads themselves; a webdataset's tars are streamed in order
by the calling thread (a tar is one sequential read), the threads preparing what it yields.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import TypeVar

from invcache.data.device_decode import DeviceDecoder, Prepared
from invcache.data.encoded import EncodedImage
from invcache.errors import UsageError

In = TypeVar("In")
Out = TypeVar("Out")


def device_batches(dataset, rows: list[int], batch_size: int, decoder: DeviceDecoder, threads: int,
                   ahead: int | None = None) -> Iterator[dict]:
    """Batches of the given dataset rows, in order, each with its ``row`` numbers, ``input`` on the device.

    ``dataset`` is a :class:`~invcache.data.coco.CocoFolder` (``encoded(row)``) or a
    :class:`~invcache.data.wds.WdsSplit` (``iter_encoded(rows)``), without perturbations: they
    run on the original-size image on the host, which this path never has.
    """
    if getattr(dataset, "transforms", ()):
        raise UsageError("the device decode path cannot apply perturbations (--transform): use --decode cpu")
    ahead = ahead if ahead is not None else 2 * batch_size
    if hasattr(dataset, "iter_encoded"):
        prepared = ordered_map(decoder.prepare, dataset.iter_encoded(rows), threads, ahead)
    else:
        def read_and_prepare(row: int) -> Prepared:
            encoded: EncodedImage = dataset.encoded(row)
            return decoder.prepare(encoded)

        prepared = ordered_map(read_and_prepare, rows, threads, ahead)
    while chunk := list(islice(prepared, batch_size)):
        yield decoder.batch(chunk)


def ordered_map(fn: Callable[[In], Out], items: Iterable[In], threads: int, ahead: int) -> Iterator[Out]:
    """``map(fn, items)`` on ``threads`` threads, in order, with at most ``ahead`` results pending.

    ``ThreadPoolExecutor.map`` would submit every item at once (every file of the split in
    memory); an exception of ``fn`` is raised here, at its item.
    """
    source = iter(items)
    pending: deque[Future] = deque()
    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="decode-reader")
    try:
        for item in islice(source, max(1, ahead)):
            pending.append(pool.submit(fn, item))
        while pending:
            result = pending.popleft().result()
            for item in islice(source, 1):
                pending.append(pool.submit(fn, item))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
