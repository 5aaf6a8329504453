"""Extract-time perturbations (issue 10): grayscale and hue filters against stdlib references, masks from every
COCO segmentation format, undecodable masks as recorded failures, the transform syntax, the colour study's
image selection and ids files."""

from __future__ import annotations

import colorsys
import contextlib
import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from invcache.data import generate_coco, load_coco
from invcache.data.preprocess import ImageReadError, load_sample
from invcache.data.selection import (
    ids_file_text,
    read_ids_file,
    restrict_ids,
    select_images,
)
from invcache.data.transforms import (
    HUE_TARGETS,
    Transform,
    apply_transforms,
    category_mask,
    grayscale,
    hsv_to_rgb,
    parse_transform,
    resolve_transforms,
    rgb_to_hsv,
    set_hue,
)
from invcache.errors import UsageError

SET = {"red": 0.0, "green": 120 / 360, "blue": 240 / 360}
SHIFT = {"+120": 120 / 360, "+240": 240 / 360, "identity": 0.0}


def reference_hue(pixel: np.ndarray, target: str) -> list[int]:
    """One uint8 pixel through colorsys, hue set or shifted, rounded like Python rounds."""
    h, s, v = colorsys.rgb_to_hsv(*(pixel / 255.0))
    h = SET[target] if target in SET else (h + SHIFT[target]) % 1.0
    return [round(c * 255) for c in colorsys.hsv_to_rgb(h, s, v)]


def random_image(seed: int, shape=(9, 13)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    image[0, :4] = [[0, 0, 0], [255, 255, 255], [128, 128, 128], [255, 0, 0]]  # gray, black, white, pure red
    return image


def make_coco(images: list[dict], annotations: list[dict], categories: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# --- pixels ------------------------------------------------------------------------------------------------------

def test_grayscale_is_rounded_itu_601_luma_in_three_channels():
    image = random_image(0)
    gray = grayscale(image)
    assert gray.dtype == np.uint8 and gray.shape == image.shape
    for i, j in np.ndindex(image.shape[:2]):
        r, g, b = (float(v) for v in image[i, j])
        assert list(gray[i, j]) == [round(0.299 * r + 0.587 * g + 0.114 * b)] * 3, (i, j)
    # rounding, not truncation: Y(1, 1, 0) = 0.886 -> 1; Y(255, 255, 255) = 255
    assert grayscale(np.array([[[1, 1, 0], [255, 255, 255]]], np.uint8))[0, :, 0].tolist() == [1, 255]


@pytest.mark.parametrize("target", HUE_TARGETS)
def test_every_hue_target_matches_colorsys_inside_the_mask_and_is_bit_identical_outside(target):
    image = random_image(1)
    mask = np.random.default_rng(2).random(image.shape[:2]) < 0.5
    out = set_hue(image, mask, target)
    assert out.dtype == np.uint8 and np.array_equal(out[~mask], image[~mask])
    for i, j in zip(*np.nonzero(mask)):
        assert list(out[i, j]) == reference_hue(image[i, j], target), (i, j)


def test_identity_is_the_round_trip_and_keeps_every_pixel_within_one():
    levels = np.arange(0, 256, 5, dtype=np.uint8)  # 52 levels, 0 and 255 included: 140,608 colours
    image = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 52, 3)
    out = set_hue(image, np.ones(image.shape[:2], bool), "identity")
    assert np.abs(out.astype(int) - image.astype(int)).max() <= 1


def test_hsv_functions_are_colorsys_vectorised():
    rgb = np.random.default_rng(3).random((50, 3))
    rgb[:3] = [[0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [1.0, 0.0, 1.0]]
    h, s, v = rgb_to_hsv(rgb)
    expected = np.array([colorsys.rgb_to_hsv(*p) for p in rgb])
    np.testing.assert_array_equal(np.stack([h, s, v], -1), expected)
    assert ((h >= 0) & (h < 1)).all()
    np.testing.assert_array_equal(hsv_to_rgb(h, s, v), np.array([colorsys.hsv_to_rgb(*p) for p in expected]))


def test_mask_edges_one_pixel_and_the_border():
    image = random_image(4, (6, 7))
    one = np.zeros(image.shape[:2], bool)
    one[3, 4] = True
    out = set_hue(image, one, "blue")
    assert list(out[3, 4]) == reference_hue(image[3, 4], "blue") and np.array_equal(out[~one], image[~one])
    border = np.zeros(image.shape[:2], bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    out = set_hue(image, border, "+240")
    assert np.array_equal(out[~border], image[~border])
    assert all(list(out[i, j]) == reference_hue(image[i, j], "+240") for i, j in zip(*np.nonzero(border)))
    assert np.array_equal(set_hue(image, np.zeros_like(one), "red"), image)


# --- masks -------------------------------------------------------------------------------------------------------

H, W = 20, 30
SQUARE = [0.0, 0.0, 12.0, 0.0, 12.0, 9.0, 0.0, 9.0]  # touches the top-left border
TRIANGLE = [29.9, 19.9, 18.0, 19.9, 29.9, 8.0]  # touches the bottom-right border


def rle_formats(polygon: list[float]) -> dict[str, dict]:
    """One polygon's mask as a polygon, an uncompressed RLE and a compressed (crowd) RLE segmentation."""
    mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], H, W)))
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = [0, *changes.tolist(), flat.size]
    runs = np.diff(bounds).tolist()
    counts = runs if flat[0] == 0 else [0, *runs]
    compressed = mask_utils.encode(np.asfortranarray(mask))
    return {
        "polygon": {"segmentation": [polygon], "iscrowd": 0},
        "uncompressed": {"segmentation": {"size": [H, W], "counts": counts}, "iscrowd": 1},
        "compressed": {"segmentation": {"size": [H, W], "counts": compressed["counts"].decode()}, "iscrowd": 1},
    }


