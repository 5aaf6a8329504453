"""Inverse modules trained from the cache alone: learning, checkpoints, resume, DDP, compatibility checks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from invcache.analysis import stages
from invcache.cache import schema as S
from invcache.cache.reader import CacheSamples
from invcache.cache.store import Cache
from invcache.cli import main
from invcache.errors import InvcacheError, UsageError
from invcache.extraction import ExtractSettings, extract
from invcache.inverse import build_inverse, make_spec
from invcache.settings import AnalyzeSettings
from invcache.training import TrainSettings, checkpoint, evaluate, train

SIZE = (128, 160)


def make_cache(workspace: Path, split: str, images: int, weights: str = "random:0", **extra) -> str:
    options = dict(split=split, source="synthetic", workspace=workspace, model="detr-tiny", weights=weights,
                   size=SIZE, num_workers=0, shard_size=16, batch_size=16, synthetic_images=images)
    settings = ExtractSettings(**{**options, **extra})
    return extract(settings).cache


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("workspace")
    make_cache(root, "train2017", 256)
    make_cache(root, "val2017", 16)
    return root


def quick(workspace: Path, name: str, **overrides) -> TrainSettings:
    base = dict(name=name, workspace=str(workspace), epochs=2, batch_size=32, width="small",
                out=str(workspace / "runs" / f"{name}-{overrides.pop('tag', 'x')}"))
    return TrainSettings(**{**base, **overrides})


def test_reader_yields_each_valid_image_once_per_epoch_in_shuffled_shard_order(workspace):
    location = str(workspace / "cache" / "train2017")
    first = [s[S.IMAGE_ID] for s in CacheSamples(location, ["enc.0"], seed=1, epoch=0, buffer_size=32)]
    second = [s[S.IMAGE_ID] for s in CacheSamples(location, ["enc.0"], seed=1, epoch=1, buffer_size=32)]
    assert sorted(first) == sorted(second) and len(set(first)) == len(first) == 256
    assert first != second
    again = [s[S.IMAGE_ID] for s in CacheSamples(location, ["enc.0"], seed=1, epoch=0, buffer_size=32)]
    assert again == first
    loader = torch.utils.data.DataLoader(CacheSamples(location, ["dec.0", "enc.0"], shuffle=False), batch_size=64,
                                         num_workers=2)
    batches = list(loader)
    assert sum(len(b["enc.0"]) for b in batches) == 256
    assert batches[0]["enc.0"].dtype == torch.float16 and not batches[0]["dec.0"].any()
    assert batches[0]["dec.0"].shape[1:] == (10, 64)


def test_reader_gives_ddp_ranks_equal_shares(workspace):
    location = str(workspace / "cache" / "val2017")  # 16 images in one shard: rank 1 owns no shard
    shares = [list(CacheSamples(location, ["enc.0"], rank=r, world=2, buffer_size=4)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 8


def test_small_backbone_inverse_beats_the_mean_image_on_held_out_images(workspace):
    result = train(quick(workspace, "backbone-inv", epochs=25, tag="quality",
                         out=str(workspace / "modules" / "backbone-inv")))
    assert result.steps == 200
    mse = stages.run(AnalyzeSettings(workspace=workspace, out=workspace / "rec", n=4), stages=["backbone"])["mse"]
    assert mse["backbone"]["pixel"]["mean"] <= 0.8 * mse["baseline"]["pixel"]["mean"], mse
    assert (workspace / "rec" / "grid.png").is_file()


@pytest.mark.parametrize("name", ["encoder-inv", "decoder-inv"])
def test_transformer_inverses_learn(workspace, name):
    settings = quick(workspace, name, epochs=6, tag="learn")
    torch.manual_seed(settings.seed)
    spec = make_spec(name, Cache.open(str(workspace / "cache" / "train2017")).attrs)
    start = evaluate(spec, build_inverse(spec), str(workspace / "cache" / "val2017"), settings,
                     torch.device("cpu"), None)
    result = train(settings)
    assert result.best_val_loss < 0.6 * start, (start, result.history)


def test_save_then_load_gives_identical_outputs(workspace):
    rng_state = torch.get_rng_state()
    result = train(quick(workspace, "head-inv", epochs=1, tag="save"))
    assert torch.equal(torch.get_rng_state(), rng_state), "train() must not reseed the caller's RNG"
    loaded, meta, _ = checkpoint.load(result.out, "last")
    logits, boxes = torch.randn(3, 10, 92), torch.rand(3, 10, 4)
    result.module.eval()
    assert torch.equal(loaded(logits, boxes), result.module(logits, boxes))
    assert meta["spec"]["name"] == "head-inv" and meta["cache"]["model"]["name"] == "detr-tiny"
    assert (result.out / "metrics.jsonl").read_text().count("\n") == 1


def test_resumed_training_ends_where_the_uninterrupted_run_ends(workspace):
    straight = train(quick(workspace, "encoder-inv", epochs=2, tag="straight"))
    first = train(quick(workspace, "encoder-inv", epochs=1, tag="resumed"))
    with pytest.raises(InvcacheError, match="--resume"):
        train(quick(workspace, "encoder-inv", epochs=2, tag="resumed"))
    resumed = train(quick(workspace, "encoder-inv", epochs=2, tag="resumed", resume=True))
    assert first.steps * 2 == resumed.steps == straight.steps
    for (key, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)
    assert [h["epoch"] for h in resumed.history] == [1, 2]


def test_train_never_constructs_detr(workspace, monkeypatch):
    import invcache.models.detr as detr_module

    def refuse(*args, **kwargs):
        raise AssertionError("train built DETR")

    monkeypatch.setattr(detr_module.DETR, "__init__", refuse)
    train(quick(workspace, "decoder-inv", epochs=1, tag="nodetr"))
    train(quick(workspace, "backbone-inv", epochs=1, tag="nodetr", from_tap="enc.1"))


def test_mismatched_caches_and_modules_are_refused(workspace, tmp_path):
    modules = tmp_path / "modules"
    train(quick(workspace, "backbone-inv", epochs=1, out=str(modules / "backbone-inv")))
    def reconstruct(cache: str) -> dict:
        return stages.run(AnalyzeSettings(cache=cache, modules=modules, out=tmp_path / "rec", n=2), stages=["backbone"])

    reconstruct(str(workspace / "cache" / "val2017"))
    other = make_cache(tmp_path, "val2017", 4, weights="random:5")
    with pytest.raises(InvcacheError, match="weights_sha256"):
        reconstruct(other)
    expected = r"^the training cache \S+ does not belong with the validation cache \S+: they come from another DETR"
    with pytest.raises(InvcacheError, match=expected + r" or preprocessing \(model.weights_sha256"):
        train(quick(workspace, "head-inv", val_cache=other, tag="mismatch"))
    resized = make_cache(tmp_path / "b", "val2017", 4, size=(96, 128))
    with pytest.raises(InvcacheError, match=r"preprocessing.size: \[128, 160\] -> \[96, 128\]"):
        reconstruct(resized)


@pytest.mark.parametrize("name, source, needle", [
    ("encoder-inv", "dec.1", "--from takes one of"),
    ("head-inv", "enc.1", "--from does not apply"),
    ("sideways-inv", None, "unknown module"),
])
def test_bad_module_choices(workspace, name, source, needle):
    with pytest.raises(UsageError, match=needle):
        train(quick(workspace, name, from_tap=source))


def test_cli_train_without_a_cache_says_what_to_run(tmp_path, capsys):
    result = subprocess.run([sys.executable, "-m", "invcache.cli", "train", "encoder-inv", "--root", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "invcache extract --split train2017" in result.stderr
    assert "Traceback" not in result.stderr
    (tmp_path / "a-file").write_text("not a cache")
    for flag in ("--cache", "--val-cache"):  # the same entry point, in-process
        with pytest.raises(SystemExit) as exit_code:
            main(["train", "head-inv", "--root", str(tmp_path), flag, str(tmp_path / "a-file")])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_code.value.code == 2 and len(lines) == 1 and "no cache at" in lines[0], lines


def test_two_process_ddp_training_ends_with_the_same_weights_on_both_ranks(workspace, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(f"""
        import os, torch
        from invcache.distributed import process_group
        from invcache.training import TrainSettings, train
        with process_group():
            result = train(TrainSettings("encoder-inv", workspace={str(workspace)!r}, epochs=1, batch_size=12,
                                         decode_threads=1, out={str(tmp_path / "ddp")!r}))
        torch.save(result.module.state_dict(), {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.pt")
    """))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert (tmp_path / "ddp" / "best.safetensors").is_file()
    # 256 images, 128 per rank in batches of 12: 11 steps, the last one partial (no row is dropped)
    assert checkpoint.load(tmp_path / "ddp", "last")[1]["step"] == 11
    assert np.isfinite(checkpoint.load(tmp_path / "ddp", "last")[1]["history"][0]["val_loss"])


def test_a_torn_checkpoint_pair_is_refused(workspace):
    import json

    result = train(quick(workspace, "head-inv", epochs=1, tag="torn"))
    meta_path = result.out / "last.json"
    meta = json.loads(meta_path.read_text())
    meta["epoch"] = 7
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InvcacheError, match="do not belong together"):
        checkpoint.load(result.out, "last")


def test_a_cache_without_complete_shards_is_refused(tmp_path):
    import shutil

    from invcache.cache.store import Cache as C

    source = make_cache(tmp_path / "a", "val2017", 4)
    shutil.copytree(source, tmp_path / "empty")
    C.open(tmp_path / "empty", mode="r+").array("shard_complete")[:] = False
    with pytest.raises(UsageError, match="no complete shard"):
        train(TrainSettings("head-inv", cache=str(tmp_path / "empty"), epochs=1, out=str(tmp_path / "m")))
    with pytest.raises(UsageError, match="has 4 images, not 5"):
        make_cache(tmp_path / "a", "val2017", 5)


def test_a_corrupt_chunk_read_by_a_decode_thread_is_one_line_naming_it(workspace, tmp_path):
    import shutil

    copy = tmp_path / "train"
    shutil.copytree(workspace / "cache" / "train2017", copy)
    shard_file = copy / "head" / "logits" / "c" / "3" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[100] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    result = subprocess.run([sys.executable, "-m", "invcache.cli", "train", "head-inv", "--cache", str(copy),
                             "--epochs", "1", "--batch-size", "32", "--decode-threads", "2", "--out",
                             str(tmp_path / "m")], capture_output=True, text=True)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("invcache: error")]
    assert len(errors) == 1 and "head/logits shard 3" in errors[0] and "Traceback" not in result.stderr
