"""``invcache analyze ap``: COCO box AP of DETR from the cached head outputs, without running DETR (SPEC §5).

Over every valid image of the cache: ``head.logits`` and ``head.boxes`` go through DETR's own
post-processing (:func:`invcache.models.postprocess.post_process`, every query kept), boxes
are scaled by each image's ``orig_size`` and written in COCO's results format, and
pycocotools' ``COCOeval`` (bbox) scores them against the annotation file the cache was
extracted from, restricted to the cache's valid image ids. Writes ``results.json`` (AP, AP50,
AP75, AP small/medium/large, AP per category, the annotation file and its sha256),
``per_category.csv``, ``detections.json`` (the COCO results list) and ``ap_per_category.png``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from invcache.analysis.common import (
    batches,
    evaluation_rows,
    open_evaluation_cache,
    provenance,
    require_taps,
    write_results,
)
from invcache.cache import schema as S
from invcache.cache.store import Cache
from invcache.data.coco import load_coco
from invcache.errors import UsageError
from invcache.hashing import file_sha256
from invcache.models.postprocess import post_process
from invcache.settings import AnalyzeSettings
from invcache.taps import HEAD_BOXES, HEAD_LOGITS

NAME = "ap"
DETECTIONS = "detections.json"
# COCOeval's summary statistics, in the order of ``COCOeval.stats`` (the first six are AP).
STATS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")
MAX_DETECTIONS = 100

log = logging.getLogger("invcache")


def run(settings: AnalyzeSettings | None = None, *, annotations: str | os.PathLike | None = None) -> dict:
    """Evaluate DETR's cached detections on every valid image; returns (and writes) the results.

    ``annotations`` overrides the annotation file the cache records (needed for webdataset
    caches, or when the file has moved).
    """
    settings = settings or AnalyzeSettings()
    cache = open_evaluation_cache(settings.cache_location())
    rows = evaluation_rows(cache)
    require_taps(cache, (HEAD_LOGITS, HEAD_BOXES), "the AP analysis")
    coco, annotation = open_annotations(cache, annotations)
    image_ids = cache.image_ids[rows]
    require_images(coco, image_ids, cache, annotation)

    detections = cache_detections(cache, rows, settings.batch_size)
    evaluation = evaluate_bbox(coco, detections, image_ids)

    results = {
        "analysis": NAME, "images": int(len(rows)), "detections": len(detections),
        "ap": evaluation["ap"], "per_category": evaluation["per_category"], "cocoeval": evaluation["summary"],
        "annotations": annotation, "detections_file": DETECTIONS,
        "headline": {name: evaluation["ap"][name] for name in ("AP", "AP50", "AP75")},
        "settings": {"batch_size": settings.batch_size},
        "provenance": provenance(cache),
    }
    figure = per_category_figure(evaluation["per_category"], evaluation["ap"]["AP"], len(rows))
    write_results(settings.out_dir(NAME), results, {"per_category": evaluation["per_category"]},
                  {"ap_per_category": figure}, {DETECTIONS: json.dumps(detections).encode()})
    return results


def annotation_record(cache: Cache, annotations: str | os.PathLike | None, option: str = "--annotations") -> dict:
    """The annotation file to evaluate against: ``annotations`` if given, else the one the cache records.

    A recorded file must still be there with the sha256 recorded at extraction: other
    annotations would silently give another AP. A file passed explicitly is the user's
    choice; a sha256 other than the recorded one is logged, and kept in the results.
    ``option`` is the command's option that passes the file, named in the errors.
    """
    source = cache.attrs.get("source") or {}
    recorded_sha = source.get("annotation_sha256") if source.get("annotation_file") else None
    if annotations is not None:
        path = Path(annotations)
        if not path.is_file():
            raise UsageError(f"no annotation file {path} ({option})")
        sha = file_sha256(path)
        if recorded_sha and sha != recorded_sha:
            log.warning("%s differs from the annotation file %s the cache %s was extracted with (sha256 %s, "
                        "recorded %s)", path, source["annotation_file"], cache.location, sha[:12], recorded_sha[:12])
        return {"file": str(path.resolve()), "sha256": sha, "recorded_file": source.get("annotation_file"),
                "recorded_sha256": recorded_sha, "from": option}
    if not source.get("annotation_file"):
        kind = source.get("kind", "an unknown source")
        raise UsageError(f"the cache {cache.location} was extracted from {kind}, which records no annotation file; "
                         f"pass the COCO annotation file of its images with {option} FILE")
    path = Path(source["annotation_file"])
    if not path.is_file():
        raise UsageError(f"the annotation file {path} the cache {cache.location} was extracted with is not there any "
                         f"more; pass it with {option} FILE")
    sha = file_sha256(path)
    if sha != recorded_sha:
        raise UsageError(f"the annotation file {path} changed since the cache {cache.location} was extracted (sha256 "
                         f"{sha[:12]}…, recorded {str(recorded_sha)[:12]}…); pass the original with {option} FILE")
    return {"file": str(path), "sha256": sha, "recorded_file": str(path), "recorded_sha256": recorded_sha,
            "from": "cache"}


def open_annotations(cache: Cache, annotations: str | os.PathLike | None, option: str = "--annotations"
                     ) -> tuple[COCO, dict]:
    """The COCO annotations of ``cache``'s images (:func:`annotation_record`), loaded; bad files are one line."""
    annotation = annotation_record(cache, annotations, option)
    try:
        return load_coco(annotation["file"]), annotation
    except UsageError as exc:  # load_coco names the file and what is wrong with it
        raise UsageError(f"{exc}; pass the right one with {option} FILE") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # what pycocotools itself may still raise
        raise UsageError(f"{annotation['file']} is not a COCO annotation file ({type(exc).__name__}: {exc}); "
                         f"pass the right one with {option} FILE") from None


