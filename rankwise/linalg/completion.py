"""Low-rank matrix completion by robust alternating minimisation.

Follows Gu, Song, Yin and Zhang, "Low Rank Matrix Completion via Robust Alternating Minimization in Nearly Linear
Time" (2023), https://arxiv.org/abs/2302.11068, which builds on the alternating minimisation of Jain, Netrapalli and
Sanghavi (2013), https://arxiv.org/abs/1212.0467:

1. **Spectral initialisation.** ``U0`` = top-``rank`` left singular vectors of the rescaled observed matrix
   ``P_Omega(M) / p`` (``p = |Omega| / (m n)``), entries of ``U0`` above ``2 mu sqrt(rank / m)`` clipped to zero
   (the paper's robust initialisation), then re-orthonormalised. Before the SVD, rows and columns observed more than
   twice as often as average are zeroed ("trimming", Keshavan, Montanari and Oh 2010,
   https://arxiv.org/abs/0901.3150); under uniform sampling this never fires, it guards against a few heavy rows.
2. **Alternating least squares** on the observed entries: ``V = argmin ||P_Omega(U V^T - M)||`` (one ``rank``-sized
   least-squares problem per column), then the same for ``U`` per row, orthonormalising the fixed factor first
   (QR, as in the paper's analysis; it does not change the product).

``solver="exact"`` solves every row's normal equations exactly (batched Cholesky). ``solver="approx"`` solves them
only approximately, which is the paper's point: the robust analysis tolerates per-step regression errors. Like the
paper's solver it is *sketch-and-precondition*: a CountSketch of each row's observed design gives a sketch-and-solve
starting point and a ``(rank, rank)`` preconditioner, after which ``cg_steps`` steps of preconditioned conjugate
gradients refine it (the paper takes preconditioned gradient steps; CG converges at least as fast per step). Even
``cg_steps=0`` (sketch-and-solve alone) still recovers the matrix, in more iterations.

Differences from the paper, stated once: the paper's analysis splits ``Omega`` into fresh, independent samples for
each half-step; like its practical version and Jain et al.'s experiments we reuse all of ``Omega`` every step, which
is what makes the exact solver's observed residual non-increasing. ``mu`` (``incoherence``) is a user choice here,
not known in advance; products with the mask are dense matrix products (BLAS), not the ``O(|Omega| rank)`` sparse
ones the nearly linear time bound counts (on CPUs the dense products were faster than gathers and scatters over
the observed entries at the sizes benchmarked).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from rankwise.linalg._checks import FLOAT_DTYPES, all_finite, check_positive_int, compute_dtype, make_generator
from rankwise.linalg.lowrank import LowRank
from rankwise.linalg.svd import svd_flip, truncated_svd

SOLVERS = ("exact", "approx")
DEFAULT_INCOHERENCE = 3.0
"""``mu`` of the init clipping: entries of ``U0`` above ``2 mu sqrt(rank / m)`` are zeroed. A random ``rank``-dim
subspace has entries near ``sqrt(2 log(m rank) / m)``, far below this for the sizes met in practice."""


@dataclass(frozen=True)
class Completion:
    """The result of :func:`complete`.

    Attributes:
        factors: the completed rank-``r`` matrix as :class:`LowRank` (``U``, ``S``, ``Vh``) in ``M``'s dtype.
        residuals: relative observed-entry residual ``||P_Omega(X - M)||_F / ||P_Omega(M)||_F`` after each
            iteration (one ``V`` and one ``U`` update); non-increasing for ``solver="exact"``.
        iterations: iterations run.
        converged: stopped before ``iters`` because the residual fell below ``tol`` or stopped decreasing by more
            than ``tol`` relative.
        clipped: entries of the initial ``U0`` clipped to zero (robust init).
        trimmed: ``(rows, columns)`` left out of the initial SVD for being observed more than twice the average.
    """

    factors: LowRank
    residuals: tuple[float, ...]
    iterations: int
    converged: bool
    clipped: int = 0
    trimmed: tuple[int, int] = (0, 0)

    def to_dense(self) -> torch.Tensor:
        """The completed ``(m, n)`` matrix."""
        return self.factors.to_dense()


def _check_inputs(M: object, mask: object, rank: object) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Validate ``M``, ``mask`` and ``rank``; return ``M``, a boolean mask and the rank."""
    if not isinstance(M, torch.Tensor) or M.ndim != 2 or M.numel() == 0:
        got = tuple(M.shape) if isinstance(M, torch.Tensor) else type(M).__name__
        raise ValueError(f"M must be a non-empty 2-D torch.Tensor, got {got}")
    if M.dtype not in FLOAT_DTYPES:
        raise ValueError(f"M must have dtype float16, bfloat16, float32 or float64, got {M.dtype}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(M.shape):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a tensor of M's shape {tuple(M.shape)}, got {got}")
    if mask.dtype != torch.bool:
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must be boolean or hold only 0 and 1 (1 = observed)")
        mask = mask != 0
    mask = mask.to(M.device)
    m, n = M.shape
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= int(rank) <= min(m, n):
        raise ValueError(f"rank must be an integer in [1, min(m, n)] = [1, {min(m, n)}], got {rank!r}")
    rank = int(rank)
    for dim, label in ((1, "row"), (0, "column")):
        counts = mask.sum(dim)
        low = int(counts.argmin())
        if int(counts[low]) < rank:
            raise ValueError(f"mask: {label} {low} has {int(counts[low])} observed entries, fewer than rank={rank}; "
                             f"every row and column needs at least rank observed entries")
    if not all_finite(M[mask]):
        raise ValueError("M contains NaN or Inf at observed entries; only unobserved entries may be non-finite")
    return M, mask, rank


