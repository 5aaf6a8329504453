"""Linear CKA with the unbiased minibatch HSIC estimator, checked against independent numpy computations."""

import itertools

import numpy as np
import pytest
import torch
import zarr

from invcache.analysis import cka


def numpy_hsic1(K, L):
    """Song et al. (2012)'s unbiased HSIC, written out in numpy."""
    n = len(K)
    K, L = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    one = np.ones(n)
    return (np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one @ K @ L @ one)) / (n * (n - 3))


def numpy_minibatch_cka(batches):
    """Nguyen et al. (2021): mean over minibatches of HSIC₁ of each pair, normalized by the self terms.

    ``batches``: a list of lists of (n, features) arrays, one per layer.
    """
    grams = [[x @ x.T for x in layers] for layers in batches]
    m = len(grams[0])
    mean = np.array([[np.mean([numpy_hsic1(g[a], g[b]) for g in grams]) for b in range(m)] for a in range(m)])
    return mean / np.sqrt(np.outer(np.diag(mean), np.diag(mean)))


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 30))
    y = x[:, :20] @ rng.normal(size=(20, 12)) + 0.5 * rng.normal(size=(24, 12))
    return x, y


def test_hsic1_by_hand_on_tiny_grams():
    # One related pair among 4 examples: K̃ = L̃ = e₁e₂ᵀ + e₂e₁ᵀ, so tr(K̃L̃) = 2, 1ᵀK̃1 = 2, 1ᵀK̃L̃1 = 2:
    # HSIC₁ = (2 + 2·2/(3·2) - 2/2·2) / (4·1) = 1/6. The diagonal is ignored.
    K = np.diag([5.0, 1.0, 2.0, 7.0])
    K[0, 1] = K[1, 0] = 1.0
    assert cka.hsic1(K, K) == pytest.approx(1 / 6, abs=1e-15)
    # A constant kernel carries no dependence: (12 + 12·12/6 - 36) / 4 = 0.
    assert cka.hsic1(np.ones((4, 4)), np.ones((4, 4))) == pytest.approx(0, abs=1e-15)
    with pytest.raises(ValueError, match="at least 4"):
        cka.hsic1(np.ones((3, 3)), np.ones((3, 3)))


def test_hsic1_is_the_u_statistic_over_distinct_quadruples(data):
    # Song et al. (2012), eq. 5: the mean over ordered distinct (i, j, q, r) of k_ij l_ij + k_ij l_qr - 2 k_ij l_iq.
    x, y = data[0][:6], data[1][:6]
    K, L = x @ x.T, y @ y.T
    quadruples = list(itertools.permutations(range(6), 4))
    u = np.mean([K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2 * K[i, j] * L[i, q] for i, j, q, r in quadruples])
    assert cka.hsic1(K, L) == pytest.approx(u, rel=1e-10)


def test_cka_of_a_representation_with_itself_is_one(data):
    x, _ = data
    assert cka.linear_cka_full(x, x) == pytest.approx(1.0, rel=1e-12)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling(data):
    x, y = data
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(30, 30)))
    reference = cka.linear_cka_full(x, y)
    assert 0 < reference < 1
    assert cka.linear_cka_full(x @ q, y) == pytest.approx(reference, rel=1e-10)
    assert cka.linear_cka_full(3.7 * x, y) == pytest.approx(reference, rel=1e-10)
    assert cka.linear_cka_full(x, 0.01 * y) == pytest.approx(reference, rel=1e-10)


def test_one_minibatch_is_the_full_batch_unbiased_formula(data):
    x, y = data
    stream = cka.MinibatchCKA(["x", "y"])
    stream.update({"x": torch.from_numpy(x), "y": torch.from_numpy(y)})
    K, L = x @ x.T, y @ y.T
    expected = numpy_hsic1(K, L) / np.sqrt(numpy_hsic1(K, K) * numpy_hsic1(L, L))
    np.testing.assert_allclose(stream.matrix(), [[1, expected], [expected, 1]], rtol=1e-10)
    assert cka.linear_cka_full(x, y) == pytest.approx(expected, rel=1e-10)


def test_all_pairs_at_once_match_one_pair_at_a_time(data):
    x, y = data
    grams = torch.stack([cka.gram(x), cka.gram(y), cka.gram(x[:, :5])])
    pairs = cka.hsic1_pairs(grams)
    for a, b in itertools.product(range(3), repeat=2):
        assert pairs[a, b].item() == pytest.approx(cka.hsic1(grams[a], grams[b]), rel=1e-10)


def test_streaming_over_a_real_cache_is_the_mean_of_minibatch_formula(analysis_workspace):
    group = zarr.open_group(analysis_workspace / "cache" / "val2017", mode="r")
    valid = group["valid"][:]
    layers = ["enc.0", "enc.2", "dec.1", "dec.2", "head.logits", "head.boxes"]
    # fp16 on disk, each image flattened to tokens × channels, in float64.
    values = {t: group[t.replace(".", "/")][:][valid].astype(np.float64).reshape(int(valid.sum()), -1)
              for t in layers}
    stream = cka.MinibatchCKA(layers)
    starts = range(0, int(valid.sum()), 4)  # 9 valid images: minibatches of 4, 4 and a last one of 1
    for start in starts:
        stream.update({t: torch.from_numpy(v[start:start + 4]).half() for t, v in values.items()})
    assert (stream.batches, stream.examples, stream.dropped) == (2, 8, 1)
    expected = numpy_minibatch_cka([[values[t][s:s + 4] for t in layers] for s in (0, 4)])
    np.testing.assert_allclose(stream.matrix(), expected, rtol=1e-9)
    np.testing.assert_allclose(np.diag(stream.matrix()), 1.0, rtol=1e-12)


def test_no_minibatch_kept_is_nan():
    stream = cka.MinibatchCKA(["a", "b"])
    stream.update({"a": np.ones((3, 2)), "b": np.ones((3, 2))})
    assert stream.dropped == 3 and np.isnan(stream.matrix()).all()