def annotation(fields: dict, category_id: int = 1, ann_id: int = 1) -> dict:
    return {"id": ann_id, "image_id": 1, "category_id": category_id, **fields}


def test_polygon_uncompressed_and_crowd_rle_give_the_same_mask_and_masks_unite():
    square, triangle = rle_formats(SQUARE), rle_formats(TRIANGLE)
    masks = {kind: category_mask([annotation(a)], 1, H, W) for kind, a in square.items()}
    assert masks["polygon"].sum() > 0 and masks["polygon"][0, 0]
    for kind in ("uncompressed", "compressed"):
        assert np.array_equal(masks[kind], masks["polygon"]), kind
    tri = category_mask([annotation(triangle["polygon"])], 1, H, W)
    assert tri[-1, -1]
    union = category_mask([annotation(square["compressed"], ann_id=1), annotation(triangle["polygon"], ann_id=2),
                           annotation(triangle["uncompressed"], category_id=2, ann_id=3)], 1, H, W)
    assert np.array_equal(union, masks["polygon"] | tri)
    assert not category_mask([annotation(square["polygon"], category_id=2)], 1, H, W).any()
    # a polygon part of two points encloses nothing: skipped, not an error
    assert np.array_equal(category_mask([annotation({"segmentation": [SQUARE, [1.0, 1.0, 2.0, 2.0]]})], 1, H, W),
                          masks["polygon"])


@pytest.mark.parametrize("segmentation, needle", [
    ({"size": [H + 1, W], "counts": [H * W + W]}, f"is {H + 1}x{W}, the image {H}x{W}"),
    ({"size": [H, W], "counts": [5, 7]}, "covers 12 pixels"),
    ({"size": [H, W], "counts": [5, -7, 10]}, "not non-negative integers"),
    ({"size": [H, W], "counts": "not an rle \x7f"}, "cannot be decoded"),
    ({"size": [H, W], "counts": "09"}, "covers 9 pixels"),  # a valid 3x3 string, short for this image
    ({"size": [H, W]}, "no counts"),
    ({"counts": [H * W]}, "no size"),
    ([[float("nan"), 1.0, 5.0, 1.0, 5.0, 5.0]], "not finite"),
    ([[1e30, 1.0, 5.0, 1.0, 5.0, 5.0]], "far outside"),
    ([[1.0, 1.0, 5.0, 1.0, 5.0]], "odd number"),
    ([["a", 1.0, 5.0, 1.0, 5.0, 5.0]], "not a list of numbers"),
    ("polygon", "neither polygons nor RLE"),
])
def test_an_undecodable_mask_raises_image_read_error_naming_the_annotation(segmentation, needle):
    with pytest.raises(ImageReadError, match="annotation 7") as error:
        category_mask([annotation({"segmentation": segmentation}, ann_id=7)], 1, H, W)
    assert needle in str(error.value)


