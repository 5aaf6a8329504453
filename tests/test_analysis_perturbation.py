"""``analyze grayscale`` and ``analyze color``: perturbed caches made once, outputs written, figures recomputed
independently (plain zarr, pycocotools, numpy)."""

import csv
import gc
import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from invcache.analysis import color, grayscale
from invcache.cli import main
from invcache.errors import UsageError
from invcache.models.detr import DETR
from invcache.settings import AnalyzeSettings

MIN_AREA = 0.02


def hasler_susstrunk(rgb):
    """Colourfulness of (H, W, 3) values on 0-255, written out from the paper's formula."""
    r, g, b = (rgb[..., k].astype(np.float64).ravel() for k in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return np.sqrt(rg.var() + yb.var()) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)


@pytest.fixture(scope="module")
def gray_results(analysis_workspace):
    return grayscale.run(AnalyzeSettings(workspace=analysis_workspace, n=3, batch_size=4))


def test_grayscale_writes_its_outputs_and_gray_inputs_have_no_colour(analysis_workspace, gray_results):
    out = analysis_workspace / "analysis" / "grayscale"
    for name in ("results.json", "per_image.csv", "colourfulness.png", "mse.png", "grid.png"):
        assert (out / name).is_file(), name
    colour = gray_results["colourfulness"]
    assert colour["grayscale input"]["input"]["mean"] == 0.0
    gray = zarr.open_group(analysis_workspace / "cache" / "val2017+grayscale", mode="r")
    assert gray.attrs["perturbation"][0]["name"] == "grayscale"
    original = zarr.open_group(analysis_workspace / "cache" / "val2017", mode="r")
    valid = original["valid"][:] & gray["valid"][:]
    assert gray_results["images"] == int(valid.sum()) == 9
    # only the taps the chains and AP read
    assert sorted(gray.attrs["taps"]) == ["dec.2", "enc.0", "enc.2", "head.boxes", "head.logits", "input"]
    expected = [hasler_susstrunk(image) for image in original["input"][:][valid]]
    np.testing.assert_allclose(colour["color input"]["input"]["mean"], np.mean(expected), rtol=1e-7)
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    np.testing.assert_allclose([float(r["colourfulness_color_input"]) for r in rows], expected, rtol=1e-7)
    assert all(float(r["colourfulness_grayscale_input"]) == 0.0 for r in rows)
    assert set(gray_results["ap"]) == {"color", "grayscale"}
    # the embedded default tells its shapes apart by colour (docs/analyses.md): gray costs most of its AP
    assert gray_results["ap"]["color"]["AP50"] >= 0.5 and gray_results["ap"]["grayscale"]["AP50"] < 0.5 * \
        gray_results["ap"]["color"]["AP50"]


