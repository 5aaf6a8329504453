"""The device decode path (``--decode device``), run on the CPU: same cache as the CPU path, fallbacks, bad files.

On a machine without CUDA the device path decodes with torchvision's libjpeg-turbo on the CPU,
so it must give exactly the CPU path's pixels (PIL decodes with libjpeg-turbo too, and the
resize is Pillow's, bit for bit). A GPU's nvjpeg decodes differently; that difference is
measured by ``benchmarks/decode_paths.py``, not here.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from invcache.cache import schema as S
from invcache.cache.store import Cache
from invcache.data import CocoFolder, coco_to_wds, generate_coco
from invcache.data import device_decode as D
from invcache.data.jpeg_header import device_refusal, read_jpeg_header
from invcache.data.pil_resize import resize_like_pil, vertical_first
from invcache.errors import UsageError
from invcache.extraction import ExtractSettings, extract
from invcache.extraction import loop as extraction_loop
from invcache.extraction.device_loader import device_batches, ordered_map
from invcache.extraction.run import _decode_on_device
from invcache.settings import ExtractSettings as Settings
from invcache.settings import default

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec; they still work
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

SIZE = (64, 96)
# Files the CPU path reads but the device path must not trust to nvjpeg, or that fail on both
ODD_FILES = ("adobe_rgb", "progressive", "progressive_truncated", "truncated_with_eoi", "twelve_bit", "png_as_jpg")


def settings_for(root: Path, out: Path, **overrides) -> ExtractSettings:
    base = dict(split="val2017", layers="all", coco_root=root, out=out, model="detr-tiny", weights="random:0",
                size=SIZE, batch_size=4, num_workers=2, shard_size=4)
    return ExtractSettings(**{**base, **overrides})


def arrays(location: Path) -> dict[str, np.ndarray]:
    cache = Cache.open(location)
    return {name: cache.array(name)[:] for name in [*cache.taps, *S.PER_IMAGE_ARRAYS]}


def _jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def _odd_bytes(kind: str, image: Image.Image) -> bytes:
    """A file of ``kind`` (:data:`ODD_FILES`) made from ``image``."""
    baseline = _jpeg(image)
    if kind == "adobe_rgb":  # an Adobe marker saying the 3 components are RGB, not YCbCr
        adobe = b"Adobe" + bytes([0, 100, 0, 0, 0, 0, 0])
        return baseline[:2] + b"\xff\xee" + (len(adobe) + 2).to_bytes(2, "big") + adobe + baseline[2:]
    if kind == "progressive":
        return _jpeg(image, progressive=True)
    if kind == "progressive_truncated":
        data = _jpeg(image, progressive=True)
        return data[: len(data) // 2]
    if kind == "truncated_with_eoi":  # cut in the scan, but ending like a whole file
        return baseline[: len(baseline) // 2] + b"\xff\xd9"
    if kind == "twelve_bit":  # the frame header claims 12-bit samples
        header = read_jpeg_header(baseline)
        assert header is not None
        at = baseline.index(b"\xff\xc0") + 4
        return baseline[:at] + bytes([12]) + baseline[at + 1:]
    if kind == "png_as_jpg":
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return buffer.getvalue()
    raise ValueError(kind)


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory) -> Path:
    """A COCO folder of 14 small images: 2 plain JPEGs, the generator's faults, then :data:`ODD_FILES`."""
    root = tmp_path_factory.mktemp("odd-coco")
    faults = ("truncated", "zero_bytes", "missing", "cmyk", "palette", "grayscale")
    generate_coco(root, "val2017", num_images=2 + len(faults) + len(ODD_FILES), seed=3, faults=faults,
                  height_range=(40, 90), width_range=(50, 130))
    coco = CocoFolder(root, "val2017").coco
    ids = sorted(coco.imgs)
    for kind, image_id in zip(ODD_FILES, ids[-len(ODD_FILES):], strict=True):
        path = root / "val2017" / coco.imgs[image_id]["file_name"]
        path.write_bytes(_odd_bytes(kind, Image.open(path).convert("RGB")))
    return root


def _rows_of(dataset, decoder: D.DeviceDecoder, batch_size: int = 4) -> list[dict]:
    """Every row of ``dataset`` through the device path, one dict per row."""
    rows = []
    for batch in device_batches(dataset, list(range(len(dataset.image_ids))), batch_size, decoder, threads=2):
        for i in range(len(batch["row"])):
            rows.append({"row": int(batch["row"][i]), "image_id": int(batch["image_id"][i]),
                         "input": batch["input"][i].cpu(), "orig_size": tuple(batch["orig_size"][i].tolist()),
                         "valid": bool(batch["valid"][i]), "error": batch["error"][i]})
    return rows


