"""Hostile or broken inputs (issue 9): escaping file names, malformed annotation files, edited checkpoints,
an unwritable --out, and resumes that would change the data order. Each gets one line or a recorded
failure, never a traceback, and nothing outside the data is opened or allocated."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import invcache
from invcache.cache.store import Cache
from invcache.data import CocoFolder, coco_to_wds, generate_coco, shard_pattern
from invcache.data.wds import WdsSplit
from invcache.errors import InvcacheError, UsageError
from invcache.extraction import ExtractSettings, extract
from invcache.training import TrainSettings, checkpoint, train

SIZE = (64, 96)
TINY = dict(model="detr-tiny", weights="random:0", size=SIZE, batch_size=2, num_workers=0, shard_size=4)

# Paths opened (the "open" audit event: builtins.open, io.open, os.open, PIL) while a spy records.
_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed; it records only inside opened_files()


@contextmanager
def opened_files() -> Iterator[list[str]]:
    """The absolute paths of every file this process opens inside the block."""
    global _opened
    _opened = []
    seen = _opened
    try:
        yield seen
    finally:
        _opened = None
        seen[:] = [os.path.realpath(p) for p in seen]


def one_line(text: str) -> bool:
    return len(text.strip().splitlines()) == 1 and "Traceback" not in text


def write_tar(path: Path, members: dict[str, bytes | dict]) -> Path:
    """A tar of the given members (a dict is written as JSON), names as given, '..' included."""
    with tarfile.open(path, "w") as tar:
        for name, content in members.items():
            data = content if isinstance(content, bytes) else json.dumps(content).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invcache.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


# --- item 7: a file_name must not name a file outside <coco-root>/<split> -------------------------------------


@pytest.fixture(scope="module")
def escaping_coco(tmp_path_factory) -> dict:
    """A synthetic val2017 whose annotation file names files outside it, each a readable image.

    images[1]: ``../../outside/secret.jpg``; images[2]: an absolute path; images[3]:
    ``../../../../etc/passwd``; images[4]: ``linked.jpg``, a symlink inside the split folder
    to an image outside it (followed: the folder is the user's).
    """
    base = tmp_path_factory.mktemp("escape")
    root = base / "coco"
    annotation = generate_coco(root, "val2017", num_images=6, seed=0)
    dataset = json.loads(annotation.read_text())
    images = dataset["images"]
    some_image = root / "val2017" / images[0]["file_name"]
    secret, absolute, link_target = base / "outside" / "secret.jpg", base / "elsewhere" / "abs.jpg", base / "t.jpg"
    for path in (secret, absolute, link_target):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(some_image, path)
    (root / "val2017" / "linked.jpg").symlink_to(link_target)
    names = ["../../outside/secret.jpg", str(absolute), "../../../../etc/passwd", "linked.jpg"]
    for image, name in zip(images[1:5], names):
        image["file_name"] = name
    annotation.write_text(json.dumps(dataset))
    return {"root": root, "ids": [image["id"] for image in images], "names": names,
            "outside": [str(secret), str(absolute), "/etc/passwd"]}


def assert_never_opened(opened: list[str], outside: list[str]) -> None:
    for path in outside:
        assert os.path.realpath(path) not in opened, path
    assert not any(p.endswith("etc/passwd") for p in opened)


def test_escaping_file_names_are_recorded_failures_and_never_opened(escaping_coco, tmp_path):
    ids, names = escaping_coco["ids"], escaping_coco["names"]
    with opened_files() as opened:
        result = extract(ExtractSettings(split="val2017", coco_root=escaping_coco["root"], out=tmp_path / "cache",
                                         **TINY))
    assert_never_opened(opened, escaping_coco["outside"])
    reasons = {f["image_id"]: f["reason"] for f in result.failures}
    assert set(reasons) == set(ids[1:4])
    for image_id, name in zip(ids[1:4], names):
        assert reasons[image_id].startswith(f"file_name {name!r} escapes the image folder"), reasons[image_id]
    cache = Cache.open(result.cache)
    stored = cache.image_ids.tolist()
    valid = dict(zip(stored, cache.array("valid")[:].tolist()))
    assert valid == {i: i not in ids[1:4] for i in ids}  # the symlinked image is read, the rest extracted
    assert {f["image_id"] for f in cache.attrs["failures"]} == set(ids[1:4])
    assert not cache.array("input")[:][[stored.index(i) for i in ids[1:4]]].any()


def test_coco_to_wds_never_reads_an_escaping_file_and_its_reader_records_the_failure(escaping_coco, tmp_path):
    ids = escaping_coco["ids"]
    with opened_files() as opened:
        shards = coco_to_wds(escaping_coco["root"], "val2017", tmp_path / "shards", images_per_shard=4)
        result = extract(ExtractSettings(split="val2017", wds=shard_pattern(shards), out=tmp_path / "cache", **TINY))
    assert_never_opened(opened, escaping_coco["outside"])
    reasons = {f["image_id"]: f["reason"] for f in result.failures}
    assert reasons == {i: f"no .jpg in webdataset sample {i:012d}" for i in ids[1:4]}


def test_a_webdataset_sample_reads_only_its_own_bytes_whatever_its_key_and_json_name(escaping_coco, tmp_path):
    """The image of a sample is its .jpg member: neither a key with '..' nor a file_name in its .json is a path."""
    image = (escaping_coco["root"] / "val2017" / "linked.jpg").read_bytes()
    secret = escaping_coco["outside"][0]
    members = {
        "../../outside/secret.json": {"image": {"id": 1, "file_name": secret, "height": 8, "width": 8}},
        "000000000002.json": {"image": {"id": 2, "file_name": "/etc/passwd", "height": 8, "width": 8}},
        "000000000002.jpg": image,
    }
    shard = write_tar(tmp_path / "crafted.tar", members)
    with opened_files() as opened:
        result = extract(ExtractSettings(split="val2017", wds=str(shard), out=tmp_path / "cache", **TINY))
    assert_never_opened(opened, escaping_coco["outside"])
    assert [(f["image_id"], f["reason"]) for f in result.failures] == [
        (1, "no .jpg in webdataset sample ../../outside/secret")]
    assert Cache.open(result.cache).array("valid")[:].tolist() == [False, True]


# --- item 9: malformed annotation files; an unwritable --out ------------------------------------------------------


def coco_with_annotation(root: Path, text: str) -> Path:
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    path = root / "annotations" / "instances_val2017.json"
    path.write_text(text)
    return path


IMAGE = {"id": 1, "file_name": "a.jpg", "height": 8, "width": 8}


@pytest.mark.parametrize("text, cause", [
    ('{"images": [{"id": 1, "file_na', "not valid JSON (Unterminated string"),
    (json.dumps({"images": [IMAGE, {"id": 2, "height": 8, "width": 8}]}), "images[1] has no file_name"),
    (json.dumps({"images": [{**IMAGE, "id": "1"}]}), "images[0] has id '1', not an integer"),
    (json.dumps({"images": {"1": IMAGE}}), '"images" is a JSON object, not a list'),
    (json.dumps([IMAGE]), "the top level is a JSON array, not an object"),
    (json.dumps({"images": [IMAGE, IMAGE]}), "images[1] repeats the id 1"),
    (json.dumps({"images": [{**IMAGE, "height": "tall"}]}), "images[0] has height 'tall', not a non-negative"),
    (json.dumps({"images": [IMAGE], "annotations": [{"image_id": 1, "category_id": 1}]}), "annotations[0] has no id"),
])
def test_a_malformed_annotation_file_is_one_line_naming_it(tmp_path, text, cause):
    path = coco_with_annotation(tmp_path, text)
    with pytest.raises(UsageError) as error:
        CocoFolder(tmp_path, "val2017")
    message = str(error.value)
    assert message.startswith(f"{path} is not a COCO annotation file: ") and cause in message, message
    assert one_line(message)


def test_cli_extract_with_a_malformed_annotation_file_exits_2_with_one_line(tmp_path):
    path = coco_with_annotation(tmp_path / "coco", json.dumps({"images": [{"id": "7", "file_name": "a.jpg"}]}))
    result = run_cli("extract", "--split", "val2017", "--coco-root", str(tmp_path / "coco"), "--model", "detr-tiny",
                     "--weights", "random:0", "--size", "64x96", "--out", str(tmp_path / "cache"))
    assert result.returncode == 2 and one_line(result.stderr), result.stderr
    assert f"{path} is not a COCO annotation file: images[0] has id '7'" in result.stderr


def test_a_malformed_webdataset_json_is_one_line_naming_the_sample(tmp_path):
    shard = write_tar(tmp_path / "bad.tar", {"000000000001.json": {"image": {"id": "x"}}})
    with pytest.raises(UsageError, match=r"webdataset sample '000000000001' of \S+bad.tar: its image record has "
                                         r"id 'x', not an integer"):
        WdsSplit(str(shard), "val2017", SIZE)


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("train-cache")
    return extract(ExtractSettings(split="train2017", source="synthetic", workspace=root, synthetic_images=16,
                                   model="detr-tiny", weights="random:0", size=SIZE, batch_size=8, num_workers=0,
                                   shard_size=8)).cache


def quick(cache: str, out: Path, **overrides) -> TrainSettings:
    return TrainSettings(**{**dict(name="encoder-inv", cache=cache, epochs=1, batch_size=4, out=str(out)),
                            **overrides})


def test_an_unwritable_out_is_refused_before_any_training(train_cache, tmp_path, monkeypatch):
    import invcache.training.loop as loop

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(loop, "train_epoch", no_training)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    with pytest.raises(UsageError, match=rf"^cannot write to --out {re.escape(str(a_file / 'run'))}: Not a directory$"):
        train(quick(train_cache, a_file / "run"))
    with pytest.raises(UsageError, match=rf"^cannot write to --out {re.escape(str(a_file))}: it is a file, not a "
                                         "folder$"):
        train(quick(train_cache, a_file))
    assert a_file.read_text() == "not a folder"
    fine = tmp_path / "new" / "run"
    with pytest.raises(AssertionError, match="trained before"):
        train(quick(train_cache, fine))
    assert fine.is_dir() and not list(fine.iterdir())  # created, and the probe removed


def test_cli_train_with_an_unwritable_out_exits_2_with_one_line(train_cache, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    result = run_cli("train", "head-inv", "--cache", train_cache, "--epochs", "1", "--out", str(a_file / "run"))
    assert result.returncode == 2 and one_line(result.stderr), result.stderr
    assert f"cannot write to --out {a_file / 'run'}: Not a directory" in result.stderr


# --- item 11: a checkpoint's JSON and tensors are checked before they are trusted ---------------------------------


@pytest.fixture(scope="module")
def trained(train_cache, tmp_path_factory) -> Path:
    """A one-epoch encoder-inv run (``best`` and ``last``), trained with the default settings."""
    out = tmp_path_factory.mktemp("trained") / "encoder-inv"
    train(quick(train_cache, out))
    return out


def edited_copy(trained: Path, to: Path, *edits: Callable[[dict], str | None], stem: str = "best") -> Path:
    """A copy of the run whose ``<stem>.json`` went through ``edits`` (an edit that returns text replaces it)."""
    shutil.copytree(trained, to)
    path = to / f"{stem}.json"
    meta = json.loads(path.read_text())
    texts = [edit(meta) for edit in edits]
    path.write_text(texts[-1] if isinstance(texts[-1], str) else json.dumps(meta))
    return to


@pytest.fixture
def built(monkeypatch) -> list:
    """The specs :func:`checkpoint.load` builds a module for."""
    calls = []
    real = checkpoint.build_inverse

    def spy(spec):
        calls.append(spec)
        return real(spec)

    monkeypatch.setattr(checkpoint, "build_inverse", spy)
    return calls


def _parent(meta: dict, path: str) -> tuple[dict, str]:
    *parents, last = path.split(".")
    for key in parents:
        meta = meta[key]
    return meta, last


def _set(path: str, value: object) -> Callable[[dict], None]:
    """An edit setting ``meta[a][b]...`` for the dotted ``path``."""
    def edit(meta: dict) -> None:
        parent, key = _parent(meta, path)
        parent[key] = value
    return edit


def _delete(path: str) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        parent, key = _parent(meta, path)
        del parent[key]
    return edit


@pytest.mark.parametrize("edit, needle", [
    (_set("spec.name", "sideways-inv"), "unknown module 'sideways-inv'"),
    (_set("spec.config.dropout", 0.1), "config.dropout: None -> 0.1"),
    (_delete("spec.config.nhead"), "config.nhead: 4 -> None"),
    (_delete("spec.target"), "its spec has the keys config, inputs, name, not config, inputs, name, target"),
    (_set("spec.extra", 1), "its spec has the keys"),
    (_set("spec.inputs", "enc.2"), "inputs 'enc.2' are not a list of tap names"),
    (_set("spec.inputs", ["dec.1"]), "encoder-inv cannot read 'dec.1'"),
    (lambda meta: "{not json", "is not a checkpoint's JSON (JSONDecodeError"),
    (lambda meta: "[1, 2]", "is not a checkpoint's JSON (a JSON list, not an object)"),
    (_delete("cache"), 'no cache fingerprint ("cache" with "model" and "preprocessing")'),
    (_set("cache.model.name", "detr-r9000"), "unknown DETR 'detr-r9000'"),
])
def test_an_edited_checkpoint_json_is_one_line_naming_it(trained, tmp_path, built, edit, needle):
    copy = edited_copy(trained, tmp_path / "copy", edit)
    with pytest.raises(InvcacheError) as error:
        checkpoint.load(copy, "best")
    message = str(error.value)
    assert message.startswith(f"{copy / 'best.json'}") and needle in message and one_line(message), message
    assert not built


@pytest.mark.parametrize("edits", [
    [_set("spec.config.dim_feedforward", 10 ** 9)],
    # the fingerprint edited to agree: still not the config of a DETR invcache has
    [_set("spec.config.dim_feedforward", 10 ** 9), _set("cache.model.config.dim_feedforward", 10 ** 9)],
    # an image size the position encodings would grow with
    [_set("spec.config.feature_size", [10 ** 5, 10 ** 5]), _set("cache.preprocessing.size", [32 * 10 ** 5] * 2)],
])
def test_a_huge_module_is_refused_before_it_is_built(trained, tmp_path, built, edits):
    copy = edited_copy(trained, tmp_path / "copy", *edits)
    with pytest.raises(InvcacheError, match=r"best\.json: .*(dim_feedforward|not detr-tiny's|image size)"):
        checkpoint.load(copy, "best")
    assert not built


def test_weights_that_do_not_fit_the_spec_are_refused_before_loading(trained, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    tensors = load_file(str(copy / "best.safetensors"))
    first = next(k for k in tensors if k.startswith("module.") and tensors[k].dim() == 2)
    tensors[first] = torch.zeros(3, 3)
    tensors["module.stray"] = torch.zeros(1)
    epoch = json.loads((copy / "best.json").read_text())["epoch"]
    save_file(tensors, str(copy / "best.safetensors"), metadata={"epoch": str(epoch)})
    with pytest.raises(InvcacheError, match=rf"best.safetensors does not hold the weights of the encoder-inv its "
                                            rf"best.json describes \(unexpected module.stray; {first} is \(3, 3\)"):
        checkpoint.load(copy, "best")
    (copy / "best.safetensors").write_bytes(b"garbage")
    with pytest.raises(InvcacheError, match="best.safetensors is not a safetensors file"):
        checkpoint.load(copy, "best")


def test_load_modules_refuses_an_edited_checkpoint_in_one_line(trained, tmp_path, built):
    folder = edited_copy(trained, tmp_path / "modules" / "encoder-inv", _set("spec.config.dim_feedforward", 10 ** 9))
    with pytest.raises(InvcacheError, match=rf"^{re.escape(str(folder / 'best.json'))}: its spec is "
                                            r"not the encoder-inv of detr-tiny caches of size \[64, 96\] "
                                            r"\(config.dim_feedforward: 256 -> 1000000000, expected -> found\)"):
        invcache.load_modules(tmp_path / "modules")
    assert not built


@pytest.mark.parametrize("edit, needle", [
    (_set("optimizer_param_groups", []), "its optimizer_param_groups are not a list of 1 group(s)"),
    (lambda meta: meta["optimizer_param_groups"][0].update(lr="fast"),
     "its optimizer_param_groups[0] has lr 'fast', which is not a float"),
    (lambda meta: meta["optimizer_param_groups"][0].update(params=[0, 1]),
     "its optimizer_param_groups[0] holds the parameters [0, 1]"),
    (_set("step", "many"), "step is 'many', not a non-negative integer"),
    (_set("grad_scaler", None), "grad_scaler is None, not an object"),
])
def test_bad_resume_state_is_one_line_before_any_step(trained, train_cache, tmp_path, edit, needle, monkeypatch):
    import invcache.training.loop as loop

    copy = edited_copy(trained, tmp_path / "copy", edit, stem="last")
    monkeypatch.setattr(loop, "train_epoch", lambda *a, **k: pytest.fail("trained from a bad resume state"))
    with pytest.raises(InvcacheError) as error:
        train(quick(train_cache, copy, epochs=2, resume=True))
    message = str(error.value)
    assert message.startswith(f"{copy / 'last.json'}: ") and needle in message and one_line(message), message


def test_optimizer_tensors_that_do_not_fit_are_refused(trained, train_cache, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    tensors = load_file(str(copy / "last.safetensors"))
    key = next(k for k in tensors if k.startswith("optimizer.") and k.endswith(".exp_avg"))
    tensors[key] = torch.zeros(2, 2, 2)
    epoch = json.loads((copy / "last.json").read_text())["epoch"]
    save_file(tensors, str(copy / "last.safetensors"), metadata={"epoch": str(epoch)})
    with pytest.raises(InvcacheError, match=rf"last.json: its optimizer state {key} has the shape \(2, 2, 2\)"):
        train(quick(train_cache, copy, epochs=2, resume=True))


def test_cli_train_resume_with_a_garbage_checkpoint_exits_1_with_one_line(trained, train_cache, tmp_path):
    copy = edited_copy(trained, tmp_path / "copy", lambda meta: '{"spec": ', stem="last")
    result = run_cli("train", "encoder-inv", "--cache", train_cache, "--epochs", "2", "--batch-size", "4",
                     "--out", str(copy), "--resume")
    assert result.returncode == 1 and one_line(result.stderr), result.stderr
    assert f"{copy / 'last.json'} is not a checkpoint's JSON" in result.stderr


# --- item 12: a resume must not change the data order ----------------------------------------------------------


def test_a_resume_with_another_batch_size_or_shuffle_window_is_refused_naming_them(trained, train_cache, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    with pytest.raises(InvcacheError, match=r"cannot resume the run in \S+ with settings that change the order or "
                                            r"batching of its data \(--batch-size 4 -> 8; shuffle_window 1024 -> 8\)"):
        train(quick(train_cache, copy, epochs=2, resume=True, shuffle_window=8, batch_size=8))
    older = edited_copy(trained, tmp_path / "older", lambda meta: meta["settings"].pop("shuffle_window"), stem="last")
    with pytest.raises(InvcacheError, match=r"\(the run was saved by the per-sample reader of earlier versions"):
        train(quick(train_cache, older, epochs=2, resume=True))
    # a finished run has no order left to keep: resuming it (as a rerun of make demo does) trains nothing
    finished = train(quick(train_cache, older, epochs=1, resume=True, shuffle_window=8, batch_size=8))
    assert finished.steps == json.loads((trained / "last.json").read_text())["step"]


def test_decode_threads_do_not_change_the_order_so_that_resume_is_exact(trained, train_cache, tmp_path):
    straight = train(quick(train_cache, tmp_path / "straight", epochs=2, decode_threads=2))
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    resumed = train(quick(train_cache, copy, epochs=2, resume=True, decode_threads=1))
    assert resumed.steps == straight.steps
    for (key, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)