def require_images(coco: COCO, image_ids: Sequence[int] | np.ndarray, cache: Cache, annotation: dict,
                   option: str = "--annotations") -> None:
    """Refuse annotations that lack one of ``image_ids`` (the images to score or train on), naming ``option``."""
    unknown = np.setdiff1d(image_ids, coco.getImgIds())
    if len(unknown):
        raise UsageError(f"{len(unknown)} image id(s) of {cache.location} (e.g. {int(unknown[0])}) are not in "
                         f"{annotation['file']}; pass the annotations of its images with {option} FILE")


def cache_detections(cache: Cache, rows: np.ndarray, batch_size: int) -> list[dict]:
    """COCO results entries (:func:`coco_detections`) of the cached heads of ``rows``."""
    require_taps(cache, (HEAD_LOGITS, HEAD_BOXES), "AP")
    orig_size = torch.from_numpy(cache.read(S.ORIG_SIZE, 0, cache.num_images))
    detections: list[dict] = []
    for batch_rows, batch in batches(cache, (HEAD_LOGITS, HEAD_BOXES), rows, batch_size):
        detections += coco_detections(cache.image_ids[batch_rows], batch[HEAD_LOGITS], batch[HEAD_BOXES],
                                      orig_size[batch_rows])
    return detections


def coco_detections(image_ids: Sequence[int] | np.ndarray, logits: torch.Tensor, boxes: torch.Tensor,
                    orig_size: torch.Tensor) -> list[dict]:
    """COCO results entries (``image_id``, ``category_id``, ``bbox`` xywh in pixels, ``score``) of every query.

    As DETR's COCO evaluation writes them: :func:`post_process`, then (x0, y0, x1, y1) →
    (x0, y0, w, h). Labels are category ids; labels no category has (DETR's unused ids) are
    ignored by COCOeval.
    """
    scores, labels, corners = post_process(logits, boxes, orig_size)
    xywh = torch.cat([corners[..., :2], corners[..., 2:] - corners[..., :2]], dim=-1)
    return [
        {"image_id": int(image_id), "category_id": label, "bbox": box, "score": score}
        for image_id, image_scores, image_labels, image_boxes in zip(image_ids, scores.tolist(), labels.tolist(),
                                                                      xywh.tolist())
        for score, label, box in zip(image_scores, image_labels, image_boxes)
    ]