def _orth(A: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(A, mode="reduced").Q


def _solve_exact(B: torch.Tensor, W: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Per column ``j`` of ``Y``: ``x_j = argmin_x sum_i W_ij (B_i . x - Y_ij)^2``, exactly.

    Args:
        B: ``(m, k)`` fixed factor; W: ``(m, n)`` 0/1 mask; Y: ``(m, n)`` observations, zero where unobserved.

    Returns:
        ``(n, k)``: the rows ``x_j``.
    """
    m, k = B.shape
    outer = (B[:, :, None] * B[:, None, :]).reshape(m, k * k)  # (m, k^2)
    G = (W.mT @ outer).reshape(-1, k, k)  # (n, k, k) per-column Gram of the observed rows
    rhs = Y.mT @ B  # (n, k)
    L, info = torch.linalg.cholesky_ex(G)
    X = torch.cholesky_solve(rhs[:, :, None], L)[:, :, 0]
    bad = info != 0
    if bool(bad.any()):  # a singular Gram (observed rows span less than k dims): minimum-norm solution
        X[bad] = (torch.linalg.pinv(G[bad], hermitian=True) @ rhs[bad][:, :, None])[:, :, 0]
    return X


def _solve_sketched(B: torch.Tensor, W: torch.Tensor, Y: torch.Tensor, sketch_size: int, cg_steps: int,
                    generator: torch.Generator) -> torch.Tensor:
    """Same problems as :func:`_solve_exact`, solved approximately by sketch-and-precondition.

    One CountSketch ``S`` (``sketch_size`` buckets, random signs; Clarkson and Woodruff 2013,
    https://arxiv.org/abs/1207.6365) is drawn over the ``m`` rows and applied to every column's observed design
    ``B_j = diag(W_:j) B`` at once, in one batched product over the buckets. ``S B_j`` gives the sketch-and-solve start
    ``x_j = argmin ||S (B_j x - y_j)||`` and the preconditioner ``(B_j^T S^T S B_j)^-1``; ``cg_steps`` steps of
    batched preconditioned CG on the normal equations ``B_j^T B_j x = B_j^T y_j`` follow.
    """
    m, k = B.shape
    n = W.shape[1]
    buckets = torch.randint(0, sketch_size, (m,), generator=generator).to(B.device)
    signs = (torch.randint(0, 2, (m,), generator=generator) * 2 - 1).to(B.device, B.dtype)
    counts = torch.bincount(buckets, minlength=sketch_size)  # (s,)
    order = torch.argsort(buckets, stable=True)  # rows grouped by bucket
    slot = torch.arange(m, device=B.device) - (torch.cumsum(counts, 0) - counts)[buckets[order]]  # place in bucket
    where = (buckets[order], slot)
    width = int(counts.max())
    Wb = W.new_zeros(sketch_size, width, n)  # (s, c, n): each bucket's rows of the mask, zero-padded to c rows
    Wb[where] = W[order]
    Bb = B.new_zeros(sketch_size, width, k)
    Bb[where] = signs[order, None] * B[order]
    Yb = Y.new_zeros(sketch_size, width, n)
    Yb[where] = signs[order, None] * Y[order]
    SB = (Wb.mT @ Bb).transpose(0, 1)  # (n, s, k): S diag(W_:j) B for every column j, one batched product
    Sy = Yb.sum(1).mT[:, :, None]  # (n, s, 1): S y_j
    H = SB.mT @ SB  # (n, k, k) sketched Gram
    ridge = 1e-10 * H.diagonal(dim1=1, dim2=2).mean(1).clamp_min(torch.finfo(B.dtype).tiny)
    H = H + ridge[:, None, None] * torch.eye(k, dtype=B.dtype, device=B.device)
    L = torch.linalg.cholesky_ex(H).L
    X = torch.cholesky_solve(SB.mT @ Sy, L)[:, :, 0]  # (n, k) sketch-and-solve start

    def gram(P: torch.Tensor) -> torch.Tensor:  # (n, k) -> rows G_j p_j, G_j = B^T diag(W_:j) B
        return (W * (B @ P.mT)).mT @ B

    R = Y.mT @ B - gram(X)  # (n, k) normal-equation residuals
    Z = torch.cholesky_solve(R[:, :, None], L)[:, :, 0]
    P = Z
    rz = (R * Z).sum(1)
    for _ in range(cg_steps):
        GP = gram(P)
        curvature = (P * GP).sum(1)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(torch.finfo(B.dtype).tiny), 0.0)
        X = X + alpha[:, None] * P
        R = R - alpha[:, None] * GP
        Z = torch.cholesky_solve(R[:, :, None], L)[:, :, 0]
        rz_new = (R * Z).sum(1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(torch.finfo(B.dtype).tiny), 0.0)
        P, rz = Z + beta[:, None] * P, rz_new
    return X


def _initial_basis(Y: torch.Tensor, mask: torch.Tensor, rank: int, incoherence: float | None,
                   generator: torch.Generator) -> tuple[torch.Tensor, int, tuple[int, int]]:
    """Trimmed, rescaled spectral start ``U0`` (``(m, rank)``, orthonormal), clipped entries and trimmed counts."""
    m, n = Y.shape
    p = float(mask.sum()) / (m * n)
    row_counts, col_counts = mask.sum(1), mask.sum(0)
    heavy_rows = row_counts > 2 * row_counts.double().mean()
    heavy_cols = col_counts > 2 * col_counts.double().mean()
    A = Y / p
    if bool(heavy_rows.any()) or bool(heavy_cols.any()):
        A = A * (~heavy_rows)[:, None] * (~heavy_cols)[None, :]
    U = truncated_svd(A, rank, solver="randomized", generator=generator).U  # (m, rank)
    clipped = 0
    if incoherence is not None:
        big = U.abs() > 2.0 * incoherence * math.sqrt(rank / m)
        clipped = int(big.sum())
        if clipped:
            U = _orth(U.masked_fill(big, 0.0))
    return U, clipped, (int(heavy_rows.sum()), int(heavy_cols.sum()))


def complete(
    M: torch.Tensor,
    mask: torch.Tensor,
    rank: int,
    *,
    iters: int = 50,
    solver: str = "exact",
    generator: torch.Generator | int | None = None,
    tol: float = 1e-6,
    incoherence: float | None = DEFAULT_INCOHERENCE,
    sketch_size: int | None = None,
    cg_steps: int = 2,
) -> Completion:
    """Complete a partially observed low-rank matrix by robust alternating minimisation.

    Args:
        M: ``(m, n)`` matrix, float16/bfloat16/float32/float64. Only entries where ``mask`` is true are read;
            unobserved entries may hold anything, NaN and Inf included.
        mask: ``(m, n)`` boolean (or 0/1) tensor, true where ``M`` is observed. Every row and column needs at least
            ``rank`` observed entries.
        rank: target rank ``r`` in ``[1, min(m, n)]``.
        iters: maximum alternating iterations (each one ``V`` and one ``U`` update).
        solver: ``"exact"`` (batched Cholesky per row) or ``"approx"`` (sketch-and-precondition plus ``cg_steps``
            preconditioned CG steps per row).
        generator: a ``torch.Generator`` or an integer seed (``None`` means seed 0) for the randomized initial SVD
            and the sketches.
        tol: stop when the relative observed residual is at most ``tol`` or falls by less than ``tol`` of itself.
        incoherence: ``mu`` of the init clipping (entries of ``U0`` above ``2 mu sqrt(r / m)`` zeroed); ``None``
            turns clipping off.
        sketch_size: CountSketch buckets for ``solver="approx"`` (default ``4 r``, at least ``r``).
        cg_steps: preconditioned CG steps per solve for ``solver="approx"``.

    Returns:
        :class:`Completion` with the factors in ``M``'s dtype and device, the residual history and the iteration
        count.

    Raises:
        ValueError: ``M`` not a 2-D float tensor, ``mask`` of another shape or not 0/1, ``rank`` outside
            ``[1, min(m, n)]``, a row or column with fewer than ``rank`` observed entries, NaN/Inf at an observed
            entry, or a bad option.

    References:
        Gu, Song, Yin, Zhang (2023) https://arxiv.org/abs/2302.11068;
        Jain, Netrapalli, Sanghavi (2013) https://arxiv.org/abs/1212.0467.
    """
    M, mask, rank = _check_inputs(M, mask, rank)
    iters = check_positive_int(iters, "iters", minimum=1)
    cg_steps = check_positive_int(cg_steps, "cg_steps")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if not (isinstance(tol, numbers.Real) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if incoherence is not None and not (isinstance(incoherence, numbers.Real) and incoherence > 0):
        raise ValueError(f"incoherence must be a positive number or None, got {incoherence!r}")
    if sketch_size is None:
        sketch_size = 4 * rank
    sketch_size = check_positive_int(sketch_size, "sketch_size", minimum=rank)
    gen = make_generator(generator)
    dtype = compute_dtype(M.dtype)
    W = mask.to(dtype)  # (m, n) 0/1
    Y = torch.where(mask, M, 0).to(dtype)  # (m, n) observations, zero elsewhere
    norm = float(torch.linalg.norm(Y)) or 1.0

    def solve(B: torch.Tensor, Wt: torch.Tensor, Yt: torch.Tensor) -> torch.Tensor:
        if solver == "exact":
            return _solve_exact(B, Wt, Yt)
        return _solve_sketched(B, Wt, Yt, sketch_size, cg_steps, gen)

    U, clipped, trimmed = _initial_basis(Y, mask, rank, incoherence, gen)
    residuals: list[float] = []
    converged = False
    for _ in range(iters):
        Q = _orth(solve(_orth(U), W, Y))  # (n, r) orthonormal V basis
        U = solve(Q, W.mT, Y.mT)  # (m, r)
        residual = float(torch.linalg.norm(W * (U @ Q.mT) - Y)) / norm
        residuals.append(residual)
        if residual <= tol or (len(residuals) > 1 and residuals[-2] - residual <= tol * residuals[-2]):
            converged = True
            break
    Qu, Ru = torch.linalg.qr(U, mode="reduced")
    A, S, Bh = torch.linalg.svd(Ru)  # U Q^T = Qu A diag(S) Bh Q^T
    left, right = svd_flip(Qu @ A, Bh @ Q.mT)
    info = {"solver": solver, "iterations": len(residuals), "clipped": clipped}
    factors = LowRank(left.to(M.dtype), S.to(M.dtype), right.to(M.dtype), info)
    return Completion(factors, tuple(residuals), len(residuals), converged, clipped, trimmed)
