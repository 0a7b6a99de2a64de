"""Tucker (HOSVD, HOOI) against references: exact at full rank, the HOSVD error bound, HOOI <= HOSVD, numpy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from rankwise.linalg.tucker import TuckerFactors, tucker, validate_ranks


def tensor(shape: tuple[int, ...], *, seed: int = 0, decay: float = 1.0) -> torch.Tensor:
    """A float64 tensor with decaying multilinear spectra: a random core with entries scaled by
    ``prod_n (i_n + 1)^-decay``, multiplied by random orthogonal matrices in every mode."""
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(shape, generator=g, dtype=torch.float64)
    for mode, size in enumerate(shape):
        view = [1] * len(shape)
        view[mode] = size
        core = core * torch.arange(1, size + 1, dtype=torch.float64).pow(-decay).view(view)
    factors = [torch.linalg.qr(torch.randn(s, s, generator=g, dtype=torch.float64)).Q for s in shape]
    return TuckerFactors(core, tuple(factors)).to_dense()


def unfold(T: torch.Tensor, mode: int) -> torch.Tensor:
    return torch.movedim(T, mode, 0).reshape(T.shape[mode], -1)


def error(T: torch.Tensor, tf: TuckerFactors) -> float:
    return float(torch.linalg.norm(T - tf.to_dense().double()))


def hosvd_bound(T: torch.Tensor, ranks: tuple[int, ...]) -> float:
    """De Lathauwer et al. (2000), Property 10: ||T - T'||^2 <= sum_n sum_{i > r_n} sigma_i(T_(n))^2."""
    return sum(float(torch.linalg.svdvals(unfold(T, n))[r:].pow(2).sum()) for n, r in enumerate(ranks)) ** 0.5


@pytest.mark.parametrize("method", ["hosvd", "hooi"])
@pytest.mark.parametrize("shape", [(6, 5, 4), (3, 4, 2, 5)])
def test_full_multilinear_rank_reconstructs(method, shape):
    T = tensor(shape)
    tf = tucker(T, shape, method=method)
    torch.testing.assert_close(tf.to_dense(), T, atol=1e-12, rtol=0)
    assert tf.ranks == shape and tf.num_params == T.numel() + sum(s * s for s in shape)


@pytest.mark.parametrize("ranks", [(3, 2, 2), (1, 1, 1), (5, 4, 3), (8, 2, 6)])
def test_hosvd_meets_the_classical_bound_and_hooi_improves_on_it(ranks):
    T = tensor((9, 7, 6), decay=0.5, seed=1)
    hosvd, hooi = tucker(T, ranks, method="hosvd"), tucker(T, ranks, method="hooi")
    bound = hosvd_bound(T, ranks)
    assert error(T, hosvd) <= bound * (1 + 1e-12)
    assert error(T, hooi) <= error(T, hosvd) * (1 + 1e-12)
    errors = hooi.info["errors"]  # relative errors per sweep: HOOI only ever grows ||core||
    assert all(b <= a + 1e-14 for a, b in itertools.pairwise(errors))


def test_hooi_strictly_better_than_hosvd_on_a_generic_tensor():
    T = tensor((10, 9, 8), decay=0.2, seed=2)
    assert error(T, tucker(T, (3, 3, 3), method="hooi")) < 0.999 * error(T, tucker(T, (3, 3, 3), method="hosvd"))


@pytest.mark.parametrize("method", ["hosvd", "hooi"])
def test_factors_orthonormal_and_core_is_the_projection(method):
    T = tensor((8, 7, 5), seed=3)
    tf = tucker(T, (4, 3, 2), method=method)
    for f in tf.factors:
        torch.testing.assert_close(f.mT @ f, torch.eye(f.shape[1], dtype=f.dtype), atol=1e-12, rtol=0)
    core = T
    for mode, f in enumerate(tf.factors):
        core = torch.movedim(torch.tensordot(f.mT, core, dims=([1], [mode])), 0, mode)
    torch.testing.assert_close(tf.core, core, atol=1e-12, rtol=0)
    # orthonormal factors: ||T - T'||^2 = ||T||^2 - ||core||^2
    assert error(T, tf) ** 2 == pytest.approx(float(T.norm() ** 2 - tf.core.norm() ** 2), rel=1e-9)