def test_a_rerun_reuses_the_gray_cache_without_running_detr(analysis_workspace, gray_results, monkeypatch):
    calls = []
    forward = DETR.forward
    monkeypatch.setattr(DETR, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    again = grayscale.run(AnalyzeSettings(workspace=analysis_workspace, n=3, batch_size=4))
    assert calls == []
    gc.collect()  # an unfinished generator holding torch.no_grad() would switch autograd off here
    assert torch.is_grad_enabled()
    assert again["colourfulness"] == gray_results["colourfulness"]


def selected_ids(annotation_file, category, valid_ids):
    """Images with a non-crowd instance of ``category`` covering ≥ MIN_AREA of the image, from the raw masks."""
    coco = COCO(annotation_file)
    category_id = coco.getCatIds(catNms=[category])[0]
    chosen = set()
    for ann in coco.loadAnns(coco.getAnnIds(catIds=[category_id], iscrowd=False)):
        image = coco.imgs[ann["image_id"]]
        rle = mask_utils.frPyObjects(ann["segmentation"], image["height"], image["width"])
        area = mask_utils.decode(mask_utils.merge(rle)).sum()
        if area / (image["height"] * image["width"]) >= MIN_AREA and ann["image_id"] in valid_ids:
            chosen.add(ann["image_id"])
    return sorted(chosen)


@pytest.fixture(scope="module")
def color_run(analysis_workspace):
    original = zarr.open_group(analysis_workspace / "cache" / "val2017", mode="r")
    annotation_file = original.attrs["source"]["annotation_file"]
    valid_ids = set(original["image_id"][:][original["valid"][:]].tolist())
    present = [c for c in ("stop sign", "apple", "bus", "bear", "kite")
               if selected_ids(annotation_file, c, valid_ids)][:2]
    results = color.run(AnalyzeSettings(workspace=analysis_workspace, n=3, batch_size=4), categories=present,
                        min_area=MIN_AREA)
    return present, annotation_file, valid_ids, results


def test_color_writes_every_output(analysis_workspace, color_run):
    categories, _, _, results = color_run
    out = analysis_workspace / "analysis" / "color"
    names = ["results.json", "per_image.csv", "hue_histograms.csv", "pairwise_mse.png", "pairwise_mse_object.png",
             "ap.png", "hue.png", "examples.png"]
    for name in names + [results["selection"][c]["file"] for c in categories]:
        assert (out / name).is_file(), name
    listed = json.loads((out / "results.json").read_text())["files"]
    assert set(listed["figures"]) == {n for n in names if n.endswith(".png")}
    for category in categories:
        assert set(results["ap"][category]) == {"identity", *color.FILTERS}
        for variant in ("identity", *color.FILTERS):
            histogram = results["hue_histograms"][category][variant]["input"]
            assert len(histogram) == color.HUE_BINS and abs(sum(histogram) - 1) < 1e-9
    # the paper's finding, on the embedded default: an object keeps its AP only in its prototypical colour
    stop_sign = results["ap"]["stop sign"]
    assert stop_sign["identity"]["AP50"] >= 0.5 and stop_sign["red"]["AP50"] >= 0.5
    assert max(stop_sign[f]["AP50"] for f in ("green", "blue", "+120", "+240")) < 0.5 * stop_sign["identity"]["AP50"]


def test_color_selection_and_input_pairwise_mse_match_an_independent_computation(analysis_workspace, color_run):
    categories, annotation_file, valid_ids, results = color_run
    out = analysis_workspace / "analysis" / "color"
    for category in categories:
        expected_ids = selected_ids(annotation_file, category, valid_ids)
        written = [int(line) for line in (out / results["selection"][category]["file"]).read_text().splitlines()
                   if line.strip() and not line.startswith("#")]
        assert written == expected_ids
        slug, caches = category.replace(" ", "-"), analysis_workspace / "cache"
        control = zarr.open_group(caches / f"val2017+hue-identity@{slug}+area{MIN_AREA:g}", mode="r")
        assert control["image_id"][:].tolist() == expected_ids
        base = control["input"][:].astype(np.float64) / 255
        for name, variant in (("red", "red"), ("+120", "plus120")):
            filtered = zarr.open_group(caches / f"val2017+hue-{variant}@{slug}+area{MIN_AREA:g}", mode="r")
            valid = control["valid"][:] & filtered["valid"][:]
            per_image = ((filtered["input"][:].astype(np.float64) / 255 - base) ** 2).mean(axis=(1, 2, 3))[valid]
            figure = results["pairwise_mse"][f"{category} · {name}"]["input"]
            np.testing.assert_allclose(figure["mean"], per_image.mean(), rtol=1e-7)
            assert figure["mean"] > 0  # the recolouring changed the selected objects


def test_color_rejects_an_unknown_category_and_a_threshold_that_selects_nothing(analysis_workspace, capsys):
    root = str(analysis_workspace)
    for args, words in ((["--categories", "unicorn"], ("unicorn", "stop sign")),
                        (["--categories", "apple", "--min-area", "0.99"], ("apple", "0.99"))):
        with pytest.raises(SystemExit) as exit_info:
            main(["analyze", "color", "--root", root, *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_a_run_with_fewer_stages_reuses_the_cache_and_too_few_layers_are_refused_up_front(analysis_workspace,
                                                                                          gray_results, tmp_path):
    settings = AnalyzeSettings(workspace=analysis_workspace, n=3, batch_size=4, out=tmp_path / "fewer")
    fewer = grayscale.run(settings, stages=["backbone"])  # a subset of the cached taps: reused, no refusal
    assert fewer["colourfulness"]["grayscale input"]["input"]["mean"] == 0.0
    with pytest.raises(UsageError, match="leaves out .*dec.2"):
        grayscale.run(settings, layers=["input", "enc.0"])


def test_another_min_area_gets_its_own_caches(analysis_workspace, color_run, tmp_path):
    categories, _, _, _ = color_run
    other = color.run(AnalyzeSettings(workspace=analysis_workspace, n=2, batch_size=4, out=tmp_path / "other"),
                      categories=categories[:1], min_area=MIN_AREA / 2, stages=["backbone"])
    slug = categories[0].replace(" ", "-")
    assert (analysis_workspace / "cache" / f"val2017+hue-red@{slug}+area{MIN_AREA / 2:g}").is_dir()
    assert other["selection"][categories[0]]["images"] >= 1


def test_a_moved_coco_folder_is_one_line_naming_it(analysis_workspace, tmp_path, capsys):
    original = zarr.open_group(analysis_workspace / "cache" / "val2017", mode="r")
    copy = tmp_path / "val2017"
    shutil.copytree(analysis_workspace / "cache" / "val2017", copy)
    moved = zarr.open_group(copy, mode="r+")
    moved.attrs["source"] = {**original.attrs["source"], "root": str(tmp_path / "gone")}
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "grayscale", "--root", str(analysis_workspace), "--cache", str(copy), "--out",
              str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gone" in err and "not there any more" in err, err
