"""Sparse dictionary factorisation ``W ~= S D``: batched orthogonal matching pursuit, K-SVD and the whitened fit of
CoSpaDi (Shopkhoev et al., "CoSpaDi: Compressing LLMs via Calibration-Guided Sparse Dictionary Learning", 2025,
https://arxiv.org/abs/2509.22075).

Each row of the ``(m, n)`` weight (one output) is a combination of exactly ``s`` of the ``k`` rows (atoms) of a dense
dictionary ``D`` ``(k, n)``, so different outputs live in different ``s``-dimensional subspaces (a union of subspaces;
a rank-``k`` factorisation is the case ``s = k``). The codes are stored as ``(m, s)`` values and ``(m, s)`` atom
indices.

* :func:`omp`: orthogonal matching pursuit for all rows at once (Batch-OMP, Rubinstein, Zibulevsky and Elad 2008:
  everything through the Gram matrix ``D D^T``, a progressive inverse Cholesky factor per row); optionally several
  atoms per greedy step (generalised OMP, Wang, Kwon and Shim 2012), which divides the number of steps.
* :func:`ksvd`: K-SVD (Aharon, Elad and Bruckstein 2006) with the one-power-step atom update of approximate K-SVD
  (Rubinstein et al. 2008), each sweep followed by a least-squares refit of the whole dictionary (MOD); a row keeps
  its previous code when a new pursuit does worse, so the error never rises.
* :func:`sparse_dictionary` / :func:`whitened_dictionary`: the fit of ``W`` itself, or of ``W S`` with
  ``X X^T = S S^T`` so that ``||(W - W') X||_F`` is minimised (CoSpaDi's calibration-guided objective), started from
  the top-``k`` right singular vectors and their hard-thresholded codes (what OMP gives on orthonormal atoms).

The pursuit's least squares cost about ``s^3`` per row (``s`` is in the hundreds for LLM layers at ``k / s = 2``),
the atom sweeps about ``s n`` per row and atom: the fits default to no recoding pursuit after the start
(``iterations=0``) and two sweeps, which is what keeps a 135M-parameter model within minutes on two CPU cores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from rankwise.linalg._checks import check_matrix, check_positive_int, compute_dtype, make_generator
from rankwise.linalg.omp import _flush_, _omp, _width
from rankwise.linalg.svd import svd_flip
from rankwise.linalg.whiten import Whitening, as_whitening


@dataclass(frozen=True)
class SparseDictionary:
    """``W ~= codes @ dictionary`` with exactly ``s`` stored codes per row.

    Attributes:
        dictionary: ``(k, n)``: ``k`` atoms over the input space.
        values: ``(m, s)`` code values.
        indices: ``(m, s)`` int64 atom indices, distinct and ascending within a row.
        info: what the fit did (relative errors after each stage, the whitening); for reports, never for logic.
        whitening_fallback: the input covariance was not positive definite and was factored after a ridge or by a
            clamped eigen-decomposition (whitened fits only).
    """

    dictionary: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict, compare=False)
    whitening_fallback: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if self.dictionary.ndim != 2 or self.values.ndim != 2 or self.indices.shape != self.values.shape:
            raise ValueError(f"SparseDictionary needs dictionary (k, n), values and indices (m, s); got "
                             f"{tuple(self.dictionary.shape)}, {tuple(self.values.shape)}, {tuple(self.indices.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` of the approximated matrix."""
        return self.values.shape[0], self.dictionary.shape[1]

    @property
    def atoms(self) -> int:
        return self.dictionary.shape[0]

    @property
    def nonzeros(self) -> int:
        """Codes per row ``s``."""
        return self.values.shape[1]

    @property
    def num_params(self) -> int:
        """Stored values ``k n + m s`` (the paper's count: indices are not values)."""
        return self.dictionary.numel() + self.values.numel()

    def codes(self) -> torch.Tensor:
        """The ``(m, k)`` code matrix with ``s`` non-zeros per row."""
        return scatter_codes(self.values, self.indices, self.atoms)

    def to_dense(self) -> torch.Tensor:
        """The ``(m, n)`` matrix ``codes @ dictionary``."""
        return self.codes() @ self.dictionary

    def to(self, *args: Any, **kwargs: Any) -> SparseDictionary:
        """Move or cast the floating-point tensors like :meth:`torch.Tensor.to` (indices only move)."""
        dictionary, values = self.dictionary.to(*args, **kwargs), self.values.to(*args, **kwargs)
        return replace(self, dictionary=dictionary, values=values, indices=self.indices.to(values.device),
                       info=dict(self.info))


