"""``analyze onehot`` over a whole cache, recomputed independently (plain zarr, the modules' weights, numpy)."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from invcache.analysis import onehot
from invcache.errors import UsageError
from invcache.settings import AnalyzeSettings
from invcache.training import checkpoint

MEAN = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
CHAIN = ("decoder-inv", "encoder-inv", "backbone-inv")


def module(root, name):
    loaded, _, _ = checkpoint.load(root / "modules" / name, "best")
    return loaded.eval()


@pytest.fixture(scope="module")
def results(analysis_workspace):
    return onehot.run(AnalyzeSettings(workspace=analysis_workspace, n=3, batch_size=5))


def test_mses_and_no_object_fraction_match_an_independent_computation(analysis_workspace, results):
    root = analysis_workspace
    group = zarr.open_group(root / "cache" / "val2017", mode="r")
    valid = group["valid"][:]
    images = group["input"][:][valid].astype(np.float64).transpose(0, 3, 1, 2) / 255
    logits = group["head/logits"][:][valid].astype(np.float64)
    boxes = group["head/boxes"][:][valid].astype(np.float64)
    # P⁻¹'s two class inputs, made here rather than by the module: the argmax one-hot and the softmax.
    one_hot = np.eye(logits.shape[-1])[logits.argmax(-1)]
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    class_inputs = {"onehot": one_hot, "scores": exp / exp.sum(-1, keepdims=True)}
    folders = {"onehot": "head-inv", "scores": "head-inv-scores"}
    d, e, b = (module(root, name) for name in CHAIN)
    with torch.no_grad():
        recon = {variant: b(e(d(module(root, folders[variant]).net(
            torch.from_numpy(np.concatenate([classes, boxes], -1)).float())))).double().numpy()
            for variant, classes in class_inputs.items()}

    assert results["images"] == int(valid.sum()) == 9
    no_object = (logits.argmax(-1) == logits.shape[-1] - 1).mean(-1)
    assert results["no_object"]["fraction"] == pytest.approx(no_object.mean())
    assert results["headline"]["no-object queries (fraction)"] == pytest.approx(no_object.mean())
    rows = list(csv.DictReader(open(root / "analysis" / "onehot" / "per_image.csv")))
    assert [int(r["image_id"]) for r in rows] == group["image_id"][:][valid].tolist()
    np.testing.assert_allclose([float(r["no_object_fraction"]) for r in rows], no_object)
    for variant, pred in recon.items():
        pixel = ((pred - images) ** 2).mean(axis=(1, 2, 3))
        normalized = (((pred - MEAN) / STD - (images - MEAN) / STD) ** 2).mean(axis=(1, 2, 3))
        for space, values in (("pixel", pixel), ("normalized", normalized)):
            np.testing.assert_allclose([float(r[f"{variant}_{space}"]) for r in rows], values, rtol=1e-4)
            np.testing.assert_allclose(results["mse"][variant][space]["mean"], values.mean(), rtol=1e-4)
    label = {"onehot": "one-hot", "scores": "scores"}
    for variant in recon:
        assert results["headline"][f"{label[variant]} MSE, [0,1] pixels"] == results["mse"][variant]["pixel"]["mean"]
    difference = [float(r["onehot_pixel"]) - float(r["scores_pixel"]) for r in rows]
    assert results["onehot_minus_scores"]["mse"]["pixel"]["mean"] == pytest.approx(np.mean(difference))


def test_results_name_their_files_and_both_head_modules(analysis_workspace, results):
    out = analysis_workspace / "analysis" / "onehot"
    written = json.loads((out / "results.json").read_text())
    assert written["files"] == {"tables": ["per_image.csv"], "figures": ["mse.png", "grid.png"], "data": []}
    for name in written["files"]["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    modules = written["provenance"]["modules"]
    assert modules["head-inv"]["spec"]["config"]["class_input"] == "onehot"
    assert modules["head-inv-scores"]["spec"]["config"]["class_input"] == "scores"
    assert written["mse"]["baseline"]["pixel"]["n"] == 9


def link_modules(analysis_workspace, target, names):
    for name in names:
        (target / name).symlink_to(analysis_workspace / "modules" / name)


def test_missing_scores_module_is_one_line_exit_2_naming_the_command(analysis_workspace, tmp_path):
    link_modules(analysis_workspace, tmp_path, ("head-inv", *CHAIN))
    result = subprocess.run([sys.executable, "-m", "invcache.cli", "analyze", "onehot", "--root",
                             str(analysis_workspace), "--modules", str(tmp_path), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "no trained head-inv-scores" in lines[0] and "`invcache train head-inv --class-input scores --" in lines[0]
    assert not (tmp_path / "o" / "results.json").exists()


def test_a_head_module_with_the_other_class_input_is_refused(analysis_workspace, tmp_path):
    link_modules(analysis_workspace, tmp_path, CHAIN)
    (tmp_path / "head-inv").symlink_to(analysis_workspace / "modules" / "head-inv-scores")
    (tmp_path / "head-inv-scores").symlink_to(analysis_workspace / "modules" / "head-inv")
    with pytest.raises(UsageError, match=r"trained with --class-input (scores|onehot), but the head-inv(-scores)? "
                                         r"folder holds the one trained by `invcache train head-inv"):
        onehot.run(AnalyzeSettings(workspace=analysis_workspace, modules=tmp_path, out=tmp_path / "o"))


def test_no_object_fraction_counts_queries_whose_argmax_is_the_last_class():
    logits = torch.zeros(2, 100, 92)
    logits[0, :30, -1] = 5.0  # 30 no-object queries
    logits[0, 30:, 3] = 5.0
    logits[1, :, 0] = 5.0
    logits[1, :7, -1] = 6.0  # 7 no-object queries, though class 0 is high too
    np.testing.assert_allclose(onehot.no_object_fraction(logits), [0.30, 0.07])
