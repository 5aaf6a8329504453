"""The command line: the demo's commands, one-line errors with exit 2, help without torch, displays."""

import io
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from rich.console import Console

from invcache.settings import ExtractSettings, TrainSettings, default


def invcache(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "invcache.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_synthetic_then_taps_prints_every_tap(tmp_path):
    result = invcache("synthetic", "--out", str(tmp_path / "coco"), "--images", "3", "--fault", "grayscale")
    assert result.returncode == 0, result.stderr
    result = invcache("taps", "--model", "detr-tiny", "--weights", "random:0", "--coco-root", str(tmp_path / "coco"),
                      "--size", "64x96", "--images", "2", "--layers", "all,backbone.c5")
    assert result.returncode == 0, result.stderr
    for tap, shape in [("input", "(64, 96, 3)"), ("backbone.c5", "(6, 512)"), ("enc.2", "(6, 64)"),
                       ("dec.2", "(10, 64)"), ("head.logits", "(10, 92)"), ("head.boxes", "(10, 4)")]:
        assert any(tap in line and shape in line for line in result.stdout.splitlines()), (tap, result.stdout)


def test_to_wds_prints_the_pattern_that_extract_and_taps_take(tmp_path):
    assert invcache("synthetic", "--out", str(tmp_path / "coco"), "--images", "5").returncode == 0
    result = invcache("to-wds", "--coco-root", str(tmp_path / "coco"), "--split", "val2017",
                      "--out", str(tmp_path / "wds"), "--images-per-shard", "2")
    assert result.returncode == 0, result.stderr
    pattern = result.stdout.strip()
    assert pattern == str(tmp_path / "wds" / "coco-val2017-{000000..000002}.tar")
    common = ["--model", "detr-tiny", "--weights", "random:0", "--size", "64x64", "--layers", "enc.0", "--wds", pattern]
    result = invcache("taps", *common, "--images", "5")
    assert result.returncode == 0 and "(4, 64)" in result.stdout, result.stderr
    result = invcache("extract", *common, "--split", "val2017", "--num-workers", "0", "--out", str(tmp_path / "c"))
    assert result.returncode == 0, result.stderr

    # info --json is the cache_info summary, machine-readable
    result = invcache("info", "--json", str(tmp_path / "c"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["num_images"] == 5 and summary["complete_shards"] == summary["num_shards"]
    assert summary["attrs"]["source"]["kind"] == "wds" and "enc/0" in [a["name"] for a in summary["arrays"]]

    # one shard: the pattern is its path
    result = invcache("to-wds", "--coco-root", str(tmp_path / "coco"), "--split", "val2017",
                      "--out", str(tmp_path / "one"))
    assert result.stdout.strip() == str(tmp_path / "one" / "coco-val2017-000000.tar")


@pytest.mark.parametrize("args, needle", [
    (["taps", "--layers", "enc.9", "--model", "detr-tiny"], "unknown tap 'enc.9'"),
    (["taps", "--size", "480by640"], "bad size"),
    (["taps", "--model", "detr-r18"], "unknown model 'detr-r18'"),
    (["taps", "--model", "detr-tiny", "--weights", "random", "--coco-root", "/nonexistent"], "--source synthetic"),
    (["taps", "--no-such-flag"], "No such option"),
    (["synthetic", "--out", "x", "--fault", "melted"], "unknown --fault 'melted'"),
    (["taps", "--model", "detr-tiny", "--wds", "gone-{000000..000001}.tar"],
     "webdataset shard not found: gone-000000.tar"),
    (["extract", "--split", "val2017", "--model", "detr-tiny", "--weights", "random", "--wds", "gone.tar"],
     "webdataset shard not found: gone.tar"),
    (["info", "nothing-here"], "no cache at nothing-here"),
    (["verify", "nothing-here"], "no cache at nothing-here"),
    (["extract", "--split", "val2071", "--source", "synthetic", "--model", "detr-tiny", "--weights", "random"],
     "unknown synthetic split 'val2071'; choose from: train2017, val2017"),
    (["taps", "--split", "val2071", "--source", "synthetic", "--model", "detr-tiny", "--weights", "random"],
     "unknown synthetic split 'val2071'"),
])
def test_wrong_values_are_one_line_exit_2(args, needle, tmp_path):
    result = invcache(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert not (tmp_path / "invcache-runs" / "synthetic-coco" / "val2071").exists()


@pytest.mark.parametrize("command", ["taps", "extract"])
def test_an_unreadable_shard_is_one_line_exit_1(command, tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 200)
    args = ["--model", "detr-tiny", "--weights", "random", "--size", "64x64", "--wds", str(tmp_path / "bad.tar")]
    if command == "extract":
        args += ["--split", "val2017", "--out", str(tmp_path / "c")]
    result = invcache(command, *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"webdataset shard {tmp_path / 'bad.tar'}: cannot read it" in lines[0], result.stderr


def test_help_and_h_answer_without_importing_torch():
    script = textwrap.dedent("""
        import contextlib, io, sys
        from invcache.cli import cli
        for args in ([], *([name] for name in cli.commands)):
            for flag in ("-h", "--help"):
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    assert cli.main([*args, flag], prog_name="invcache", standalone_mode=False) == 0
                assert out.getvalue().startswith("Usage: invcache"), (args, flag, out.getvalue())
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "zarr", "webdataset", "numpy"))
        print(heavy, "rich.progress" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] False"


def test_option_defaults_are_the_settings_defaults():
    from invcache.cli import cli

    def defaults(command: str) -> dict:
        return {p.name: p.default for p in cli.commands[command].params}

    extract = defaults("extract")
    for name in ("num_workers", "writers", "batch_size", "shard_size", "layers", "source", "weights",
                 "cudnn_benchmark"):
        assert extract[name] == default(ExtractSettings, name), name
    assert extract["model_name"] == default(ExtractSettings, "model")
    train = defaults("train")
    for name in ("num_workers", "epochs", "batch_size", "seed", "width", "class_input"):
        assert train[name] == default(TrainSettings, name), name


def test_one_failing_rank_ends_a_torchrun_run_within_seconds(tmp_path):
    """The process group's exit tears it down, so the other rank does not wait out the timeout at its barrier."""
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent("""
        import torch.distributed as dist
        from invcache.distributed import process_group
        with process_group(timeout_s=600) as (rank, world):
            if rank == 1:
                raise RuntimeError("rank 1 fails on purpose")
            dist.barrier()
    """))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode != 0 and "rank 1 fails on purpose" in result.stderr
    assert time.monotonic() - started < 60


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def event(**fields):
    from invcache.training.loop import TrainProgress

    base = dict(epoch=2, epochs=3, step=0, steps=10, samples_per_s=128.0, train_loss=None)
    return TrainProgress(**{**base, **fields})


def test_train_display_shows_epochs_losses_and_the_whole_run_eta():
    """A resumed run (first_epoch 2 of 3): the ETA counts the remaining epoch at the rate measured since resuming."""
    from invcache.cli.display import TrainDisplay

    out, clock = io.StringIO(), Clock()
    with TrainDisplay(console=Console(file=out, width=150), clock=clock) as display:
        def eta() -> str:
            return display.progress.tasks[0].fields["eta"]

        display(event(step=2, train_loss=0.9))
        assert eta() == "-:--:--"  # no rate measured yet
        clock.now = 8.0
        display(event(step=10, train_loss=0.5))
        assert eta() == "0:00:10"  # 8 steps in 8 s; epoch 3's 10 steps to go
        clock.now = 9.0  # validation took 1 s; the report that ends the epoch carries no steps
        display(event(step=0, steps=0, samples_per_s=0.0, train_loss=0.5, val_loss=0.4, epoch_done=True))
        assert eta() == "0:00:11"  # 8 steps in 9 s
        assert display.progress.tasks[0].completed == 10
        clock.now = 14.0
        display(event(epoch=3, step=5, train_loss=0.3))
        assert eta() == "0:00:05"  # 13 steps in 14 s, 5 to go
        assert display.progress.tasks[0].description == "epoch 3/3" and display.progress.tasks[0].completed == 5
    text = out.getvalue()
    assert "epoch 2/3: train loss 0.50000, validation loss 0.40000" in text
    assert "epoch 3/3" in text and "loss 0.3000" in text and "128 samples/s" in text


def test_extract_bar_shows_images_per_second():
    from invcache.cli.display import ExtractBar

    out, clock = io.StringIO(), Clock()
    with ExtractBar("extract val2017", console=Console(file=out, width=150), clock=clock) as bar:
        bar.plan(8)
        for _ in range(4):
            clock.now += 0.5
            bar.advance(2, 4_000_000)
    assert "8/8" in out.getvalue() and "4.0 img/s" in out.getvalue() and "8.0 MB/s" in out.getvalue()