def _assert_rows_are_the_cpu_paths(dataset: CocoFolder, rows: list[dict]) -> None:
    assert [r["row"] for r in rows] == list(range(len(dataset)))
    for r in rows:
        cpu = dataset[r["row"]]
        where = f"image {r['image_id']}"
        assert r["image_id"] == cpu["image_id"], where
        assert r["valid"] == cpu["valid"] and r["error"] == cpu["error"], where
        assert r["orig_size"] == tuple(cpu["orig_size"].tolist()), where
        assert torch.equal(r["input"], cpu["input"]), where


# --- the resize and the routing --------------------------------------------------------------------------------


def test_the_device_resize_is_pils_bilinear_bit_for_bit():
    rng = np.random.default_rng(0)
    shapes = [((241, 300), (40, 200)), ((120, 80), (64, 96)), ((64, 96), (64, 96)), ((1, 7), (32, 32)),
              ((333, 500), (480, 640)), ((480, 640), (64, 96))]
    shapes += [(tuple(rng.integers(1, 160, 2)), tuple(rng.integers(1, 120, 2))) for _ in range(20)]
    orders = set()
    for (height, width), (h, w) in shapes:
        pixels = rng.integers(0, 256, (int(height), int(width), 3), dtype=np.uint8)
        expected = np.asarray(Image.fromarray(pixels).resize((int(w), int(h)), Image.Resampling.BILINEAR))
        got = resize_like_pil(torch.from_numpy(pixels).permute(2, 0, 1)[None], (int(h), int(w)))
        assert np.array_equal(got[0].permute(1, 2, 0).numpy(), expected), ((height, width), (h, w))
        orders.add(vertical_first(int(height), int(width), int(h), int(w)))
    assert True in orders or not vertical_first(241, 300, 40, 200)  # both pass orders met where Pillow has both


@pytest.mark.parametrize("kind, reason", [
    ("progressive", None), ("adobe_rgb", "RGB-coded"), ("progressive_truncated", "no end-of-image marker"),
    ("truncated_with_eoi", None), ("twelve_bit", "12-bit"), ("png_as_jpg", "not a JPEG"),
])
def test_only_jpegs_nvjpeg_decodes_like_libjpeg_go_to_the_device(kind, reason):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    refusal = device_refusal(_odd_bytes(kind, image), None)
    assert refusal is None if reason is None else reason in refusal
    assert "CMYK" in device_refusal(_jpeg(image.convert("CMYK")), None)
    assert device_refusal(_jpeg(image.convert("L")), None) is None
    assert "decompression-bomb" in device_refusal(_jpeg(image), 30 * 40 - 1)
    assert device_refusal(b"", None) == "not a JPEG"


def test_an_adobe_marker_after_the_frame_header_still_counts():
    # legal, and libjpeg applies it: the RGB-coded file must not reach nvjpeg whichever comes first
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    baseline = _jpeg(image)
    frame = baseline.index(b"\xff\xc0")
    after = frame + 2 + int.from_bytes(baseline[frame + 2:frame + 4], "big")
    adobe = b"Adobe" + bytes([0, 100, 0, 0, 0, 0, 0])
    moved = baseline[:after] + b"\xff\xee" + (len(adobe) + 2).to_bytes(2, "big") + adobe + baseline[after:]
    assert read_jpeg_header(moved).adobe_transform == 0
    assert "RGB-coded" in device_refusal(moved, None)


def test_the_header_reader_never_raises_on_cut_or_damaged_files():
    rng = np.random.default_rng(2)
    data = _jpeg(Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)))
    damaged = [data[:n] for n in range(len(data))]
    for _ in range(200):
        copy = bytearray(data[:700])
        copy[int(rng.integers(2, len(copy)))] = int(rng.integers(0, 256))
        damaged.append(bytes(copy) + b"\xff\xd9")
    for candidate in damaged:
        device_refusal(candidate, None)  # a reason or None, never an exception


def test_auto_decodes_on_the_device_only_on_cuda_without_transforms():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _decode_on_device(Settings("val2017"), cuda) and not _decode_on_device(Settings("val2017"), cpu)
    assert not _decode_on_device(Settings("val2017", transforms=("grayscale",)), cuda)
    assert _decode_on_device(Settings("val2017", decode="device"), cpu)
    assert not _decode_on_device(Settings("val2017", decode="cpu"), cuda)


