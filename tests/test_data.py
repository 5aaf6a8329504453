"""COCO folder reading, preprocessing, webdataset shards and the synthetic generator."""

import hashlib
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from invcache.data import (
    FAULTS,
    CocoFolder,
    WdsImages,
    coco_to_wds,
    generate_coco,
    load_coco,
    normalize,
    open_split,
    parse_size,
    shard_pattern,
)
from invcache.data.preprocess import decode_image, resize_uint8, to_rgb
from invcache.data.synthetic import CATEGORIES, UNREADABLE_FAULTS
from invcache.data.wds import WdsSplit
from invcache.errors import InvcacheError, UsageError

SIZE = (64, 96)


def test_parse_size():
    assert parse_size("480x640") == (480, 640)
    for bad in ("480", "480x", "x640", "48ax640", "100x640", "0x64"):
        with pytest.raises(UsageError):
            parse_size(bad)


def test_normalize_is_exactly_imagenet_of_the_uint8_image():
    images = torch.randint(0, 256, (2, 4, 5, 3), dtype=torch.uint8)
    out = normalize(images)
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    expected = (images[1].permute(2, 0, 1).numpy() / 255.0 - mean) / std
    assert out.shape == (2, 3, 4, 5) and out.dtype == torch.float32
    np.testing.assert_allclose(out[1].numpy(), expected, atol=1e-6)


def test_mode_conversions():
    rgb = np.random.default_rng(0).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    gray = np.asarray(image.convert("L"))
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(gray))), np.repeat(gray[..., None], 3, axis=2))
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray((gray.astype(np.uint16) * 257)))),
                          np.repeat(gray[..., None], 3, axis=2))
    rgba = image.convert("RGBA")
    rgba.putalpha(0)
    assert np.array_equal(np.asarray(to_rgb(rgba)), rgb)
    palette = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    assert np.array_equal(np.asarray(to_rgb(palette)), np.asarray(palette.convert("RGB")))
    cmyk = to_rgb(image.convert("CMYK"))
    assert cmyk.mode == "RGB" and np.abs(np.asarray(cmyk).astype(int) - rgb).max() <= 1


def test_resize_ignores_aspect_and_keeps_uint8():
    image = Image.new("RGB", (300, 100), (10, 20, 30))
    out = resize_uint8(image, SIZE)
    assert out.shape == (64, 96, 3) and out.dtype == np.uint8 and (out == [10, 20, 30]).all()


def test_synthetic_is_deterministic_and_valid_coco(tmp_path):
    a = generate_coco(tmp_path / "a", "train2017", num_images=6, seed=3)
    b = generate_coco(tmp_path / "b", "train2017", num_images=6, seed=3)
    c = generate_coco(tmp_path / "c", "val2017", num_images=6, seed=3)
    assert a.read_bytes() == b.read_bytes()
    for image in json.loads(a.read_text())["images"]:
        name = image["file_name"]
        assert (tmp_path / "a/train2017" / name).read_bytes() == (tmp_path / "b/train2017" / name).read_bytes()
    assert json.loads(c.read_text())["images"] != json.loads(a.read_text())["images"]

    coco = load_coco(a)
    assert sorted(coco.getCatIds()) == sorted(cat["id"] for cat in CATEGORIES)
    anns = coco.loadAnns(coco.getAnnIds())
    assert anns and all(ann["iscrowd"] == 0 for ann in anns)
    for ann in anns:
        mask = coco.annToMask(ann)
        assert abs(mask.sum() - ann["area"]) <= 0.02 * ann["area"] + 2
        ys, xs = np.nonzero(mask)
        x, y, w, h = ann["bbox"]
        assert x - 1 <= xs.min() and xs.max() <= x + w + 1 and y - 1 <= ys.min() and ys.max() <= y + h + 1


