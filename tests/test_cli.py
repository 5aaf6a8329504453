"""The command line: the demo's commands and one-line errors with exit 2."""

import subprocess
import sys

import pytest


def invcache(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "invcache.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_synthetic_then_taps_prints_every_tap(tmp_path):
    result = invcache("synthetic", "--out", str(tmp_path / "coco"), "--images", "3", "--fault", "grayscale")
    assert result.returncode == 0, result.stderr
    result = invcache("taps", "--model", "detr-tiny", "--weights", "random:0", "--coco-root", str(tmp_path / "coco"),
                      "--size", "64x96", "--images", "2", "--layers", "all,backbone.c5")
    assert result.returncode == 0, result.stderr
    for tap, shape in [("input", "(64, 96, 3)"), ("backbone.c5", "(6, 512)"), ("enc.2", "(6, 64)"),
                       ("dec.2", "(100, 64)"), ("head.logits", "(100, 92)"), ("head.boxes", "(100, 4)")]:
        assert any(tap in line and shape in line for line in result.stdout.splitlines()), (tap, result.stdout)


def test_taps_reads_webdataset_shards(tmp_path):
    assert invcache("synthetic", "--out", str(tmp_path / "coco"), "--images", "3").returncode == 0
    result = invcache("to-wds", "--coco-root", str(tmp_path / "coco"), "--split", "val2017",
                      "--out", str(tmp_path / "wds"))
    assert result.returncode == 0, result.stderr
    result = invcache("taps", "--model", "detr-tiny", "--weights", "random", "--size", "64x64", "--layers", "enc.0",
                      "--wds", str(tmp_path / "wds" / "coco-val2017-000000.tar"))
    assert result.returncode == 0 and "(4, 64)" in result.stdout, result.stderr


@pytest.mark.parametrize("args, needle", [
    (["taps", "--layers", "enc.9", "--model", "detr-tiny"], "unknown tap 'enc.9'"),
    (["taps", "--size", "480by640"], "bad size"),
    (["taps", "--model", "detr-r18"], "unknown model 'detr-r18'"),
    (["taps", "--model", "detr-tiny", "--weights", "random", "--coco-root", "/nonexistent"], "--source synthetic"),
    (["taps", "--no-such-flag"], "No such option"),
    (["synthetic", "--out", "x", "--fault", "melted"], "unknown --fault 'melted'"),
])
def test_wrong_values_are_one_line_exit_2(args, needle, tmp_path):
    result = invcache(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
