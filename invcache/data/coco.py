"""COCO in the official folder layout: ``<root>/<split>/*.jpg`` and ``<root>/annotations/instances_<split>.json``."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from pycocotools.coco import COCO

from invcache.data.encoded import EncodedImage
from invcache.data.preprocess import ImageReadError, failed_sample, load_sample
from invcache.data.selection import restrict_ids
from invcache.data.transforms import Transform
from invcache.errors import UsageError
from invcache.hashing import file_sha256
from invcache.settings import DEFAULT_SIZE

COCO_HELP = (
    "get COCO 2017 from https://cocodataset.org/#download (images and annotations unpacked under "
    "--coco-root or $COCO_ROOT), or run with --source synthetic"
)


def annotation_path(root: str | os.PathLike, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def load_coco(annotation_file: str | os.PathLike) -> COCO:
    """pycocotools' COCO of a checked annotation file, without its progress prints.

    A file that is not JSON, or whose layout is not COCO's where invcache and pycocotools rely
    on it, is a one-line UsageError naming the file and the first problem: pycocotools would
    fail with a traceback, or not at all until a DataLoader worker meets the bad record.
    """
    path = Path(annotation_file)
    try:
        dataset = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        raise UsageError(f"{path} is not a COCO annotation file: not valid JSON ({exc})") from None
    problem = _layout_problem(dataset)
    if problem:
        raise UsageError(f"{path} is not a COCO annotation file: {problem}")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def image_record_problem(record: object, where: str) -> str | None:
    """What is wrong with a COCO image record for reading its image (``id``, ``height``, ``width``), if anything."""
    if not isinstance(record, dict):
        return f"{where} is a JSON {_json_type(record)}, not an object"
    return (_field_problem(record, "id", where, _is_int, "an integer")
            or _field_problem(record, "height", where, _is_count, "a non-negative integer", required=False)
            or _field_problem(record, "width", where, _is_count, "a non-negative integer", required=False))


def _layout_problem(dataset: object) -> str | None:
    """The first thing in a parsed annotation file that pycocotools or :class:`CocoFolder` would trip over."""
    if not isinstance(dataset, dict):
        return f"the top level is a JSON {_json_type(dataset)}, not an object"
    problem = _list_problem(dataset, "images", required=True)
    if problem:
        return problem
    ids: set[int] = set()
    for i, image in enumerate(dataset["images"]):
        where = f"images[{i}]"
        problem = (image_record_problem(image, where)
                   or _field_problem(image, "file_name", where, _is_name, "a non-empty string"))
        if problem:
            return problem
        if image["id"] in ids:
            return f"{where} repeats the id {image['id']}"
        ids.add(image["id"])
    # what pycocotools' index keys on
    for key, fields in (("annotations", ("id", "image_id", "category_id")), ("categories", ("id",))):
        problem = _list_problem(dataset, key, required=False)
        if problem:
            return problem
        for i, item in enumerate(dataset.get(key, [])):
            where = f"{key}[{i}]"
            if not isinstance(item, dict):
                return f"{where} is a JSON {_json_type(item)}, not an object"
            for field in fields:
                problem = _field_problem(item, field, where, _is_int, "an integer")
                if problem:
                    return problem
    return None


def _list_problem(dataset: dict, key: str, required: bool) -> str | None:
    if key not in dataset:
        return f'no "{key}" list' if required else None
    if not isinstance(dataset[key], list):
        return f'"{key}" is a JSON {_json_type(dataset[key])}, not a list'
    return None


def _field_problem(record: dict, key: str, where: str, ok: Callable[[object], bool], expected: str,
                   required: bool = True) -> str | None:
    if key not in record:
        return f"{where} has no {key}" if required else None
    if not ok(record[key]):
        shown = repr(record[key])
        return f"{where} has {key} {shown if len(shown) <= 60 else shown[:57] + '...'}, not {expected}"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    return _is_int(value) and value >= 0


def _is_name(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


class CocoFolder(torch.utils.data.Dataset):
    """One split of a COCO-format folder, images in ascending id order, resized to ``size``.

    Each item is :meth:`Sample.as_dict`: an unreadable image is an item with ``valid`` False
    and its reason in ``error``, never an exception. ``transforms`` (resolved against
    :attr:`coco` by :func:`~invcache.data.transforms.resolve_transforms`) perturb each image
    before the resize; :meth:`restrict` keeps only some of the split's images.
    """

    def __init__(
        self, root: str | os.PathLike, split: str, size: tuple[int, int] = DEFAULT_SIZE, kind: str = "coco",
        transforms: Sequence[Transform] = (),
    ) -> None:
        self.root = Path(root)
        self.kind = kind
        self.split = split
        self.size = size
        self.transforms = tuple(transforms)
        self.annotation_file = annotation_path(root, split)
        self.image_dir = self.root / split
        if not self.annotation_file.is_file():
            raise UsageError(f"COCO {split} not found: no {self.annotation_file}; {COCO_HELP}")
        if not self.image_dir.is_dir():
            raise UsageError(f"COCO {split} not found: no image folder {self.image_dir}; {COCO_HELP}")
        self.coco = load_coco(self.annotation_file)
        self.image_ids = sorted(self.coco.getImgIds())

    def restrict(self, image_ids: Iterable[int]) -> None:
        """Keep only ``image_ids`` (ascending, once each), so that row i is the i-th of them.

        Ids the split does not have are a UsageError naming the first few.
        """
        self.image_ids = restrict_ids(self.image_ids, image_ids, self.split)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.image_ids[index]
        record = self.coco.imgs[image_id]
        try:
            path = self.image_file(record)
        except ImageReadError as exc:
            return failed_sample(image_id, record, self.size, str(exc)).as_dict()
        annotations = self.coco.imgToAnns.get(image_id, []) if self.transforms else ()
        return load_sample(image_id, path, record, self.size, self.transforms, annotations).as_dict()

    def encoded(self, index: int) -> EncodedImage:
        """Item ``index`` as its file's bytes, for the device decode path (thread-safe: it only reads).

        A file that cannot be read, or a ``file_name`` that :meth:`image_file` refuses, gets no
        bytes: the CPU path (this dataset's item) then records the failure exactly as it does.
        """
        image_id = self.image_ids[index]
        data = None
        try:
            path = self.image_file(self.coco.imgs[image_id])
            with open(path, "rb") as handle:
                # a bytearray: torch.frombuffer wants a writable buffer, and readinto fills it without a copy
                data = bytearray(os.fstat(handle.fileno()).st_size)
                if handle.readinto(data) != len(data):
                    data = None  # the file changed while being read: let the CPU path read it
        except (ImageReadError, OSError):
            data = None
        return EncodedImage(index, image_id, data, functools.partial(self.__getitem__, index))

    def image_file(self, record: dict) -> Path:
        """The file of an image record: its ``file_name`` under the split folder.

        The annotation file may come from anywhere, so its ``file_name`` must not name a file
        elsewhere on the machine: an absolute one, or one with any ``..`` component, raises
        ImageReadError (a recorded failure) and nothing is opened. Any ``..`` at all, not only
        one that climbs out: after a symlinked folder, ``..`` leads to the parent of the link's
        target. Symlinks inside the split folder are followed wherever they point: the folder
        is the user's (a split of links into a shared store is a common layout); only what the
        annotation file says is untrusted.
        """
        name = record["file_name"]
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ImageReadError(f"file_name {name!r} escapes the image folder {self.image_dir} (absolute, or "
                                 "with '..'); not read")
        return self.image_dir / name

    def source_record(self) -> dict:
        """Provenance of this source for a cache's attributes."""
        return {
            "kind": self.kind,
            "root": str(self.root.resolve()),
            "split": self.split,
            "annotation_file": str(self.annotation_file.resolve()),
            "annotation_sha256": file_sha256(self.annotation_file),
            "images": len(self),
        }
