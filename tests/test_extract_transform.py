"""``extract --transform`` and ``--ids``/``--ids-file`` (issue 10): a perturbed cache is DETR on the perturbed
images, computed here from the image files with PIL; resumes with another transform are refused; bad values are
one line, exit 2; an undecodable mask fails its image only."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from invcache.cache.store import Cache
from invcache.cli import main
from invcache.data import coco_to_wds, generate_coco, load_coco
from invcache.data.transforms import apply_transforms, resolve_transforms
from invcache.errors import InvcacheError, UsageError
from invcache.extraction import ExtractSettings, extract
from invcache.forward import forward_taps
from invcache.models import build_detr

SIZE = (64, 96)
CATEGORY = "stop sign"  # in 4 of the 6 images of seed 0
HUE = f"hue:+120@{CATEGORY}"


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> dict:
    """Six synthetic images; one stop sign's mask is an RLE of the wrong size, so its image cannot be recoloured."""
    root = tmp_path_factory.mktemp("coco")
    path = generate_coco(root, "val2017", num_images=6, seed=0)
    dataset = json.loads(path.read_text())
    category_id = next(c["id"] for c in dataset["categories"] if c["name"] == CATEGORY)
    signs = [a for a in dataset["annotations"] if a["category_id"] == category_id]
    broken = signs[0]
    broken["segmentation"] = {"size": [3, 3], "counts": [9]}
    path.write_text(json.dumps(dataset))
    return {"root": root, "broken_image": broken["image_id"], "broken_annotation": broken["id"],
            "with_category": sorted({a["image_id"] for a in signs})}


def settings(root: Path, out: Path, **overrides) -> ExtractSettings:
    base = dict(split="val2017", layers="all", coco_root=root, out=out, model="detr-tiny", weights="random:0",
                size=SIZE, batch_size=4, num_workers=0, shard_size=4)
    return ExtractSettings(**{**base, **overrides})


def reference_inputs(root: Path, image_ids, texts) -> np.ndarray:
    """Each image decoded with PIL, perturbed at its original size, resized to SIZE like the pipeline does."""
    annotations = load_coco(root / "annotations" / "instances_val2017.json")
    transforms = resolve_transforms(texts, annotations)
    images = []
    for image_id in image_ids:
        record = annotations.imgs[int(image_id)]
        original = np.asarray(Image.open(root / "val2017" / record["file_name"]).convert("RGB"))
        perturbed = apply_transforms(original, transforms, annotations.imgToAnns[int(image_id)])
        resized = Image.fromarray(perturbed).resize(SIZE[::-1], Image.Resampling.BILINEAR)
        images.append(np.asarray(resized))
    return np.stack(images)