def scatter_codes(values: torch.Tensor, indices: torch.Tensor, atoms: int) -> torch.Tensor:
    """The dense ``(m, atoms)`` code matrix of ``(m, s)`` values at ``(m, s)`` indices (repeats add up)."""
    return values.new_zeros(values.shape[0], atoms).scatter_add_(1, indices.long(), values)


def nonzeros_for(atoms: int, atoms_per_nonzero: float) -> int:
    """Codes per row for ``atoms`` atoms at the ratio ``k / s`` (at least one)."""
    return max(1, math.floor(atoms / atoms_per_nonzero + 1e-9))


def _update_atoms(D: torch.Tensor, S: torch.Tensor, support: torch.Tensor, R: torch.Tensor) -> None:
    """One K-SVD sweep, in place: each atom and its coefficients on the rows that use it, by one power step.

    With ``E`` the residual of those rows with atom ``j`` put back, ``g = E d``, ``d' = E^T g / ||E^T g||`` and
    ``g' = E d'`` never increase ``||E - g' d'^T||`` (a power step raises the Rayleigh quotient of ``E^T E``). An
    atom no row uses is replaced by the normalised worst-represented row (then used from the next pursuit on).
    """
    worst = (R * R).sum(1)
    pairs = support.mT.nonzero()  # (atom, row), grouped by atom
    counts = torch.bincount(pairs[:, 0], minlength=D.shape[0]).tolist()
    for j, rows in enumerate(pairs[:, 1].split(counts)):
        if not counts[j]:
            i = int(worst.argmax())
            if float(worst[i]) > 0:
                D[j] = R[i] / R[i].norm()
                worst[i] = -1.0
            continue
        d = D[j]
        c = S[rows, j]
        E = R.index_select(0, rows).addr_(c, d)  # (|rows|, n): their residual with atom j put back
        v = E.mT @ (E @ d)  # E^T E d
        norm = torch.linalg.vector_norm(v)
        if float(norm) == 0.0:
            continue
        dn = _flush_(v / norm)
        g = E @ dn
        R.index_copy_(0, rows, E.addr_(g, dn, alpha=-1.0))
        S[rows, j] = g
        D[j] = dn


def _unit_atoms(D: torch.Tensor, S: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``D`` with unit rows (zero rows stay zero) and ``S`` with its columns scaled to keep ``S D``."""
    norms = torch.linalg.vector_norm(D, dim=1)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    return _flush_(D / norms[:, None]), None if S is None else _flush_(S * norms)


def _refit_dictionary(Y: torch.Tensor, D: torch.Tensor, S: torch.Tensor, R: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``argmin_D ||Y - S D||_F`` for fixed codes (the MOD update of Engan, Aase and Husoy 1999: float64 normal
    equations, a tiny ridge for unused atoms), renormalised; keeps ``(D, S, R)`` if rounding makes it no better.

    Returns:
        ``(D, S, R)``: unit atoms, the codes rescaled to match, the residual.
    """
    S64 = S.double()
    gram = S64.mT @ S64  # (k, k)
    ridge = 1e-12 * float(gram.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny))
    gram.diagonal().add_(ridge)
    L, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return D, S, R
    refit, codes = _unit_atoms(torch.cholesky_solve(S64.mT @ Y.double(), L).to(D.dtype), S)
    residual = Y - codes @ refit
    if float((residual * residual).sum()) < float((R * R).sum()):
        return refit, codes, residual
    return D, S, R


