"""COCO as webdataset tar shards: one sample per image, ``.jpg`` (the original file's bytes) + ``.json``.

The ``.json`` holds ``{"image": <COCO image record>, "annotations": [<its annotations>]}``.
Shards are read from local paths or any URL webdataset opens (``https://…``, ``pipe:…``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from invcache.data.coco import CocoFolder
from invcache.data.preprocess import DEFAULT_SIZE, Sample, load_sample


def coco_to_wds(
    root: str | os.PathLike, split: str, out_dir: str | os.PathLike, images_per_shard: int = 1000
) -> list[Path]:
    """Write a COCO split as ``coco-<split>-NNNNNN.tar`` shards in ascending image-id order.

    Image bytes are copied as they are (no re-encoding); a missing file gives a sample
    without ``.jpg``, which the reader reports as a failure. Each shard appears under its
    final name only once complete.
    """
    dataset = CocoFolder(root, split)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = dataset.image_ids
    shards = []
    for shard_index, start in enumerate(range(0, len(ids), images_per_shard)):
        final = out_dir / f"coco-{split}-{shard_index:06d}.tar"
        partial = final.with_suffix(".tar.partial")
        with wds.TarWriter(str(partial), encoder=False) as sink:
            for image_id in ids[start:start + images_per_shard]:
                record = dataset.coco.imgs[image_id]
                meta = {"image": record, "annotations": dataset.coco.imgToAnns.get(image_id, [])}
                sample = {"__key__": f"{image_id:012d}", "json": json.dumps(meta).encode()}
                image_file = dataset.image_dir / record["file_name"]
                if image_file.is_file():
                    sample["jpg"] = image_file.read_bytes()
                sink.write(sample)
        partial.replace(final)
        shards.append(final)
    return shards


def _every_node(urls):
    return urls


class WdsImages(torch.utils.data.IterableDataset):
    """Images streamed from webdataset shards, in shard order; DataLoader workers split the shards."""

    def __init__(self, urls: str | list[str], size: tuple[int, int] = DEFAULT_SIZE) -> None:
        self.urls = urls
        self.size = size

    def samples(self) -> Iterator[Sample]:
        stream = wds.WebDataset(
            self.urls, shardshuffle=False, nodesplitter=_every_node, workersplitter=wds.split_by_worker,
            empty_check=False,
        )
        for raw in stream:
            record = json.loads(raw["json"])["image"]
            if "jpg" not in raw:
                fallback = (int(record.get("height", 0)), int(record.get("width", 0)))
                reason = f"no .jpg in webdataset sample {raw['__key__']}"
                yield Sample(record["id"], np.zeros((*self.size, 3), np.uint8), fallback, False, reason)
                continue
            yield load_sample(record["id"], raw["jpg"], record, self.size)

    def __iter__(self) -> Iterator[dict]:
        return (sample.as_dict() for sample in self.samples())

    def source_record(self) -> dict:
        return {"kind": "wds", "urls": self.urls, "annotation_sha256": None}