def test_reading_ahead_is_bounded():
    pulled = []

    def source():
        for i in range(100):
            pulled.append(i)
            yield i

    results = ordered_map(lambda i: i * 2, source(), threads=2, ahead=5)
    assert next(results) == 0 and len(pulled) <= 7
    assert list(results) == [2 * i for i in range(1, 100)]


# --- bad files: fallback or recorded failure, never a crash -----------------------------------------------------


def test_odd_and_broken_files_give_the_cpu_paths_rows(odd_root):
    dataset = CocoFolder(odd_root, "val2017", SIZE)
    decoder = D.DeviceDecoder(SIZE, "cpu")
    rows = _rows_of(dataset, decoder)
    _assert_rows_are_the_cpu_paths(dataset, rows)
    assert sum(not r["valid"] for r in rows) >= 5  # truncated, zero bytes, missing, cut progressive, 12-bit
    reasons = decoder.counts.cpu
    assert decoder.counts.device >= 5 and reasons["not a JPEG"] >= 3 and reasons["file not read"] == 1
    assert any("CMYK" in r for r in reasons) and any("12-bit" in r for r in reasons)


def test_a_batch_the_device_decoder_rejects_is_retried_image_by_image(odd_root):
    """nvjpeg returns nothing for a batch with one bad image: only that image goes to the CPU path."""
    calls = []

    def no_progressive(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        calls.append(len(data))
        if any(read_jpeg_header(d.numpy().tobytes()).frame == 0xC2 for d in data):
            raise RuntimeError("Error while decoding JPEG images: nvjpeg status 2")
        return D.torchvision_decoder(data, device)

    dataset = CocoFolder(odd_root, "val2017", SIZE)
    decoder = D.DeviceDecoder(SIZE, "cpu", batch_decoder=no_progressive)
    _assert_rows_are_the_cpu_paths(dataset, _rows_of(dataset, decoder, batch_size=len(dataset)))
    assert decoder.counts.cpu[D.REJECTED] == 1  # the whole progressive file (the cut one never reaches it)
    assert calls[0] > 1 and all(n == 1 for n in calls[1:])


@pytest.mark.parametrize("decoder_kind", ["raises", "wrong_size"])
def test_a_device_decoder_that_fails_every_image_leaves_the_cpu_path(odd_root, decoder_kind):
    def raises(data, device):
        raise RuntimeError("nvjpeg: NVJPEG_STATUS_JPEG_NOT_SUPPORTED")

    def wrong_size(data, device):
        return [torch.zeros((3, 8, 8), dtype=torch.uint8, device=device) for _ in data]

    dataset = CocoFolder(odd_root, "val2017", SIZE)
    decoder = D.DeviceDecoder(SIZE, "cpu", batch_decoder={"raises": raises, "wrong_size": wrong_size}[decoder_kind])
    _assert_rows_are_the_cpu_paths(dataset, _rows_of(dataset, decoder))
    assert decoder.counts.device == 0 and decoder.counts.cpu[D.REJECTED] >= 5


def test_perturbations_are_refused_on_the_device_path(odd_root, tmp_path):
    with pytest.raises(UsageError, match="--decode device cannot apply --transform"):
        extract(settings_for(odd_root, tmp_path / "c", decode="device", transforms=("grayscale",)))
    dataset = CocoFolder(odd_root, "val2017", SIZE)
    dataset.transforms = ("grayscale",)
    with pytest.raises(UsageError, match="perturbations"):
        next(device_batches(dataset, [0], 1, D.DeviceDecoder(SIZE, "cpu"), threads=1))


# --- whole extractions ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_cache(synthetic_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cpu-path") / "cache"
    extract(settings_for(synthetic_root, out, decode="cpu"))
    return out


@pytest.fixture(scope="module")
def device_run(synthetic_root, tmp_path_factory) -> tuple[Path, list[torch.Tensor]]:
    """The device path's cache, and every batch the model was fed (captured at the forward)."""
    out = tmp_path_factory.mktemp("device-path") / "cache"
    fed = []
    forward = extraction_loop.forward_taps

    def spy(model, images, taps, amp):
        fed.append(images.detach().cpu().clone())
        return forward(model, images, taps, amp)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(extraction_loop, "forward_taps", spy)
        extract(settings_for(synthetic_root, out, decode="device"))
    return out, fed


def test_the_device_path_stores_what_the_model_was_fed_and_equals_the_cpu_path(cpu_cache, device_run):
    out, fed = device_run
    device, cpu = arrays(out), arrays(cpu_cache)
    # the first forward is the codec probe of the cache's creation (the first batch, read on the CPU path)
    assert np.array_equal(fed[0].numpy(), device["input"][:len(fed[0])])
    assert np.array_equal(torch.cat(fed[1:]).numpy(), device["input"])  # batches arrive in row order
    for name in cpu:  # the same pixels, the same batches: every tap bit for bit
        assert np.array_equal(device[name], cpu[name]), name
    attrs = Cache.open(out).attrs
    assert attrs["failures"] == Cache.open(cpu_cache).attrs["failures"]
    assert attrs["decode"]["path"] == "device" and attrs["decode"]["images_on_device"] >= 4
    assert attrs["settings"]["decode"] == "device"
    assert Cache.open(cpu_cache).attrs["decode"] == {"path": "cpu", "device": "cpu"}


def test_a_device_decoder_that_rejects_everything_still_gives_the_cpu_paths_cache(synthetic_root, cpu_cache,
                                                                                 tmp_path, monkeypatch):
    def rejects(data, device):
        raise RuntimeError("nvjpeg: NVJPEG_STATUS_BAD_JPEG")

    monkeypatch.setattr(D, "torchvision_decoder", rejects)
    extract(settings_for(synthetic_root, tmp_path / "c", decode="device", layers="input,enc.1,head.logits"))
    device, cpu = arrays(tmp_path / "c"), arrays(cpu_cache)
    for name in device:
        assert np.array_equal(device[name], cpu[name]), name
    record = Cache.open(tmp_path / "c").attrs["decode"]
    assert record["images_on_device"] == 0 and record["images_on_cpu"][D.REJECTED] >= 4


def test_odd_files_from_a_folder_and_from_webdataset_complete_with_the_cpu_paths_rows(odd_root, tmp_path):
    """The command line's ``--decode device`` on the folder, the API's on webdataset shards of it."""
    result = _cli("--split", "val2017", "--coco-root", str(odd_root), "--out", str(tmp_path / "folder"), "--model",
                  "detr-tiny", "--weights", "random:0", "--size", "64x96", "--layers", "input,enc.1",
                  "--num-workers", "1", "--shard-size", "4", "--decode", "device", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "on the CPU path" in result.stderr and "failure(s)" in result.stdout
    coco_to_wds(odd_root, "val2017", tmp_path / "wds", images_per_shard=5)
    pattern = str(tmp_path / "wds" / "coco-val2017-{000000..000002}.tar")
    extract(settings_for(odd_root, tmp_path / "wds-cache", decode="device", layers="input,enc.1", wds=pattern))
    dataset = CocoFolder(odd_root, "val2017", SIZE)
    cpu = [dataset[row] for row in range(len(dataset))]  # the CPU path, image by image
    for name in ("folder", "wds-cache"):
        cache = Cache.open(tmp_path / name)
        assert cache.attrs["decode"]["path"] == "device", name
        got = arrays(tmp_path / name)
        assert np.array_equal(got["input"], np.stack([c["input"].numpy() for c in cpu])), name
        assert got[S.VALID].tolist() == [c["valid"] for c in cpu], name
        assert got[S.ORIG_SIZE].tolist() == [c["orig_size"].tolist() for c in cpu], name
        failures = cache.attrs["failures"]
        assert [f["image_id"] for f in failures] == [c["image_id"] for c in cpu if not c["valid"]], name
        assert all(f["reason"] and "\n" not in f["reason"] for f in failures), name
    assert Cache.open(tmp_path / "folder").attrs["failures"] == [
        {"image_id": c["image_id"], "reason": c["error"]} for c in cpu if not c["valid"]]


# --- the command line -------------------------------------------------------------------------------------------


def test_the_decode_option_defaults_to_the_settings_default():
    from invcache.cli import cli

    options = {p.name: p for p in cli.commands["extract"].params}
    assert options["decode"].default == default(ExtractSettings, "decode") == "auto"
    assert list(options["decode"].type.choices) == ["auto", "cpu", "device"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invcache.cli", "extract", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"})


def test_a_bad_decode_value_exits_2_in_one_line(odd_root, tmp_path):
    result = _cli("--split", "val2017", "--coco-root", str(odd_root), "--out", str(tmp_path / "c"), "--decode", "gpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'gpu' is not one of 'auto', 'cpu', 'device'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
