"""``analyze tradeoff``: fine-tuning per λ from the cached images, runs that resume, the default row recomputed
independently (plain zarr, the modules, numpy), refusals."""

import csv
import json

import numpy as np
import pytest
import torch
import zarr

from invcache.analysis import ap, tradeoff
from invcache.analysis.report import build_report
from invcache.cache.store import Cache
from invcache.chain import load_modules
from invcache.cli import main
from invcache.errors import UsageError
from invcache.models import build_detr
from invcache.settings import AnalyzeSettings
from invcache.training import checkpoint

MEAN = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
# A learning rate far above the authors' 1e-5, so that four steps move the tiny DETR and its modules visibly
# (λ = 1 ends about 5% below λ = 0; at 1e-2 it is 13%, but two steps at 1e-2 can overshoot).
LR = 3e-3


@pytest.fixture(scope="module")
def root(analysis_workspace, tmp_path_factory):
    """A workspace of its own (the session's caches and modules linked in), so the runs stay out of other tests."""
    root = tmp_path_factory.mktemp("tradeoff")
    for name in ("cache", "modules"):
        (root / name).symlink_to(analysis_workspace / name)
    return root


def settings(root, **extra):
    return AnalyzeSettings(workspace=root, n=3, batch_size=16, **extra)


@pytest.fixture(scope="module")
def results(root):
    return tradeoff.run(settings(root), lambdas=(0, 1), epochs=1, lr=LR)


