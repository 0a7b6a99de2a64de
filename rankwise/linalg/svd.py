"""Truncated SVD with exact, randomized and block-Krylov solvers.

* ``"exact"``: ``torch.linalg.svd`` then truncation (Eckart-Young optimal).
* ``"gram"``: float64 eigen-decomposition of the smaller Gram matrix; exact up to rounding for singular values
  above ``1e-7 * s_max`` (falls back to ``"exact"`` otherwise), about twice as fast on layer-sized matrices.
* ``"randomized"``: the randomized range finder of Halko, Martinsson and Tropp (2011),
  https://arxiv.org/abs/0909.4061, with oversampling and normalised power (subspace) iterations.
* ``"block_krylov"``: randomized block Krylov iteration of Musco and Musco (2015), https://arxiv.org/abs/1504.05477.

Every solver computes in float32 or float64 and returns the input dtype; signs follow a deterministic convention
(the largest-magnitude entry of each left singular vector is positive, as scikit-learn's ``svd_flip``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from rankwise.linalg._checks import check_matrix, check_positive_int, compute_dtype, make_generator, randn
from rankwise.linalg.lowrank import LowRank
from rankwise.linalg.rank import Energy, RankSpec, resolve_rank


class SVDSolver(Protocol):
    """A callable solver: ``(A, rank, generator) -> (U, S, Vh)`` with at least ``rank`` components."""

    def __call__(self, A: torch.Tensor, rank: int, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


SOLVERS = ("exact", "gram", "randomized", "block_krylov")
DEFAULT_OVERSAMPLE = 8
DEFAULT_POWER_ITERS = 2


def svd_flip(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make the largest-magnitude entry of each column of ``U`` positive, flipping ``Vh`` rows to match."""
    if U.shape[1] == 0:
        return U, Vh
    idx = U.abs().argmax(dim=0)  # (r,)
    signs = torch.sign(U.gather(0, idx[None, :])).squeeze(0)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, Vh * signs[:, None]


def _orth(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``Y`` (reduced QR)."""
    return torch.linalg.qr(Y, mode="reduced").Q


def _lu_basis(Y: torch.Tensor) -> torch.Tensor:
    """A well-conditioned basis ``P L`` of the columns of a tall ``Y`` from LU with partial pivoting.

    Cheaper than QR and enough between power iterations, where only the span matters (as scikit-learn's
    ``randomized_range_finder`` with ``power_iteration_normalizer="LU"``).
    """
    LU, pivots, _ = torch.linalg.lu_factor_ex(Y)  # a zero pivot (rank-deficient Y) leaves L unit and full rank
    L = LU.tril(-1)
    L.diagonal().fill_(1.0)  # unit lower-trapezoidal (m, k)
    perm = list(range(Y.shape[0]))
    for i, p in enumerate((pivots - 1).tolist()):  # LAPACK row swaps, applied in order
        perm[i], perm[p] = perm[p], perm[i]
    basis = torch.empty_like(L)
    basis[torch.tensor(perm, device=Y.device)] = L  # rows back in Y's order: Y = basis @ U
    return basis


def _exact(A: torch.Tensor, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    return torch.linalg.svd(A, full_matrices=False)


def _gram(A: torch.Tensor, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """SVD through the float64 eigen-decomposition of the Gram matrix of the smaller side.

    About twice as fast as LAPACK's SVD for the moderately sized, moderately conditioned matrices met when
    compressing layers. Singular values below ``1e-7 * s_max`` are not resolved this way (float64 squares the
    condition number), so if the kept ones reach that far it falls back to the exact SVD.
    """
    m, n = A.shape
    Ad = A.double()
    tall = m >= n
    G = Ad.mT @ Ad if tall else Ad @ Ad.mT  # (k, k), k = min(m, n)
    evals, vecs = torch.linalg.eigh(G)
    evals, vecs = evals.flip(0)[:rank], vecs.flip(1)[:, :rank]  # descending
    S = evals.clamp_min(0.0).sqrt()
    if rank == 0 or float(S[-1]) <= 1e-7 * float(S[0]):
        return _exact(A, rank, generator)
    other = (Ad @ vecs if tall else Ad.mT @ vecs) / S  # (m, r) or (n, r)
    U, Vh = (other, vecs.mT) if tall else (vecs, other.mT)
    return U.to(A.dtype), S.to(A.dtype), Vh.to(A.dtype)


def squared_singular_values(A: torch.Tensor) -> torch.Tensor:
    """The squared singular values of ``A`` (``(m, n)``), descending, float64, ``min(m, n)`` of them.

    They are the eigenvalues of the Gram matrix of ``A``'s short side, formed and decomposed in float64 (negatives
    from rounding clamped to zero): absolute error about ``1e-16 s_max^2``, finer than float32's ``svdvals``, and no
    singular vectors are computed.
    """
    A = check_matrix(A, "A").double()
    G = A @ A.mT if A.shape[0] <= A.shape[1] else A.mT @ A  # (k, k), k = min(m, n)
    return torch.linalg.eigvalsh(G).clamp_min_(0.0).flip(0)


def _project_svd(A: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``Q Q^T A`` for an orthonormal ``(m, l)`` basis ``Q``.

    ``B = Q^T A`` is short and wide; its SVD goes through a QR of ``B^T`` and the SVD of the small ``(l, l)``
    triangle, which LAPACK does several times faster than a wide ``gesdd``.
    """
    B = Q.mT @ A  # (l, n)
    if B.shape[1] > B.shape[0]:
        Qb, R = torch.linalg.qr(B.mT, mode="reduced")  # B^T = Qb R, (n, l) and (l, l)
        Ur, S, Vr = torch.linalg.svd(R.mT)
        return Q @ Ur, S, Vr @ Qb.mT
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    return Q @ Ub, S, Vh


