"""``analyze stages`` over a whole cache, its figures recomputed independently (plain zarr, the modules, numpy)."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from scipy import stats

from invcache.analysis import stages
from invcache.cli import main
from invcache.errors import UsageError
from invcache.settings import AnalyzeSettings
from invcache.training import checkpoint

MEAN = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)


def module(root, name):
    loaded, _, _ = checkpoint.load(root / "modules" / name, "best")
    return loaded.eval()


@pytest.fixture(scope="module")
def results(analysis_workspace):
    return stages.run(AnalyzeSettings(workspace=analysis_workspace, n=3, batch_size=5))


def test_every_valid_image_is_evaluated_and_the_figures_match_an_independent_computation(analysis_workspace,
                                                                                        results):
    root = analysis_workspace
    group = zarr.open_group(root / "cache" / "val2017", mode="r")
    valid = group["valid"][:]
    images = group["input"][:][valid].astype(np.float64).transpose(0, 3, 1, 2) / 255
    mean_image = zarr.open_group(root / "cache" / "train2017", mode="r")["mean_image"][:].transpose(2, 0, 1)
    b, e, d, p = (module(root, n) for n in ("backbone-inv", "encoder-inv", "decoder-inv", "head-inv"))

    def tensor(tap):
        return torch.from_numpy(group[tap.replace(".", "/")][:][valid]).float()

    with torch.no_grad():
        recon = {"backbone": b(tensor("enc.0")), "encoder": b(e(tensor("enc.2"))),
                 "decoder": b(e(d(tensor("dec.2")))), "head": b(e(d(p(tensor("head.logits"), tensor("head.boxes")))))}
    recon = {k: v.double().numpy() for k, v in recon.items()}
    recon["baseline"] = np.broadcast_to(mean_image[None], images.shape)
    assert results["images"] == int(valid.sum()) == 9
    rows = list(csv.DictReader(open(root / "analysis" / "stages" / "per_image.csv")))
    assert [int(r["image_id"]) for r in rows] == group["image_id"][:][valid].tolist()
    for label, pred in recon.items():
        pixel = ((pred - images) ** 2).mean(axis=(1, 2, 3))
        normalized = (((pred - MEAN) / STD - (images - MEAN) / STD) ** 2).mean(axis=(1, 2, 3))
        for space, values in (("pixel", pixel), ("normalized", normalized)):
            figure = results["mse"][label][space]
            np.testing.assert_allclose([float(r[f"{label}_{space}"]) for r in rows], values, rtol=1e-4)
            np.testing.assert_allclose(figure["mean"], values.mean(), rtol=1e-4)
            half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
            np.testing.assert_allclose(figure["ci95"], half, rtol=1e-3)


def test_results_name_their_files_and_provenance(analysis_workspace, results):
    out = analysis_workspace / "analysis" / "stages"
    written = json.loads((out / "results.json").read_text())
    assert written["files"] == {"tables": ["per_image.csv"], "figures": ["mse.png", "grid.png"], "data": []}
    for name in written["files"]["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    provenance = written["provenance"]
    assert provenance["cache"]["model"]["weights_sha256"] and set(provenance["modules"]) == {
        "backbone-inv", "encoder-inv", "decoder-inv", "head-inv"}
    assert not list(out.glob("*.partial"))


def test_missing_modules_name_the_command_that_makes_them(analysis_workspace, tmp_path):
    (tmp_path / "backbone-inv").symlink_to(analysis_workspace / "modules" / "backbone-inv")
    (tmp_path / "encoder-inv").symlink_to(analysis_workspace / "modules" / "encoder-inv")
    with pytest.raises(UsageError, match=r"no trained decoder-inv, head-inv in .*`invcache train decoder-inv --out "
                                         r"\S+/decoder-inv`; `invcache train head-inv --out \S+/head-inv`"):
        stages.run(AnalyzeSettings(workspace=analysis_workspace, modules=tmp_path, out=tmp_path / "o"))
    assert not (tmp_path / "o" / "results.json").exists()


def test_cli_errors_are_one_line_exit_2(analysis_workspace, tmp_path, capsys):
    command = ["analyze", "stages", "--root", str(analysis_workspace), "--out", str(tmp_path / "o")]
    # one real process for the exit status and streams; the other cases through the same entry point in-process
    result = subprocess.run([sys.executable, "-m", "invcache.cli", *command, "--cache", str(tmp_path / "none")],
                            capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "no cache at" in lines[0], result.stderr
    for args, needle in [(["--modules", str(tmp_path)], "invcache train backbone-inv"),
                         (["--stage", "neck"], "unknown stage 'neck'"),
                         (["--ids", "1,x"], "bad --ids")]:
        with pytest.raises(SystemExit) as exit_code:
            main([*command, *args])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_code.value.code == 2 and len(lines) == 1 and needle in lines[0], (args, lines)
    with pytest.raises(SystemExit) as exit_code:
        main([*command, "--n", "2"])
    assert exit_code.value.code == 0 and "results.json" in capsys.readouterr().out


def test_results_replace_the_previous_run_and_are_strict_json(tmp_path):
    from matplotlib.figure import Figure

    from invcache.analysis.common import write_results

    write_results(tmp_path, {"x": 1.0}, {"rows": [{"a": 1}]}, {"old": Figure()}, {"extra.json": b"[]"})
    assert (tmp_path / "old.png").is_file() and (tmp_path / "extra.json").is_file()
    write_results(tmp_path, {"ci": float("nan"), "nested": [np.float64("nan"), 2.0]}, figures={"new": Figure()})
    assert not (tmp_path / "old.png").exists() and not (tmp_path / "rows.csv").exists()
    assert not (tmp_path / "extra.json").exists() and (tmp_path / "new.png").is_file()
    written = json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert written["ci"] is None and written["nested"] == [None, 2.0]


def test_bad_settings_and_bad_checkpoints_are_usage_errors(analysis_workspace, tmp_path):
    import shutil

    with pytest.raises(UsageError, match="batch_size must be at least 1"):
        AnalyzeSettings(workspace=analysis_workspace, batch_size=0)
    first = _valid_ids(analysis_workspace)[0]
    results = stages.run(AnalyzeSettings(workspace=analysis_workspace, out=tmp_path / "dup", n=2),
                         stages=["backbone"], ids=[first, first])  # a repeated id is shown once
    assert results["images"] == 9 and (tmp_path / "dup" / "grid.png").is_file()
    modules = tmp_path / "modules"
    shutil.copytree(analysis_workspace / "modules" / "backbone-inv", modules / "backbone-inv")
    (modules / "backbone-inv" / "best.json").write_text("{not json")
    with pytest.raises(UsageError, match="best.json is not a checkpoint.s JSON"):
        stages.run(AnalyzeSettings(workspace=analysis_workspace, modules=modules, out=tmp_path / "o"),
                   stages=["backbone"])


def test_fix_commands_say_where_to_write(analysis_workspace, tmp_path):
    elsewhere = tmp_path / "ws"
    (elsewhere / "modules").mkdir(parents=True)
    with pytest.raises(UsageError, match=rf"`invcache train backbone-inv --root {elsewhere}`"):
        stages.run(AnalyzeSettings(workspace=analysis_workspace, modules=elsewhere / "modules", out=tmp_path / "o"),
                   stages=["backbone"])
    with pytest.raises(UsageError, match=rf"invcache extract --split val2017 --layers all --root {elsewhere}"):
        stages.run(AnalyzeSettings(workspace=elsewhere))


def _valid_ids(root):
    group = zarr.open_group(root / "cache" / "val2017", mode="r")
    return group["image_id"][:][group["valid"][:]].tolist()
