"""Matrix completion by robust alternating minimisation: recovery, monotone residual, Eckart-Young, bad input."""

from __future__ import annotations

import itertools

import pytest
import torch

from rankwise.linalg.completion import _solve_exact, _solve_sketched, complete
from tests.matrices import decaying, optimal_error


def incoherent(m: int, n: int, rank: int, fraction: float, *, seed: int = 0, noise: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(M, mask, clean)``: a random-subspace (incoherent) rank-``rank`` matrix, singular values in ``[1, 2]`` times
    ``sqrt(m n / rank)``, observed uniformly at random with probability ``fraction``."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64)).Q
    s = torch.linspace(2.0, 1.0, rank, dtype=torch.float64) * (m * n / rank) ** 0.5
    clean = (U * s) @ V.T
    M = clean + noise * torch.randn(m, n, generator=g, dtype=torch.float64)
    return M, torch.rand(m, n, generator=g) < fraction, clean


def relative_error(X: torch.Tensor, M: torch.Tensor) -> float:
    return float(torch.linalg.norm(X.double() - M) / torch.linalg.norm(M))


@pytest.mark.parametrize("solver,cg_steps", [("exact", 2), ("approx", 2), ("approx", 0)])
def test_recovers_incoherent_low_rank_from_30_percent(solver, cg_steps):
    """The paper's regime: exact recovery from uniform samples, even with inexact per-row solves (``cg_steps=0`` is
    sketch-and-solve alone)."""
    M, mask, _ = incoherent(100, 80, 3, 0.3)
    result = complete(M, mask, 3, solver=solver, cg_steps=cg_steps, iters=60, tol=1e-9)
    assert relative_error(result.to_dense(), M) < 1e-7
    assert result.factors.rank == 3 and result.residuals[-1] <= 1e-9 and result.converged


def test_exact_observed_residual_never_increases():
    M, mask, _ = incoherent(120, 90, 3, 0.2, seed=1, noise=0.5)  # noisy: the residual plateaus, it must not rise
    result = complete(M, mask, 3, iters=25, tol=0.0)
    r = result.residuals
    assert len(r) == 25 and not result.converged
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(r))
    observed = torch.linalg.norm((result.to_dense() - M)[mask]) / torch.linalg.norm(M[mask])
    assert float(observed) == pytest.approx(r[-1], rel=1e-9)


def test_full_observation_meets_eckart_young():
    W, s = decaying(60, 40, decay=1.0, seed=3)
    result = complete(W, torch.ones_like(W, dtype=torch.bool), 5, iters=300, tol=1e-14)
    err = float(torch.linalg.norm(W - result.to_dense()))
    assert optimal_error(s, 5) * (1 - 1e-12) <= err <= optimal_error(s, 5) * (1 + 1e-8)
    torch.testing.assert_close(result.factors.S, s[:5], rtol=1e-6, atol=0)


@pytest.mark.parametrize("solver", ["exact", "approx"])
def test_deterministic_under_seed(solver):
    M, mask, _ = incoherent(80, 60, 3, 0.3, seed=2)
    a = complete(M.float(), mask, 3, solver=solver, iters=5, generator=11)
    b = complete(M.float(), mask, 3, solver=solver, iters=5, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a.factors.U, b.factors.U) and torch.equal(a.factors.Vh, b.factors.Vh)
    assert a.residuals == b.residuals


def test_unobserved_entries_are_never_read():
    M, mask, _ = incoherent(80, 60, 3, 0.3, seed=4)
    garbage = torch.where(mask, M, torch.full_like(M, float("nan")))
    garbage[~mask & (torch.arange(60) % 2 == 0)] = float("inf")
    a, b = complete(M, mask, 3, iters=8), complete(garbage, mask.to(torch.uint8), 3, iters=8)
    assert torch.equal(a.to_dense(), b.to_dense())


def test_sketched_solver_with_k_cg_steps_matches_exact_solve():
    g = torch.Generator().manual_seed(5)
    B = torch.linalg.qr(torch.randn(200, 6, generator=g, dtype=torch.float64)).Q
    W = (torch.rand(200, 50, generator=g) < 0.3).double()
    Y = W * torch.randn(200, 50, generator=g, dtype=torch.float64)
    exact = _solve_exact(B, W, Y)
    few = _solve_sketched(B, W, Y, 24, 1, g)
    full = _solve_sketched(B, W, Y, 24, 6, g)  # CG on a k x k SPD system is exact after k steps
    torch.testing.assert_close(full, exact, rtol=1e-7, atol=1e-9)
    assert float((few - exact).norm()) > float((full - exact).norm())


def test_dtype_and_device_preserved():
    M, mask, _ = incoherent(60, 50, 2, 0.4, seed=6)
    for dtype in (torch.float32, torch.bfloat16):
        lr = complete(M.to(dtype), mask, 2, iters=10).factors
        assert lr.U.dtype == lr.S.dtype == lr.Vh.dtype == dtype and lr.shape == (60, 50)


def test_heavy_rows_are_trimmed_from_the_initial_svd():
    M, mask, _ = incoherent(100, 80, 2, 0.2, seed=7)
    mask[:3] = True  # three rows observed 5x more often than average
    result = complete(M, mask, 2, iters=30, tol=1e-12)
    assert result.trimmed == (3, 0)
    assert relative_error(result.to_dense(), M) < 1e-8


@pytest.mark.parametrize("kwargs,match", [
    ({"mask": torch.ones(10, 7, dtype=torch.bool)}, "mask must be a tensor of M's shape"),
    ({"mask": torch.full((10, 8), 0.5)}, "mask must be boolean"),
    ({"rank": 9}, r"rank must be an integer in \[1, min\(m, n\)\] = \[1, 8\]"),
    ({"rank": 0}, "rank must be an integer"),
    ({"solver": "svt"}, "solver must be one of exact, approx"),
    ({"iters": 0}, "iters must be an integer >= 1"),
    ({"tol": -1.0}, "tol must be"),
    ({"incoherence": 0.0}, "incoherence must be"),
    ({"sketch_size": 1}, "sketch_size must be an integer >= 2"),
])
def test_bad_input_raises_one_line(kwargs, match):
    args = {"M": torch.randn(10, 8), "mask": torch.ones(10, 8, dtype=torch.bool), "rank": 2} | kwargs
    M, mask, rank = args.pop("M"), args.pop("mask"), args.pop("rank")
    with pytest.raises(ValueError, match=match) as err:
        complete(M, mask, rank, **args)
    assert "\n" not in str(err.value)


def test_too_few_observed_entries_and_observed_nan_raise():
    M, mask = torch.randn(10, 8), torch.ones(10, 8, dtype=torch.bool)
    mask[4, 1:] = False
    with pytest.raises(ValueError, match="mask: row 4 has 1 observed entries, fewer than rank=2"):
        complete(M, mask, 2)
    mask = torch.ones(10, 8, dtype=torch.bool)
    mask[:, 6] = False
    mask[0, 6] = True
    with pytest.raises(ValueError, match="mask: column 6 has 1 observed"):
        complete(M, mask, 2)
    M[3, 3] = float("nan")
    with pytest.raises(ValueError, match="M contains NaN or Inf at observed entries"):
        complete(M, torch.ones(10, 8, dtype=torch.bool), 2)
