"""truncated_svd against references: Eckart-Young, determinism, dtypes, shapes, bad input."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise import RankwiseWarning
from rankwise.linalg import Energy, LowRank, subspace_basis, truncated_svd
from tests.matrices import decaying, optimal_error

SOLVERS = ["exact", "gram", "randomized", "block_krylov"]


@pytest.mark.parametrize("shape", [(120, 80), (80, 120)])
@pytest.mark.parametrize("solver", ["exact", "gram"])
def test_exact_meets_eckart_young(shape, solver):
    W, s = decaying(*shape)
    for rank in (1, 10, 40):
        lr = truncated_svd(W, rank, solver=solver)
        err = float(torch.linalg.norm(W - lr.to_dense()))
        assert err == pytest.approx(optimal_error(s, rank), rel=1e-9)
        ref = torch.linalg.svd(W, full_matrices=False).S[:rank]
        torch.testing.assert_close(lr.S, ref)


@pytest.mark.parametrize("solver,factor", [("randomized", 1.02), ("block_krylov", 1.02)])
@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_randomized_near_optimal(solver, factor, shape):
    W, s = decaying(*shape, decay=1.0)
    for rank in (5, 30):
        err = float(torch.linalg.norm(W - truncated_svd(W, rank, solver=solver).to_dense()))
        assert err <= factor * optimal_error(s, rank)


@pytest.mark.parametrize("solver", SOLVERS)
def test_full_rank_reconstructs(solver):
    W, _ = decaying(40, 25)
    lr = truncated_svd(W, 25, solver=solver)
    torch.testing.assert_close(lr.to_dense(), W, atol=1e-10, rtol=0)


@pytest.mark.parametrize("solver", ["randomized", "block_krylov"])
def test_deterministic_under_seed(solver):
    W, _ = decaying(100, 70, dtype=torch.float32)
    a = truncated_svd(W, 10, solver=solver, generator=123)
    b = truncated_svd(W, 10, solver=solver, generator=torch.Generator().manual_seed(123))
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)


def test_signs_are_deterministic():
    W, _ = decaying(50, 30)
    lr = truncated_svd(W, 10, solver="exact")
    idx = lr.U.abs().argmax(0)
    assert bool((lr.U.gather(0, idx[None]) > 0).all())
    flipped = truncated_svd(-W, 10, solver="exact")
    torch.testing.assert_close(flipped.U, lr.U)
    torch.testing.assert_close(flipped.Vh, -lr.Vh)


@pytest.mark.parametrize("solver", SOLVERS)
def test_error_never_increases_with_rank(solver):
    W, _ = decaying(90, 60, decay=0.5)
    errs = [float(torch.linalg.norm(W - truncated_svd(W, r, solver=solver).to_dense())) for r in range(0, 61, 6)]
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(errs))


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    rank=st.integers(0, 50),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    solver=st.sampled_from(SOLVERS),
)
def test_property_shapes_dtypes_ranks(m, n, rank, dtype, solver):
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(m * 100 + n)).to(dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lr = truncated_svd(W, rank, solver=solver)
    r = min(rank, m, n)
    assert isinstance(lr, LowRank)
    assert lr.rank == r and lr.shape == (m, n)
    assert lr.U.dtype == dtype and lr.S.dtype == dtype and lr.Vh.dtype == dtype
    assert lr.num_params == r * (m + n)
    assert (rank > min(m, n)) == any(issubclass(w.category, RankwiseWarning) for w in caught)
    dense = lr.to_dense()
    assert dense.shape == (m, n) and bool(torch.isfinite(dense).all())
    if r == min(m, n) and dtype == torch.float64:
        torch.testing.assert_close(dense, W, atol=1e-8, rtol=0)
    if r > 0:
        assert bool((lr.S[:-1].float() >= lr.S[1:].float() - 1e-3 * lr.S[0].float()).all())


def test_fraction_and_energy_ranks():
    W, s = decaying(60, 40)
    assert truncated_svd(W, 0.5, solver="exact").rank == int(0.5 * 60 * 40 / 100)
    lr = truncated_svd(W, Energy(0.9), solver="exact")
    energy = s.pow(2).cumsum(0) / s.pow(2).sum()
    assert energy[lr.rank - 1] >= 0.9 and (lr.rank == 1 or energy[lr.rank - 2] < 0.9)


def test_truncate_and_factors():
    W, _s = decaying(30, 20)
    lr = truncated_svd(W, 10, solver="exact")
    small = lr.truncate(4)
    assert small.rank == 4
    torch.testing.assert_close(small.to_dense(), truncated_svd(W, 4, solver="exact").to_dense())
    A, B = lr.factors()
    torch.testing.assert_close(A @ B, lr.to_dense())
    with pytest.warns(RankwiseWarning):
        assert lr.truncate(50).rank == 10


@pytest.mark.cuda
@pytest.mark.parametrize("solver", SOLVERS)
def test_cuda_matches_cpu(solver):
    W, _s = decaying(200, 150, dtype=torch.float32)
    cpu = truncated_svd(W, 20, solver=solver, generator=7)
    gpu = truncated_svd(W.cuda(), 20, solver=solver, generator=7)
    assert gpu.U.is_cuda and gpu.U.dtype == torch.float32
    torch.testing.assert_close(gpu.to_dense().cpu(), cpu.to_dense(), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize(
    "W,rank,kwargs,match",
    [
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1, {}, "W contains NaN or Inf"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), 1, {}, "W contains NaN or Inf"),
        (torch.ones(3, 3), -1, {}, "rank must be a non-negative integer"),
        (torch.ones(3, 3), 1.5, {}, r"rank must be an int >= 0, a float in \(0, 1\)"),
        (torch.ones(3, 3), "2", {}, "rank must be a non-negative integer"),
        (torch.ones(3), 1, {}, "W must be a 2-D matrix"),
        (torch.ones(0, 3), 1, {}, "W must be non-empty"),
        (torch.ones(3, 3, dtype=torch.int64), 1, {}, "W must have dtype"),
        (torch.ones(3, 3), 1, {"solver": "lanczos"}, "solver must be one of exact, gram, randomized, block_krylov"),
        (torch.ones(3, 3), 1, {"oversample": -2}, "oversample must be an integer >= 0"),
        (torch.ones(3, 3), Energy(0.9), {"solver": "randomized"}, "use solver='exact'"),
    ],
)
def test_bad_input(W, rank, kwargs, match):
    with pytest.raises(ValueError, match=match):
        truncated_svd(W, rank, **kwargs)


def test_callable_solver():
    W, s = decaying(40, 30)
    calls = []

    def my_solver(A, rank, generator):
        calls.append(rank)
        return torch.linalg.svd(A, full_matrices=False)

    lr = truncated_svd(W, 5, solver=my_solver)
    assert calls == [5] and lr.info["solver"] == "my_solver"
    assert float(torch.linalg.norm(W - lr.to_dense())) == pytest.approx(optimal_error(s, 5))


@pytest.mark.parametrize("solver", ["randomized", "block_krylov"])
@pytest.mark.parametrize("make", [lambda: torch.zeros(30, 20), lambda: torch.ones(30, 1) @ torch.randn(1, 20)])
def test_rank_deficient_input_does_not_break_the_power_iteration(solver, make):
    # a zero pivot in the LU normaliser used to raise from torch.linalg.lu_factor
    W = make()
    lr = truncated_svd(W, 8, solver=solver, generator=0)
    assert torch.allclose(lr.to_dense(), W, atol=1e-4)
    P = subspace_basis(W, 8, start=torch.linalg.qr(torch.randn(30, 8)).Q, power_iters=2, generator=0)
    assert P.shape == (30, 8) and bool(torch.isfinite(P).all())


@pytest.mark.parametrize("shape", [(40, 7), (7, 40), (30, 30), (1, 5)])
def test_squared_singular_values_match_the_float64_svd(shape):
    from rankwise.linalg import squared_singular_values

    gen = torch.Generator().manual_seed(0)
    A = torch.randn(*shape, generator=gen)
    A[:, -1] = A[:, 0]  # rank-deficient: a zero singular value stays >= 0
    s2 = squared_singular_values(A)
    ref = torch.linalg.svdvals(A.double()).pow(2)
    assert s2.dtype == torch.float64 and s2.shape == ref.shape
    assert bool((s2[:-1] >= s2[1:]).all()) and bool((s2 >= 0).all())
    assert torch.allclose(s2, ref, rtol=1e-10, atol=1e-12 * float(ref[0]))