def test_every_output_is_written_and_the_report_shows_it(root, results):
    out = root / "analysis" / "tradeoff"
    written = json.loads((out / "results.json").read_text())
    assert written["files"] == {"tables": ["tradeoff.csv", "per_image.csv"], "figures": ["tradeoff.png", "grid.png"],
                                "data": []}
    for name in written["files"]["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["images"] == 9 and [r["label"] for r in results["lambdas"]] == ["λ=0", "λ=1"]
    assert list(results["mse"]) == ["λ=0", "λ=1", "default", "baseline"]
    for row in results["lambdas"]:
        assert row["epochs"] == 1 and row["steps"] == 4  # 64 training images, batches of 16
        assert row["run"] == str(out / "runs" / f"lambda-{row['lambda']:g}")
        assert set(row["mse"]) == {"normalized", "pixel"} and row["mse"]["pixel"]["n"] == 9
        assert row["AP"] == row["ap"]["AP"] and row["history"][0]["epoch"] == 1
    rows = list(csv.DictReader(open(out / "tradeoff.csv", encoding="utf-8")))
    assert [r["row"] for r in rows] == ["λ=0", "λ=1", "default", "baseline"]
    assert float(rows[3]["mse_pixel"]) == pytest.approx(results["baseline"]["mse"]["pixel"]["mean"])
    assert len(list(csv.DictReader(open(out / "per_image.csv", encoding="utf-8")))) == 9
    assert written["provenance"]["detr"]["weights_sha256"] == written["provenance"]["cache"]["model"]["weights_sha256"]

    page = build_report(root, root / "report.html").read_text()
    assert "<h3>tradeoff</h3>" in page and "λ=0" in page and page.count("data:image/png;base64,") >= 2


def test_each_run_holds_a_detr_that_weights_loads_and_modules_that_pair_with_it(root, results):
    folder = root / "analysis" / "tradeoff" / "runs" / "lambda-1"
    detr = build_detr("detr-tiny", str(folder / "detr.pth"))
    start = build_detr("detr-tiny", "demo")
    assert detr.fingerprint["weights_sha256"] != start.fingerprint["weights_sha256"]
    modules = load_modules(folder, ["backbone-inv", "encoder-inv", "decoder-inv"])
    for loaded in modules.values():  # paired with the fine-tuned DETR, not with the cache's
        assert loaded.meta["cache"]["model"]["weights_sha256"] == detr.fingerprint["weights_sha256"]
        assert loaded.meta["epoch"] == 1
    assert json.loads((folder / "run.json").read_text())["settings"]["lambda"] == 1.0


def test_reconstruction_weight_one_ends_with_a_lower_error_than_zero(root, analysis_workspace, results):
    for space in ("pixel", "normalized"):
        assert results["lambdas"][1]["mse"][space]["mean"] < results["lambdas"][0]["mse"][space]["mean"]
    # λ = 0: no gradient reaches the modules, which stay exactly as they were trained
    runs = root / "analysis" / "tradeoff" / "runs"
    for name in ("backbone-inv", "encoder-inv", "decoder-inv"):
        trained = checkpoint.load(analysis_workspace / "modules" / name, "best")[0].state_dict()
        for lam, same in (("0", True), ("1", False)):
            tuned = checkpoint.load(runs / f"lambda-{lam}" / name, "best")[0].state_dict()
            assert all(torch.equal(tuned[k], trained[k]) for k in trained) is same, (name, lam)
    # λ = 0 trains on L_det alone, λ = 1 on L_rec alone (the loss logged is exactly that term)
    first, second = (r["history"][0] for r in results["lambdas"])
    assert first["loss"] == pytest.approx(first["loss_det"]) and second["loss"] == pytest.approx(second["loss_rec"])


def test_the_default_row_is_the_cached_decoder_chain_and_the_cached_heads(root, analysis_workspace, results):
    group = zarr.open_group(analysis_workspace / "cache" / "val2017", mode="r")
    valid = group["valid"][:]
    images = group["input"][:][valid].astype(np.float64).transpose(0, 3, 1, 2) / 255
    b, e, d = (checkpoint.load(analysis_workspace / "modules" / n, "best")[0].eval()
               for n in ("backbone-inv", "encoder-inv", "decoder-inv"))
    with torch.no_grad():
        recon = b(e(d(torch.from_numpy(group["dec/2"][:][valid]).float()))).double().numpy()
    pixel = ((recon - images) ** 2).mean(axis=(1, 2, 3))
    normalized = (((recon - MEAN) / STD - (images - MEAN) / STD) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(results["default"]["mse"]["pixel"]["mean"], pixel.mean(), rtol=1e-4)
    np.testing.assert_allclose(results["default"]["mse"]["normalized"]["mean"], normalized.mean(), rtol=1e-4)
    mean_image = zarr.open_group(analysis_workspace / "cache" / "train2017", mode="r")["mean_image"][:]
    guess = ((mean_image.transpose(2, 0, 1)[None] - images) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(results["baseline"]["mse"]["pixel"]["mean"], guess.mean(), rtol=1e-4)
    assert results["default"]["ap"] == ap.run(settings(root, out=root / "ap"))["ap"]


def test_a_rerun_trains_nothing_and_more_epochs_continue_the_run(root, results, monkeypatch):
    steps = []
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: steps.append(1) or step(self, *a, **k))
    again = tradeoff.run(settings(root), lambdas=(0, 1), epochs=1, lr=LR)
    assert steps == [] and again["mse"] == results["mse"]

    longer = tradeoff.run(settings(root), lambdas=(1,), epochs=2, lr=LR)
    assert len(steps) == 4 * 4  # one more epoch of four batches, one step of each of DETR and the three modules
    run = longer["lambdas"][0]
    assert run["epochs"] == 2 and run["steps"] == 8 and [h["epoch"] for h in run["history"]] == [1, 2]
    assert run["history"][0] == results["lambdas"][1]["history"][0]

    with pytest.raises(UsageError, match=r"fine-tuned with other settings \(lr: 0\.003 -> 0\.03\)"):
        tradeoff.run(settings(root), lambdas=(1,), epochs=2, lr=0.03)


def test_refusals_are_one_line_usage_errors(root, tmp_path, capsys, monkeypatch):
    for args, needle in [(["--lambdas", "0,1.5"], "λ 1.5 is outside [0, 1]"),
                         (["--lambdas", "0,x"], "bad --lambdas '0,x'"),
                         (["--epochs", "0"], "Invalid value for '--epochs'")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["analyze", "tradeoff", "--root", str(root), "--out", str(tmp_path / "o"), *args])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and needle in err, (args, err)
    assert not (tmp_path / "o").exists()

    out = settings(root, out=tmp_path / "o")
    for options, needle in [({"lambdas": ()}, "no λ given"), ({"lambdas": (float("nan"),)}, "λ nan is outside"),
                            ({"epochs": 0}, "--epochs must be at least 1"),
                            ({"train_cache": str(tmp_path / "none")}, "no training cache at .*--train-cache")]:
        with pytest.raises(UsageError, match=needle):
            tradeoff.run(out, **options)
    (tmp_path / "m" / "backbone-inv").mkdir(parents=True)
    with pytest.raises(UsageError, match="no trained backbone-inv, decoder-inv, encoder-inv"):
        tradeoff.run(settings(root, modules=tmp_path / "m", out=tmp_path / "o"))
    stored = Cache.taps.fget
    monkeypatch.setattr(Cache, "taps", property(lambda cache: [t for t in stored(cache) if t != "input"]))
    with pytest.raises(UsageError, match="lacks the taps input that the trade-off analysis needs"):
        tradeoff.run(out)
    assert not (tmp_path / "o").exists()