def randomized_range(A: torch.Tensor, size: int, power_iters: int, generator: torch.Generator) -> torch.Tensor:
    """Orthonormal ``(m, size)`` basis approximating the dominant column space of ``A`` (HMT Alg. 4.4).

    Power iterations are normalised with LU in between on the CPU (cheaper than QR there) and with QR on GPUs
    (where pivoted LU is slow), and with QR at the end.
    """
    n = A.shape[1]
    normalise = _lu_basis if A.device.type == "cpu" else _orth
    Y = A @ randn((n, size), generator, A.dtype, A.device)  # (m, size)
    for _ in range(power_iters):
        Y = A @ normalise(A.mT @ normalise(Y))
    return _orth(Y)


def subspace_basis(A: torch.Tensor, rank: int, *, start: torch.Tensor | None = None, oversample: int = 4,
                   power_iters: int = 1, generator: torch.Generator | int | None = None) -> torch.Tensor:
    """Orthonormal ``(m, rank)`` basis of the dominant left singular subspace of ``A`` (randomized subspace
    iteration, Halko, Martinsson and Tropp 2011, https://arxiv.org/abs/0909.4061).

    With ``start`` (an ``(m, k)`` basis, e.g. the one found for a previous, similar matrix) the iteration begins from
    ``A A^T start`` plus ``oversample`` random directions: a warm start that needs fewer power iterations than a cold
    one for the same accuracy. Computes in float32/float64 and returns ``A``'s dtype; columns are ordered by singular
    value and their signs fixed as :func:`svd_flip` does, so the same input and seed give the same bytes.
    """
    A = check_matrix(A, "A")
    m, n = A.shape
    rank = max(0, min(int(rank), m, n))
    gen = make_generator(generator)
    work = A.to(compute_dtype(A.dtype))
    size = min(rank + check_positive_int(oversample, "oversample"), m, n)
    normalise = _lu_basis if work.device.type == "cpu" else _orth
    if start is not None:
        if start.ndim != 2 or start.shape[0] != m:
            raise ValueError(f"start must be an (m, k) basis with m = {m}, got shape {tuple(start.shape)}")
        warm = work @ (work.mT @ start[:, :size].to(work.dtype))  # (m, k)
        extra = size - warm.shape[1]
        Y = torch.cat([warm, work @ randn((n, extra), gen, work.dtype, work.device)], 1) if extra > 0 else warm
    else:
        Y = work @ randn((n, size), gen, work.dtype, work.device)  # (m, size)
    for _ in range(check_positive_int(power_iters, "power_iters")):
        Y = work @ normalise(work.mT @ normalise(Y))
    U, _, Vh = _project_svd(work, _orth(Y))
    U, _ = svd_flip(U[:, :rank], Vh[:rank])
    return U.to(A.dtype)


