"""What the perturbation analyses share: caches of perturbed images made like an evaluation cache, reconstructions
of every stage batch by batch, and colour statistics of images.

A perturbed cache is an ordinary cache (SPEC §5): the evaluation cache's extraction again, with
the same model, weights, size and images, plus ``--transform``. It lives beside the evaluation
cache (:func:`invcache.workspace.derived_cache`) and holds only the taps the analysis reads. It is
made by :func:`invcache.extract`, so a rerun resumes it and a complete one costs no DETR forward;
a cache there made with other settings is refused by extract's own resume check, naming the
difference.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from invcache.analysis.common import batches, recorded_weights
from invcache.cache.store import Cache
from invcache.chain import STAGE_CHAINS, LoadedModule, invert
from invcache.data.preprocess import unit_images
from invcache.data.transforms import rgb_to_hsv
from invcache.errors import InvcacheError, UsageError
from invcache.extraction import extract
from invcache.models import get_config
from invcache.settings import AnalyzeSettings, ExtractSettings
from invcache.taps import DECODER_INPUT, HEAD_BOXES, HEAD_LOGITS, INPUT
from invcache.workspace import derived_cache

# Hasler & Süsstrunk (2003): M = σ_rgyb + 0.3 · μ_rgyb on 0–255 RGB.
COLOURFULNESS_MEAN_WEIGHT = 0.3
HUE_BINS = 12  # 30° each, centred on red (0°), …, so red, green and blue each own a bin


def chain_taps(modules: Mapping[str, LoadedModule], stages: Sequence[str]) -> list[str]:
    """The taps a perturbed cache needs: ``input``, what the first module of each stage's chain reads, the heads."""
    read = {t for stage in stages for t in modules[STAGE_CHAINS[stage][0]].spec.inputs}
    return sorted({INPUT, HEAD_LOGITS, HEAD_BOXES, *read} - {DECODER_INPUT})


def perturbed_cache(cache: Cache, transforms: Sequence[str], label: str, image_ids: Sequence[int],
                    taps: Sequence[str], settings: AnalyzeSettings) -> Cache:
    """The cache of ``image_ids`` of ``cache``'s split under ``transforms``, made (or resumed, or reused) now.

    A complete cache there of these images and perturbation that holds at least ``taps`` is reused
    as it is (an analysis run with fewer stages needs a subset of its taps). The perturbation of a
    ``cache`` that is itself perturbed comes first, so its images stay what they are.
    """
    location = str(derived_cache(cache.location, label))
    chained = tuple(r["text"] for r in cache.attrs.get("perturbation") or []) + tuple(transforms)
    ids = tuple(int(i) for i in image_ids)
    if Cache.exists(location):
        existing = Cache.open(location)
        texts = tuple(r.get("text") for r in existing.attrs.get("perturbation") or [])
        if (texts == chained and set(taps) <= set(existing.taps) and existing.complete_shards().all()
                and np.array_equal(existing.image_ids, ids)):
            return existing
    try:
        extract(like(cache, transforms=chained, ids=ids, layers=",".join(taps), out=location, settings=settings))
    except InvcacheError as exc:
        if "made with other settings" not in str(exc):
            raise
        # a cache an earlier analysis made for other images or taps: it is derived data, the user decides
        raise UsageError(f"{location} was made for another run of this analysis (other images, taps or "
                         f"perturbation); remove that folder and run the analysis again ({exc})") from None
    return Cache.open(location)


def check_layers(cache: Cache, layers: Sequence[str] | None, needed: Sequence[str]) -> list[str]:
    """The taps a perturbed cache is made with: ``layers`` (names or globs), which must include ``needed``."""
    if not layers:
        return list(needed)
    config = get_config(cache.attrs["model"]["model"])
    chosen = config.select_taps(",".join(layers))
    missing = [t for t in needed if t not in chosen]
    if missing:
        raise UsageError(f"--layers {','.join(layers)} leaves out {', '.join(missing)}, which the analysis reads; "
                         "add them (or leave --layers out)")
    return chosen


def like(cache: Cache, *, transforms: tuple[str, ...], ids: tuple[int, ...], layers: str, out: str,
         settings: AnalyzeSettings) -> ExtractSettings:
    """Extraction settings that repeat ``cache``'s (source, model, weights, size, shards, codec) with ``transforms``.

    The source comes from the cache's provenance: the COCO folder it recorded, the synthetic
    dataset in its workspace, or its webdataset shards. A cache whose source is not there any
    more cannot be perturbed, and extract says which folder or shard is missing.
    """
    attrs = cache.attrs
    source, model = attrs.get("source") or {}, attrs.get("model") or {}
    recorded = attrs.get("settings") or {}
    if source.get("kind") == "wds":
        where = {"wds": source["urls"]}
    elif source.get("kind") == "synthetic":
        # the generated dataset is <workspace>/synthetic-coco (invcache.workspace)
        where = {"source": "synthetic", "workspace": Path(source["root"]).parent,
                 "synthetic_images": recorded.get("synthetic_images")}
    elif source.get("kind") == "coco":
        if not Path(source["root"]).is_dir():  # extract's own message would suggest options analyze does not take
            raise UsageError(f"the COCO folder {source['root']} that {cache.location} was extracted from is not there "
                             "any more; perturbing means extracting its images again: put the folder back, or extract "
                             "the evaluation cache again from where it is now")
        where = {"source": "coco", "coco_root": source["root"]}
    else:
        raise UsageError(f"the cache {cache.location} records no source it can be extracted again from")
    return ExtractSettings(
        split=source["split"], layers=layers, out=out, model=model["model"], weights=recorded_weights(cache),
        size=tuple(attrs["preprocessing"]["size"]), batch_size=settings.batch_size,
        num_workers=min(2, int(recorded.get("num_workers", 0) or 0)), device=settings.device,
        amp=recorded.get("amp"), shard_size=int(attrs["shard_size"]),
        keepbits=(attrs.get("codec") or {}).get("keepbits"), transforms=transforms, ids=ids, **where,
    )


