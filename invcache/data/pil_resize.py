"""PIL's antialiased bilinear resize of uint8 images, bit for bit, in torch on any device.

The CPU path resizes with ``PIL.Image.resize(..., BILINEAR)`` (``preprocess.resize_uint8``).
The device path must give the very same pixels from the same decoded image, so this is
Pillow's algorithm (``libImaging/Resample.c``) rather than ``torch.nn.functional.interpolate``,
whose antialiased bilinear differs from PIL by one level on ~15% of the pixel values of
photographs resized to 480×640 (``benchmarks/decode_paths.py``):

- per output position, a triangle filter stretched by the scale factor when reducing;
  coefficients normalised in float64, then rounded to integers of 22 fractional bits;
- two separable passes, each summing in integers, rounding (+2^21, >>22) and clipping to
  uint8 before the next; a pass is skipped where that side keeps its size.

Which pass runs first depends on the Pillow version: horizontal always before Pillow 13; from
13 on (python-pillow/Pillow#9549) vertical first when the height shrinks by more than twice as
many pixels as the width, ``H - h > 2 (W - w)`` (the rule as measured against Pillow 13.0 on
random sizes). :func:`vertical_first` probes the installed Pillow once, so the device path
follows whichever it is. Integer arithmetic makes the result independent of the
device: sums stay below 2^31 (255 × 2^22 plus rounding) because bilinear weights are never
negative.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2  # Pillow's: 8 bits of result, 2 for overflow of filters with negative lobes
_HALF = 1 << (PRECISION_BITS - 1)


def bilinear_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for the bilinear filter.

    Returns (indices, weights), each (out_size, K): the input positions each output reads and
    their integer weights (positions past an output's support get weight 0 and a valid index).
    The float64 operations are Pillow's, in its order, so the rounded weights are its weights.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear filter's support is 1
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    # C's (int) truncates toward zero; both bounds are then clamped to the image
    first = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    taps = np.arange(ksize)
    x = ((taps[None, :] + first[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale)
    weights = np.where(np.abs(x) < 1.0, 1.0 - np.abs(x), 0.0)
    weights[taps[None, :] >= count[:, None]] = 0.0
    total = np.zeros(out_size)
    for k in range(ksize):  # summed in Pillow's order: float addition is not associative
        total += weights[:, k]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    fixed = np.trunc(0.5 + weights * (1 << PRECISION_BITS)).astype(np.int32)  # weights are >= 0
    indices = np.minimum(first[:, None] + taps[None, :], in_size - 1)
    return indices, fixed


@functools.lru_cache(maxsize=256)
def _coefficients_on(in_size: int, out_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    # images of a split share a few sizes, so each pair is computed and uploaded once
    indices, weights = bilinear_coefficients(in_size, out_size)
    return torch.from_numpy(indices).to(device), torch.from_numpy(weights).to(device)


def _resample(images: torch.Tensor, dim: int, out_size: int) -> torch.Tensor:
    """One pass along ``dim`` (-1: width, -2: height) of uint8 (..., H, W) images."""
    indices, weights = _coefficients_on(images.shape[dim], out_size, str(images.device))
    shape = [1] * images.dim()
    shape[dim] = out_size
    out_shape = list(images.shape)
    out_shape[dim] = out_size
    total = torch.full(out_shape, _HALF, dtype=torch.int32, device=images.device)
    # one filter tap at a time, accumulated in place: a gather of all K taps at once would
    # materialise K copies of the output
    for k in range(indices.shape[1]):
        total.addcmul_(images.index_select(dim, indices[:, k]), weights[:, k].reshape(shape))
    return (total >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def resize_like_pil(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (N, C, H, W) on any device -> (N, C, h, w), equal to PIL's BILINEAR resize of each image."""
    (height, width), (h, w) = images.shape[-2:], size
    if (height, width) == (h, w):
        return images
    if vertical_first(height, width, h, w):
        out = _resample(images, -2, h) if h != height else images
        return _resample(out, -1, w) if w != width else out
    out = _resample(images, -1, w) if w != width else images
    return _resample(out, -2, h) if h != height else out


def vertical_first(height: int, width: int, h: int, w: int) -> bool:
    """Whether the installed Pillow resizes (height, width) -> (h, w) with the vertical pass first."""
    return _pillow_shrinks_height_first() and height > h and height - h > 2 * (width - w)


@functools.lru_cache(maxsize=1)
def _pillow_shrinks_height_first() -> bool:
    """Probe the installed Pillow with a size whose two pass orders give different pixels."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (241, 300, 3), dtype=np.uint8)
    (h, w) = (40, 200)  # 201 rows dropped > 2 × 100 columns: vertical first from Pillow 13 on
    expected = torch.from_numpy(np.array(Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR)))
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    vertical = _resample(_resample(image, -2, h), -1, w)[0].permute(1, 2, 0)
    return bool(torch.equal(vertical, expected))
