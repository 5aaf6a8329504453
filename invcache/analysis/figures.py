"""Figure helpers shared by the analyses: bars with confidence intervals, grouped bars, curves, heatmaps, image
grids.

Figures are plain ``matplotlib.figure.Figure`` objects (no pyplot, so no global state and no
display needed); :func:`invcache.analysis.common.write_results` saves them as PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure


def bars_with_ci(labels: Sequence[str], means: Sequence[float], cis: Sequence[float], *, title: str,
                 ylabel: str, baseline: float | None = None, baseline_label: str = "mean image") -> Figure:
    """One bar per label with its 95% CI as error bars; the baseline as a dashed line."""
    figure = Figure(figsize=(1.3 * len(labels) + 2.5, 3.6))
    ax = figure.subplots()
    positions = np.arange(len(labels))
    ax.bar(positions, means, yerr=np.nan_to_num(cis), capsize=4, color="#4c72b0")
    if baseline is not None:
        ax.axhline(baseline, color="#c44e52", linestyle="--", label=baseline_label)
        ax.legend(loc="upper left", frameon=False)
    ax.set_xticks(positions, labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.spines[["top", "right"]].set_visible(False)
    return figure


def grouped_bars(groups: Sequence[str], series: Mapping[str, Sequence[float | None]], *, title: str,
                 ylabel: str) -> Figure:
    """One group of bars per entry of ``groups``, one bar per series in each (None: no bar)."""
    figure = Figure(figsize=(max(5.0, 0.35 * len(groups) * len(series) + 2.5), 3.6))
    ax = figure.subplots()
    width = 0.8 / max(1, len(series))
    positions = np.arange(len(groups))
    for k, (label, values) in enumerate(series.items()):
        heights = [np.nan if v is None else v for v in values]
        ax.bar(positions + (k - (len(series) - 1) / 2) * width, heights, width, label=label)
    ax.set_xticks(positions, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(frameon=False, fontsize="small", ncol=min(len(series), 6))
    ax.spines[["top", "right"]].set_visible(False)
    return figure


def curves(x_labels: Sequence[str], series: Mapping[str, Sequence[float]], *, title: str, ylabel: str,
           xlabel: str, baseline: float | None = None, cis: Mapping[str, Sequence[float]] | None = None) -> Figure:
    """One line per series over categorical x positions (NaN points are gaps), optional CI error bars and baseline."""
    figure = Figure(figsize=(max(5.0, 0.55 * len(x_labels) + 2.5), 3.8))
    ax = figure.subplots()
    positions = np.arange(len(x_labels))
    for label, values in series.items():
        values = np.asarray(values, dtype=float)
        # error bars, not bands: a series with a single point (a per-layer module) shows its CI too
        half = np.nan_to_num(np.asarray(cis[label], dtype=float)) if cis and label in cis else None
        ax.errorbar(positions, values, yerr=half, marker="o", capsize=3, label=label)
    if baseline is not None:
        ax.axhline(baseline, color="#c44e52", linestyle="--", label="mean image")
    ax.set_xticks(positions, x_labels, rotation=45 if len(x_labels) > 8 else 0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(frameon=False, fontsize="small")
    ax.spines[["top", "right"]].set_visible(False)
    return figure


def heatmap(matrix: np.ndarray, labels: Sequence[str], *, title: str, colorbar_label: str,
            vmin: float = 0.0, vmax: float = 1.0) -> Figure:
    """A square matrix with its labels on both axes and each value written in its cell."""
    size = max(4.0, 0.45 * len(labels) + 2.0)
    figure = Figure(figsize=(size + 1.0, size))
    ax = figure.subplots()
    image = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap="viridis")
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    if len(labels) <= 20:
        for i in range(len(labels)):
            for j in range(len(labels)):
                value = matrix[i, j]
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if value < (vmin + vmax) / 2 else "black")
    figure.colorbar(image, ax=ax, label=colorbar_label)
    ax.set_title(title)
    return figure


def image_grid(columns: Mapping[str, torch.Tensor], row_labels: Sequence[str], *, title: str) -> Figure:
    """Rows = images, columns = named (B, 3, H, W) batches in [0, 1] (e.g. original, then each reconstruction).

    The tiles are laid into one array and drawn as one image (one axes instead of one per
    tile: matplotlib's per-axes cost made the grid the slowest part of an analysis).
    """
    names = list(columns)
    rows = len(row_labels)
    height, width = next(iter(columns.values())).shape[2:]
    gap = max(2, height // 32)
    canvas = np.ones((rows * (height + gap) - gap, len(names) * (width + gap) - gap, 3))
    for c, name in enumerate(names):
        images = columns[name].detach().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        for r in range(rows):
            top, left = r * (height + gap), c * (width + gap)
            canvas[top:top + height, left:left + width] = images[r]
    # a tile at most its native size at the saved 110 dpi (no upsampling: smaller files, same detail), ≤ 1.6 in
    tile = min(1.6, max(0.9, height / 110))
    figure = Figure(figsize=(tile * len(names) * width / height + 0.8, tile * rows + 0.7))
    ax = figure.subplots()
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks([c * (width + gap) + width / 2 for c in range(len(names))], names, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([r * (height + gap) + height / 2 for r in range(rows)], row_labels, fontsize=7)
    ax.tick_params(length=0)
    ax.spines[:].set_visible(False)
    ax.set_title(title, fontsize=10, pad=18)
    return figure
