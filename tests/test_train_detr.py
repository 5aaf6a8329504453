"""Training DETR itself: learning, official-layout checkpoints, resume, DDP, NaN stops, bad input, `--weights demo`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from invcache import build_detr, forward_taps
from invcache.cli import main, train_detr_command
from invcache.data import generate_coco, open_split
from invcache.data.detection import collate, epoch_indices
from invcache.errors import InvcacheError, UsageError, WeightsError
from invcache.hashing import file_sha256
from invcache.models import weights as weights_module
from invcache.models.loss import SetCriterion
from invcache.settings import DetrTrainSettings, default
from invcache.training import detr as trainer

SIZE = (64, 96)
IMAGES = torch.randint(0, 256, (2, *SIZE, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A synthetic training split of 4 images and a validation split of 2, generated once."""
    root = tmp_path_factory.mktemp("detr-workspace")
    open_split("synthetic", "shapes", workspace=root, size=SIZE, synthetic_images=4)
    open_split("synthetic", "shapes-val", workspace=root, size=SIZE, synthetic_images=2)
    return root


def quick(workspace: Path, **overrides) -> DetrTrainSettings:
    base = dict(model="detr-tiny", source="synthetic", workspace=workspace, split="shapes", synthetic_images=4,
                val_split="shapes-val", synthetic_val_images=2, size=SIZE, epochs=1, batch_size=2, num_workers=0,
                out=workspace / "runs" / overrides.pop("tag", "x"))
    return DetrTrainSettings(**{**base, **overrides})


@pytest.fixture(scope="module")
def one_epoch(workspace):
    rng_state = torch.get_rng_state()
    result = trainer.train_detr(quick(workspace, tag="one"))
    assert torch.equal(torch.get_rng_state(), rng_state), "train_detr() must not reseed the caller's RNG"
    return result


def outputs(model, images=IMAGES) -> dict[str, torch.Tensor]:
    return forward_taps(model.eval(), images, ["enc.2", "head.logits", "head.boxes"])


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(workspace):
    run = trainer.prepare(quick(workspace, tag="fixed", lr=1e-3))
    batch = collate([run.train_data[i] for i in range(2)])
    losses = [trainer.train_step(run.trainee, run.criterion, run.optimizer, run.scaler, batch["input"],
                                 batch["targets"], None, 0.1)[0].item() for _ in range(4)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_checkpoints_are_official_and_load_with_weights_path(one_epoch):
    out = one_epoch.out
    assert sorted(p.name for p in out.iterdir()) == ["best.safetensors", "last.pth", "metrics.jsonl"]
    expected = outputs(one_epoch.model)
    for name in ("best.safetensors", "last.pth"):
        loaded = outputs(build_detr("detr-tiny", str(out / name)))
        for tap in expected:
            assert torch.equal(loaded[tap], expected[tap]), (name, tap)
    last = torch.load(out / "last.pth", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "epoch", "args"} <= set(last) and last["epoch"] == 0
    assert {"backbone.0.body.layer4.1.conv2.weight", "transformer.decoder.norm.weight", "query_embed.weight",
            "bbox_embed.layers.2.bias", "class_embed.weight"} <= set(last["model"])
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["epoch"] == 1 and record["step"] == 2 and 0 <= record["val_AP"] <= 1 and record["val_images"] == 2
    # the official freezing: the backbone's stem and layer1 keep their initial weights, layer2-4 train
    initial = build_detr("detr-tiny", "random:0").state_dict()
    trained = last["model"]
    frozen, trained_layer = "backbone.0.body.layer1.0.conv1.weight", "backbone.0.body.layer2.0.conv1.weight"
    assert torch.equal(trained[frozen], initial[frozen]) and not torch.equal(trained[trained_layer],
                                                                             initial[trained_layer])


def test_full_backbone_trains_stem_and_batch_norms_and_saves_the_official_keys(workspace):
    with pytest.raises(UsageError, match="--full-backbone .* --lr-backbone above 0"):
        trainer.train_detr(quick(workspace, tag="full-refused", full_backbone=True, lr_backbone=0.0))
    result = trainer.train_detr(quick(workspace, tag="full", full_backbone=True, lr_backbone=1e-4))
    initial = build_detr("detr-tiny", "random:0").state_dict()
    last = torch.load(result.out / "last.pth", weights_only=True)["model"]
    assert set(last) == set(initial)  # no batch counters: the frozen batch norms' layout
    for key in ("backbone.0.body.conv1.weight", "backbone.0.body.layer1.0.conv1.weight",
                "backbone.0.body.bn1.weight", "backbone.0.body.bn1.running_mean",
                "backbone.0.body.layer4.1.bn2.running_var"):
        assert not torch.equal(last[key], initial[key]), key
    # the statistics learned are what a frozen batch norm reads: the returned model, frozen again, and
    # the checkpoint give the same outputs, and the returned model has no trainable norm left
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in result.model.modules())
    expected = outputs(result.model)
    loaded = outputs(build_detr("detr-tiny", str(result.out / "best.safetensors")))
    assert all(torch.equal(loaded[tap], expected[tap]) for tap in expected)


