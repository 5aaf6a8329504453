"""Lossless codecs for the ``input`` tap on photographs at 480×640: ratio, encode and decode CPU-ms per image.

The photographs are the colour samples bundled with scikit-image and matplotlib, saved as JPEGs (quality 90)
and decoded and resized as extraction does, so the pixels carry JPEG's artefacts as COCO's do. Every codec
runs single-threaded on one image at a time (the writer and the reader run one image per thread); each
image must come back bit for bit. The chosen codec is the cache's (``invcache.cache.schema.INPUT_CODEC``).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import imagecodecs
import numpy as np
from numcodecs import Blosc
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import photograph_paths, report, setup  # noqa: E402

from invcache.cache.schema import INPUT_CODEC  # noqa: E402
from invcache.data import parse_size  # noqa: E402

_BLOSC = Blosc(cname="zstd", clevel=1, shuffle=Blosc.BITSHUFFLE)
CODECS = {  # name -> (encode, decode)
    "blosc-zstd-1-bitshuffle": (_BLOSC.encode, lambda data: np.frombuffer(_BLOSC.decode(data), np.uint8)),
    "png-1": (lambda a: imagecodecs.png_encode(a, level=1), imagecodecs.png_decode),
    "qoi": (imagecodecs.qoi_encode, imagecodecs.qoi_decode),
    "webp-lossless-0": (lambda a: imagecodecs.webp_encode(a, lossless=True, method=0), imagecodecs.webp_decode),
    "jpegls": (imagecodecs.jpegls_encode, imagecodecs.jpegls_decode),
    "jpegxl-lossless-1": (lambda a: imagecodecs.jpegxl_encode(a, lossless=True, effort=1, numthreads=1),
                          lambda d: imagecodecs.jpegxl_decode(d, numthreads=1)),
    "jpegxl-lossless-2": (lambda a: imagecodecs.jpegxl_encode(a, lossless=True, effort=2, numthreads=1),
                          lambda d: imagecodecs.jpegxl_decode(d, numthreads=1)),
}
CHOSEN = f"jpegxl-lossless-{INPUT_CODEC.effort}"


def pipeline_images(size: tuple[int, int]) -> list[np.ndarray]:
    """Each photograph as extraction would store it: a JPEG, decoded to RGB and resized to ``size``."""
    images = []
    for path in photograph_paths():
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").save(buffer, "JPEG", quality=90)
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        images.append(np.asarray(image.resize(size[::-1], Image.BILINEAR)))
    return images


def measure(images: list[np.ndarray], encode, decode, repeats: int) -> dict:
    encode_s, decode_s = [], []
    for _ in range(repeats):
        start = time.thread_time()
        encoded = [encode(image) for image in images]
        encode_s.append(time.thread_time() - start)
        start = time.thread_time()
        decoded = [decode(data) for data in encoded]
        decode_s.append(time.thread_time() - start)
    for image, back in zip(images, decoded):
        if not np.array_equal(np.asarray(back).reshape(image.shape), image):
            raise AssertionError("a lossless codec changed the pixels")
    raw, stored = sum(i.nbytes for i in images), sum(len(e) for e in encoded)
    return {"ratio": round(raw / stored, 3), "kb_per_image": round(stored / len(images) / 1e3, 1),
            "encode_cpu_ms": round(min(encode_s) / len(images) * 1e3, 2),
            "decode_cpu_ms": round(min(decode_s) / len(images) * 1e3, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="480x640")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    setup()
    images = pipeline_images(parse_size(args.size))
    table = {name: measure(images, *codecs, repeats=args.repeats) for name, codecs in CODECS.items()}
    chosen = table[CHOSEN]
    report("image_codecs", size=args.size, photographs=len(images), chosen=CHOSEN, ratio=chosen["ratio"],
           chosen_vs_blosc=round(chosen["ratio"] / table["blosc-zstd-1-bitshuffle"]["ratio"], 3), codecs=table)


if __name__ == "__main__":
    main()
