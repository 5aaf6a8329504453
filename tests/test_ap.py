"""``analyze ap``: DETR's post-processing (against HF's), COCOeval on detections made from the ground truth, the
annotation file lookup, and the analysis over a whole cache."""

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from invcache.analysis import ap
from invcache.cache import schema as S
from invcache.cache.store import Cache
from invcache.cli import main
from invcache.data.coco import annotation_path, load_coco
from invcache.errors import UsageError
from invcache.hashing import file_sha256
from invcache.models import get_config
from invcache.models.postprocess import post_process
from invcache.settings import AnalyzeSettings

QUERIES, CLASSES = 100, 92
INVALID = (1, 2)  # rows written as unreadable images: no detections, and their ground truth must not count


def test_post_processing_matches_hf_detr_image_processor():
    from transformers import DetrImageProcessor
    from transformers.models.detr.modeling_detr import DetrObjectDetectionOutput

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, QUERIES, CLASSES, generator=generator) * 3
    boxes = torch.rand(3, QUERIES, 4, generator=generator)
    sizes = torch.tensor([[480, 640], [241, 333], [1000, 17]])
    theirs = DetrImageProcessor().post_process_object_detection(
        DetrObjectDetectionOutput(logits=logits, pred_boxes=boxes), threshold=0, target_sizes=sizes)
    ours = post_process(logits, boxes, sizes)
    for i, reference in enumerate(theirs):
        assert len(reference["scores"]) == QUERIES
        torch.testing.assert_close(ours.scores[i], reference["scores"], atol=1e-5, rtol=0)
        assert torch.equal(ours.labels[i], reference["labels"])
        torch.testing.assert_close(ours.boxes[i], reference["boxes"], atol=1e-5 * sizes.max().item(), rtol=1e-5)
    entries = ap.coco_detections([7, 8, 9], logits, boxes, sizes)
    assert len(entries) == 3 * QUERIES and entries[QUERIES]["image_id"] == 8
    x0, y0, x1, y1 = theirs[1]["boxes"][0].tolist()
    np.testing.assert_allclose(entries[QUERIES]["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=1e-3)
    assert entries[QUERIES]["category_id"] == theirs[1]["labels"][0].item()


def head_outputs(coco, image_ids, shift=0.0, relabel=None):
    """Cached-style (logits, boxes, orig_size) made from the ground truth: one confident query per object,
    the rest no-object; ``shift`` moves boxes right by that fraction of their width, ``relabel`` changes classes."""
    logits = torch.zeros(len(image_ids), QUERIES, CLASSES)
    logits[..., -1] = 10.0
    boxes = torch.tensor([0.5, 0.5, 0.2, 0.2]).repeat(len(image_ids), QUERIES, 1)
    sizes = torch.tensor([[coco.imgs[i]["height"], coco.imgs[i]["width"]] for i in image_ids])
    for row, image_id in enumerate(image_ids):
        height, width = sizes[row].tolist()
        for query, annotation in enumerate(coco.imgToAnns[image_id]):
            x, y, w, h = annotation["bbox"]
            category = relabel(annotation["category_id"]) if relabel else annotation["category_id"]
            logits[row, query] = 0.0
            logits[row, query, category] = 10.0
            boxes[row, query] = torch.tensor([(x + w / 2 + shift * w) / width, (y + h / 2) / height,
                                              w / width, h / height])
    return logits, boxes, sizes


@pytest.fixture(scope="module")
def coco(synthetic_root):
    return load_coco(annotation_path(synthetic_root, "val2017"))


def evaluate(coco, image_ids, **degrade):
    return ap.evaluate_bbox(coco, ap.coco_detections(image_ids, *head_outputs(coco, image_ids, **degrade)),
                            image_ids)


def test_detections_from_the_ground_truth_score_one_and_degraded_ones_less(coco):
    ids = sorted(coco.getImgIds())
    perfect = evaluate(coco, ids)
    assert perfect["ap"]["AP"] == pytest.approx(1.0) and perfect["ap"]["AP50"] == pytest.approx(1.0)
    assert perfect["ap"]["AP75"] == pytest.approx(1.0)
    present = {a["category_id"] for a in coco.anns.values()}
    for row in perfect["per_category"]:
        assert (row["AP"] == pytest.approx(1.0)) if row["category_id"] in present else row["AP"] is None
    assert sum(r["instances"] for r in perfect["per_category"]) == len(coco.anns)
    assert any(line.startswith(" Average Precision") for line in perfect["summary"])

    # IoU of a box shifted by 0.3 of its width: 0.7 / 1.3 = 0.54, a hit at threshold 0.50 only (1 of 10)
    shifted = evaluate(coco, ids, shift=0.3)
    assert shifted["ap"]["AP"] == pytest.approx(0.1) and shifted["ap"]["AP50"] == pytest.approx(1.0)
    assert shifted["ap"]["AP75"] == 0.0
    categories = sorted(coco.cats)
    wrong = evaluate(coco, ids, relabel=lambda c: categories[(categories.index(c) + 1) % len(categories)])
    assert wrong["ap"]["AP"] == 0.0 and all(r["AP"] in (0.0, None) for r in wrong["per_category"])


def test_per_category_ap_averages_to_cocoevals_ap(coco):
    ids = sorted(coco.getImgIds())
    bus, stop_sign = 6, 13
    mixed = evaluate(coco, ids, relabel=lambda c: stop_sign if c == bus else c)  # buses detected as stop signs
    per_category = {r["name"]: r["AP"] for r in mixed["per_category"]}
    assert per_category["bus"] == 0.0 and 0.0 < per_category["stop sign"] < 1.0 and per_category["apple"] == 1.0
    assert np.mean([ap for ap in per_category.values() if ap is not None]) == pytest.approx(mixed["ap"]["AP"])


def test_evaluation_counts_only_the_given_images(coco):
    ids = sorted(coco.getImgIds())
    half = ids[: len(ids) // 2]
    detections = ap.coco_detections(half, *head_outputs(coco, half))
    assert ap.evaluate_bbox(coco, detections, half)["ap"]["AP"] == pytest.approx(1.0)
    assert ap.evaluate_bbox(coco, detections, ids)["ap"]["AP"] < 1.0  # the other half's objects were missed


def write_cache(location, annotation_file, source=None):
    """A cache of head outputs made from the ground truth (rows ``INVALID`` unreadable), recording its source."""
    coco = load_coco(annotation_file)
    ids = sorted(coco.getImgIds())
    logits, boxes, sizes = head_outputs(coco, ids)
    valid = ~np.isin(np.arange(len(ids)), INVALID)
    logits[~valid], boxes[~valid] = 0, 0
    source = source or {"kind": "synthetic", "split": "val2017", "annotation_file": str(annotation_file),
                        "annotation_sha256": file_sha256(annotation_file), "images": len(ids)}
    cache = Cache.create(location, num_images=len(ids), shard_size=8, attributes={"source": source},
                         tap_shapes={"head.logits": (QUERIES, CLASSES), "head.boxes": (QUERIES, 4)})
    for shard in range(cache.num_shards):
        start, stop = cache.shard_bounds(shard)
        meta = S.empty_bookkeeping(stop - start)
        meta[S.IMAGE_ID][:] = ids[start:stop]
        meta[S.ORIG_SIZE][:] = sizes[start:stop].numpy() * valid[start:stop, None]
        meta[S.VALID][:] = valid[start:stop]
        taps = {"head.logits": logits[start:stop].half().numpy(), "head.boxes": boxes[start:stop].half().numpy()}
        cache.write_shard(shard, taps, meta)
    return ids, valid


@pytest.fixture
def annotations(synthetic_root, tmp_path):
    """A copy of the synthetic annotation file the tests may move or change."""
    path = tmp_path / "instances_val2017.json"
    shutil.copy(annotation_path(synthetic_root, "val2017"), path)
    return path


def test_run_over_a_cache_evaluates_its_valid_images_against_the_recorded_file(annotations, tmp_path):
    ids, valid = write_cache(tmp_path / "cache", annotations)
    out = tmp_path / "out"
    results = ap.run(AnalyzeSettings(cache=str(tmp_path / "cache"), out=out, workspace=tmp_path))
    assert results["images"] == int(valid.sum()) and results["detections"] == QUERIES * int(valid.sum())
    assert results["headline"] == {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0), "AP75": pytest.approx(1.0)}
    assert results["annotations"]["file"] == str(annotations) and results["annotations"]["from"] == "cache"
    assert results["annotations"]["sha256"] == file_sha256(annotations)

    detections = json.loads((out / ap.DETECTIONS).read_text())
    assert len(detections) == results["detections"]
    assert {d["image_id"] for d in detections} == set(np.asarray(ids)[valid].tolist())
    assert set(detections[0]) == {"image_id", "category_id", "bbox", "score"}
    rows = list(csv.DictReader(open(out / "per_category.csv")))
    assert [r["name"] for r in rows] == [c["name"] for c in load_coco(annotations).dataset["categories"]]
    written = json.loads((out / "results.json").read_text())
    assert written["files"] == {"tables": ["per_category.csv"], "figures": ["ap_per_category.png"],
                                "data": [ap.DETECTIONS]}
    assert (out / "ap_per_category.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.partial"))


def test_a_moved_file_is_found_with_annotations_and_a_webdataset_cache_needs_it(annotations, tmp_path):
    write_cache(tmp_path / "cache", annotations)
    moved = annotations.rename(tmp_path / "moved.json")
    results = ap.run(AnalyzeSettings(cache=str(tmp_path / "cache"), out=tmp_path / "out"), annotations=moved)
    assert results["annotations"]["from"] == "--annotations" and results["headline"]["AP"] == pytest.approx(1.0)
    assert results["annotations"]["sha256"] == results["annotations"]["recorded_sha256"]

    write_cache(tmp_path / "wds", moved, source={"kind": "wds", "split": "val2017", "urls": ["x-{0..1}.tar"],
                                                 "annotation_sha256": "0" * 64})
    with pytest.raises(UsageError, match=r"extracted from wds, which records no annotation file; .*--annotations"):
        ap.run(AnalyzeSettings(cache=str(tmp_path / "wds"), out=tmp_path / "o"))
    assert ap.run(AnalyzeSettings(cache=str(tmp_path / "wds"), out=tmp_path / "o"),
                  annotations=moved)["headline"]["AP"] == pytest.approx(1.0)
    with pytest.raises(UsageError, match="no annotation file"):
        ap.run(AnalyzeSettings(cache=str(tmp_path / "wds"), out=tmp_path / "o"), annotations=tmp_path / "none")


def test_a_missing_or_changed_annotation_file_is_one_line_exit_2(annotations, tmp_path, capsys):
    write_cache(tmp_path / "cache", annotations)
    command = ["analyze", "ap", "--root", str(tmp_path), "--cache", str(tmp_path / "cache"), "--out",
               str(tmp_path / "out")]
    annotations.write_text(annotations.read_text() + " ")
    changed = subprocess.run([sys.executable, "-m", "invcache.cli", *command], capture_output=True, text=True)
    annotations.unlink()
    with pytest.raises(SystemExit) as exit_code:  # the same entry point, in-process
        main(command)
    missing = subprocess.CompletedProcess(command, exit_code.value.code, "", capsys.readouterr().err)
    for result, needle in [(changed, "changed since the cache"), (missing, "is not there any more")]:
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert needle in lines[0] and "--annotations FILE" in lines[0]
    assert not (tmp_path / "out" / "results.json").exists()


def test_run_on_the_analysis_workspace_writes_its_files(analysis_workspace, synthetic_root):
    results = ap.run(AnalyzeSettings(workspace=analysis_workspace, batch_size=4))
    out = analysis_workspace / "analysis" / "ap"
    assert results["images"] == 9 and results["detections"] == 9 * get_config("detr-tiny").num_queries
    assert results["annotations"]["file"] == str(annotation_path(synthetic_root, "val2017").resolve())
    assert all(v is None or 0.0 <= v <= 1.0 for v in results["ap"].values())
    assert results["ap"]["AP50"] >= 0.5  # the embedded default detects the held-out shapes
    for name in ("results.json", "per_category.csv", "detections.json", "ap_per_category.png"):
        assert (out / name).stat().st_size > 0


def test_an_annotation_file_that_is_not_coco_is_a_usage_error(analysis_workspace, tmp_path):
    from invcache.analysis import ap
    from invcache.errors import UsageError
    from invcache.settings import AnalyzeSettings

    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UsageError, match="is not a COCO annotation file"):
        ap.run(AnalyzeSettings(workspace=analysis_workspace, out=tmp_path / "o"), annotations=tmp_path / "broken.json")
