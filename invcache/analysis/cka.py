"""Linear CKA with the unbiased minibatch HSIC estimator, streamed over a whole cache.

Centered kernel alignment compares two representations of the same examples through their
Gram matrices K = X Xᵀ and L = Y Yᵀ (one row per example): CKA = HSIC(K, L) / √(HSIC(K, K) · HSIC(L, L)).
It is invariant to orthogonal transforms and isotropic scaling of either representation.

HSIC₁ is the unbiased estimator of Song et al. (2012), for n > 3 examples, with K̃, L̃ the Grams
with their diagonals set to zero::

    HSIC₁(K, L) = [tr(K̃ L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((n-1)(n-2)) - 2/(n-2) · 1ᵀK̃ L̃1] / (n(n-3))

Nguyen, Raghu & Kornblith (2021, "Do Wide and Deep Networks Learn the Same Things?", appendix)
average it over minibatches, so memory stays bounded however many examples there are::

    CKA_minibatch = mean_i HSIC₁(K_i, L_i) / √(mean_i HSIC₁(K_i, K_i) · mean_i HSIC₁(L_i, L_i))

Because each HSIC₁ is unbiased, the mean over minibatches does not depend on the minibatch size
in expectation (the biased estimator's would). Everything is computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

# HSIC₁ divides by n(n-3) and (n-1)(n-2): a minibatch needs at least 4 examples.
MIN_BATCH = 4


def gram(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The linear Gram matrix (n, n) of n examples, each flattened to one float64 vector."""
    x = torch.as_tensor(x)
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    return flat @ flat.T


def hsic1(K: torch.Tensor | np.ndarray, L: torch.Tensor | np.ndarray) -> float:
    """The unbiased HSIC estimator of Song et al. (2012) from two (n, n) Gram matrices, n ≥ 4."""
    K, L = (_zero_diagonal(torch.as_tensor(m, dtype=torch.float64)) for m in (K, L))
    n = _examples(K)
    ones = torch.ones(n, dtype=torch.float64, device=K.device)
    value = (torch.trace(K @ L) + K.sum() * L.sum() / ((n - 1) * (n - 2))
             - 2.0 / (n - 2) * (ones @ K @ L @ ones)) / (n * (n - 3))
    return float(value)


def hsic1_pairs(grams: torch.Tensor) -> torch.Tensor:
    """HSIC₁ of every pair of M representations at once: (M, n, n) symmetric Grams -> (M, M).

    The same formula as :func:`hsic1`, with tr(K̃ L̃) = Σ K̃ ∘ L̃ (symmetric Grams) and
    1ᵀK̃ L̃1 = (K̃1)·(L̃1), so one minibatch costs M² n² rather than M² n³.
    """
    grams = _zero_diagonal(grams.to(torch.float64))
    n = _examples(grams[0])
    flat = grams.reshape(len(grams), -1)
    rows = grams.sum(dim=2)
    totals = rows.sum(dim=1)
    return (flat @ flat.T + torch.outer(totals, totals) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (rows @ rows.T)) / (n * (n - 3))


def linear_cka_full(X: torch.Tensor | np.ndarray, Y: torch.Tensor | np.ndarray) -> float:
    """Linear CKA of two representations of the same n ≥ 4 examples, from one batch (no minibatches)."""
    K, L = gram(X), gram(Y)
    return hsic1(K, L) / math.sqrt(hsic1(K, K) * hsic1(L, L))


class MinibatchCKA:
    """Streams minibatches of several representations; :meth:`matrix` is the CKA of every pair.

    Each :meth:`update` adds the HSIC₁ of every pair on one minibatch (its Gram matrices are
    computed on the device the tensors are on), so memory is M² sums however long the stream.
    A minibatch of fewer than :data:`MIN_BATCH` examples cannot be estimated on: it is dropped
    and counted in ``dropped``.
    """

    def __init__(self, layers: Sequence[str]) -> None:
        self.layers = list(layers)
        self.sums = torch.zeros(len(self.layers), len(self.layers), dtype=torch.float64)
        self.batches = 0
        self.examples = 0
        self.dropped = 0

    def update(self, batch: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        """Add one minibatch: ``batch[layer]`` holds the same n examples for every layer, first dimension n."""
        n = len(batch[self.layers[0]])
        if n < MIN_BATCH:
            self.dropped += n
            return
        grams = torch.stack([gram(batch[layer]) for layer in self.layers])
        self.sums += hsic1_pairs(grams).cpu()
        self.batches += 1
        self.examples += n

    def matrix(self) -> np.ndarray:
        """(M, M) CKA between the layers, in their order; NaN everywhere before any minibatch was kept."""
        if not self.batches:
            return np.full((len(self.layers),) * 2, np.nan)
        # The mean over minibatches: dividing by their count cancels in the ratio but keeps sums readable.
        mean = (self.sums / self.batches).numpy()
        # A self-HSIC₁ ≤ 0 (a constant layer, or noise on very few examples) leaves CKA undefined: NaN.
        with np.errstate(invalid="ignore", divide="ignore"):
            return mean / np.sqrt(np.outer(np.diag(mean), np.diag(mean)))


def _zero_diagonal(grams: torch.Tensor) -> torch.Tensor:
    """K̃: the Gram(s) with their diagonals zeroed (the last two dimensions)."""
    return grams * (1 - torch.eye(grams.shape[-1], dtype=grams.dtype, device=grams.device))


def _examples(K: torch.Tensor) -> int:
    n = K.shape[-1]
    if n < MIN_BATCH:
        raise ValueError(f"HSIC₁ needs at least {MIN_BATCH} examples, got {n}")
    return n
