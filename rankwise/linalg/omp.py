"""Orthogonal matching pursuit, batched over rows: the sparse-coding step of :mod:`rankwise.linalg.dictionary`.

Pati et al., "Orthogonal matching pursuit: recursive function approximation with applications to wavelet
decomposition", 1993; generalised (several atoms per step) as in Wang et al., "Generalized orthogonal matching
pursuit", 2012, https://arxiv.org/abs/1111.6664.
"""

from __future__ import annotations

import math

import torch

from rankwise.linalg._checks import check_matrix, check_positive_int, compute_dtype

CHOLESKY_BUDGET = 1 << 25
"""Entries of the per-row Cholesky factors (``rows x s x s``) :func:`omp` holds at once; rows are processed in
chunks that fit (128 MB in float32)."""


def _flush_(t: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the entries too small for their products to stay normal floats.

    Greedy pursuits and atom sweeps on nearly orthogonal atoms multiply small second-order terms into subnormal
    numbers, which x86 CPUs handle tens of times slower; below ``sqrt(tiny)`` (1e-19 in float32) an entry is far
    beneath the precision of anything it is added to here (the fit works on data scaled to unit maximum).
    """
    return t.masked_fill_(t.abs() < math.sqrt(torch.finfo(t.dtype).tiny), 0.0)


# --- orthogonal matching pursuit ------------------------------------------------------------------------------------


def _dead_tolerance(dtype: torch.dtype) -> float:
    """Squared norm, relative to the atom's, below which an atom's component outside the chosen span counts as none."""
    return 1e3 * torch.finfo(dtype).eps


def _guarded_inverse_cholesky(S: torch.Tensor, diag: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse Cholesky factors of a batch of small ``(L, L)`` Schur complements, built row by row.

    A pivot below ``tol`` times the atom's squared norm (``diag``) marks that atom *dead* (it adds nothing to the
    span already chosen): its row of the inverse is zero, so it gets no direction and no coefficient. Vectorised
    over the batch, which beats LAPACK's per-matrix calls at these sizes.

    Returns:
        ``(B, L, L)`` lower-triangular ``F^-1`` (``F F^T = S`` on the live atoms) and the ``(B, L)`` live mask.
    """
    B, L, _ = S.shape
    F = torch.zeros_like(S)
    Finv = torch.zeros_like(S)
    alive = torch.ones(B, L, dtype=torch.bool, device=S.device)
    for c in range(L):
        # Row c of F: F[c, :c] = F^-1[:c, :c] S[:c, c] (dead rows of F^-1 are zero: their columns of F stay zero).
        left = (Finv[:, :c, :c] @ S[:, :c, c, None]).squeeze(-1) if c else S.new_zeros(B, 0)
        pivot = S[:, c, c] - (left * left).sum(1)
        ok = pivot > tol * diag[:, c]
        alive[:, c] = ok
        root = torch.where(ok, pivot.clamp_min(0.0).sqrt(), torch.ones_like(pivot))
        F[:, c, :c] = left
        F[:, c, c] = root
        # Row c of F^-1: (e_c - F[c, :c] F^-1[:c, :]) / F[c, c], zero for a dead atom.
        row = -(left[:, None, :] @ Finv[:, :c, :]).squeeze(1) if c else S.new_zeros(B, L)
        row[:, c] = 1.0
        Finv[:, c, :] = torch.where(ok[:, None], row / root[:, None], torch.zeros_like(row))
    return Finv, alive


def _omp_rows(a0: torch.Tensor, G: torch.Tensor, usable: torch.Tensor, s: int, width: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-OMP for ``B`` rows given their correlations ``a0 = Y D^T`` ``(B, k)`` with unit atoms.

    Per row the inverse ``Linv`` of the Cholesky factor of ``G[I, I]`` (``I`` the atoms chosen so far) grows by a
    block of up to ``width`` rows per greedy step (matrix products only: batched triangular solves are slow);
    ``z = Linv a0[I]`` are the row's coordinates in the orthonormalised chosen atoms, so the least-squares
    coefficients are ``Linv^T z``, and the residual correlations ``a0 - coef G`` change by the new block's share.

    Returns:
        ``(B, s)`` coefficients and ``(B, s)`` atom indices, in selection order.
    """
    B, k = a0.shape
    tol = _dead_tolerance(a0.dtype)
    idx = torch.zeros(B, s, dtype=torch.long, device=a0.device)
    Linv = a0.new_zeros(B, s, s)
    chosen = ~usable.expand(B, k).clone()
    gamma = a0.new_zeros(B, s)
    a = a0.clone()
    t = 0
    while t < s:
        w = min(width, s - t)
        new = a.abs().masked_fill_(chosen, -1.0).topk(w, dim=1).indices  # (B, w)
        chosen.scatter_(1, new, True)
        idx[:, t:t + w] = new
        B21 = torch.take(G, new[:, :, None] * k + idx[:, None, :t])  # (B, w, t) = G[new, I]
        B22 = torch.take(G, new[:, :, None] * k + new[:, None, :])  # (B, w, w)
        Lold = Linv[:, :t, :t]
        Wt = B21 @ Lold.mT  # (B, w, t): the new rows of the Cholesky factor left of the diagonal
        Finv = _guarded_inverse_cholesky(B22 - Wt @ Wt.mT, B22.diagonal(dim1=1, dim2=2), tol)[0]
        block = Linv[:, t:t + w, :t + w]  # (B, w, t + w): the new rows of Linv
        if t:
            block[:, :, :t] = -(Finv @ Wt) @ Lold
        block[:, :, t:] = Finv
        _flush_(block)  # chained products of the small terms of nearly orthogonal atoms
        zn = (block @ a0.gather(1, idx[:, :t + w])[:, :, None])  # (B, w, 1): new coordinates
        share = (block.mT @ zn).squeeze(-1)  # (B, t + w): their part of the coefficients Linv^T z
        gamma[:, :t + w] += share
        t += w
        if t < s:
            a -= a0.new_zeros(B, k).scatter_(1, idx[:, :t], share) @ G  # residual correlations (G symmetric)
    return gamma, idx


def omp(Y: torch.Tensor, D: torch.Tensor, nonzeros: int, *, steps: int | None = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal matching pursuit of every row of ``Y`` over the atoms (rows) of ``D``, batched over rows.

    Each row gets exactly ``nonzeros`` distinct atoms, chosen greedily by the largest correlation of the residual
    with a normalised atom, and the least-squares coefficients on them. With ``steps`` below ``nonzeros`` each greedy
    step chooses ``ceil(nonzeros / steps)`` atoms at once (generalised OMP, Wang, Kwon and Shim 2012,
    https://arxiv.org/abs/1111.6664), which divides the number of steps and their overhead; ``None`` is exact OMP.
    An atom in the span of those already chosen gets a zero coefficient. Rows are processed in chunks whose per-row
    Cholesky factors fit :data:`CHOLESKY_BUDGET` entries.

    Args:
        Y: ``(m, n)`` signals.
        D: ``(k, n)`` dictionary (any atom norms; zero atoms are never used).
        nonzeros: ``s``, in ``[1, k]``.
        steps: greedy steps, ``>= 1``; ``None`` (or ``>= s``): one atom per step.

    Returns:
        ``(m, s)`` coefficients (of the atoms of ``D`` as given) and ``(m, s)`` int64 indices, ascending per row.

    Reference: Rubinstein, Zibulevsky and Elad, "Efficient implementation of the K-SVD algorithm using batch
    orthogonal matching pursuit", Technion CS-2008-08.
    """
    Y, D = check_matrix(Y, "Y"), check_matrix(D, "D")
    if Y.shape[1] != D.shape[1]:
        raise ValueError(f"Y has {Y.shape[1]} columns but the atoms of D have {D.shape[1]}")
    s = check_positive_int(nonzeros, "nonzeros", 1)
    if s > D.shape[0]:
        raise ValueError(f"nonzeros must be at most the number of atoms {D.shape[0]}, got {s}")
    width = _width(s, steps)
    dtype = compute_dtype(torch.promote_types(Y.dtype, D.dtype))
    values, indices = _omp(Y.to(dtype), D.to(dtype), s, width)
    return values.to(Y.dtype), indices


def _width(nonzeros: int, steps: int | None) -> int:
    """Atoms per greedy step for ``steps`` steps (validated)."""
    if steps is None:
        return 1
    return -(-nonzeros // check_positive_int(steps, "steps", 1))


def _omp(Y: torch.Tensor, D: torch.Tensor, s: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`omp` without checks, ``width`` atoms per greedy step."""
    norms = torch.linalg.vector_norm(D, dim=1)
    usable = norms > 0
    Dn = D / torch.where(usable, norms, torch.ones_like(norms))[:, None]
    G = Dn @ Dn.mT  # (k, k)
    A0 = Y @ Dn.mT  # (m, k)
    rows = max(1, CHOLESKY_BUDGET // (s * s))
    values, indices = [], []
    for start in range(0, Y.shape[0], rows):
        gamma, idx = _omp_rows(A0[start:start + rows], G, usable, s, width)
        idx, order = idx.sort(dim=1)
        values.append(gamma.gather(1, order))
        indices.append(idx)
    idx = torch.cat(indices)
    scale = torch.where(usable, norms, torch.ones_like(norms))
    return torch.cat(values) / scale[idx], idx


# --- K-SVD ----------------------------------------------------------------------------------------------------------