def aligned_rows(*caches: Cache) -> np.ndarray:
    """Rows valid in every one of ``caches``, which hold the same image ids (perturbed caches of one selection)."""
    first = caches[0]
    for other in caches[1:]:
        if not np.array_equal(other.image_ids, first.image_ids):
            raise UsageError(f"{other.location} and {first.location} hold other images; remove {other.location} "
                             "and run the analysis again")
    valid = np.logical_and.reduce([c.valid for c in caches])
    rows = np.flatnonzero(valid)
    if not len(rows):
        raise UsageError(f"no image is valid in all of {', '.join(c.location for c in caches)}; nothing to analyze")
    return rows


def reconstructions(cache: Cache, modules: Mapping[str, LoadedModule], stages: Sequence[str], rows: np.ndarray,
                    batch_size: int, device: torch.device) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """(rows, {``input``: the cached images in [0, 1], stage: its chain's reconstruction, unclipped}) per batch,
    each (B, 3, H, W)."""
    taps = chain_taps(modules, stages)
    # invert() runs without autograd itself: a `with torch.no_grad()` around this generator's yields
    # would leak into its caller, and reset the caller's grad mode whenever an unfinished generator is collected
    for batch_rows, batch in batches(cache, taps, rows, batch_size, device):
        images = {INPUT: unit_images(batch[INPUT])}
        for stage in stages:
            first = modules[STAGE_CHAINS[stage][0]].spec.inputs
            images[stage] = invert(modules, {t: batch[t] for t in first}, via=STAGE_CHAINS[stage])
        yield batch_rows, images


def colourfulness(images: torch.Tensor, mask: torch.Tensor | None = None) -> np.ndarray:
    """Hasler & Süsstrunk's colourfulness of each image (B, 3, H, W) in [0, 1], over the pixels of ``mask`` (B, H, W).

    On the 0–255 scale: rg = R − G, yb = (R + G)/2 − B, M = √(σ_rg² + σ_yb²) + 0.3 √(μ_rg² + μ_yb²)
    (population statistics). 0 for a gray image; about 100 for a saturated one. NaN where the mask is empty.
    """
    rgb = images.double().clamp(0, 1) * 255.0  # a reconstruction may leave [0, 1]; a display would clip it
    rg = rgb[:, 0] - rgb[:, 1]
    yb = (rgb[:, 0] + rgb[:, 1]) / 2 - rgb[:, 2]
    weight = torch.ones_like(rg) if mask is None else mask.to(rg.device, torch.float64)
    count = weight.sum(dim=(1, 2))

    def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = (x * weight).sum(dim=(1, 2)) / count
        variance = (((x - mean[:, None, None]) ** 2) * weight).sum(dim=(1, 2)) / count
        return mean, variance

    (mean_rg, var_rg), (mean_yb, var_yb) = moments(rg), moments(yb)
    value = torch.sqrt(var_rg + var_yb) + COLOURFULNESS_MEAN_WEIGHT * torch.sqrt(mean_rg ** 2 + mean_yb ** 2)
    return value.cpu().numpy()


def hue_counts(images: torch.Tensor, mask: torch.Tensor, bins: int = HUE_BINS) -> np.ndarray:
    """Saturation-weighted hue counts (bins,) of the ``mask`` pixels of ``images`` (B, 3, H, W) in [0, 1].

    Bins are centred on 0°, 360°/bins, …; a pixel counts by its saturation, so gray pixels,
    whose hue means nothing, do not count. Sum the counts of all batches, then normalize.
    """
    rgb = images.clamp(0, 1).permute(0, 2, 3, 1).double().cpu().numpy()[mask.cpu().numpy().astype(bool)]
    hue, saturation, _ = rgb_to_hsv(rgb)
    index = np.floor(hue * bins + 0.5).astype(np.int64) % bins
    return np.bincount(index, weights=saturation, minlength=bins)


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> np.ndarray:
    """Per-image MSE of (B, 3, H, W) images over all pixels, or over the pixels of ``mask`` (B, H, W); NaN if empty."""
    squared = ((a.double() - b.double().to(a.device)) ** 2).mean(dim=1)
    if mask is None:
        return squared.mean(dim=(1, 2)).cpu().numpy()
    weight = mask.to(squared.device, torch.float64)
    return ((squared * weight).sum(dim=(1, 2)) / weight.sum(dim=(1, 2))).cpu().numpy()