def test_full_backbone_refuses_a_one_by_one_feature_map_and_resumes_exactly(workspace, tmp_path):
    with pytest.raises(UsageError, match="--full-backbone needs a feature map larger than 1x1; --size 32x32"):
        trainer.train_detr(quick(workspace, tag="full-tiny", full_backbone=True, lr_backbone=1e-4, size=(32, 32)))
    full = dict(full_backbone=True, lr_backbone=1e-4)
    straight = trainer.train_detr(quick(workspace, epochs=2, tag="full-straight", **full))
    trainer.train_detr(quick(workspace, epochs=1, out=tmp_path / "full", **full))
    resumed = trainer.train_detr(quick(workspace, epochs=2, out=tmp_path / "full", resume=True, **full))
    for key, value in straight.model.state_dict().items():  # batch-norm statistics included
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    with pytest.raises(InvcacheError, match="--full-backbone True -> False"):
        trainer.train_detr(quick(workspace, epochs=3, out=tmp_path / "full", resume=True, lr_backbone=1e-4))


def test_thawed_batch_norms_normalize_by_batch_statistics_and_freeze_back_exactly():
    from torchvision.ops import FrozenBatchNorm2d

    from invcache.models.backbone import freeze_batch_norms, thaw_batch_norms

    model = build_detr("detr-tiny", "random:3")
    images = torch.randn(4, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    trunk = model.backbone[0]
    before = trunk(images)
    thaw_batch_norms(model.backbone)
    norm = trunk.body.bn1
    assert isinstance(norm, torch.nn.BatchNorm2d)
    assert "backbone.0.body.bn1.num_batches_tracked" not in model.state_dict()
    torch.testing.assert_close(trunk(images), before, rtol=1e-4, atol=1e-4)  # eval mode: the same statistics
    model.backbone.train()
    stem = trunk.body.conv1(images)
    normalized = norm(stem)
    mean, var = stem.mean(dim=(0, 2, 3)), stem.var(dim=(0, 2, 3), unbiased=False)
    reference = (stem - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5)
    torch.testing.assert_close(normalized, reference * norm.weight[:, None, None] + norm.bias[:, None, None],
                               rtol=1e-4, atol=1e-4)
    statistics = norm.running_mean.clone(), norm.running_var.clone()
    model.backbone.eval()
    thawed = trunk(images)
    freeze_batch_norms(model.backbone)
    assert isinstance(trunk.body.bn1, FrozenBatchNorm2d)
    assert torch.equal(trunk.body.bn1.running_mean, statistics[0])
    torch.testing.assert_close(trunk(images), thawed, rtol=1e-4, atol=1e-4)


def test_resumed_training_ends_where_the_uninterrupted_run_ends(workspace, one_epoch, tmp_path):
    straight = trainer.train_detr(quick(workspace, epochs=2, tag="straight"))
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(one_epoch.out, resumed_dir)
    with pytest.raises(InvcacheError, match="--resume"):
        trainer.train_detr(quick(workspace, epochs=2, out=resumed_dir))
    with pytest.raises(InvcacheError, match=r"--lr 0.0001 -> 0.0002"):
        trainer.train_detr(quick(workspace, epochs=2, out=resumed_dir, resume=True, lr=2e-4))
    # a run saved before a setting existed resumes as if it had that setting's default
    saved = torch.load(resumed_dir / "last.pth", weights_only=True)
    del saved["args"]["full_backbone"]
    torch.save(saved, resumed_dir / "last.pth")
    # through the command, as a user resumes
    args = ["train", "detr", "--model", "detr-tiny", "--source", "synthetic", "--root", str(workspace), "--split",
            "shapes", "--synthetic-images", "4", "--val-split", "shapes-val", "--synthetic-val-images", "2",
            "--size", "64x96", "--epochs", "2", "--batch-size", "2", "--num-workers", "0", "--out",
            str(resumed_dir), "--resume"]
    with pytest.raises(SystemExit) as exit_code:
        main(args)
    assert exit_code.value.code == 0
    resumed = torch.load(resumed_dir / "last.pth", weights_only=True)
    assert resumed["step"] == straight.steps == 4 and resumed["epoch"] == 1
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed["model"][key], value.cpu(), rtol=1e-4, atol=1e-5, msg=key)
    lines = [json.loads(line) for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert lines[1]["val_AP"] == pytest.approx(straight.history[1]["val_AP"], abs=1e-3)


def test_two_process_ddp_training_ends_with_the_same_weights_on_both_ranks(workspace, tmp_path):
    # with the whole backbone training, so the batch norms' statistics (buffers) must agree too
    script = tmp_path / "ddp_detr.py"
    script.write_text(textwrap.dedent(f"""
        import os, torch
        from invcache.distributed import process_group
        from invcache.settings import DetrTrainSettings
        from invcache.training.detr import train_detr
        with process_group():
            result = train_detr(DetrTrainSettings(
                model="detr-tiny", source="synthetic", workspace={str(workspace)!r}, split="shapes",
                synthetic_images=4, val_split="shapes-val", synthetic_val_images=2, size={SIZE!r}, epochs=1,
                batch_size=2, num_workers=0, out={str(tmp_path / "ddp")!r}, full_backbone=True, lr_backbone=1e-4))
        torch.save(result.model.state_dict(), {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.pt")
    """))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    last = torch.load(tmp_path / "ddp" / "last.pth", weights_only=True)
    assert last["step"] == 1 and last["args"]["world_size"] == 2  # 4 images, 2 per rank, batches of 2
    assert last["history"][0]["val_images"] == 2  # each validation image scored once, gathered from both ranks


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(workspace, one_epoch, tmp_path,
                                                                              monkeypatch):
    shutil.copytree(one_epoch.out, tmp_path / "run")
    saved = (tmp_path / "run" / "last.pth").read_bytes()
    settings = quick(workspace, epochs=2, out=tmp_path / "run", resume=True)
    total = SetCriterion.total
    monkeypatch.setattr(SetCriterion, "total", lambda self, losses: total(self, losses) * float("nan"))
    with pytest.raises(InvcacheError) as error:
        trainer.train_detr(settings)
    message = str(error.value)
    order = epoch_indices(4, settings.seed, 1)[:2]  # the first batch of epoch 2, step 3 of the run
    image_ids = open_split("synthetic", "shapes", workspace=workspace, size=SIZE, synthetic_images=4).image_ids
    ids = ", ".join(str(i) for i in sorted(image_ids[i] for i in order))
    assert message == (f"the loss is not finite at epoch 2, step 3 (images {ids}); training stopped, the last good "
                       f"checkpoint is {tmp_path / 'run' / 'last.pth'} (epoch 1)")
    assert (tmp_path / "run" / "last.pth").read_bytes() == saved


def test_an_unreadable_training_image_is_skipped_and_named(tmp_path, caplog):
    generate_coco(tmp_path / "coco", "train2017", num_images=3, faults=("truncated",))
    generate_coco(tmp_path / "coco", "val2017", num_images=2)
    broken = json.loads((tmp_path / "coco" / "annotations" / "instances_train2017.json").read_text())["images"][1]["id"]
    settings = DetrTrainSettings(model="detr-tiny", coco_root=tmp_path / "coco", size=SIZE, epochs=1, batch_size=1,
                                 num_workers=0, out=tmp_path / "run")
    with caplog.at_level("WARNING", logger="invcache"):
        result = trainer.train_detr(settings)
    assert result.steps == 2  # its batch was left empty: no step
    named = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(named) == 1 and named[0].startswith(f"skipped the unreadable training image {broken}: "), named


def test_a_category_outside_the_model_is_one_line_naming_the_image(tmp_path, capsys):
    generate_coco(tmp_path / "coco", "train2017", num_images=3)
    generate_coco(tmp_path / "coco", "val2017", num_images=2)
    annotation_file = tmp_path / "coco" / "annotations" / "instances_train2017.json"
    dataset = json.loads(annotation_file.read_text())
    dataset["annotations"][-1]["category_id"] = 95
    annotation_file.write_text(json.dumps(dataset))
    image = dataset["annotations"][-1]["image_id"]
    with pytest.raises(SystemExit) as exit_code:
        main(["train", "detr", "--model", "detr-tiny", "--coco-root", str(tmp_path / "coco"), "--size", "64x96",
              "--out", str(tmp_path / "run")])
    errors = capsys.readouterr().err.strip().splitlines()
    assert exit_code.value.code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"invcache: error: image {image} ({image:012d}.jpg) in ") and "category 95" in errors[0]