def test_synthetic_masks_cover_the_drawn_colour(tmp_path):
    """The stored polygon is the drawn shape: inside it the pixels carry the category colour."""
    path = generate_coco(tmp_path, "val2017", num_images=3, seed=1)
    coco = load_coco(path)
    colours = {cat["id"]: np.array(cat["color"]) for cat in CATEGORIES}
    for ann in coco.loadAnns(coco.getAnnIds()):
        record = coco.imgs[ann["image_id"]]
        pixels = np.asarray(Image.open(tmp_path / "val2017" / record["file_name"]).convert("RGB")).astype(int)
        inside = pixels[coco.annToMask(ann).astype(bool)]
        assert np.abs(np.median(inside, axis=0) - colours[ann["category_id"]]).max() <= 30


def test_ground_truth_as_detections_scores_ap_one(tmp_path):
    """Real pycocotools evaluation runs on the synthetic annotations."""
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    coco = load_coco(generate_coco(tmp_path, "val2017", num_images=8, seed=2))
    detections = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in coco.loadAnns(coco.getAnnIds())
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_coco_folder_reads_every_fault_without_crashing(synthetic_root):
    dataset = CocoFolder(synthetic_root, "val2017", SIZE)
    assert dataset.image_ids == sorted(dataset.image_ids)
    faults = {int(k): v for k, v in dataset.coco.dataset["info"]["faults"].items()}
    assert set(faults.values()) == set(FAULTS)
    for index, image_id in enumerate(dataset.image_ids):
        sample = dataset[index]
        assert sample["image_id"] == image_id
        assert sample["input"].shape == (*SIZE, 3) and sample["input"].dtype == torch.uint8
        record = dataset.coco.imgs[image_id]
        assert tuple(sample["orig_size"].tolist()) == (record["height"], record["width"])
        fault = faults.get(image_id)
        if fault in UNREADABLE_FAULTS:
            assert not sample["valid"] and sample["error"] and not sample["input"].any()
        else:
            assert sample["valid"] and sample["error"] == "" and sample["input"].float().std() > 5, fault
    reasons = {faults[dataset.image_ids[i]]: dataset[i]["error"] for i in range(len(dataset))
               if faults.get(dataset.image_ids[i]) in UNREADABLE_FAULTS}
    assert "truncated" in reasons["truncated"]
    assert "0 bytes" in reasons["zero_bytes"]
    assert "missing" in reasons["missing"]


def test_odd_modes_decode_to_the_same_picture(synthetic_root):
    """Gray, 16-bit gray and CMYK versions of an image decode to what their content says."""
    dataset = CocoFolder(synthetic_root, "val2017", SIZE)
    faults = {int(k): v for k, v in dataset.coco.dataset["info"]["faults"].items()}
    by_fault = {v: k for k, v in faults.items()}
    gray16 = decode_image(synthetic_root / "val2017" / dataset.coco.imgs[by_fault["gray16"]]["file_name"])
    raw = np.asarray(Image.open(synthetic_root / "val2017" / dataset.coco.imgs[by_fault["gray16"]]["file_name"]))
    assert np.array_equal(np.asarray(gray16)[..., 0], np.rint(raw / 257).astype(np.uint8))
    gray = np.asarray(decode_image(synthetic_root / "val2017" / dataset.coco.imgs[by_fault["grayscale"]]["file_name"]))
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])


def test_missing_coco_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="--source synthetic"):
        CocoFolder(tmp_path, "train2017")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text("{}")
    with pytest.raises(UsageError, match="no image folder"):
        CocoFolder(tmp_path, "train2017")


def test_open_split_synthetic_generates_once_into_the_workspace(tmp_path):
    first = open_split("synthetic", "val2017", workspace=tmp_path, size=SIZE, synthetic_images=5)
    assert len(first) == 5 and (tmp_path / "synthetic-coco" / "val2017").is_dir()
    again = open_split("synthetic", "val2017", workspace=tmp_path, size=SIZE)
    assert again.image_ids == first.image_ids
    with pytest.raises(UsageError, match="unknown source"):
        open_split("imagenet", "val2017")


