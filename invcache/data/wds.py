"""COCO as webdataset tar shards: one sample per image, ``.jpg`` (the original file's bytes) + ``.json``.

The ``.json`` holds ``{"image": <COCO image record>, "annotations": [<its annotations>]}``.
Shards are read from local paths or any URL webdataset opens (``https://…``, ``pipe:…``). Local
shards are checked before streaming, so a missing one is named up front; an error while
streaming (an unreachable URL, a corrupt tar) is raised as one line naming the shard.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
import webdataset as wds
from webdataset.shardlists import expand_urls

from invcache.data.coco import CocoFolder, image_record_problem
from invcache.data.encoded import EncodedImage
from invcache.data.preprocess import ImageReadError, Sample, failed_sample, load_sample
from invcache.data.selection import restrict_ids
from invcache.data.transforms import Transform
from invcache.errors import InvcacheError, UsageError
from invcache.settings import DEFAULT_SIZE

log = logging.getLogger(__name__)

SHARD_DIGITS = 6


def coco_to_wds(
    root: str | os.PathLike, split: str, out_dir: str | os.PathLike, images_per_shard: int = 1000
) -> list[Path]:
    """Write a COCO split as ``coco-<split>-NNNNNN.tar`` shards in ascending image-id order.

    Image bytes are copied as they are (no re-encoding); a missing file, or a ``file_name``
    that points outside the split folder (:meth:`CocoFolder.image_file`, never opened),
    gives a sample without ``.jpg``, which the reader reports as a failure. Each shard
    appears under its final name only once complete.
    """
    dataset = CocoFolder(root, split)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = dataset.image_ids
    shards = []
    for shard_index, start in enumerate(range(0, len(ids), images_per_shard)):
        final = out_dir / f"coco-{split}-{shard_index:0{SHARD_DIGITS}d}.tar"
        partial = final.with_suffix(".tar.partial")
        with wds.TarWriter(str(partial), encoder=False) as sink:
            for image_id in ids[start:start + images_per_shard]:
                record = dataset.coco.imgs[image_id]
                meta = {"image": record, "annotations": dataset.coco.imgToAnns.get(image_id, [])}
                sample = {"__key__": f"{image_id:012d}", "json": json.dumps(meta).encode()}
                try:
                    image_file = dataset.image_file(record)
                except ImageReadError as exc:
                    log.warning(f"image {image_id}: {exc}; its sample gets no .jpg")
                else:
                    if image_file.is_file():
                        sample["jpg"] = image_file.read_bytes()
                sink.write(sample)
        partial.replace(final)
        shards.append(final)
    return shards


def shard_pattern(shards: list[Path]) -> str:
    """The ``--wds`` pattern naming the shards :func:`coco_to_wds` wrote: a brace range, or the one path."""
    if len(shards) == 1:
        return str(shards[0])
    first, last = (shard.name.removesuffix(".tar") for shard in (shards[0], shards[-1]))
    prefix = first[:-SHARD_DIGITS]
    return str(shards[0].parent / f"{prefix}{{{first[-SHARD_DIGITS:]}..{last[-SHARD_DIGITS:]}}}.tar")


def _expand(urls: str | list[str]) -> list[str]:
    return expand_urls(urls) if isinstance(urls, str) else list(urls)


def check_shards(urls: str | list[str]) -> None:
    """Raise a one-line UsageError naming the first local shard that is not there.

    webdataset would only find out while streaming, in a DataLoader worker, with a traceback.
    URLs (``scheme://…``, ``pipe:…``) are left to the stream.
    """
    shards = _expand(urls)
    if not shards:
        raise UsageError(f"webdataset {urls!r} names no shard")
    for url in shards:
        if "://" in url or url.startswith("pipe:"):
            continue
        path = Path(url.removeprefix("file:"))
        if not path.is_file():
            raise UsageError(f"webdataset shard not found: {path} (from --wds {urls})")


def _stream(samples: Iterable[dict], urls: str | list[str]) -> Iterator[dict]:
    """The stream's samples; an error reading a shard becomes one line that names it."""
    try:
        yield from samples
    except (OSError, tarfile.TarError, ValueError) as exc:
        # webdataset appends the shard's URL (and the stream) to the error's args
        shards = set(_expand(urls))
        where = next((a for a in reversed(exc.args) if isinstance(a, str) and a in shards), urls)
        reason = getattr(exc, "strerror", None) or next((a for a in exc.args if isinstance(a, str)), repr(exc))
        raise InvcacheError(f"webdataset shard {where}: cannot read it ({reason})") from None


def image_record(raw: dict) -> dict:
    """The COCO image record in a sample's ``.json``; a malformed one is a one-line UsageError naming the sample."""
    return sample_metadata(raw)["image"]


def sample_metadata(raw: dict) -> dict:
    """A sample's ``.json``, ``{"image": record, "annotations": [...]}``, its image record checked.

    A malformed one is a one-line UsageError naming the sample. The annotations are checked
    only by the transforms that read them (an undecodable mask fails that image alone).
    """
    where = f"webdataset sample {raw.get('__key__')!r} of {raw.get('__url__', 'the stream')}"
    if "json" not in raw:
        raise UsageError(f"{where} has no .json")
    try:
        meta = json.loads(raw["json"])
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        raise UsageError(f"{where}: its .json is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or "image" not in meta:
        raise UsageError(f'{where}: its .json is not {{"image": ..., "annotations": ...}}, as `invcache to-wds` '
                         "writes it")
    problem = image_record_problem(meta["image"], "its image record")
    if problem:
        raise UsageError(f"{where}: {problem}")
    return meta


def _every_node(urls):
    return urls


class WdsImages(torch.utils.data.IterableDataset):
    """Images streamed from webdataset shards, in shard order; DataLoader workers split the shards.

    ``transforms`` perturb each image before the resize, with the annotations of its ``.json``.
    """

    def __init__(self, urls: str | list[str], size: tuple[int, int] = DEFAULT_SIZE,
                 transforms: Sequence[Transform] = ()) -> None:
        check_shards(urls)
        self.urls = urls
        self.size = size
        self.transforms = tuple(transforms)

    def samples(self) -> Iterator[Sample]:
        return (self.sample(meta, raw) for meta, raw in self.raw_samples())

    def raw_samples(self) -> Iterator[tuple[dict, dict]]:
        """The kept samples undecoded: (their checked ``.json``, the raw webdataset sample)."""
        stream = wds.WebDataset(
            self.urls, shardshuffle=False, nodesplitter=_every_node, workersplitter=wds.split_by_worker,
            empty_check=False,
        )
        for raw in _stream(stream, self.urls):
            meta = sample_metadata(raw)
            if self._keep(meta["image"]):
                yield meta, raw

    def sample(self, meta: dict, raw: dict) -> Sample:
        """One raw sample decoded, perturbed and resized (the CPU path)."""
        # The image is the sample's .jpg bytes, never a file its key or .json names: a shard
        # cannot make the reader open anything outside it.
        record = meta["image"]
        if "jpg" not in raw:
            return failed_sample(record["id"], record, self.size, f"no .jpg in webdataset sample {raw['__key__']}")
        annotations = (meta.get("annotations") or ()) if self.transforms else ()
        return load_sample(record["id"], raw["jpg"], record, self.size, self.transforms, annotations)

    def _keep(self, record: dict) -> bool:
        return True

    def __iter__(self) -> Iterator[dict]:
        return (sample.as_dict() for sample in self.samples())


class WdsSplit:
    """A webdataset split addressed like a COCO folder: ``image_ids`` known up front, rows decoded on demand.

    A first pass reads only the ``.json`` members to learn the ids (which must ascend, as
    :func:`coco_to_wds` writes them); :meth:`iter_rows` then decodes just the rows asked for,
    DataLoader workers splitting the tar shards. ``transforms`` perturb each image before the
    resize; :meth:`restrict` keeps only some of the split's images.
    """

    def __init__(self, urls: str | list[str], split: str, size: tuple[int, int] = DEFAULT_SIZE,
                 transforms: Sequence[Transform] = ()) -> None:
        check_shards(urls)
        self.urls, self.split, self.size = urls, split, size
        self.transforms = tuple(transforms)
        stream = wds.WebDataset(
            urls, shardshuffle=False, nodesplitter=_every_node, workersplitter=None, empty_check=False,
            select_files=lambda name: name.endswith(".json"),
        )
        # hashed as read, not kept: train2017's metadata is hundreds of MB
        digest, self.image_ids = hashlib.sha256(), []
        for raw in _stream(stream, urls):
            self.image_ids.append(image_record(raw)["id"])
            digest.update(raw["json"])
        self.annotation_sha256 = digest.hexdigest()
        if self.image_ids != sorted(set(self.image_ids)):
            raise UsageError(
                f"webdataset {urls}: image ids must be unique and ascending, as `invcache to-wds` writes them"
            )

    def restrict(self, image_ids: Iterable[int]) -> None:
        """Keep only ``image_ids`` (ascending, once each), so that row i is the i-th of them.

        Ids the shards do not hold are a UsageError naming the first few. The source record
        still describes every shard's metadata: the cache records which ids it holds.
        """
        self.image_ids = restrict_ids(self.image_ids, image_ids, self.split)

    def source_record(self) -> dict:
        return {
            "kind": "wds", "urls": self.urls, "split": self.split,
            "annotation_sha256": self.annotation_sha256, "images": len(self.image_ids),
        }

    def iter_rows(self, rows: list[int], batch_size: int, num_workers: int) -> Iterator[dict]:
        row_of = {image_id: row for row, image_id in enumerate(self.image_ids)}
        wanted = {self.image_ids[r] for r in rows}
        loader = torch.utils.data.DataLoader(
            _SelectedImages(self.urls, self.size, wanted, self.transforms), batch_size=batch_size,
            num_workers=num_workers,
        )
        for batch in loader:
            batch["row"] = torch.as_tensor([row_of[int(i)] for i in batch["image_id"]])
            yield batch

    def iter_encoded(self, rows: list[int]) -> Iterator[EncodedImage]:
        """The rows asked for as their ``.jpg`` bytes, in shard order (the rows' order), for the device path.

        Read in the calling thread, one shard after the other; each image's ``cpu_sample`` is
        what :meth:`iter_rows` would give for it.
        """
        row_of = {image_id: row for row, image_id in enumerate(self.image_ids)}
        images = _SelectedImages(self.urls, self.size, {self.image_ids[r] for r in rows}, self.transforms)
        for meta, raw in images.raw_samples():
            image_id = meta["image"]["id"]
            data = raw.get("jpg")
            yield EncodedImage(row_of[image_id], image_id, bytearray(data) if data is not None else None,
                               functools.partial(_as_dict, images.sample, meta, raw))


def _as_dict(sample: Callable[[dict, dict], Sample], meta: dict, raw: dict) -> dict:
    return sample(meta, raw).as_dict()


class _SelectedImages(WdsImages):
    def __init__(self, urls, size, wanted: set[int], transforms: Sequence[Transform]) -> None:
        super().__init__(urls, size, transforms)
        self.wanted = wanted

    def _keep(self, record: dict) -> bool:
        return record["id"] in self.wanted