def test_train_detr_is_a_command_of_its_own_under_train(capsys):
    with pytest.raises(SystemExit) as exit_code:
        main(["train", "detr", "--help"])
    assert exit_code.value.code == 0 and capsys.readouterr().out.startswith("Usage: invcache train detr [OPTIONS]")
    with pytest.raises(SystemExit) as exit_code:
        main(["train", "--epochs", "2", "detr"])
    assert exit_code.value.code == 2 and "invcache train detr [OPTIONS]" in capsys.readouterr().err
    options = {p.name: p.default for p in train_detr_command.params}
    for field in fields(DetrTrainSettings):
        name = {"model": "model_name", "workspace": "root"}.get(field.name, field.name)
        if field.name in ("coco_root", "workspace", "size", "log_every"):  # environment-dependent, parsed, API-only
            continue
        assert options[name] == default(DetrTrainSettings, field.name), field.name


def test_embedded_weights_load_by_name_and_refuse_a_missing_or_altered_file(one_epoch, tmp_path, monkeypatch):
    shipped = tmp_path / "embedded"
    shipped.mkdir()
    shutil.copy(one_epoch.out / "best.safetensors", shipped / "tiny-test.safetensors")
    entry = weights_module.EmbeddedWeights("detr-tiny", "tiny-test.safetensors",
                                           file_sha256(shipped / "tiny-test.safetensors"), "invcache train detr …")
    monkeypatch.setattr(weights_module, "EMBEDDED_DIR", shipped)
    monkeypatch.setattr(weights_module, "EMBEDDED_WEIGHTS", {"demo": entry})
    model = build_detr("detr-tiny", "demo")
    assert model.fingerprint["weights"] == "demo"
    expected = outputs(build_detr("detr-tiny", str(one_epoch.out / "best.safetensors")))
    assert all(torch.equal(outputs(model)[tap], expected[tap]) for tap in expected)
    with pytest.raises(UsageError, match="--weights demo are detr-tiny weights, not detr-r50's"):
        build_detr("detr-r50", "demo")

    data = bytearray((shipped / "tiny-test.safetensors").read_bytes())
    data[-1] ^= 1
    (shipped / "tiny-test.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="altered") as error:
        build_detr("detr-tiny", "demo")
    assert "\n" not in str(error.value) and "invcache train detr" in str(error.value)
    (shipped / "tiny-test.safetensors").unlink()
    with pytest.raises(WeightsError, match="missing") as error:
        build_detr("detr-tiny", "demo")
    assert "\n" not in str(error.value) and "invcache train detr" in str(error.value)
