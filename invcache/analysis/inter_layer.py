"""``invcache analyze inter-layer``: how much of the image each encoder and decoder layer still holds (SPEC §5).

Every cached layer goes back to pixels through the inverse chains, over every valid image of the
cache: ``enc.0..enc.L`` through B⁻¹ and through B⁻¹∘E⁻¹ (E⁻¹ trained on enc.L, applied to every
encoder layer, enc.0 included), ``dec.0..dec.L`` through B⁻¹∘E⁻¹∘D⁻¹ (dec.0, DETR's zero queries,
shows what D⁻¹ makes of no information). Per-layer modules trained with ``--from TAP``
(``backbone-inv-from-enc.K``, ``encoder-inv-from-enc.K``, ``decoder-inv-from-dec.K``) found in
the modules folder add a curve of their own beside the shared module's. Per (chain, layer):
per-image MSE in normalized and in [0, 1] pixel space, mean ± 95% CI, next to the mean training
image. Beyond the paper: linear CKA between all cached layers (:mod:`invcache.analysis.cka`).

Writes ``results.json``, ``per_layer.csv``, ``per_image.csv``, ``mse.png`` (curves), ``grid.png``
(the first ``n`` images from every layer) and, with ``cka``, ``cka.png`` and ``cka.csv``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from invcache import taps as T
from invcache.analysis.cka import MIN_BATCH, MinibatchCKA
from invcache.analysis.common import (
    batches,
    evaluation_rows,
    image_errors,
    mean_ci,
    mean_training_image,
    open_evaluation_cache,
    provenance,
    require_modules,
    require_taps,
    write_results,
)
from invcache.analysis.figures import curves, heatmap, image_grid
from invcache.cache.store import Cache
from invcache.chain import STAGE_CHAINS, LoadedModule, invert
from invcache.data.preprocess import unit_images
from invcache.distributed import resolve_device
from invcache.errors import UsageError
from invcache.inverse import make_spec, model_config
from invcache.settings import AnalyzeSettings

NAME = "inter-layer"
SPACES = ("normalized", "pixel")
# The shared chains, named after the stage whose chain they are (first module to last), with their notation.
SHARED = {"backbone": "B⁻¹", "encoder": "B⁻¹∘E⁻¹", "decoder": "B⁻¹∘E⁻¹∘D⁻¹"}
# A per-layer module's curve: its stage's chain with the first module trained on each layer it starts from.
PER_LAYER = {"backbone": "B⁻¹ trained on that layer", "encoder": "B⁻¹∘E⁻¹, E⁻¹ trained on that layer",
             "decoder": "B⁻¹∘E⁻¹∘D⁻¹, D⁻¹ trained on that layer"}
# The chains the grid shows: each layer through its own stage's chain.
GRID_CHAINS = ("encoder", "decoder")
# The head as two CKA layers: a concatenation would be dominated by the 92 logit channels, hiding the 4 box ones.
HEAD_LAYERS = (T.HEAD_LOGITS, T.HEAD_BOXES)


@dataclass(frozen=True)
class Chain:
    """One curve: for each layer it starts from, the module folders (first to last) that take it to pixels."""

    name: str
    label: str
    via: dict[str, tuple[str, ...]]


def run(settings: AnalyzeSettings | None = None, *, cka: bool = True) -> dict:
    """Reconstruct every valid image of the cache from every encoder and decoder layer; returns (and writes) results.

    With ``cka``, also the linear CKA between all cached layers (minibatches of ``settings.batch_size``).
    """
    settings = settings or AnalyzeSettings()
    if cka and settings.batch_size < MIN_BATCH:
        raise UsageError(f"CKA needs minibatches of at least {MIN_BATCH} images (its unbiased HSIC divides by "
                         f"n(n-3)); pass --batch-size {MIN_BATCH} or more, or --no-cka")
    cache = open_evaluation_cache(settings.cache_location())
    rows = evaluation_rows(cache)
    device = resolve_device(settings.device)
    encoder_layers, decoder_layers = layers_of(cache)
    layers = [*encoder_layers, *decoder_layers]
    chains = layer_chains(settings.modules_dir(), encoder_layers, decoder_layers)
    modules = chain_modules(settings.modules_dir(), chains, cache, device)
    # dec.0 is all zeros: its CKA with anything is 0/0, so the CKA layers start at dec.1.
    similarity = MinibatchCKA([*encoder_layers, *decoder_layers[1:], *HEAD_LAYERS]) if cka else None
    taps = [T.INPUT, *layers, *(HEAD_LAYERS if cka else ())]
    require_taps(cache, taps, "the inter-layer analysis")
    baseline = mean_training_image(modules, cache, settings.mean_from).to(device)
    shown = rows[:settings.n]

    per_image, image_ids, grid = reconstruct(cache, rows, taps, chains, modules, baseline, shown, similarity,
                                             settings.batch_size, device)
    # {space: {chain: {layer: mean ± CI}}}: each space is a table of chains × layers (what the report shows).
    mse = {s: {c.name: {t: mean_ci(per_image[column(c.name, t, s)]) for t in c.via} for c in chains} for s in SPACES}
    baseline_mse = {s: mean_ci(per_image[column("baseline", None, s)]) for s in SPACES}
    similarities = cka_record(similarity, settings.batch_size) if similarity is not None else None
    results = {
        "analysis": NAME, "images": int(len(rows)), "layers": layers,
        "chains": {c.name: {"label": c.label, "via": {t: list(via) for t, via in c.via.items()}} for c in chains},
        **{f"mse_{s}": mse[s] for s in SPACES}, "baseline": baseline_mse, "cka": similarities,
        "headline": headline(mse["pixel"], baseline_mse, encoder_layers, decoder_layers, similarities),
        "settings": {"batch_size": settings.batch_size, "n": settings.n, "cka": cka},
        "provenance": provenance(cache, modules),
    }
    tables = {
        "per_layer": per_layer_table(chains, mse, baseline_mse),
        "per_image": [{"image_id": int(i), **{key: float(values[k]) for key, values in per_image.items()}}
                      for k, i in enumerate(image_ids)],
    }
    figures = {
        "mse": curves(layers, {c.label: curve(mse["pixel"][c.name], layers, "mean") for c in chains},
                      cis={c.label: curve(mse["pixel"][c.name], layers, "ci95") for c in chains},
                      title=f"Reconstruction error per layer ({len(rows)} images, 95% CI)",
                      xlabel="layer the chain starts from", ylabel="MSE, [0, 1] pixels",
                      baseline=baseline_mse["pixel"]["mean"]),
        "grid": image_grid(grid, [str(int(i)) for i in cache.image_ids[shown]],
                           title=f"Reconstructions from each layer: enc.k through {SHARED['encoder']}, "
                                 f"dec.k through {SHARED['decoder']}"),
    }
    if similarities is not None:
        names, matrix = similarities["layers"], similarities["matrix"]
        tables["cka"] = [{"layer": a, **{b: float(matrix[i, j]) for j, b in enumerate(names)}}
                         for i, a in enumerate(names)]
        figures["cka"] = heatmap(matrix, names, colorbar_label="linear CKA (unbiased minibatch HSIC)",
                                 title=f"Linear CKA between layers ({similarities['images']} images, "
                                       f"minibatches of {settings.batch_size})")
    write_results(settings.out_dir(NAME), results, tables, figures)
    return results


def reconstruct(cache: Cache, rows: np.ndarray, taps: Sequence[str], chains: Sequence[Chain],
                modules: Mapping[str, LoadedModule], baseline: torch.Tensor, shown: np.ndarray,
                similarity: MinibatchCKA | None, batch_size: int, device: torch.device
                ) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, torch.Tensor]]:
    """One pass over ``rows``: every chain from every layer it starts from, the baseline, and the CKA minibatches.

    Returns the per-image errors by :func:`column`, the image ids in row order, and the grid's
    columns (the originals of the ``shown`` rows, then each layer through its own stage's chain).
    """
    errors: dict[str, list[np.ndarray]] = {column(c.name, t, s): [] for c in chains for t in c.via for s in SPACES}
    errors.update({column("baseline", None, s): [] for s in SPACES})
    grid: dict[str, list[torch.Tensor]] = {"original": []}
    image_ids = []
    with torch.no_grad():
        for batch_rows, batch in batches(cache, taps, rows, batch_size, device):
            original = batch[T.INPUT]
            image_ids.append(cache.image_ids[batch_rows])
            keep = torch.from_numpy(np.isin(batch_rows, shown))
            if keep.any():
                grid["original"].append(unit_images(original[keep]).cpu())
            add_errors(errors, "baseline", None, baseline.expand(len(original), -1, -1, -1), original)
            for chain in chains:
                for tap, via in chain.via.items():
                    images = invert(modules, {tap: batch[tap]}, via=via)
                    add_errors(errors, chain.name, tap, images, original)
                    if chain.name in GRID_CHAINS and keep.any():
                        grid.setdefault(tap, []).append(images[keep.to(images.device)].cpu())
            if similarity is not None:
                similarity.update({layer: batch[layer] for layer in similarity.layers})
    return ({key: np.concatenate(values) for key, values in errors.items()}, np.concatenate(image_ids),
            {name: torch.cat(parts) for name, parts in grid.items()})


def layers_of(cache: Cache) -> tuple[list[str], list[str]]:
    """``enc.0..enc.L`` and ``dec.0..dec.L`` of the cache's model."""
    config = model_config(cache.attrs)
    return ([T.enc(k) for k in range(config.num_encoder_layers + 1)],
            [T.dec(k) for k in range(config.num_decoder_layers + 1)])


def layer_chains(modules_dir: str | os.PathLike, encoder_layers: Sequence[str],
                 decoder_layers: Sequence[str]) -> list[Chain]:
    """The shared chains over their layers, then one chain per kind of per-layer module that was trained.

    A per-layer module replaces the first module of its stage's chain: ``backbone-inv-from-enc.K``
    is B⁻¹_K alone, ``encoder-inv-from-enc.K`` is followed by B⁻¹, ``decoder-inv-from-dec.K`` by E⁻¹
    and B⁻¹. A folder counts once its ``best`` checkpoint exists (one being trained is left out).
    """
    starts = {"backbone": encoder_layers, "encoder": encoder_layers, "decoder": decoder_layers}
    chains = [Chain(stage, label, {t: STAGE_CHAINS[stage] for t in starts[stage]}) for stage, label in SHARED.items()]
    for stage, label in PER_LAYER.items():
        first, *rest = STAGE_CHAINS[stage]
        via = {t: (f"{first}-from-{t}", *rest) for t in starts[stage]
               if (Path(modules_dir) / f"{first}-from-{t}" / "best.json").is_file()}
        if via:
            chains.append(Chain(f"{stage}-per-layer", label, via))
    return chains


def chain_modules(modules_dir: str | os.PathLike, chains: Sequence[Chain], cache: Cache,
                  device: torch.device) -> dict[str, LoadedModule]:
    """Every module folder the chains name, paired with the cache; each must read the tap its folder name says."""
    names = sorted({name for chain in chains for via in chain.via.values() for name in via})
    modules = require_modules(modules_dir, names, cache, device)
    for folder, loaded in modules.items():
        name, _, from_tap = folder.partition("-from-")
        expected = make_spec(name, cache.attrs, from_tap=from_tap or None).inputs
        if loaded.spec.inputs != expected:
            raise UsageError(f"module {loaded.directory} reads {', '.join(loaded.spec.inputs)}, but its place in "
                             f"a chain reads {', '.join(expected)}")
    return modules


def column(chain: str, tap: str | None, space: str) -> str:
    """The per-image CSV column of one (chain, layer) in one space: ``encoder:enc.3:pixel``, ``baseline:pixel``."""
    return ":".join(part for part in (chain, tap, space) if part)


def curve(points: Mapping[str, dict], layers: Sequence[str], key: str) -> list[float]:
    """A chain's ``mean`` (or ``ci95``) at each layer, NaN (a gap) where it does not start."""
    return [points[t][key] if t in points else np.nan for t in layers]


def add_errors(errors: dict[str, list[np.ndarray]], chain: str, tap: str | None, images: torch.Tensor,
               original: torch.Tensor) -> None:
    for space, values in image_errors(images, original).items():
        errors[column(chain, tap, space)].append(values)


def per_layer_table(chains: Sequence[Chain], mse: Mapping[str, dict], baseline: Mapping[str, dict]) -> list[dict]:
    """One row per (chain, layer), then the baseline (layer empty): mean and CI half-width in both spaces, n."""
    def row(chain: str, via: str, layer: str, figures: Mapping[str, dict]) -> dict:
        return {"chain": chain, "via": via, "layer": layer,
                **{f"{s}_{k}": figures[s][k] for s in SPACES for k in ("mean", "ci95")}, "n": figures["pixel"]["n"]}

    table = [row(c.name, " -> ".join(via), t, {s: mse[s][c.name][t] for s in SPACES})
             for c in chains for t, via in c.via.items()]
    return [*table, row("baseline", "mean training image", "", baseline)]


def cka_record(similarity: MinibatchCKA, minibatch_size: int) -> dict:
    """The CKA matrix with its layer order and how it was estimated."""
    return {"layers": similarity.layers, "matrix": similarity.matrix(),
            "estimator": "unbiased minibatch HSIC (Nguyen, Raghu & Kornblith 2021)",
            "representation": "each image's tap flattened to one vector (tokens × channels), float64",
            "minibatch_size": minibatch_size, "minibatches": similarity.batches, "images": similarity.examples,
            "dropped_images": similarity.dropped}


def headline(pixel: Mapping[str, dict], baseline: Mapping[str, dict], encoder_layers: Sequence[str],
             decoder_layers: Sequence[str], similarities: Mapping | None) -> dict:
    """A few key numbers: pixel MSE from the first and last encoder layer and the last decoder layer, the
    baseline, and (with CKA) how alike the encoder's input, its output and the decoder's output are."""
    first, last, dec_last = encoder_layers[0], encoder_layers[-1], decoder_layers[-1]

    def mse(chain: str, tap: str) -> float:
        return pixel[chain][tap]["mean"]

    numbers = {
        f"{first} through {SHARED['encoder']}: MSE, [0,1] pixels": mse("encoder", first),
        f"{last} through {SHARED['backbone']}: MSE, [0,1] pixels": mse("backbone", last),
        f"{last} through {SHARED['encoder']}: MSE, [0,1] pixels": mse("encoder", last),
        f"{dec_last} through {SHARED['decoder']}: MSE, [0,1] pixels": mse("decoder", dec_last),
        "mean image (baseline): MSE, [0,1] pixels": baseline["pixel"]["mean"],
    }
    if similarities is not None:
        index, matrix = similarities["layers"].index, similarities["matrix"]
        numbers[f"CKA {first} vs {last}"] = float(matrix[index(first), index(last)])
        numbers[f"CKA {last} vs {dec_last}"] = float(matrix[index(last), index(dec_last)])
    return numbers