def test_an_undecodable_mask_makes_the_sample_a_recorded_failure(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(random_image(5, (H, W))).save(path)
    hue = Transform("hue", "red", "thing", 1)
    broken = [annotation({"segmentation": {"size": [W, H], "counts": [H * W]}}, ann_id=3)]
    sample = load_sample(1, path, {"height": H, "width": W}, (32, 32), (hue,), broken)
    assert not sample.valid and "annotation 3" in sample.error and not sample.input.any()
    square = [annotation(rle_formats(SQUARE)["polygon"])]
    sample = load_sample(1, path, {"height": H, "width": W}, (32, 32), (hue,), square)
    assert sample.valid and sample.orig_size == (H, W)


def test_apply_transforms_applies_in_order():
    image = random_image(6, (H, W))
    annotations = [annotation(rle_formats(SQUARE)["polygon"])]
    hue, gray = Transform("hue", "+120", "thing", 1), Transform("grayscale")
    mask = category_mask(annotations, 1, H, W)
    assert np.array_equal(apply_transforms(image, (hue, gray), annotations), grayscale(set_hue(image, mask, "+120")))
    assert np.array_equal(apply_transforms(image, (gray, hue), annotations), grayscale(image))  # gray has no hue
    assert np.array_equal(apply_transforms(image, (), annotations), image)


# --- the transform syntax ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, slug", [
    ("grayscale", "grayscale"), ("hue:red@stop sign", "hue-red@stop-sign"), ("hue:+120@stop sign",
    "hue-plus120@stop-sign"), ("hue:+240@bear", "hue-plus240@bear"), ("hue:identity@apple", "hue-identity@apple"),
    ("hue:blue@hair drier/x", "hue-blue@hair-drier-x-747e98b2"),  # a lossy name gets its crc32
])
def test_parse_gives_text_slug_and_record(text, slug):
    transform = parse_transform(text)
    assert transform.text == text and transform.slug == slug
    assert all(c.isascii() and (c.isalnum() or c in "-@._") for c in transform.slug)
    assert json.loads(json.dumps(transform.record()))["text"] == text
    assert pickle.loads(pickle.dumps(transform)) == transform  # DataLoader workers receive it


@pytest.mark.parametrize("text, needle", [
    ("sepia", "unknown transform 'sepia'; choose from: grayscale, hue:<red|green|blue|+120|+240|identity>"),
    ("grayscale:2", "unknown transform"),
    ("hue:purple@bear", "unknown hue target 'purple' in 'hue:purple@bear'; choose from: red, green, blue, +120"),
    ("hue:red", "bad transform 'hue:red': expected hue:<"),
    ("hue:red@", "bad transform"),
])
def test_a_bad_transform_is_one_line_naming_the_choices(text, needle):
    with pytest.raises(UsageError) as error:
        parse_transform(text)
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_a_transform_built_directly_is_checked_too():
    for fields in (("sepia",), ("hue", "purple", "bear"), ("hue", "red", "")):
        with pytest.raises(UsageError):
            Transform(*fields)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return load_coco(generate_coco(root, "val2017", num_images=12, seed=3))


def test_resolve_gives_category_ids_and_refuses_what_has_no_mask(synthetic):
    gray, hue = resolve_transforms(["grayscale", "hue:green@bear"], synthetic)
    assert gray == Transform("grayscale") and hue.category_id == 23 and hue.record()["category_id"] == 23
    with pytest.raises(UsageError, match="unknown category 'zebra' .* the annotations have: apple, bear, bus, kite, "
                                         "stop sign"):
        resolve_transforms(["hue:red@zebra"], synthetic)
    with pytest.raises(UsageError, match=r"webdataset shards do not store: extract from the COCO folder "
                                         r"\(--coco-root\)"):
        resolve_transforms(["hue:red@bear"], None)
    assert resolve_transforms(["grayscale"], None) == (Transform("grayscale"),)
    bare = make_coco(list(synthetic.imgs.values()),
                     [{**a, "segmentation": []} if a["category_id"] == 23 else a for a in synthetic.anns.values()],
                     list(synthetic.cats.values()))
    with pytest.raises(UsageError, match="no annotation of 'bear' in this split carries a segmentation"):
        resolve_transforms(["hue:red@bear"], bare)
    unresolved = parse_transform("hue:red@bear")
    with pytest.raises(UsageError, match="not resolved"):
        unresolved.apply(random_image(7), [])


# --- selection and ids files -------------------------------------------------------------------------------------