def make_randomized(oversample: int = DEFAULT_OVERSAMPLE, power_iters: int = DEFAULT_POWER_ITERS) -> SVDSolver:
    """The HMT randomized solver with the given oversampling and power iterations."""

    def solve(A: torch.Tensor, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        size = min(rank + oversample, *A.shape)
        return _project_svd(A, randomized_range(A, size, power_iters, generator))

    return solve


def make_block_krylov(oversample: int = DEFAULT_OVERSAMPLE, power_iters: int = 2) -> SVDSolver:
    """Randomized block Krylov (Musco and Musco 2015, Alg. 2) with block size ``rank + oversample``.

    The Krylov space ``[A G, (A A^T) A G, ..., (A A^T)^q A G]`` has ``(q + 1)`` blocks; each block is orthonormalised
    as it is built and the whole basis once more at the end, then the SVD of the projection is truncated.
    """

    def solve(A: torch.Tensor, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        m, n = A.shape
        block = min(rank + oversample, m, n)
        blocks = [_orth(A @ randn((n, block), generator, A.dtype, A.device))]
        for _ in range(power_iters):
            blocks.append(_orth(A @ (A.mT @ blocks[-1])))
        K = torch.cat(blocks, dim=1)  # (m, (q + 1) * block); reduced QR caps the basis at m columns
        return _project_svd(A, _orth(K))

    return solve


def _resolve_solver(solver: str | Callable, oversample: int, power_iters: int | None) -> Callable:
    if callable(solver):
        return solver
    if solver == "exact":
        return _exact
    if solver == "gram":
        return _gram
    if solver == "randomized":
        return make_randomized(oversample, DEFAULT_POWER_ITERS if power_iters is None else power_iters)
    if solver == "block_krylov":
        return make_block_krylov(oversample, 2 if power_iters is None else power_iters)
    raise ValueError(f"solver must be one of {', '.join(SOLVERS)} or a callable, got {solver!r}")


def truncated_svd(
    W: torch.Tensor,
    rank: RankSpec,
    *,
    solver: str | SVDSolver = "randomized",
    oversample: int = DEFAULT_OVERSAMPLE,
    power_iters: int | None = None,
    generator: torch.Generator | int | None = None,
) -> LowRank:
    """Best rank-``rank`` approximation of ``W`` in the Frobenius norm.

    Args:
        W: ``(m, n)`` matrix, float16/bfloat16/float32/float64, on any device.
        rank: an ``int`` (clamped to ``min(m, n)`` with a warning), a float in ``(0, 1)`` (fraction of parameters
            kept) or :class:`~rankwise.linalg.rank.Energy` (exact solver only).
        solver: ``"exact"``, ``"gram"``, ``"randomized"`` (default), ``"block_krylov"`` or a callable
            ``(A, rank, generator) -> (U, S, Vh)``.
        oversample: extra random directions beyond ``rank`` for the randomized solvers.
        power_iters: power (randomized, default 2) or Krylov (block_krylov, default 2) iterations.
        generator: a ``torch.Generator`` or an integer seed; ``None`` means seed 0, so results are reproducible.

    Returns:
        :class:`LowRank` in ``W``'s dtype and device; ``info["solver"]`` names the solver used.

    References:
        Halko, Martinsson, Tropp (2011) https://arxiv.org/abs/0909.4061;
        Musco and Musco (2015) https://arxiv.org/abs/1504.05477.
    """
    W = check_matrix(W, "W")
    oversample = check_positive_int(oversample, "oversample")
    if power_iters is not None:
        power_iters = check_positive_int(power_iters, "power_iters")
    solve = _resolve_solver(solver, oversample, power_iters)
    gen = make_generator(generator)
    m, n = W.shape
    A = W.to(compute_dtype(W.dtype))
    solver_name = solver if isinstance(solver, str) else getattr(solver, "__name__", "callable")
    if isinstance(rank, Energy) and solver != "exact":
        raise ValueError("rank=Energy(...) needs the full spectrum: use solver='exact'")
    if isinstance(rank, Energy):
        U, S, Vh = _exact(A, min(m, n), gen)
        r = resolve_rank(rank, m, n, S)
    else:
        r = resolve_rank(rank, m, n)
        if r == 0:
            return LowRank(W.new_zeros(m, 0), W.new_zeros(0), W.new_zeros(0, n), {"solver": solver_name})
        U, S, Vh = solve(A, r, gen)
    U, Vh = svd_flip(U[:, :r], Vh[:r])
    return LowRank(U.to(W.dtype), S[:r].to(W.dtype), Vh.to(W.dtype), {"solver": solver_name})
