"""Row sampling: leverage scores, Lewis weights, sensitivity and volume sampling, l_inf sketched regression."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rankwise.linalg.sampling import (
    greedy_volume,
    leverage_scores,
    lewis_weights,
    projection_dpp,
    sensitivity_sample,
    sketch_lstsq_linf,
    volume_sample,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_leverage_scores_are_the_hat_matrix_diagonal():
    A = _randn(40, 5)
    hat = A @ torch.linalg.pinv(A)
    torch.testing.assert_close(leverage_scores(A), hat.diagonal())
    ridge = A @ torch.linalg.solve(A.mT @ A + 3.0 * torch.eye(5, dtype=torch.float64), A.mT)
    torch.testing.assert_close(leverage_scores(A, 3.0), ridge.diagonal())
    torch.testing.assert_close(leverage_scores(A, 3.0, gram=A.mT @ A), ridge.diagonal())
    torch.testing.assert_close(leverage_scores(A, gram=A.mT @ A), hat.diagonal())


def test_leverage_scores_of_a_rank_deficient_matrix_sum_to_its_rank():
    A = _randn(30, 3) @ _randn(3, 6, seed=1)  # rank 3, 6 columns
    scores = leverage_scores(A)
    assert float(scores.sum()) == pytest.approx(3.0, abs=1e-9)
    assert float(scores.max()) <= 1 + 1e-9


def test_sketched_leverage_scores_approximate_the_exact_ones():
    A = _randn(2048, 8, seed=2) * torch.logspace(0, 3, 8, dtype=torch.float64)  # badly scaled columns
    exact = leverage_scores(A)
    approx = leverage_scores(A, sketch_size=256, jl_dim=512, generator=1)
    rel = (approx - exact).abs() / exact
    assert float(rel.mean()) < 0.2 and float(rel.max()) < 0.6
    torch.testing.assert_close(approx, leverage_scores(A, sketch_size=256, jl_dim=512, generator=1))  # seeded


@pytest.mark.parametrize("p", [1.0, 1.5, 3.0, 6.0])
def test_lewis_weights_solve_their_fixed_point(p):
    A = _randn(30, 4, seed=3)
    w = lewis_weights(A, p)
    M = (A * w.pow(1 - 2 / p)[:, None]).mT @ A
    tau = (A * torch.linalg.solve(M, A.mT).mT).sum(1)  # a_i^T (A^T W^(1-2/p) A)^-1 a_i
    torch.testing.assert_close(w.pow(2 / p), tau, rtol=1e-7, atol=1e-9)
    assert float(w.sum()) == pytest.approx(4.0, rel=1e-7)  # Lewis weights sum to the rank


def test_lewis_weights_at_p2_are_leverage_scores_and_respect_symmetry():
    A = _randn(25, 4, seed=4)
    torch.testing.assert_close(lewis_weights(A, 2.0), leverage_scores(A))
    doubled = torch.cat((torch.eye(3), torch.eye(3))).double()  # each row has a twin: all weights 1/2 for any p
    for p in (1.0, 4.0):
        torch.testing.assert_close(lewis_weights(doubled, p), torch.full((6,), 0.5, dtype=torch.float64))


def test_sensitivity_sample_is_seeded_and_unbiased_in_lp_norm():
    n, p = 20000, 1.0
    A = _randn(n, 3, seed=5) * torch.linspace(0.1, 3.0, n, dtype=torch.float64)[:, None]
    x = _randn(3, seed=6)
    idx, scale = sensitivity_sample(A, 6, p, 7)
    idx2, scale2 = sensitivity_sample(A, 6, p, torch.Generator().manual_seed(7))
    assert torch.equal(idx, idx2) and torch.equal(scale, scale2)
    w = lewis_weights(A, p)
    torch.testing.assert_close(scale, (6 * w[idx] / w.sum()).pow(-1 / p))
    # ||S A x||_p^p is a sum of k i.i.d. terms, each with mean ||A x||_p^p / k: one large draw tests the mean
    idx, scale = sensitivity_sample(A, n, p, 8)
    terms = ((A[idx] @ x).abs() * scale).pow(p)
    target = float((A @ x).abs().pow(p).sum())
    assert abs(float(terms.sum()) - target) < 5 * float(terms.std()) * math.sqrt(n)


def test_volume_sampling_frequencies_are_proportional_to_squared_volume():
    A = _randn(6, 2, seed=9)
    subsets = list(itertools.combinations(range(6), 2))
    volumes = [float(torch.linalg.det(A[list(s)]) ** 2) for s in subsets]
    prob = torch.tensor(volumes, dtype=torch.float64) / float(torch.linalg.det(A.mT @ A))
    assert float(prob.sum()) == pytest.approx(1.0, rel=1e-9)  # Cauchy-Binet
    gen = torch.Generator().manual_seed(10)
    draws = 3000
    counts = torch.zeros(len(subsets))
    where = {s: k for k, s in enumerate(subsets)}
    U = torch.linalg.svd(A, full_matrices=False).U  # what volume_sample hands the sampler
    assert torch.equal(volume_sample(A, 2, 5)[0], projection_dpp(U, torch.Generator().manual_seed(5)))
    for _ in range(draws):
        idx = projection_dpp(U, gen)
        counts[where[tuple(sorted(idx.tolist()))]] += 1
    expected = prob * draws
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 37.7, (counts, expected)  # 14 degrees of freedom: the 0.999 quantile is 36.1


def test_volume_sampling_gives_unbiased_least_squares():
    A, b = _randn(8, 2, seed=11), _randn(8, seed=12)
    x_star = torch.linalg.lstsq(A, b[:, None]).solution[:, 0]
    gen = torch.Generator().manual_seed(13)
    for k in (2, 4):  # k = d: A_S^-1 b_S; k > d: weighted least squares on the volume-rescaled sample
        estimates = []
        for _ in range(1500):
            idx, scale = volume_sample(A, k, gen)
            estimates.append(torch.linalg.lstsq(A[idx] * scale[:, None], (b[idx] * scale)[:, None]).solution[:, 0])
        est = torch.stack(estimates)
        se = est.std(0) / math.sqrt(len(est))
        assert bool(((est.mean(0) - x_star).abs() < 5 * se).all()), (k, est.mean(0), x_star, se)


def test_greedy_volume_is_deterministic_and_near_the_best_volume():
    A = _randn(12, 3, seed=14)
    idx = greedy_volume(A, 3)
    assert torch.equal(idx, greedy_volume(A, 3)) and len(set(idx.tolist())) == 3
    best = max(float(torch.linalg.det(A[list(s)]) ** 2) for s in itertools.combinations(range(12), 3))
    assert float(torch.linalg.det(A[idx]) ** 2) >= best / math.factorial(3) ** 2  # greedy's guarantee
    idx, _ = volume_sample(A, 5, method="greedy")
    assert len(set(idx.tolist())) == 5


@pytest.mark.parametrize("seed", range(4))
def test_sketch_lstsq_linf_meets_the_papers_bound(seed):
    n, d, eps = 1 << 14, 4, 1.0
    A = _randn(n, d, seed=100 + seed) * torch.tensor([1.0, 3.0, 0.3, 10.0], dtype=torch.float64)
    b = A @ _randn(d, seed=200 + seed) + _randn(n, seed=300 + seed)
    x_star = torch.linalg.lstsq(A, b[:, None]).solution[:, 0]
    x, m = sketch_lstsq_linf(A, b, eps, delta=0.1, kind="srht", generator=seed)
    assert m == math.ceil(d * math.log(n / 0.1) ** 3 / eps**2) and m < n  # the paper's row count, really sketched
    bound = eps / math.sqrt(d) * float((A @ x_star - b).norm()) / float(torch.linalg.svdvals(A).min())
    assert float((x - x_star).abs().max()) <= bound
    assert not torch.equal(x, x_star)


def test_sketch_lstsq_linf_solves_exactly_when_the_sketch_would_not_be_smaller():
    A, b = _randn(50, 3), _randn(50, seed=1)
    x, m = sketch_lstsq_linf(A, b, 0.5)
    assert m == 50
    torch.testing.assert_close(x, torch.linalg.lstsq(A, b[:, None]).solution[:, 0])


def test_bad_input_is_refused_with_one_line():
    A = _randn(10, 3)
    with pytest.raises(ValueError, match=r"k=11 exceeds the pool of 10 rows"):
        sensitivity_sample(A, 11, 1.0)
    with pytest.raises(ValueError, match=r"k=11 exceeds the pool of 10 rows"):
        volume_sample(A, 11)
    with pytest.raises(ValueError, match=r"k=2 is below d=3"):
        volume_sample(A, 2)
    with pytest.raises(ValueError, match=r"p must be a finite number >= 1"):
        lewis_weights(A, 0.5)
    bad = A.clone()
    bad[0, 0] = float("nan")
    for fn in (leverage_scores, lambda M: lewis_weights(M, 1.0), lambda M: volume_sample(M, 3)):
        with pytest.raises(ValueError, match="NaN or Inf"):
            fn(bad)
    with pytest.raises(ValueError, match="ridge"):
        leverage_scores(A, -1.0)
    with pytest.raises(ValueError, match="full column rank"):
        volume_sample(torch.cat((A[:, :2], A[:, :1]), 1), 3)
    with pytest.raises(ValueError, match="method must be one of dpp, greedy"):
        volume_sample(A, 3, method="maxvol")
    with pytest.raises(ValueError, match="eps"):
        sketch_lstsq_linf(A, A[:, 0], 0.0)
