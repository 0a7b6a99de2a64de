"""Gradient projections for the low-rank optimizers: which ``r``-dimensional subspace a matrix gradient is
squeezed into, and how that subspace is refreshed.

A matrix gradient ``G`` (``m x n``; a convolution's ``(out, in, k...)`` is viewed as ``(out, in * k...)``) is projected
on its shorter side: ``P^T G`` (``r x n``) with a left basis ``P`` (``m x r``) when ``m <= n``, else ``G Q``
(``m x r``) with a right basis ``Q`` (``n x r``). Each kind keeps the least state that reproduces its basis:

* ``"svd"`` (GaLore, Zhao et al. 2024, https://arxiv.org/abs/2403.03507): the top-``r`` singular subspace, refreshed
  with :func:`rankwise.linalg.subspace_basis` warm-started from the previous basis (randomized subspace iteration,
  not a full SVD). State: the basis.
* ``"dct"`` (SVD-free projection, Modoranu et al. 2025, https://arxiv.org/abs/2505.17967): the ``r`` columns of the
  orthonormal DCT-II matrix best aligned with the gradient (largest ``||D_j^T G||``). State: ``r`` indices; the DCT
  matrix is rebuilt from its size.
* ``"random"`` (APOLLO, Zhu et al. 2024, https://arxiv.org/abs/2412.05270): a seeded Gaussian matrix scaled by
  ``1/sqrt(r)``, redrawn at each refresh. State: nothing but the seed, which follows from the step.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from rankwise.linalg import subspace_basis

PROJECTIONS = ("svd", "dct", "random")


def matrix_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a matrix: 2-D as is, more dimensions flattened after the first (``(out, in * k...)``)."""
    return t if t.ndim == 2 else t.reshape(t.shape[0], -1)


def projected_shape(shape: tuple[int, ...], rank: int) -> tuple[int, int]:
    """The shape of a projected gradient of a parameter of ``shape`` at ``rank``."""
    m = shape[0]
    n = math.prod(shape[1:])
    return (rank, n) if m <= n else (m, rank)


def max_rank(shape: tuple[int, ...]) -> int:
    return min(shape[0], math.prod(shape[1:]))


@lru_cache(maxsize=32)
def _dct_cpu(size: int) -> torch.Tensor:
    k = torch.arange(size, dtype=torch.float64)
    D = torch.cos(math.pi / size * (k[:, None] + 0.5) * k[None, :])  # (size, size): column j is frequency j
    D[:, 0] *= 1.0 / math.sqrt(2.0)
    return (D * math.sqrt(2.0 / size)).float()


def dct_matrix(size: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal DCT-II basis (``size x size``, columns are the basis vectors)."""
    return _dct_cpu(size).to(device=device, dtype=dtype)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed % (2**63))


def refresh(kind: str, G: torch.Tensor, rank: int, state: dict, seed: int, power_iters: int = 2) -> None:
    """Recompute the projection of ``kind`` for the matrix gradient ``G`` into ``state`` (``power_iters``: subspace
    iterations of the ``"svd"`` refresh)."""
    left = G.shape[0] <= G.shape[1]
    A = G if left else G.mT  # project along A's rows: basis (rows(A), r)
    if kind == "svd":
        start = state.get("basis")
        state["basis"] = subspace_basis(A.float(), rank, start=start.float() if start is not None else None,
                                        oversample=8, power_iters=power_iters, generator=_generator(seed)).to(G.dtype)
    elif kind == "dct":
        D = dct_matrix(A.shape[0], A.device)
        scores = (D.mT @ A.float()).norm(dim=1)  # (rows,): alignment of each DCT vector with the gradient
        state["indices"] = scores.topk(rank).indices.sort().values
    elif kind == "random":
        state["seed"] = seed
    else:
        raise ValueError(f"projection must be one of {', '.join(PROJECTIONS)}, got {kind!r}")


def basis(kind: str, G: torch.Tensor, rank: int, state: dict) -> torch.Tensor:
    """The current ``(rows, r)`` basis for ``G`` (rows: the shorter side of ``G``)."""
    rows = min(G.shape)
    if kind == "svd":
        return state["basis"]
    if kind == "dct":
        return dct_matrix(rows, G.device, G.dtype)[:, state["indices"]]
    gen = _generator(state["seed"])
    P = torch.randn((rows, rank), generator=gen, dtype=torch.float32) / math.sqrt(rank)
    return P.to(device=G.device, dtype=G.dtype)


def project(G: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """``P^T G`` (left, ``m <= n``) or ``G P`` (right)."""
    return P.mT @ G if G.shape[0] <= G.shape[1] else G @ P


def project_back(R: torch.Tensor, P: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse map of :func:`project` into the full ``shape``: ``P R`` or ``R P^T``."""
    return P @ R if shape[0] <= shape[1] else R @ P.mT
