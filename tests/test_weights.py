"""Checkpoint loading: strict official layout, safe unpickling, the published files, fingerprints."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from invcache import build_detr
from invcache.errors import UsageError, WeightsError
from invcache.models import weights as W


@pytest.fixture(scope="module")
def tiny_state():
    return build_detr("detr-tiny", "random:1").state_dict()


def test_missing_and_unexpected_keys_are_all_named(tiny_state, tmp_path):
    state = dict(tiny_state)
    del state["transformer.decoder.norm.weight"]
    del state["query_embed.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "ckpt.pth")
    with pytest.raises(WeightsError) as err:
        build_detr("detr-tiny", str(tmp_path / "ckpt.pth"))
    message = str(err.value)
    assert "transformer.decoder.norm.weight" in message and "query_embed.weight" in message
    assert "unexpected keys: extra.weight" in message and "\n" not in message


def test_wrong_shapes_are_named(tiny_state, tmp_path):
    state = dict(tiny_state)
    state["class_embed.bias"] = torch.zeros(10)
    torch.save(state, tmp_path / "bare.pth")
    with pytest.raises(WeightsError, match=r"class_embed.bias \(10,\) vs \(92,\)"):
        build_detr("detr-tiny", str(tmp_path / "bare.pth"))


def test_cli_missing_key_is_one_line_nonzero_no_traceback(tiny_state, tmp_path):
    state = dict(tiny_state)
    del state["input_proj.bias"]
    torch.save({"model": state}, tmp_path / "ckpt.pth")
    result = subprocess.run(
        [sys.executable, "-m", "invcache.cli", "taps", "--model", "detr-tiny", "--weights",
         str(tmp_path / "ckpt.pth"), "--source", "synthetic", "--root", str(tmp_path), "--size", "64x64"],
        capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing keys: input_proj.bias" in lines[0]


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_arbitrary_pickles_are_refused(tmp_path):
    torch.save({"model": {"x": Payload()}}, tmp_path / "evil.pth", _use_new_zipfile_serialization=True)
    with pytest.raises(WeightsError, match="refused to unpickle"):
        build_detr("detr-tiny", str(tmp_path / "evil.pth"))


def test_garbage_files_are_clear_errors(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    for name in ("junk.pth", "junk.safetensors"):
        with pytest.raises(WeightsError, match="junk"):
            build_detr("detr-tiny", str(tmp_path / name))
    with pytest.raises(WeightsError, match="no model.safetensors or pytorch_model.bin"):
        build_detr("detr-tiny", str(tmp_path))


@pytest.mark.parametrize("weights", ["random:x", "nowhere.pth", "random:-1"])
def test_bad_weights_values(weights):
    with pytest.raises(UsageError):
        build_detr("detr-tiny", weights)


def test_official_offline_names_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("INVCACHE_DETR_URL_BASE", "http://127.0.0.1:9/detr/")
    with pytest.raises(WeightsError) as err:
        build_detr("detr-r50", "official")
    message = str(err.value)
    expected = tmp_path / "hub" / "checkpoints" / "detr-r50-e632da11.pth"
    assert "detr-r50-e632da11.pth" in message and str(expected) in message
    assert not expected.exists()
    with pytest.raises(UsageError, match="no published weights for detr-tiny"):
        build_detr("detr-tiny", "official")


def test_official_cached_file_is_hash_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    state = build_detr("detr-r50", "random:2").state_dict()
    target = checkpoints / "detr-r50-e632da11.pth"
    torch.save({"model": state}, target)
    with pytest.raises(WeightsError, match="does not start with e632da11"):
        build_detr("detr-r50", "official")
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    renamed = f"detr-r50-{digest[:8]}.pth"
    target.rename(checkpoints / renamed)
    monkeypatch.setitem(W.OFFICIAL_FILES, "detr-r50", renamed)
    model = build_detr("detr-r50", "official")
    assert model.fingerprint["weights"] == f"official:{renamed}"
    assert torch.equal(model.state_dict()["query_embed.weight"], state["query_embed.weight"])


def test_official_download_goes_through_the_hub_cache(tmp_path, monkeypatch):
    import functools
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    staging = served / "staging.pth"
    torch.save({"model": build_detr("detr-r50", "random:4").state_dict()}, staging)
    name = f"detr-r50-{hashlib.sha256(staging.read_bytes()).hexdigest()[:8]}.pth"
    staging.rename(served / name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        monkeypatch.setenv("INVCACHE_DETR_URL_BASE", f"http://127.0.0.1:{server.server_address[1]}/")
        monkeypatch.setitem(W.OFFICIAL_FILES, "detr-r50", name)
        model = build_detr("detr-r50", "official")
    finally:
        server.shutdown()
    assert (tmp_path / "torch" / "hub" / "checkpoints" / name).is_file()
    assert model.fingerprint["weights"] == f"official:{name}"


def test_random_weights_do_not_depend_on_the_thread_count():
    # torchrun runs every rank with one thread; its caches must pair with a single process's
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = build_detr("detr-tiny", "random:3").fingerprint["weights_sha256"]
        torch.set_num_threads(2)
        two = build_detr("detr-tiny", "random:3").fingerprint["weights_sha256"]
    finally:
        torch.set_num_threads(before)
    assert one == two and torch.get_num_threads() == before


def test_random_weights_follow_the_official_initialization_and_leave_the_callers_rng_alone():
    rng_state = torch.get_rng_state()
    model = build_detr("detr-r50", "random:5")
    assert torch.equal(torch.get_rng_state(), rng_state)
    state = model.state_dict()
    # the query embedding standard normal (nn.Embedding's default), as the official DETR leaves it
    assert abs(state["query_embed.weight"].std().item() - 1.0) < 0.05
    # every matrix of the transformer Xavier-uniform, as the official Transformer._reset_parameters
    for key in ("transformer.encoder.layers.0.self_attn.in_proj_weight", "transformer.decoder.layers.5.linear1.weight"):
        fan_out, fan_in = state[key].shape
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert state[key].abs().max() <= bound and state[key].std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
    # torchvision's ResNet initialization: He-normal with the fan-out, unit batch-norm affine
    conv = state["backbone.0.body.layer3.0.conv2.weight"]
    assert conv.std().item() == pytest.approx((2 / (conv.shape[0] * conv[0, 0].numel())) ** 0.5, rel=0.05)
    assert torch.equal(state["backbone.0.body.layer3.0.bn2.weight"], torch.ones(256))
    # the class head as nn.Linear initializes it: uniform within 1/sqrt(fan_in)
    assert state["class_embed.weight"].abs().max() <= 256**-0.5