def test_select_images_uses_mask_areas_of_non_crowd_instances():
    def square(side: int) -> list[float]:
        return [0.0, 0.0, side, 0.0, side, side, 0.0, side]

    images = [{"id": i, "file_name": f"{i}.jpg", "height": 10, "width": 10} for i in (1, 2, 3, 4)]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 5, "segmentation": [square(6)], "area": 1.0, "iscrowd": 0},  # 0.36
        {"id": 2, "image_id": 2, "category_id": 5, "segmentation": [square(5)], "area": 99.0, "iscrowd": 0},  # 0.25
        {"id": 3, "image_id": 3, "category_id": 5, "segmentation": {"size": [10, 10], "counts": [0, 100]},
         "area": 100.0, "iscrowd": 1},  # all of it, but crowd
        {"id": 4, "image_id": 4, "category_id": 5, "segmentation": {"size": [10, 10], "counts": [70, 30]},
         "area": 30.0, "iscrowd": 0},  # exactly 0.3: selected (≥)
        {"id": 5, "image_id": 2, "category_id": 6, "segmentation": [square(9)], "area": 81.0, "iscrowd": 0},
    ]
    coco = make_coco(images, annotations, [{"id": 5, "name": "bus"}, {"id": 6, "name": "kite"}])
    assert select_images(coco, "bus") == [1, 4]
    assert select_images(coco, "bus", 0.25) == [1, 2, 4]
    assert select_images(coco, "bus", 0.25, image_ids=np.array([2, 3])) == [2]
    with pytest.raises(UsageError, match=r"no image has an instance of 'bus' \(not crowd\) covering ≥ 0.5 .*"
                                         r"the largest covers 0.36"):
        select_images(coco, "bus", 0.5)
    with pytest.raises(UsageError, match="unknown category 'bear'; the annotations have: bus, kite"):
        select_images(coco, "bear")
    for bad in (0, 1.5, -0.1, float("nan")):
        with pytest.raises(UsageError, match=r"\(0, 1\]"):
            select_images(coco, "bus", bad)


def test_select_images_agrees_with_decoded_masks_on_the_synthetic_split(synthetic):
    for category in ("stop sign", "bus"):
        category_id = synthetic.getCatIds(catNms=[category])[0]
        expected = set()
        for a in synthetic.loadAnns(synthetic.getAnnIds(catIds=[category_id], iscrowd=False)):
            image = synthetic.imgs[a["image_id"]]
            rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], image["height"], image["width"]))
            if mask_utils.decode(rle).sum() / (image["height"] * image["width"]) >= 0.05:
                expected.add(a["image_id"])
        assert select_images(synthetic, category, 0.05) == sorted(expected)


def test_ids_files_round_trip_with_comments_and_bad_lines_are_named(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text(ids_file_text([139, 285, 632], "colour study: bear\nmin area 0.3"))
    assert path.read_text() == "# colour study: bear\n# min area 0.3\n139\n285\n632\n"
    assert read_ids_file(path) == [139, 285, 632]
    (tmp_path / "inline.txt").write_text("  7  # seven\n\n# nothing\n3\n")
    assert read_ids_file(tmp_path / "inline.txt") == [7, 3]
    for text, needle in (("1\n2\nbear\n", "line 3: 'bear' is not an image id"), ("1,2\n", "line 1: '1,2'"),
                         ("-5\n", "line 1"), ("# only comments\n", "lists no image id")):
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(UsageError, match=needle):
            read_ids_file(tmp_path / "bad.txt")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe1\n")
    with pytest.raises(UsageError, match="not text"):
        read_ids_file(tmp_path / "binary.txt")
    with pytest.raises(UsageError, match="not found"):
        read_ids_file(tmp_path / "absent.txt")


def test_restrict_ids_sorts_dedups_and_names_the_first_missing():
    assert restrict_ids([1, 5, 9, 12], [12, 1, 12], "val2017") == [1, 12]
    with pytest.raises(UsageError, match=r"7 image id\(s\) not in val2017: 2, 3, 4, 6, 7 and 2 more"):
        restrict_ids([1, 5], [1, 2, 3, 4, 6, 7, 8, 10], "val2017")
    with pytest.raises(UsageError, match="no image id"):
        restrict_ids([1, 5], [], "val2017")


def test_names_that_clean_to_one_slug_keep_apart_and_a_shared_category_name_is_refused():
    slugs = {parse_transform(f"hue:red@{name}").slug for name in ("a/b@c:d", "a-b@c-d", "日本", "中国", "a b")}
    assert len(slugs) == 5
    coco = COCO()
    coco.dataset = {"images": [], "annotations": [],
                    "categories": [{"id": 6, "name": "bus"}, {"id": 99, "name": "bus"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    with pytest.raises(UsageError, match="two categories 'bus' \\(ids 6 and 99\\)"):
        resolve_transforms(["hue:red@bus"], coco)


def test_a_huge_integer_vertex_is_a_recorded_failure_not_a_crash():
    annotation = {"id": 1, "image_id": 1, "category_id": 6, "iscrowd": 0, "segmentation": [[0, 0, 10 ** 400, 0, 5, 5]]}
    with pytest.raises(ImageReadError, match="far outside"):
        category_mask([annotation], 6, 10, 10)
