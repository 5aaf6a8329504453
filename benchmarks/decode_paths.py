"""The two decode paths on photographs: how far apart their pixels are, and how fast each decodes and resizes.

The bundled photographs (``common.photograph_paths``: scikit-image's and matplotlib's samples)
are saved as baseline JPEGs (quality 90, as COCO's files are JPEGs) and each is decoded and
resized to ``--size`` by

- the CPU path: what a DataLoader worker does for one image (``CocoFolder[i]``: PIL decode,
  PIL bilinear resize), one image after the other on one core;
- the device path: ``DeviceDecoder`` on ``--device`` (default: CUDA if there is one, else the
  CPU), all images in one batch (torchvision's ``decode_jpeg``, nvjpeg on CUDA, then Pillow's
  resize re-implemented in torch; torch runs on one thread). File reading is left out of both
  timings.

``max_abs_diff`` and ``mean_abs_diff`` compare the two paths' uint8 images over every pixel
and channel. On the CPU both decode with libjpeg-turbo, so they should be 0; on a GPU the
difference is nvjpeg's decoding. ``interpolate_*`` compares, on the same decoded pixels, PIL's
resize with ``torch.nn.functional.interpolate(antialias=True)``, the resize not used (why the
device path re-implements PIL's). ``ratio``: device path images/s over the CPU path's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import photograph_paths, photograph_split, report, setup  # noqa: E402

from invcache.data import parse_size  # noqa: E402
from invcache.data.coco import CocoFolder  # noqa: E402
from invcache.data.device_decode import DeviceDecoder  # noqa: E402
from invcache.data.preprocess import decode_image, resize_uint8  # noqa: E402


def _best(repeats: int, fn, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="480x640")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    setup(threads=1)  # the CPU path decodes an image on one core: so does the device path when it is the CPU
    size, device = parse_size(args.size), torch.device(args.device)
    images = len(photograph_paths())

    with tempfile.TemporaryDirectory() as tmp:
        photograph_split(tmp, images, quality=args.quality)
        dataset = CocoFolder(tmp, "val2017", size)
        encoded = [dataset.encoded(i) for i in range(images)]
        cpu = [dataset[i] for i in range(images)]
        decoder = DeviceDecoder(size, device)

        def device_path() -> dict:
            return decoder.batch([decoder.prepare(e) for e in encoded])

        on_device = device_path()["input"].cpu()  # also warms up the decoder (nvjpeg's handle, buffers)
        cpu_seconds = _best(args.repeats, lambda: [dataset[i] for i in range(images)], torch.device("cpu"))
        device_seconds = _best(args.repeats, device_path, device)
        decoded = [decode_image(dataset.image_file(dataset.coco.imgs[i])) for i in dataset.image_ids]

    cpu_pixels = torch.stack([c["input"] for c in cpu])
    diff = (on_device.to(torch.int16) - cpu_pixels.to(torch.int16)).abs()
    interpolate = []
    for image in decoded:  # the resize alone, on the same decoded pixels
        pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None].float()
        resized = torch.nn.functional.interpolate(pixels, size=size, mode="bilinear", antialias=True,
                                                  align_corners=False)
        ours = resized.round().clamp(0, 255).to(torch.int16)[0].permute(1, 2, 0)
        interpolate.append((ours - torch.from_numpy(resize_uint8(image, size)).to(torch.int16)).abs())
    interpolate_diff = torch.stack(interpolate)
    cpu_rate, device_rate = images / cpu_seconds, images / device_seconds
    report(
        "decode_paths", size=list(size), images=images, device=str(device),
        decoder="nvjpeg" if device.type == "cuda" else "libjpeg-turbo (torchvision, CPU)",
        decoded_on_device=decoder.counts.device // (args.repeats + 1),
        max_abs_diff=int(diff.max()), mean_abs_diff=round(float(diff.float().mean()), 4),
        identical_images=int(sum(bool((d == 0).all()) for d in diff)),
        interpolate_max_abs_diff=int(interpolate_diff.max()),
        interpolate_mean_abs_diff=round(float(interpolate_diff.float().mean()), 4),
        cpu_path_images_s=round(cpu_rate, 1), device_path_images_s=round(device_rate, 1),
        ratio=round(device_rate / cpu_rate, 3),
    )


if __name__ == "__main__":
    main()