def test_synthetic_split_names_are_the_generators_unless_sized(tmp_path):
    """A typo such as val2071 is refused (it would generate a new split); an explicit size allows any name."""
    with pytest.raises(UsageError, match=r"unknown synthetic split 'val2071'; choose from: train2017, val2017"):
        open_split("synthetic", "val2071", workspace=tmp_path, size=SIZE)
    assert not (tmp_path / "synthetic-coco").exists()
    custom = open_split("synthetic", "holdout", workspace=tmp_path, size=SIZE, synthetic_images=3)
    assert len(custom) == 3 and (tmp_path / "synthetic-coco" / "holdout").is_dir()


def test_webdataset_round_trip_equals_the_folder(synthetic_root, tmp_path):
    shards = coco_to_wds(synthetic_root, "val2017", tmp_path / "wds", images_per_shard=5)
    assert [s.name for s in shards] == ["coco-val2017-000000.tar", "coco-val2017-000001.tar",
                                        "coco-val2017-000002.tar"]
    folder = CocoFolder(synthetic_root, "val2017", SIZE)
    streamed = list(WdsImages(str(tmp_path / "wds" / "coco-val2017-{000000..000002}.tar"), SIZE))
    assert [s["image_id"] for s in streamed] == folder.image_ids
    for index, sample in enumerate(streamed):
        expected = folder[index]
        assert sample["valid"] == expected["valid"]
        assert torch.equal(sample["input"], expected["input"])
        assert torch.equal(sample["orig_size"], expected["orig_size"])
        if not sample["valid"]:
            assert sample["error"]


def test_webdataset_splits_shards_across_dataloader_workers(synthetic_root, tmp_path):
    coco_to_wds(synthetic_root, "val2017", tmp_path / "wds", images_per_shard=3)
    pattern = str(tmp_path / "wds" / "coco-val2017-{000000..000003}.tar")
    loader = torch.utils.data.DataLoader(WdsImages(pattern, SIZE), batch_size=None, num_workers=2)
    ids = [int(sample["image_id"]) for sample in loader]
    assert sorted(ids) == CocoFolder(synthetic_root, "val2017", SIZE).image_ids


def test_webdataset_pattern_of_the_written_shards_reads_them_all(synthetic_root, tmp_path):
    shards = coco_to_wds(synthetic_root, "val2017", tmp_path / "wds", images_per_shard=5)
    pattern = shard_pattern(shards)
    assert pattern == str(tmp_path / "wds" / "coco-val2017-{000000..000002}.tar")
    expected = CocoFolder(synthetic_root, "val2017", SIZE).image_ids
    assert [s["image_id"] for s in WdsImages(pattern, SIZE)] == expected
    split = WdsSplit(pattern, "val2017", SIZE)
    assert split.image_ids == expected
    assert shard_pattern(shards[:1]) == str(shards[0])
    # the metadata digest, hashed as the shards stream: every .json member in shard and member order
    digest = hashlib.sha256()
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    digest.update(tar.extractfile(member).read())
    assert split.source_record()["annotation_sha256"] == digest.hexdigest()


def test_a_missing_local_shard_is_named_before_streaming(synthetic_root, tmp_path):
    coco_to_wds(synthetic_root, "val2017", tmp_path, images_per_shard=5)
    pattern = str(tmp_path / "coco-val2017-{000000..000003}.tar")  # there are three
    for reader in (lambda: WdsImages(pattern, SIZE), lambda: WdsSplit(pattern, "val2017", SIZE)):
        with pytest.raises(UsageError, match=r"webdataset shard not found: .*coco-val2017-000003\.tar"):
            reader()


def test_an_unreadable_shard_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar" * 200)
    for reader in (lambda: list(WdsImages(str(bad), SIZE)), lambda: WdsSplit(str(bad), "val2017", SIZE)):
        with pytest.raises(InvcacheError, match=f"webdataset shard {bad}: cannot read it") as caught:
            reader()
        assert "\n" not in str(caught.value)
