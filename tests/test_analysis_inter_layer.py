"""``analyze inter-layer`` over a whole cache, its figures recomputed independently (plain zarr, the modules, numpy)."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from invcache.analysis import inter_layer
from invcache.analysis.cka import MinibatchCKA
from invcache.errors import UsageError
from invcache.extraction import ExtractSettings, extract
from invcache.settings import AnalyzeSettings
from invcache.training import checkpoint

MEAN = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
ENCODER, DECODER = ["enc.0", "enc.1", "enc.2"], ["dec.0", "dec.1", "dec.2"]
PNG = b"\x89PNG\r\n\x1a\n"


def module(root, name):
    loaded, _, _ = checkpoint.load(root / "modules" / name, "best")
    return loaded.eval()


@pytest.fixture(scope="module")
def results(analysis_workspace):
    return inter_layer.run(AnalyzeSettings(workspace=analysis_workspace, n=3, batch_size=5))


@pytest.fixture(scope="module")
def val(analysis_workspace):
    group = zarr.open_group(analysis_workspace / "cache" / "val2017", mode="r")
    valid = group["valid"][:]

    def tap(name):
        if name == "dec.0":  # DETR's zero queries, never stored
            return np.zeros_like(tap("dec.1"))
        return group[name.replace(".", "/")][:][valid]

    return group, valid, tap


def test_every_layer_through_every_chain_matches_an_independent_computation(analysis_workspace, results, val):
    root = analysis_workspace
    group, valid, tap = val
    images = tap("input").astype(np.float64).transpose(0, 3, 1, 2) / 255
    b, e, d, b1 = (module(root, n) for n in ("backbone-inv", "encoder-inv", "decoder-inv", "backbone-inv-from-enc.1"))
    with torch.no_grad():
        recon = {**{("backbone", t): b(torch.from_numpy(tap(t)).float()) for t in ENCODER},
                 **{("encoder", t): b(e(torch.from_numpy(tap(t)).float())) for t in ENCODER},
                 **{("decoder", t): b(e(d(torch.from_numpy(tap(t)).float()))) for t in DECODER},
                 ("backbone-per-layer", "enc.1"): b1(torch.from_numpy(tap("enc.1")).float())}
    assert results["images"] == int(valid.sum()) == 9
    assert results["layers"] == ENCODER + DECODER
    assert set(results["chains"]) == set(results["mse_pixel"]) == {"backbone", "encoder", "decoder",
                                                                   "backbone-per-layer"}
    # The per-layer B⁻¹ has one point, at the layer it was trained on.
    assert results["chains"]["backbone-per-layer"]["via"] == {"enc.1": ["backbone-inv-from-enc.1"]}
    assert results["mse_pixel"]["backbone-per-layer"].keys() == {"enc.1"}
    assert results["chains"]["decoder"]["via"]["dec.0"] == ["decoder-inv", "encoder-inv", "backbone-inv"]
    rows = list(csv.DictReader(open(root / "analysis" / "inter-layer" / "per_image.csv")))
    assert [int(r["image_id"]) for r in rows] == group["image_id"][:][valid].tolist()
    for (chain, layer), pred in recon.items():
        pred = pred.double().numpy()
        pixel = ((pred - images) ** 2).mean(axis=(1, 2, 3))
        normalized = (((pred - MEAN) / STD - (images - MEAN) / STD) ** 2).mean(axis=(1, 2, 3))
        for space, values in (("pixel", pixel), ("normalized", normalized)):
            figure = results[f"mse_{space}"][chain][layer]
            np.testing.assert_allclose(figure["mean"], values.mean(), rtol=1e-4, err_msg=f"{chain} {layer}")
            np.testing.assert_allclose([float(r[f"{chain}:{layer}:{space}"]) for r in rows], values, rtol=1e-4)
            assert figure["n"] == 9 and figure["ci95"] > 0
    mean_image = zarr.open_group(root / "cache" / "train2017", mode="r")["mean_image"][:].transpose(2, 0, 1)
    np.testing.assert_allclose(results["baseline"]["pixel"]["mean"], ((mean_image - images) ** 2).mean(), rtol=1e-4)
    assert results["headline"]["mean image (baseline): MSE, [0,1] pixels"] == results["baseline"]["pixel"]["mean"]


def test_cka_is_the_minibatch_estimate_over_the_same_minibatches(results, val):
    _, valid, tap = val
    layers = ["enc.0", "enc.1", "enc.2", "dec.1", "dec.2", "head.logits", "head.boxes"]
    record = results["cka"]
    assert record["layers"] == layers
    # 9 valid images in minibatches of --batch-size 5: 5 and 4, none dropped.
    assert (record["minibatch_size"], record["minibatches"], record["images"], record["dropped_images"]) == (5, 2, 9, 0)
    stream = MinibatchCKA(layers)
    for start in (0, 5):
        stream.update({t: tap(t)[start:start + 5] for t in layers})
    np.testing.assert_allclose(record["matrix"], stream.matrix(), rtol=1e-9)
    np.testing.assert_allclose(np.diag(record["matrix"]), 1.0, rtol=1e-9)


def test_tables_and_figures_are_written(analysis_workspace, results):
    out = analysis_workspace / "analysis" / "inter-layer"
    written = json.loads((out / "results.json").read_text())
    assert written["files"] == {"tables": ["per_layer.csv", "per_image.csv", "cka.csv"],
                                "figures": ["mse.png", "grid.png", "cka.png"], "data": []}
    for name in written["files"]["figures"]:
        assert (out / name).read_bytes()[:8] == PNG
    per_layer = list(csv.DictReader(open(out / "per_layer.csv")))
    # 3 + 3 + 3 shared points, 1 per-layer point, the baseline.
    assert len(per_layer) == 11 and per_layer[-1]["chain"] == "baseline"
    row = next(r for r in per_layer if (r["chain"], r["layer"]) == ("decoder", "dec.2"))
    assert float(row["pixel_mean"]) == pytest.approx(results["mse_pixel"]["decoder"]["dec.2"]["mean"])
    assert float(row["normalized_ci95"]) == pytest.approx(results["mse_normalized"]["decoder"]["dec.2"]["ci95"])
    assert row["via"] == "decoder-inv -> encoder-inv -> backbone-inv" and row["n"] == "9"
    matrix = list(csv.DictReader(open(out / "cka.csv")))
    assert [r["layer"] for r in matrix] == results["cka"]["layers"]
    assert float(matrix[0]["enc.2"]) == pytest.approx(results["cka"]["matrix"][0][2])
    assert set(written["provenance"]["modules"]) == {"backbone-inv", "encoder-inv", "decoder-inv",
                                                     "backbone-inv-from-enc.1"}
    assert not list(out.glob("*.partial"))


def test_cli_runs_and_no_cka_skips_it(analysis_workspace, tmp_path):
    out = tmp_path / "o"
    result = subprocess.run([sys.executable, "-m", "invcache.cli", "analyze", "inter-layer", "--root",
                             str(analysis_workspace), "--out", str(out), "--n", "2", "--no-cka"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "results.json" in result.stdout, result.stderr
    assert "dec.2 through B⁻¹∘E⁻¹∘D⁻¹" in result.stdout
    written = json.loads((out / "results.json").read_text())
    assert written["cka"] is None and not (out / "cka.png").exists() and not (out / "cka.csv").exists()
    assert (out / "grid.png").read_bytes()[:8] == PNG


def test_missing_modules_are_a_one_line_exit_2_naming_the_command(analysis_workspace, tmp_path):
    (tmp_path / "backbone-inv").symlink_to(analysis_workspace / "modules" / "backbone-inv")
    result = subprocess.run([sys.executable, "-m", "invcache.cli", "analyze", "inter-layer", "--root",
                             str(analysis_workspace), "--modules", str(tmp_path), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert (f"`invcache train decoder-inv --out {tmp_path}/decoder-inv`; "
            f"`invcache train encoder-inv --out {tmp_path}/encoder-inv`") in lines[0]
    assert not (tmp_path / "o" / "results.json").exists()


def test_a_cache_without_a_needed_tap_is_refused(analysis_workspace, synthetic_root, tmp_path):
    location = tmp_path / "encoder-only"
    extract(ExtractSettings(split="val2017", layers="input,enc.*", coco_root=synthetic_root, out=location,
                            model="detr-tiny", weights="demo", size=(128, 160), shard_size=8, batch_size=8,
                            num_workers=0))
    needle = r"lacks the taps dec\.1, dec\.2, head\.logits, head\.boxes that .*`invcache extract --layers all`"
    with pytest.raises(UsageError, match=needle):
        inter_layer.run(AnalyzeSettings(workspace=analysis_workspace, cache=str(location), out=tmp_path / "o"))


def test_cka_needs_minibatches_of_four(analysis_workspace, tmp_path):
    with pytest.raises(UsageError, match="at least 4 images"):
        inter_layer.run(AnalyzeSettings(workspace=analysis_workspace, batch_size=3, out=tmp_path / "o"))