def evaluate_bbox(coco: COCO, detections: list[dict], image_ids: Sequence[int] | np.ndarray,
                  category_ids: Sequence[int] | None = None) -> dict:
    """pycocotools' bbox evaluation of ``detections`` on ``image_ids`` only (and ``category_ids``, if given).

    Returns ``ap`` (:data:`STATS`; None where no ground truth of that size exists), ``per_category``
    (one row per category of the file) and ``summary`` (COCOeval's printed summary lines).
    pycocotools prints as it goes; that goes to a buffer, and only the summary is kept.
    """
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        # loadRes adds fields to the dicts it is given; ours stay as written to detections.json.
        found = coco.loadRes([dict(d) for d in detections])
        evaluator = COCOeval(coco, found, iouType="bbox")
        evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        if category_ids is not None:
            evaluator.params.catIds = sorted(int(i) for i in category_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        printed.seek(0)
        printed.truncate()
        evaluator.summarize()
    ap = {name: _score(value) for name, value in zip(STATS, evaluator.stats)}
    return {"ap": ap, "per_category": per_category(coco, evaluator), "summary": printed.getvalue().splitlines()}


def per_category(coco: COCO, evaluator: COCOeval) -> list[dict]:
    """AP of each category: ``eval['precision']`` [IoU, recall, category, area, maxDets] at area ``all`` and 100
    detections, averaged over IoU thresholds and recall points (entries of -1, "no ground truth", left out)
    — the number COCOeval's AP line averages over categories. None for a category without ground truth here.
    """
    precision = evaluator.eval["precision"]
    area, dets = evaluator.params.areaRngLbl.index("all"), evaluator.params.maxDets.index(MAX_DETECTIONS)
    image_ids = list(evaluator.params.imgIds)
    rows = []
    for k, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, area, dets]
        values = values[values > -1]
        instances = len(coco.getAnnIds(imgIds=image_ids, catIds=[category_id], iscrowd=False))
        rows.append({"category_id": int(category_id), "name": coco.cats[category_id]["name"],
                     "instances": instances, "AP": float(values.mean()) if values.size else None})
    return rows


def per_category_figure(rows: list[dict], overall: float | None, images: int) -> Figure:
    """Horizontal bars, one per category with ground truth in these images, the overall AP as a dashed line."""
    shown = [r for r in rows if r["AP"] is not None]
    figure = Figure(figsize=(6.0, 0.22 * len(shown) + 1.4))
    ax = figure.subplots()
    positions = np.arange(len(shown))
    bars = ax.barh(positions, [r["AP"] for r in shown], color="#4c72b0")
    ax.bar_label(bars, fmt="%.3f", fontsize=6, padding=2)
    ax.set_yticks(positions, [f"{r['name']} ({r['instances']})" for r in shown], fontsize=7)
    ax.invert_yaxis()  # the file's category order, top to bottom
    title = f"Box AP per category ({images} images; ground-truth instances in brackets)"
    if overall is not None:
        ax.axvline(overall, color="#c44e52", linestyle="--")
        title += f"\ndashed: all categories, AP {overall:.3f}"
    ax.set_xlim(0, 1.1)  # room for the value labels of bars at 1
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("AP (IoU 0.50:0.95, all areas, 100 detections)")
    ax.set_title(title, fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    return figure


def _score(value: float) -> float | None:
    """A COCOeval statistic; its -1 ("nothing to evaluate") becomes None."""
    return None if value < 0 or math.isnan(value) else float(value)