def test_hosvd_matches_a_direct_numpy_reference():
    T = tensor((5, 6, 4), seed=4, decay=0.7)
    ranks = (3, 4, 2)
    X = T.numpy()
    factors = []
    for mode, r in enumerate(ranks):
        unfolded = np.moveaxis(X, mode, 0).reshape(X.shape[mode], -1)
        factors.append(np.linalg.svd(unfolded, full_matrices=False)[0][:, :r])
    core = np.einsum("abc,ai,bj,ck->ijk", X, *factors)
    reference = np.einsum("ijk,ai,bj,ck->abc", core, *factors)
    tf = tucker(T, ranks, method="hosvd")
    np.testing.assert_allclose(tf.to_dense().numpy(), reference, atol=1e-12)
    for ours, ref in zip(tf.factors, factors, strict=True):  # same subspaces (signs may differ)
        np.testing.assert_allclose((ours @ ours.mT).numpy(), ref @ ref.T, atol=1e-12)
    np.testing.assert_allclose(np.abs(tf.core.numpy()), np.abs(core), atol=1e-12)


@pytest.mark.parametrize("method", ["hosvd", "hooi"])
def test_deterministic(method):
    T = tensor((7, 6, 5), seed=5).float()
    a = tucker(T, (3, 3, 2), method=method, generator=3)
    b = tucker(T, (3, 3, 2), method=method, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.core, b.core) and all(torch.equal(x, y) for x, y in zip(a.factors, b.factors, strict=True))


def test_hosvd_error_never_increases_with_rank():
    T = tensor((8, 6, 5), seed=6, decay=0.5)
    errs = [error(T, tucker(T, (r, min(r, 6), min(r, 5)), method="hosvd")) for r in range(1, 9)]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(errs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv2d_weight(dtype):
    W = tensor((32, 16, 3, 3), seed=7)  # a Conv2d(16, 32, 3) weight: (out, in, kh, kw)
    tf = tucker(W.to(dtype), (8, 6, 3, 3))
    assert tf.dtype == dtype and all(f.dtype == dtype for f in tf.factors)
    assert tf.shape == (32, 16, 3, 3) and tf.ranks == (8, 6, 3, 3)
    assert tf.num_params == 8 * 6 * 3 * 3 + 32 * 8 + 16 * 6 + 3 * 3 + 3 * 3
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert error(W, tf) <= hosvd_bound(W, (8, 6, 3, 3)) + tolerance * float(W.norm())


def test_validate_ranks():
    assert validate_ranks((64, 32, 3, 3), [8, None, 3, 1]) == (8, 32, 3, 1)
    assert validate_ranks((5, 5, 5), 2) == (2, 2, 2)
    kept = validate_ranks((40, 30, 20), 0.25)
    params = np.prod(kept) + sum(s * r for s, r in zip((40, 30, 20), kept, strict=True))
    assert params <= 0.25 * 40 * 30 * 20 and all(1 <= r <= s for r, s in zip(kept, (40, 30, 20), strict=True))


@pytest.mark.parametrize("ranks,match", [
    ((8, 4, 5, 3), r"ranks\[2\]=5 must be an integer in \[1, 3\] \(mode 2 has size 3\)"),
    ((8, 4, 3), "one rank per mode"),
    (4, r"ranks\[2\]=4 .*mode 2 has size 3"),
    (1.5, "fraction of parameters kept"),
    ((0, 4, 3, 3), r"ranks\[0\]=0"),
    ("same", "ranks must be"),
])
def test_bad_ranks_raise_one_line(ranks, match):
    with pytest.raises(ValueError, match=match) as err:
        tucker(torch.randn(16, 8, 3, 3), ranks)
    assert "\n" not in str(err.value)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="at least 2 modes"):
        tucker(torch.randn(5), (2,))
    with pytest.raises(ValueError, match="NaN or Inf"):
        tucker(torch.full((3, 3, 3), float("nan")), 2)
    with pytest.raises(ValueError, match="method must be one of hooi, hosvd"):
        tucker(torch.randn(3, 3, 3), 2, method="cp")
    with pytest.raises(ValueError, match="dtype"):
        tucker(torch.ones(3, 3, 3, dtype=torch.int64), 2)
