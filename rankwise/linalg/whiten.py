"""Whitened and weighted truncated SVD: low-rank approximation under a data-dependent norm.

* :func:`whitened_svd` minimises ``||(W - W') X||_F`` given ``C = X X^T`` (the SVD-LLM objective,
  Wang et al. 2024, https://arxiv.org/abs/2403.07378): with ``C = S S^T``, ``W' = [W S]_r S^-1``.
* :func:`anchored_svd` minimises ``||W X - W' Xh||_F``: the original layer's outputs from the inputs a partly
  compressed model gives it (AA-SVD, https://arxiv.org/abs/2604.02119), from ``Xh Xh^T`` and ``X Xh^T`` only.
* :func:`weighted_svd` minimises ``||diag(a) (W - W') diag(b)||_F`` in closed form, covering Fisher-weighted SVD
  (FWSVD, Hsu et al. 2022, https://arxiv.org/abs/2207.00112: row weights) and activation-aware SVD
  (ASVD, Yuan et al. 2023, https://arxiv.org/abs/2312.05821: column weights).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rankwise.linalg._checks import check_matrix, compute_dtype
from rankwise.linalg.lowrank import LowRank
from rankwise.linalg.rank import RankSpec
from rankwise.linalg.svd import SVDSolver, truncated_svd


@dataclass(frozen=True)
class Whitening:
    """A square root ``S`` of a covariance ``C ~= S S^T``, in float64, applied without forming ``S^-1``.

    Attributes:
        method: ``"cholesky"`` when ``C`` (plus damping) was positive definite; ``"ridge"`` when a Cholesky factor
            was found after adding a small ridge (large ``n`` only, see :func:`whiten`); else ``"eigh"`` (eigenvalues
            below ``floor`` were raised to it).
        damping: the ridge added to the diagonal before factorising (absolute).
        clamped: number of eigenvalues raised to the floor (0 for Cholesky): the first ``clamped`` columns of
            ``basis`` (eigenvalues ascending).
        eig_min: smallest eigenvalue of the symmetrised input, when computed (``eigh`` path), else ``None``.
        basis: ``(n, n)``: the lower-triangular Cholesky factor ``L``, or the eigenvectors ``Q`` (then
            ``S = Q diag(roots)``, never stored: one ``n x n`` matrix is held, not two).
        roots: ``sqrt(l)`` for the eigh form, else ``None``.
    """

    method: str
    damping: float
    clamped: int
    eig_min: float | None
    basis: torch.Tensor
    roots: torch.Tensor | None = None

    @property
    def factor(self) -> torch.Tensor:
        """``S`` as an explicit ``(n, n)`` matrix (formed on demand for the eigh form)."""
        return self.basis if self.roots is None else self.basis * self.roots

    @property
    def size(self) -> int:
        return self.basis.shape[0]

    def right_multiply(self, M: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        """``M @ S`` in ``M``'s dtype (float32 or float64), without forming ``S`` for the eigh form.

        ``S`` is converted to ``M``'s dtype ``chunk`` columns at a time, so no full-size copy of it is made.
        """
        out = M.new_empty(M.shape[0], self.size)
        for start in range(0, self.size, chunk):
            cols = slice(start, start + chunk)
            torch.matmul(M, self.basis[:, cols].to(M.dtype), out=out[:, cols])
            if self.roots is not None:
                out[:, cols] *= self.roots[cols].to(M.dtype)
        return out

    def right_solve(self, M: torch.Tensor) -> torch.Tensor:
        """``M @ S^-1`` without forming the inverse (a triangular solve, or a scaled rotation)."""
        M = M.to(self.basis.dtype)
        if self.roots is None:
            return torch.linalg.solve_triangular(self.basis, M, upper=False, left=False)
        return (M / self.roots) @ self.basis.mT

    def right_solve_transpose(self, M: torch.Tensor) -> torch.Tensor:
        """``M @ S^-T`` without forming the inverse (``S^-T = L^-T``, or ``Q diag(1 / roots)``)."""
        M = M.to(self.basis.dtype)
        if self.roots is None:
            return torch.linalg.solve_triangular(self.basis.mT, M, upper=True, left=False)
        return (M @ self.basis) / self.roots

    @property
    def inverse(self) -> torch.Tensor:
        """``S^-1`` as an explicit ``(n, n)`` matrix (for inspection; the solvers never form it)."""
        return self.right_solve(torch.eye(self.size, dtype=self.basis.dtype, device=self.basis.device))

    def describe(self) -> dict[str, object]:
        """Plain-data summary for reports."""
        return {"method": self.method, "damping": self.damping, "clamped": self.clamped, "eig_min": self.eig_min}


EIGH_MAX_N = 4096
"""Above this many inputs a singular covariance is first retried with a ridge before the eigen fallback: LAPACK's
symmetric eigensolver needs about ``2 n^2`` doubles of workspace (1 GB at ``n = 8192``) and ten times the time of a
Cholesky factorisation."""

RIDGES = (1e-6, 1e-5, 1e-4)
"""Relative ridges (times the mean diagonal) tried in turn for large singular covariances (SVD-LLM's own remedy)."""


def _cholesky(C: torch.Tensor, floor: float) -> torch.Tensor | None:
    L, info = torch.linalg.cholesky_ex(C)
    # Accept Cholesky only if it is well conditioned enough that S^-1 stays finite and meaningful.
    if int(info) == 0 and float(L.diagonal().min()) ** 2 > floor * float(C.diagonal().max()):
        return L
    return None


GRAM_BLOCKS = 3
"""Column strips of :func:`gram`: it multiplies ``(k + 1) / (2 k)`` of what ``x^T x`` does (2/3 at ``k = 3``). On
the 2-core CPU, a batch of 1,024 tokens took 37 ms at ``k = 3``, 44 ms at ``k = 4`` and 53 ms as ``x^T x`` for
1,536 inputs; 5.2, 5.7 and 5.7 ms for 576."""


def gram(x: torch.Tensor, *, blocks: int = GRAM_BLOCKS) -> torch.Tensor:
    """``x^T x`` (``(n, n)``) of ``x`` (``(tokens, n)``), computing only the blocks on and below the diagonal.

    The columns are cut into ``blocks`` strips; strip ``i`` is multiplied with the strips up to its own, and the
    upper triangle is the lower one's mirror, so the result is exactly symmetric. The input second moments of
    calibration are sums of these, one per batch of tokens.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be (tokens, n), got shape {tuple(x.shape)}")
    n = x.shape[-1]
    if n == 0 or x.requires_grad:
        return x.mT @ x  # nothing to split; or autograd, which out= does not support
    step = -(-n // max(1, blocks))
    out = x.new_empty(n, n)
    for start in range(0, n, step):
        stop = min(n, start + step)
        torch.matmul(x[:, start:stop].mT, x[:, :stop], out=out[start:stop, :stop])  # strip x strips up to it
    lower = out.tril_()
    return lower.add_(lower.tril(-1).mT)


def whiten(C: torch.Tensor, *, damp: float = 0.0, floor: float = 1e-8, scale: float = 1.0) -> Whitening:
    """Factor a covariance ``C = X X^T`` as ``S S^T`` robustly.

    ``C`` is symmetrised and moved to float64; ``damp * mean(diag(C))`` is added to its diagonal. A Cholesky
    factorisation is tried first. If ``C`` is singular or indefinite (as happens with few calibration tokens or
    dead input channels):

    * for ``n > EIGH_MAX_N`` inputs, Cholesky is retried with ridges of :data:`RIDGES` times the mean diagonal
      (method ``"ridge"``), which needs no workspace beyond the factor;
    * otherwise, or if those fail, the eigen-decomposition ``C = Q diag(l) Q^T`` is used, with eigenvalues below
      ``floor * max(l)`` raised to that floor, and ``S = Q diag(sqrt(l))``.

    Never raises on a finite ``C``. ``scale`` multiplies ``C`` first (e.g. ``1 / tokens`` for a sum ``X X^T``),
    without a copy of ``C``.
    """
    C = check_matrix(C, "C")
    if C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be square (n, n), got shape {tuple(C.shape)}")
    if not (damp >= 0.0):
        raise ValueError(f"damp must be >= 0, got {damp}")
    C = C.to(torch.float64)
    C = (C + C.mT).mul_(0.5 * scale)  # one n x n temporary: these matrices reach 8192 x 8192 (0.5 GB) in 7B models
    scale = float(C.diagonal().abs().mean())
    ridge = damp * scale
    if ridge > 0:
        C.diagonal().add_(ridge)
    L = _cholesky(C, floor)
    if L is not None:
        return Whitening("cholesky", ridge, 0, None, L)
    if C.shape[0] > EIGH_MAX_N:
        for relative in RIDGES:
            extra = relative * scale
            C.diagonal().add_(extra)
            ridge += extra
            L = _cholesky(C, floor)
            if L is not None:
                return Whitening("ridge", ridge, 0, None, L)
    evals, Q = torch.linalg.eigh(C)
    del C
    top = float(evals.max().clamp_min(0.0))
    threshold = floor * top if top > 0 else 1.0  # an all-zero C whitens to the identity
    clamped = int((evals < threshold).sum())
    evals_c = evals.clamp_min(threshold)
    root = evals_c.sqrt()
    return Whitening("eigh", ridge, clamped, float(evals.min()), Q, root)


def as_whitening(W: torch.Tensor, C: torch.Tensor | Whitening, damp: float = 0.0) -> Whitening:
    """``C`` (an ``(n, n)`` input second moment, factored by :func:`whiten`) or a precomputed :class:`Whitening`,
    checked against the ``n`` columns of ``W``."""
    wh = C if isinstance(C, Whitening) else None
    if wh is None:
        if not isinstance(C, torch.Tensor) or C.ndim != 2 or C.shape != (W.shape[1], W.shape[1]):
            got = tuple(C.shape) if isinstance(C, torch.Tensor) else type(C).__name__
            raise ValueError(f"C must have shape (n, n) = {(W.shape[1], W.shape[1])} to match W {tuple(W.shape)}, "
                             f"got {got}")
        wh = whiten(C, damp=damp)
    elif wh.size != W.shape[1]:
        raise ValueError(f"whitening is for {wh.size} inputs but W has {W.shape[1]} columns")
    return wh


def whitened_svd(
    W: torch.Tensor,
    C: torch.Tensor | Whitening,
    rank: RankSpec,
    *,
    damp: float = 0.0,
    solver: str | SVDSolver = "gram",
    generator: torch.Generator | int | None = None,
) -> LowRank:
    """Rank-``rank`` ``W'`` minimising ``||(W - W') X||_F`` where ``C = X X^T``.

    Args:
        W: ``(m, n)`` weight (outputs x inputs).
        C: ``(n, n)`` input second moment, or a precomputed :class:`Whitening` (shared by layers that read the same
            input, such as q/k/v projections).
        rank: see :func:`~rankwise.linalg.rank.resolve_rank`.
        damp: relative ridge, see :func:`whiten`.
        solver: SVD solver for ``W S``; ``"gram"`` by default (exact to rounding, and the whitened spectrum is too
            flat for randomized solvers to pay off).
        generator: seed for randomized solvers.

    Returns:
        :class:`LowRank` with ``U diag(s) Vh = W'``, where ``s`` are the singular values of ``W S`` (so truncating
        further stays optimal for the whitened objective); ``info["whitening"]`` says how ``C`` was factored.

    Reference: Wang et al., SVD-LLM (2024), https://arxiv.org/abs/2403.07378.
    """
    W = check_matrix(W, "W")
    wh = as_whitening(W, C, damp)
    # The covariance is factored in float64; W S and its SVD run in float32 unless W is float64 (errors made
    # there are measured in the whitened norm, where S^-1 does not amplify them).
    dtype = compute_dtype(W.dtype)
    A = wh.right_multiply(W.to(device=wh.basis.device, dtype=dtype))  # (m, n) = W S
    lr = truncated_svd(A, rank, solver=solver, generator=generator)
    Vh = wh.right_solve(lr.Vh)  # (r, n), float64
    info = {**lr.info, "whitening": wh.describe()}
    return LowRank(lr.U.to(W.device, W.dtype), lr.S.to(W.device, W.dtype), Vh.to(W.device, W.dtype), info,
                   whitening_fallback=wh.method != "cholesky")


def _check_weights(w: torch.Tensor | None, size: int, name: str) -> tuple[torch.Tensor | None, int]:
    if w is None:
        return None, 0
    if not isinstance(w, torch.Tensor) or w.ndim != 1 or w.shape[0] != size:
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{name} must be a 1-D tensor of length {size}, got {got}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"{name} must be finite and non-negative")
    w = w.to(torch.float64)
    top = float(w.max())
    floor = 1e-8 * top if top > 0 else 1.0
    return w.clamp_min(floor), int((w < floor).sum())


def weighted_svd(
    W: torch.Tensor,
    rank: RankSpec,
    row_weights: torch.Tensor | None = None,
    col_weights: torch.Tensor | None = None,
    *,
    solver: str | SVDSolver = "exact",
    generator: torch.Generator | int | None = None,
) -> LowRank:
    """Rank-``rank`` ``W'`` minimising ``||diag(a) (W - W') diag(b)||_F``.

    The closed form is ``W' = diag(a)^-1 [diag(a) W diag(b)]_r diag(b)^-1``. Zero weights are raised to
    ``1e-8`` of the largest (counted in ``info``); omitted weights are ones.

    Args:
        W: ``(m, n)`` matrix.
        rank: see :func:`~rankwise.linalg.rank.resolve_rank`.
        row_weights: ``(m,)`` non-negative ``a``; FWSVD passes the square root of the row-summed Fisher.
        col_weights: ``(n,)`` non-negative ``b``; ASVD passes per-input-channel activation scales.

    References: FWSVD https://arxiv.org/abs/2207.00112; ASVD https://arxiv.org/abs/2312.05821.
    """
    W = check_matrix(W, "W")
    m, n = W.shape
    a, clamped_rows = _check_weights(row_weights, m, "row_weights")
    b, clamped_cols = _check_weights(col_weights, n, "col_weights")
    A = W.to(compute_dtype(W.dtype) if a is None and b is None else torch.float64)
    if a is not None:
        A = a.to(A.device)[:, None] * A
    if b is not None:
        A = A * b.to(A.device)
    lr = truncated_svd(A, rank, solver=solver, generator=generator)
    U, Vh = lr.U, lr.Vh
    if a is not None:
        U = U / a.to(U.device)[:, None]
    if b is not None:
        Vh = Vh / b.to(Vh.device)
    info = {**lr.info, "clamped_row_weights": clamped_rows, "clamped_col_weights": clamped_cols}
    return LowRank(U.to(W.dtype), lr.S.to(W.dtype), Vh.to(W.dtype), info)


def refit_left(W: torch.Tensor, Vh: torch.Tensor, C: torch.Tensor, cross: torch.Tensor | None = None, *,
               ridge: float = 1e-10) -> torch.Tensor | None:
    """Least-squares left factor for a fixed right factor: ``argmin_U ||W X - U Vh Xh||_F``.

    Closed form ``U = W (X Xh^T) Vh^T (Vh Xh Xh^T Vh^T)^-1`` from second moments only: ``C = Xh Xh^T`` and
    ``cross = X Xh^T`` (``None`` means ``Xh = X``, i.e. ``cross = C``). With ``Xh`` the activations of an already
    compressed model and ``X`` the original ones, this also corrects errors from earlier layers (the update step of
    SVD-LLM, Wang et al. 2024, https://arxiv.org/abs/2403.07378). ``ridge`` is relative to the mean diagonal of the
    ``r x r`` system; a system still singular or too ill-conditioned to trust after it is refused (``None``).

    Returns:
        ``(m, r)`` in ``W``'s dtype, or ``None`` when the ``r x r`` system is singular or the solution is not finite
        (the caller keeps the factors it had).
    """
    W = check_matrix(W, "W")
    Vh64, C64 = Vh.double(), C.double()
    cross64 = C64 if cross is None else cross.double()
    gram = Vh64 @ C64 @ Vh64.mT  # (r, r)
    rhs = Vh64 @ cross64.mT @ W.double().mT  # (r, m)
    ridge = ridge * float(gram.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny))
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    L = _cholesky(gram + ridge * eye, 1e-8)  # None when singular or too ill-conditioned to trust
    if L is None or not float(gram.diagonal().max()) > 0:
        return None
    Ut = torch.cholesky_solve(rhs, L)
    return Ut.mT.to(W.dtype) if bool(torch.isfinite(Ut).all()) else None  # (m, r)


SPAN_FLOOR = 1e-6
"""Eigenvalues of the compressed inputs' covariance below this fraction of the largest are directions the anchored
fit does not regress on, when ``C`` is not positive definite: about ten times the rounding of the float32 products
the calibration statistics sum (``2^-23``), so directions the inputs do not span, whose eigenvalues are that
rounding, are never taken for signal."""


def anchored_svd(
    W: torch.Tensor,
    C: torch.Tensor | Whitening,
    cross: torch.Tensor,
    rank: RankSpec,
    *,
    weight: float = 1.0,
    damp: float = 0.0,
    solver: str | SVDSolver = "gram",
    generator: torch.Generator | int | None = None,
) -> LowRank:
    """Rank-``rank`` ``W'`` minimising ``||W X - W' Xh||_F``: the original outputs ``W X`` reproduced from the inputs
    ``Xh`` a partly compressed model gives this layer (AA-SVD's anchored objective).

    With ``C = Xh Xh^T = S S^T`` and ``P = X Xh^T``, the unconstrained minimiser is ``W* = W P C^-1`` and
    ``||W X - W' Xh||^2 = const + ||(W* - W') S||^2``, so ``W' = [W P S^-T]_r S^-1`` (the whitened truncation of
    ``W*``; with ``Xh = X`` it is :func:`whitened_svd`). When ``C`` is singular or too ill-conditioned for Cholesky
    (:func:`whiten`'s eigen form ``S = Q diag(sqrt(l))``), ``C^-1`` becomes the pseudo-inverse on the directions
    the compressed inputs span: ``W P S^-T = W P Q diag(1 / sqrt(l))`` with the columns of eigenvalues below
    :data:`SPAN_FLOOR` times the largest set to zero. Through those columns the regression would divide the rounding
    error of ``P`` by the eigenvalue's root; the objective hardly sees them (``Xh`` has next to no variance there).
    At ``a = 1``, with ``C = U_x diag(s^2) U_x^T`` from the SVD ``Xh = U_x diag(s) V_x^T``, ``A = W X V_x``: AA-SVD's
    optimum on the span, and its minimum-norm solution (``W'`` is zero along the directions left out). At ``a < 1``
    the ``(1 - a) W S`` part is not masked: along those directions ``W'`` keeps that share of the layer's own map
    (projected on the kept outputs), as the plain whitened truncation keeps all of it. ``info["anchored_dropped"]``
    counts the directions left out. When the regression or its factors are not finite (a cross moment holding NaN or
    Inf, or a regression past the dtype's range) this is :func:`whitened_svd` of ``W`` itself, ``anchored_fallback``
    is set and ``info["anchored_skipped"]`` is ``"not finite"``: the regression never blows up silently.

    ``W*`` is a full ``n x n`` regression from the compressed inputs to the original outputs; estimated from few
    tokens per input dimension it fits the calibration text's noise. ``weight`` ``a < 1`` shrinks the target towards
    the layer's own outputs, ``||W (a X + (1 - a) Xh) - W' Xh||``: ``W' = [a W P S^-T + (1 - a) W S]_r S^-1``
    (``a = 0`` is :func:`whitened_svd`).

    Args:
        W: ``(m, n)`` weight (outputs x inputs).
        C: ``(n, n)`` second moment of the compressed model's inputs ``Xh``, or its :class:`Whitening`.
        cross: ``(n, n)`` ``X Xh^T`` (original x compressed inputs of the same tokens, same scale as ``C``).
        weight: ``a`` in [0, 1], the weight of the original outputs in the target.
        rank, damp, solver, generator: as for :func:`whitened_svd`.

    Reference: Kumar et al., AA-SVD (2026), https://arxiv.org/abs/2604.02119.
    """
    W = check_matrix(W, "W")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight!r}")
    wh = as_whitening(W, C, damp)
    if cross.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"cross must have shape (n, n) = {(W.shape[1], W.shape[1])} to match W {tuple(W.shape)}, "
                         f"got {tuple(cross.shape)}")
    dtype = compute_dtype(W.dtype)
    W64 = W.to(device=wh.basis.device, dtype=torch.float64)
    A = wh.right_solve_transpose(W64 @ cross.double())  # (m, n) W* S = W P S^-T
    dropped = 0
    if wh.roots is not None:  # the eigen form: the pseudo-inverse on the directions the inputs span
        unspanned = wh.roots.square() < SPAN_FLOOR * float(wh.roots.square().max())
        A[:, unspanned] = 0.0
        dropped = int(unspanned.sum())
    if weight < 1.0:
        A.mul_(weight).add_(wh.right_multiply(W64), alpha=1.0 - weight)  # + (1 - a) W S, as C S^-T = S
    A = A.to(dtype)
    if not bool(torch.isfinite(A).all()):  # a cross moment with NaN/Inf, or a regression past the dtype's range
        return _unanchored(W, wh, rank, solver, generator, "not finite")
    lr = truncated_svd(A, rank, solver=solver, generator=generator)
    Vh = wh.right_solve(lr.Vh)  # (r, n), float64
    info = {**lr.info, "whitening": wh.describe(), "anchored": True, "anchored_dropped": dropped}
    out = LowRank(lr.U.to(W.device, W.dtype), lr.S.to(W.device, W.dtype), Vh.to(W.device, W.dtype), info,
                  whitening_fallback=wh.method != "cholesky")
    if not all(bool(torch.isfinite(t).all()) for t in (out.U, out.S, out.Vh)):
        return _unanchored(W, wh, rank, solver, generator, "not finite")
    return out


def _unanchored(W: torch.Tensor, wh: Whitening, rank: RankSpec, solver: str | SVDSolver,
                generator: torch.Generator | int | None, reason: str) -> LowRank:
    """:func:`whitened_svd` of ``W`` itself, marked as an anchored fit refused for ``reason`` (``"not finite"``: the
    regression or its factors overflowed)."""
    lr = whitened_svd(W, wh, rank, solver=solver, generator=generator)
    return replace(lr, info={**lr.info, "anchored": False, "anchored_skipped": reason}, anchored_fallback=True)
