"""Rank vocabulary, sketches, sketched least squares and Nystrom."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.linalg import (
    SKETCHES,
    Energy,
    break_even_rank,
    fwht,
    make_sketch,
    nystrom,
    rank_for_energy,
    rank_for_params_kept,
    resolve_rank,
    saves_params,
    sketch_lstsq,
)


@given(m=st.integers(1, 5000), n=st.integers(1, 5000))
def test_break_even_rank(m, n):
    r = break_even_rank(m, n)
    assert not saves_params(m, n, r + 1)
    assert r == 0 or r * (m + n) <= m * n


@settings(max_examples=200)
@given(m=st.integers(1, 3000), n=st.integers(1, 3000), kept=st.floats(0.001, 1.0))
def test_rank_for_params_kept_is_largest_within_budget(m, n, kept):
    r = rank_for_params_kept(m, n, kept)
    assert 0 <= r <= min(m, n)
    assert r * (m + n) <= kept * m * n + 1e-6
    assert r == min(m, n) or (r + 1) * (m + n) > kept * m * n


def test_rank_for_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 0.65) == 2
    assert rank_for_energy(s, 1.0) == 3
    assert rank_for_energy(torch.zeros(3), 0.5) == 0


def test_resolve_rank_vocabulary():
    assert resolve_rank(7, 10, 20) == 7
    assert resolve_rank(0.5, 100, 100) == 25
    assert resolve_rank(Energy(0.5), 3, 3, torch.tensor([2.0, 1.0, 1.0])) == 1
    for bad in (-1, 0.0, 1.0, 2.5, "3", None, True):
        with pytest.raises(ValueError, match="rank"):
            resolve_rank(bad, 10, 10)
    with pytest.raises(ValueError, match=r"Energy\.threshold must be in"):
        Energy(1.5)


@pytest.mark.parametrize("kind", SKETCHES)
def test_sketch_matches_dense_and_is_deterministic(kind):
    m, n, k = 100, 7, 64
    A = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    S = make_sketch(kind, k, m, generator=5)
    assert S.shape == (k, m)
    torch.testing.assert_close(S @ A, S.to_dense() @ A)
    torch.testing.assert_close(S.apply(A[:, 0]), (S @ A)[:, 0])
    again = make_sketch(kind, k, m, generator=5)
    assert torch.equal(again @ A, S @ A)
    assert not torch.equal(make_sketch(kind, k, m, generator=6) @ A, S @ A)


@pytest.mark.parametrize("kind", SKETCHES)
def test_sketch_preserves_norms_in_expectation(kind):
    m, k = 256, 128
    x = torch.randn(m, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ratios = [float((make_sketch(kind, k, m, generator=s) @ x).norm() ** 2 / x.norm() ** 2) for s in range(60)]
    assert sum(ratios) / len(ratios) == pytest.approx(1.0, abs=0.1)


def test_fwht_is_orthonormal_hadamard():
    H = fwht(torch.eye(8, dtype=torch.float64))
    torch.testing.assert_close(H @ H.T, torch.eye(8, dtype=torch.float64))
    assert bool(((H.abs() - 8 ** -0.5).abs() < 1e-12).all())
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.ones(6))


def test_sketch_bad_input():
    with pytest.raises(ValueError, match="kind must be one of gaussian, sparse_sign, srht, countsketch"):
        make_sketch("fourier", 4, 8)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        make_sketch("gaussian", 0, 8)
    with pytest.raises(ValueError, match="sketch expects an input with 8 rows"):
        make_sketch("countsketch", 4, 8).apply(torch.ones(7, 2))


@pytest.mark.parametrize("kind", SKETCHES)
def test_sketch_lstsq_near_optimal(kind):
    g = torch.Generator().manual_seed(2)
    A = torch.randn(2000, 20, dtype=torch.float64, generator=g)
    noise = torch.randn(2000, dtype=torch.float64, generator=g)
    b = A @ torch.randn(20, dtype=torch.float64, generator=g) + 0.5 * noise
    x_opt = torch.linalg.lstsq(A, b[:, None]).solution[:, 0]
    x = sketch_lstsq(A, b, 400, kind=kind, generator=0)
    assert float((A @ x - b).norm()) <= 1.1 * float((A @ x_opt - b).norm())
    B = torch.stack((b, 2 * b), 1)
    assert sketch_lstsq(A, B, 400, kind=kind).shape == (20, 2)


def test_sketch_lstsq_bad_input():
    with pytest.raises(ValueError, match="A must be tall"):
        sketch_lstsq(torch.ones(3, 5), torch.ones(3))
    with pytest.raises(ValueError, match=r"b must have shape \(10,\)"):
        sketch_lstsq(torch.randn(10, 2), torch.ones(9))
    with pytest.raises(ValueError, match="sketch_size must be between"):
        sketch_lstsq(torch.randn(10, 2), torch.ones(10), 11)


def test_nystrom_exact_on_low_rank_psd_and_deterministic():
    g = torch.Generator().manual_seed(0)
    F = torch.randn(80, 6, dtype=torch.float64, generator=g)
    P = F @ F.T
    ny = nystrom(P, 6, generator=1)
    torch.testing.assert_close(ny.to_dense(), P, atol=1e-8, rtol=1e-8)
    assert ny.rank == 6 and bool((ny.S >= 0).all())
    assert torch.equal(nystrom(P, 4, generator=3).to_dense(), nystrom(P, 4, generator=3).to_dense())
    with pytest.raises(ValueError, match="A must be square"):
        nystrom(torch.ones(3, 4), 2)


def test_nystrom_decaying_spectrum_accuracy():
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64, generator=g)).Q
    lam = torch.full((200,), 0.8, dtype=torch.float64).pow(torch.arange(200))
    P = (Q * lam) @ Q.T
    ny = nystrom(P, 20, oversample=10)
    assert float(torch.linalg.norm(P - ny.to_dense())) <= 1.5 * float(lam[20:].norm())
