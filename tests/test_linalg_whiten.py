"""Whitened and weighted SVD: closed forms, objective, robustness to singular covariances."""

from __future__ import annotations

import importlib

import pytest
import torch

from rankwise.linalg import Whitening, truncated_svd, weighted_svd, whiten, whitened_svd
from tests.matrices import decaying


def _data(m=48, n=32, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    X = mix @ torch.randn(n, tokens, generator=g, dtype=torch.float64)  # correlated, anisotropic inputs
    return W, X


def _closed_form(W, C, rank):
    S = torch.linalg.cholesky(C)
    U, s, Vh = torch.linalg.svd(W @ S, full_matrices=False)
    return (U[:, :rank] * s[:rank]) @ Vh[:rank] @ torch.linalg.inv(S)


@pytest.mark.parametrize("rank", [1, 8, 20])
def test_whitened_equals_closed_form_and_beats_plain(rank):
    W, X = _data()
    C = X @ X.T
    lr = whitened_svd(W, C, rank)
    assert lr.info["whitening"]["method"] == "cholesky"
    torch.testing.assert_close(lr.to_dense(), _closed_form(W, C, rank), atol=1e-8, rtol=1e-8)
    whitened_err = float(torch.linalg.norm((W - lr.to_dense()) @ X))
    plain_err = float(torch.linalg.norm((W - truncated_svd(W, rank, solver="exact").to_dense()) @ X))
    assert whitened_err < plain_err


def test_whitened_is_optimal_against_random_competitors():
    W, X = _data()
    C = X @ X.T
    best = float(torch.linalg.norm((W - whitened_svd(W, C, 6).to_dense()) @ X))
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        cand = torch.randn(48, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 32, generator=g,
                                                                                   dtype=torch.float64)
        assert best <= float(torch.linalg.norm((W - cand) @ X)) + 1e-9


@pytest.mark.parametrize("kind", ["singular", "indefinite", "zero"])
def test_singular_or_indefinite_covariance_does_not_crash(kind):
    W, X = _data(tokens=10)  # 10 tokens for 32 inputs: rank-deficient
    C = X @ X.T
    if kind == "indefinite":
        C = C - 1e-3 * float(C.diagonal().mean()) * torch.eye(32, dtype=C.dtype)
    if kind == "zero":
        C = torch.zeros_like(C)
    lr = whitened_svd(W, C, 8)
    assert lr.info["whitening"]["method"] == "eigh"
    assert lr.info["whitening"]["clamped"] > 0
    assert bool(torch.isfinite(lr.to_dense()).all())
    if kind == "singular":
        # on the data actually seen, whitening still beats plain truncation
        plain = float(torch.linalg.norm((W - truncated_svd(W, 8, solver="exact").to_dense()) @ X))
        assert float(torch.linalg.norm((W - lr.to_dense()) @ X)) < plain


def test_whitening_is_a_square_root():
    _, X = _data()
    C = X @ X.T
    singular = X[:, :10] @ X[:, :10].T
    for wh in (whiten(C), whiten(singular)):
        assert isinstance(wh, Whitening)
        torch.testing.assert_close(wh.factor @ wh.inverse, torch.eye(32, dtype=torch.float64), atol=1e-8, rtol=0)
    wh = whiten(C)
    torch.testing.assert_close(wh.factor @ wh.factor.T, C, rtol=1e-10, atol=1e-8)
    damped = whiten(C, damp=0.1)
    assert damped.damping == pytest.approx(0.1 * float(C.diagonal().mean()))


def test_whitened_keeps_dtype_and_accepts_precomputed():
    W, X = _data()
    C = (X @ X.T).float()
    lr = whitened_svd(W.to(torch.bfloat16), C, 5)
    assert lr.U.dtype == torch.bfloat16 and lr.Vh.dtype == torch.bfloat16
    wh = whiten(C)
    torch.testing.assert_close(whitened_svd(W, wh, 5).to_dense(), whitened_svd(W, C, 5).to_dense())


def test_full_rank_whitened_reconstructs():
    W, X = _data()
    torch.testing.assert_close(whitened_svd(W, X @ X.T, 32).to_dense(), W, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize(
    "C,match",
    [
        (torch.ones(5, 5), r"C must have shape \(n, n\) = \(32, 32\)"),
        (torch.full((32, 32), float("nan")), "C contains NaN or Inf"),
        (torch.ones(32), r"C must have shape \(n, n\)"),
    ],
)
def test_whitened_bad_input(C, match):
    W, _ = _data()
    with pytest.raises(ValueError, match=match):
        whitened_svd(W, C, 4)


def test_weighted_svd_closed_form_and_objective():
    W, _ = decaying(40, 30)
    g = torch.Generator().manual_seed(3)
    a = torch.rand(40, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(30, generator=g, dtype=torch.float64) + 0.1
    lr = weighted_svd(W, 5, row_weights=a, col_weights=b)
    inner = truncated_svd(a[:, None] * W * b, 5, solver="exact").to_dense()
    torch.testing.assert_close(lr.to_dense(), inner / a[:, None] / b, atol=1e-10, rtol=1e-8)

    def objective(Wp):
        return float(torch.linalg.norm(a[:, None] * (W - Wp) * b))

    assert objective(lr.to_dense()) < objective(truncated_svd(W, 5, solver="exact").to_dense())
    # no weights: plain SVD
    torch.testing.assert_close(weighted_svd(W, 5).to_dense(), truncated_svd(W, 5, solver="exact").to_dense())


def test_weighted_svd_zero_weights_clamped_and_bad_weights():
    W, _ = decaying(10, 8)
    lr = weighted_svd(W, 3, col_weights=torch.tensor([0.0] + [1.0] * 7, dtype=torch.float64))
    assert lr.info["clamped_col_weights"] == 1 and bool(torch.isfinite(lr.to_dense()).all())
    with pytest.raises(ValueError, match="row_weights must be a 1-D tensor of length 10"):
        weighted_svd(W, 3, row_weights=torch.ones(9))
    with pytest.raises(ValueError, match="col_weights must be finite and non-negative"):
        weighted_svd(W, 3, col_weights=-torch.ones(8))


def test_large_singular_covariance_takes_ridge_then_matches_eigh_quality(monkeypatch):
    wmod = importlib.import_module("rankwise.linalg.whiten")  # the module (the package exports the function)

    g = torch.Generator().manual_seed(3)
    X = torch.randn(64, 40, generator=g, dtype=torch.float64)  # 40 tokens, 64 inputs: singular
    C = X @ X.T
    W = torch.randn(20, 64, generator=g, dtype=torch.float64)
    eig = whitened_svd(W, C, 8)
    assert eig.info["whitening"]["method"] == "eigh"
    monkeypatch.setattr(wmod, "EIGH_MAX_N", 32)  # treat 64 inputs as "large"
    ridge = whitened_svd(W, C, 8)
    assert ridge.info["whitening"]["method"] == "ridge" and ridge.info["whitening"]["damping"] > 0
    err = [float(torch.linalg.matrix_norm((W - lr.to_dense()) @ X)) for lr in (eig, ridge)]
    assert abs(err[0] - err[1]) <= 1e-3 * err[0]  # same objective to 0.1 %


@pytest.mark.parametrize("n", [1, 3, 4, 10, 37])
@pytest.mark.parametrize("blocks", [1, 4, 50])
def test_gram_is_the_exactly_symmetric_second_moment(n, blocks):
    from rankwise.linalg import gram

    x = torch.randn(64, n, generator=torch.Generator().manual_seed(n))
    g = gram(x, blocks=blocks)
    assert g.shape == (n, n) and g.dtype == x.dtype
    assert torch.equal(g, g.mT)
    assert torch.allclose(g.double(), x.double().T @ x.double(), rtol=1e-5, atol=1e-4)


def test_gram_of_no_columns_of_a_tensor_that_needs_grad_and_bad_shapes():
    from rankwise.linalg import gram

    assert gram(torch.zeros(5, 0)).shape == (0, 0)
    x = torch.randn(8, 6, requires_grad=True)
    gram(x).sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach() @ torch.ones(6, 6))
    with pytest.raises(ValueError, match=r"\(tokens, n\)"):
        gram(torch.zeros(2, 3, 4))
