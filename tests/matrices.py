"""Test matrices with known spectra."""

from __future__ import annotations

import torch


def decaying(m: int, n: int, decay: float = 1.0, *, seed: int = 0, dtype: torch.dtype = torch.float64
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, s)`` with ``W = U diag(s) V^T``, random orthogonal ``U, V`` and ``s_i = (i + 1) ** -decay``."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    s = torch.arange(1, k + 1, dtype=torch.float64).pow(-decay)
    return ((U * s) @ V.T).to(dtype), s


def optimal_error(s: torch.Tensor, rank: int) -> float:
    """Eckart-Young: Frobenius error of the best rank-``rank`` approximation."""
    return float(s[rank:].pow(2).sum().sqrt())
