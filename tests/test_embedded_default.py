"""The embedded default ``--weights demo``: detr-tiny trained on the synthetic shapes (pipelines/demo_detr.py)."""

from __future__ import annotations

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval

from invcache import build_detr, forward_taps
from invcache.data import open_split
from invcache.hashing import file_sha256
from invcache.models.weights import EMBEDDED_DIR, EMBEDDED_WEIGHTS

SIZE = (128, 160)  # the size it was trained at


def test_the_embedded_default_is_shipped_small_and_as_recorded():
    entry = EMBEDDED_WEIGHTS["demo"]
    path = EMBEDDED_DIR / entry.file
    assert entry.model == "detr-tiny" and path.stat().st_size <= 25 * 2**20
    assert file_sha256(path) == entry.sha256 and "pipelines/demo_detr.py" in entry.command


def test_the_embedded_default_finds_the_shapes_of_a_held_out_split(tmp_path):
    """AP50 of at least 0.5 on images it never saw (neither trained on nor chosen by), scored by pycocotools."""
    images = open_split("synthetic", "shapes-test", workspace=tmp_path, size=SIZE, synthetic_images=64)
    model = build_detr("detr-tiny", "demo")
    assert model.fingerprint["weights"] == "demo"
    samples = [images[i] for i in range(len(images))]
    assert all(s["valid"] for s in samples)
    heads = forward_taps(model, torch.stack([s["input"] for s in samples]), ["head.logits", "head.boxes"])
    logits, boxes = heads["head.logits"].double().numpy(), heads["head.boxes"].double().numpy()
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    detections = []
    for sample, p, b in zip(samples, probabilities, boxes):
        height, width = sample["orig_size"].tolist()
        for query in range(len(p)):
            label = int(p[query, :-1].argmax())  # the last class is no-object
            cx, cy, w, h = b[query]
            detections.append({"image_id": sample["image_id"], "category_id": label,
                               "bbox": [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height],
                               "score": float(p[query, label])})
    evaluation = COCOeval(images.coco, images.coco.loadRes(detections), "bbox")
    evaluation.params.imgIds = [s["image_id"] for s in samples]
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[1] >= 0.5, evaluation.stats
