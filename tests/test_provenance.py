"""What must match (resume, pairing) and what is only recorded (perturbation for pairing, paths, dates)."""

import copy

import pytest

from invcache.cache.provenance import pairing_differences, pairing_fingerprint, resume_differences
from invcache.errors import InvcacheError
from invcache.training.checkpoint import check_compatible

ATTRS = {
    "schema_version": 1,
    "model": {"model": "detr-tiny", "config": {"d_model": 64}, "weights": "/models/a/detr.pth",
              "weights_sha256": "aa"},
    "preprocessing": {"size": [128, 160], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                      "resample": "bilinear"},
    "perturbation": None,
    "source": {"kind": "coco", "split": "val2017", "root": "/data/coco", "annotation_file": "/data/coco/a.json",
               "annotation_sha256": "bb", "images": 16},
    "taps": ["input", "enc.0"], "shard_size": 16, "codec": {"name": "blosc"}, "image_ids_sha256": "cc",
    "created": "2026-01-01", "versions": {"torch": "2.14.1"},
}


def changed(path: str, value):
    attrs = copy.deepcopy(ATTRS)
    *parents, last = path.split(".")
    target = attrs
    for key in parents:
        target = target[key]
    target[last] = value
    return attrs


@pytest.mark.parametrize("path, value", [
    ("source.root", "/mnt/elsewhere/coco"), ("source.annotation_file", "/mnt/elsewhere/a.json"),
    ("model.weights", "/moved/detr.pth"), ("created", "2027-01-01"), ("versions", {"torch": "9"}),
])
def test_paths_and_dates_do_not_block_a_resume(path, value):
    assert resume_differences(ATTRS, changed(path, value)) == []


@pytest.mark.parametrize("path, value, named", [
    ("perturbation", [{"name": "grayscale"}], "perturbation"),
    ("source.annotation_sha256", "zz", "source.annotation_sha256"),
    ("model.weights_sha256", "zz", "model.weights_sha256"),
    ("preprocessing.size", [96, 128], "preprocessing.size"),
    ("shard_size", 32, "shard_size"),
    ("image_ids_sha256", "zz", "image_ids_sha256"),
])
def test_settings_that_change_the_arrays_block_a_resume(path, value, named):
    diffs = resume_differences(ATTRS, changed(path, value))
    assert len(diffs) == 1 and diffs[0].startswith(named)


def test_a_perturbed_cache_pairs_with_modules_trained_on_clean_ones():
    fingerprint = pairing_fingerprint(ATTRS)
    perturbed = changed("perturbation", [{"name": "hue", "to": "red", "category": "stop sign"}])
    assert pairing_differences(fingerprint, perturbed) == []
    check_compatible(fingerprint, changed("source.split", "train2017"), "module m", "the cache c")
    with pytest.raises(InvcacheError, match=r"module m does not belong with the cache c: .*preprocessing.resample"):
        check_compatible(fingerprint, changed("preprocessing.resample", "nearest"), "module m", "the cache c")