def _recode(Y: torch.Tensor, D: torch.Tensor, S: torch.Tensor, R: torch.Tensor, support: torch.Tensor, s: int,
            width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A new pursuit on ``D``; each row keeps its current code where the new one fits it worse.

    Returns:
        ``(S, R, support)``.
    """
    values, indices = _omp(Y, D, s, width)
    S_new = scatter_codes(values, indices, D.shape[0])
    R_new = Y - S_new @ D
    better = ((R_new * R_new).sum(1) < (R * R).sum(1))[:, None]
    new_support = torch.zeros_like(support).scatter_(1, indices, True)
    return torch.where(better, S_new, S), torch.where(better, R_new, R), torch.where(better, new_support, support)


def threshold_codes(Y: torch.Tensor, D: torch.Tensor, nonzeros: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``nonzeros`` largest correlations ``|Y D^T|`` per row: exactly what OMP returns when ``D`` has
    orthonormal rows (hard thresholding), at the cost of one product.

    Returns:
        ``(m, s)`` values and ``(m, s)`` ascending int64 indices.
    """
    corr = Y @ D.mT  # (m, k)
    indices = corr.abs().topk(nonzeros, dim=1).indices.sort(dim=1).values
    return corr.gather(1, indices), indices


def ksvd(Y: torch.Tensor, D: torch.Tensor, nonzeros: int, iterations: int, *, steps: int | None = None,
         sweeps: int = 2, codes: tuple[torch.Tensor, torch.Tensor] | None = None
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """K-SVD from the starting dictionary ``D``, each atom sweep followed by a least-squares dictionary refit.

    The first codes are ``codes`` (values and indices) if given, else :func:`omp` on ``D``. Then ``sweeps`` K-SVD
    atom sweeps (:func:`_update_atoms`), each followed by a refit of the whole dictionary for the codes (MOD), and
    ``iterations`` times a new pursuit (each row keeping its current code where the new one fits it worse) followed
    by as many sweeps and refits. The pursuit is what changes which atoms a row uses, and costs the most (about
    ``s^3`` per row); the sweeps only move atoms and values. Every stage keeps or lowers the error.

    Args:
        Y: ``(m, n)`` signals (float32 or float64).
        D: ``(k, n)`` starting atoms (normalised here).
        nonzeros: ``s`` codes per row.
        iterations: pursuits after the first codes, ``>= 0``.
        steps: greedy steps of each pursuit, see :func:`omp`.
        sweeps: atom sweeps (each with a refit) after each pursuit, ``>= 0`` (``0``: one refit).
        codes: the first ``(m, s)`` values and indices, e.g. :func:`threshold_codes` for orthonormal atoms.

    Returns:
        ``(k, n)`` unit atoms, ``(m, s)`` values, ``(m, s)`` ascending indices, and the squared Frobenius error
        after the first codes and after every later stage (non-increasing).
    """
    width = _width(nonzeros, steps)
    sweeps = check_positive_int(sweeps, "sweeps")
    m, k = Y.shape[0], D.shape[0]
    D, _ = _unit_atoms(D)
    values, indices = _omp(Y, D, nonzeros, width) if codes is None else codes
    S = scatter_codes(values, indices, k)
    support = torch.zeros(m, k, dtype=torch.bool, device=Y.device).scatter_(1, indices, True)
    R = Y - S @ D
    errors = [float((R * R).sum())]
    for round_ in range(iterations + 1):
        if round_:
            S, R, support = _recode(Y, D, S, R, support, nonzeros, width)
            errors.append(float((R * R).sum()))
        for _ in range(max(sweeps, 1)):
            if sweeps:
                _update_atoms(D, S, support, R)
                errors.append(float((R * R).sum()))
            D, S, R = _refit_dictionary(Y, D, S, R)
            errors.append(float((R * R).sum()))
    indices = support.nonzero()[:, 1].view(m, nonzeros)  # row-major: ascending within each row
    return D, S.gather(1, indices), indices, errors


# --- the fit of a weight --------------------------------------------------------------------------------------------


def _check_sizes(atoms: int, nonzeros: int, iterations: int, steps: int | None, sweeps: int) -> tuple[int, int, int]:
    atoms = check_positive_int(atoms, "atoms", 1)
    nonzeros = check_positive_int(nonzeros, "nonzeros", 1)
    if nonzeros > atoms:
        raise ValueError(f"nonzeros must be at most atoms = {atoms}, got {nonzeros}")
    _width(nonzeros, steps)
    check_positive_int(sweeps, "sweeps")
    return atoms, nonzeros, check_positive_int(iterations, "iterations")


def _start(Y: torch.Tensor, atoms: int, generator: torch.Generator) -> torch.Tensor:
    """The top-``atoms`` right singular vectors of ``Y``; beyond its ``min(m, n)`` of them, rows of ``Y`` drawn
    with ``generator`` (then Gaussian atoms if ``Y`` has too few rows)."""
    m, n = Y.shape
    U, _, Vh = torch.linalg.svd(Y, full_matrices=False)
    _, Vh = svd_flip(U, Vh)
    D = Vh[:atoms]
    if atoms > D.shape[0]:
        extra = atoms - D.shape[0]
        rows = Y[torch.randperm(m, generator=generator)[:extra].to(Y.device)]
        if extra > m:
            rows = torch.cat([rows, torch.randn(extra - m, n, generator=generator, dtype=Y.dtype).to(Y.device)])
        D = torch.cat([D, rows])
    return D


def _fit(Y: torch.Tensor, atoms: int, nonzeros: int, iterations: int, steps: int | None, sweeps: int,
         generator: torch.Generator | int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """The singular-vector start and :func:`ksvd`, on ``Y`` scaled to unit maximum (so that :func:`_flush_`'s
    threshold is far below anything that matters); returns relative Frobenius errors."""
    scale = float(Y.abs().max())
    m, n = Y.shape
    if scale == 0.0:
        indices = torch.arange(nonzeros, device=Y.device).expand(m, nonzeros).clone()
        return Y.new_zeros(atoms, n), Y.new_zeros(m, nonzeros), indices, [0.0]
    Y = Y / scale
    D = _start(Y, atoms, make_generator(generator))
    codes = threshold_codes(Y, D, nonzeros) if atoms <= min(m, n) else None  # singular vectors: orthonormal
    D, values, indices, errors = ksvd(Y, D, nonzeros, iterations, steps=steps, sweeps=sweeps, codes=codes)
    total = float((Y * Y).sum())
    return D, values * scale, indices, [math.sqrt(e / total) for e in errors]


def sparse_dictionary(W: torch.Tensor, atoms: int, nonzeros: int, *, iterations: int = 0,
                      steps: int | None = 16, sweeps: int = 2, generator: torch.Generator | int | None = None
                      ) -> SparseDictionary:
    """``W ~= S D`` minimising ``||W - S D||_F`` with ``s = nonzeros`` codes per row of ``W`` over ``atoms`` atoms.

    Started from the top-``atoms`` right singular vectors of ``W`` and their hard-thresholded codes (what OMP gives
    for orthonormal atoms; with ``s = k`` that start is already the best rank-``k`` fit), then :func:`ksvd`.

    Args:
        W: ``(m, n)``; decomposed in float32 (float64 if ``W`` is), returned in ``W``'s dtype.
        atoms: ``k >= 1`` (more than ``min(m, n)`` draws the rest from rows of ``W`` with ``generator``).
        nonzeros: ``s`` in ``[1, k]``.
        iterations: pursuits after the start, ``>= 0``, see :func:`ksvd`.
        steps: greedy steps of each pursuit, see :func:`omp` (``None``: exact OMP).
        sweeps: K-SVD atom sweeps after the start and after each pursuit, see :func:`ksvd`.
        generator: seed for the atoms beyond ``min(m, n)``; ``None`` means seed 0.

    Returns:
        :class:`SparseDictionary`; ``info["errors"]`` holds the relative Frobenius error after each stage.
    """
    W = check_matrix(W, "W")
    atoms, nonzeros, iterations = _check_sizes(atoms, nonzeros, iterations, steps, sweeps)
    Y = W.to(compute_dtype(W.dtype))
    D, values, indices, errors = _fit(Y, atoms, nonzeros, iterations, steps, sweeps, generator)
    info = {"errors": errors}
    return SparseDictionary(D.to(W.dtype), values.to(W.dtype), indices, info)


def whitened_dictionary(W: torch.Tensor, C: torch.Tensor | Whitening, atoms: int, nonzeros: int, *,
                        damp: float = 0.0, iterations: int = 0, steps: int | None = 16, sweeps: int = 2,
                        generator: torch.Generator | int | None = None) -> SparseDictionary:
    """``W ~= S D`` minimising ``||(W - S D) X||_F`` where ``C = X X^T`` (CoSpaDi's calibration-guided objective).

    With ``C = L L^T`` the objective is ``||W L - S (D L)||_F``: the dictionary ``D_w`` is learnt on ``W L`` by
    :func:`sparse_dictionary`'s procedure and mapped back, ``D = D_w L^-1``; the codes are unchanged.

    Args:
        W: ``(m, n)`` weight (outputs x inputs).
        C: ``(n, n)`` input second moment, or a precomputed :class:`~rankwise.linalg.Whitening`.
        atoms, nonzeros, iterations, steps, sweeps, generator: as in :func:`sparse_dictionary`.
        damp: relative ridge, see :func:`~rankwise.linalg.whiten`.

    Returns:
        :class:`SparseDictionary` in ``W``'s dtype; ``info["errors"]`` are relative errors in the whitened norm and
        ``info["whitening"]`` says how ``C`` was factored.

    Reference: Shopkhoev et al., CoSpaDi (2025), https://arxiv.org/abs/2509.22075.
    """
    W = check_matrix(W, "W")
    atoms, nonzeros, iterations = _check_sizes(atoms, nonzeros, iterations, steps, sweeps)
    wh = as_whitening(W, C, damp)
    dtype = compute_dtype(W.dtype)
    Y = wh.right_multiply(W.to(device=wh.basis.device, dtype=dtype))  # (m, n) = W L
    Dw, values, indices, errors = _fit(Y, atoms, nonzeros, iterations, steps, sweeps, generator)
    D = wh.right_solve(Dw)  # (k, n) = D_w L^-1, float64
    info = {"errors": errors, "whitening": wh.describe()}
    return SparseDictionary(D.to(W.device, W.dtype), values.to(W.device, W.dtype), indices.to(W.device), info,
                            whitening_fallback=wh.method != "cholesky")