def cli(capsys, *args: str) -> tuple[int, str]:
    """Run ``invcache ARGS`` in this process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr().err


def cli_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--split", "val2017", "--coco-root", str(root), "--out", str(out), "--model", "detr-tiny",
            "--weights", "random:0", "--size", "64x96", "--layers", "input,enc.0", "--num-workers", "0", *extra]


@pytest.fixture(scope="module")
def perturbed(coco, tmp_path_factory) -> tuple[ExtractSettings, Path]:
    out = tmp_path_factory.mktemp("perturbed") / "cache"
    run = settings(coco["root"], out, transforms=(HUE, "grayscale"))
    extract(run)
    return run, out


def test_a_perturbed_cache_is_detr_on_the_perturbed_images(coco, perturbed):
    _, out = perturbed
    cache = Cache.open(out)
    ids, valid = cache.image_ids, cache.valid
    broken = ids == coco["broken_image"]
    assert broken.sum() == 1 and list(valid) == list(~broken)
    failure = cache.failures()[0]
    assert failure["image_id"] == coco["broken_image"]
    assert f"annotation {coco['broken_annotation']}" in failure["reason"] and "3x3" in failure["reason"]
    assert [t["text"] for t in cache.attrs["perturbation"]] == [HUE, "grayscale"]

    expected = reference_inputs(coco["root"], ids[valid], (HUE, "grayscale"))
    assert np.array_equal(cache.array("input")[:][valid], expected)
    clean = reference_inputs(coco["root"], ids[valid], ("grayscale",))
    recoloured = np.isin(ids[valid], coco["with_category"])
    changed = (expected != clean).any(axis=(1, 2, 3))
    assert list(changed) == list(recoloured) and recoloured.any()  # only images with a stop sign differ

    model = build_detr("detr-tiny", "random:0")
    direct = forward_taps(model, torch.from_numpy(expected), cache.taps)
    for tap in cache.taps:
        if tap != "input":
            np.testing.assert_allclose(cache.array(tap)[:][valid].astype(np.float32),
                                       direct[tap].to(torch.float16).float().numpy(), atol=2e-3, rtol=2e-3,
                                       err_msg=tap)
    assert not cache.array("enc.0")[:][~valid].any()


def test_a_resume_with_another_transform_is_refused_naming_both(perturbed):
    run, _ = perturbed
    with pytest.raises(InvcacheError, match=r"\(perturbation: hue:\+120@stop sign, grayscale -> grayscale\); "
                                            "choose another --out for these images, or pass --overwrite"):
        extract(dataclasses.replace(run, transforms=("grayscale",)))
    with pytest.raises(InvcacheError, match=r"\(perturbation: hue:\+120@stop sign, grayscale -> none\)"):
        extract(dataclasses.replace(run, transforms=()))
    assert extract(run).shards_written == 0  # the same transforms resume


def test_ids_and_ids_file_restrict_the_cache_to_exactly_those_images(coco, tmp_path, capsys):
    all_ids = sorted(load_coco(coco["root"] / "annotations" / "instances_val2017.json").imgs)
    chosen = [all_ids[4], all_ids[1]]
    code, err = cli(capsys, *cli_args(coco["root"], tmp_path / "ids", "--transform", "grayscale",
                                      "--ids", ",".join(map(str, chosen))))
    assert code == 0, err
    cache = Cache.open(tmp_path / "ids")
    assert list(cache.image_ids) == sorted(chosen) and cache.attrs["source"]["images"] == 2
    assert np.array_equal(cache.array("input")[:], reference_inputs(coco["root"], sorted(chosen), ("grayscale",)))

    listed = tmp_path / "ids.txt"
    listed.write_text(f"# three images\n{all_ids[5]}\n{all_ids[0]}  # the first\n\n{all_ids[3]}\n")
    code, err = cli(capsys, *cli_args(coco["root"], tmp_path / "file", "--ids-file", str(listed), "--limit", "2"))
    assert code == 0, err
    assert list(Cache.open(tmp_path / "file").image_ids) == [all_ids[0], all_ids[3]]  # --limit after --ids-file


def test_webdataset_takes_grayscale_and_ids_but_refuses_hue(coco, tmp_path):
    shards = coco_to_wds(coco["root"], "val2017", tmp_path / "wds", images_per_shard=4)
    pattern = str(tmp_path / "wds" / "coco-val2017-{000000..000001}.tar")
    assert len(shards) == 2
    chosen = coco["with_category"][1:3]
    run = settings(coco["root"], tmp_path / "c", wds=pattern, transforms=("grayscale",), ids=tuple(chosen[::-1]),
                   layers="input")
    extract(run)
    cache = Cache.open(tmp_path / "c")
    assert list(cache.image_ids) == chosen and cache.valid.all()
    assert np.array_equal(cache.array("input")[:], reference_inputs(coco["root"], chosen, ("grayscale",)))
    with pytest.raises(UsageError, match="webdataset shards do not store"):
        extract(dataclasses.replace(run, out=tmp_path / "hue", transforms=(HUE,)))


@pytest.mark.parametrize("extra, needles", [
    (["--transform", "hue:red@unicorn"], ["unknown category 'unicorn'", "apple, bear, bus, kite, stop sign"]),
    (["--transform", "sepia"], ["unknown transform 'sepia'", "grayscale, hue:<red|green|blue|+120|+240|identity>"]),
    (["--transform", "hue:purple@bear"], ["unknown hue target 'purple'", "red, green, blue, +120, +240, identity"]),
    (["--ids", "1,2,3"], ["3 image id(s) not in val2017: 1, 2, 3"]),
    (["--ids", "1,two"], ["bad --ids '1,two'"]),
    (["--ids", "1", "--ids-file", "IDS"], ["--ids and --ids-file", "give one of them"]),
    (["--ids-file", "IDS"], ["line 2: 'bear' is not an image id"]),
])
def test_bad_values_are_one_line_exit_2(coco, tmp_path, capsys, extra, needles):
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("# colour study\nbear\n")
    extra = [str(ids_file) if word == "IDS" else word for word in extra]
    code, err = cli(capsys, *cli_args(coco["root"], tmp_path / "c", *extra))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(needle in err for needle in needles), err
    assert not (tmp_path / "c").exists()


def test_a_category_without_segmentations_is_refused(tmp_path, capsys):
    path = generate_coco(tmp_path, "val2017", num_images=2, seed=0)
    dataset = json.loads(path.read_text())
    for annotation in dataset["annotations"]:
        del annotation["segmentation"]
    path.write_text(json.dumps(dataset))
    code, err = cli(capsys, *cli_args(tmp_path, tmp_path / "c", "--transform", f"hue:red@{CATEGORY}"))
    assert code == 2 and "no annotation of 'stop sign' in this split carries a segmentation" in err, err
