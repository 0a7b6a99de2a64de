"""Random sketches as operators, sketched least squares, and Nystrom approximation.

A sketch ``S`` is a ``(k, m)`` random matrix applied on the left (``S @ A``) without forming ``S`` when its structure
allows: Gaussian (dense by nature), very sparse sign projection (Li, Hastie, Church 2006,
https://doi.org/10.1145/1150402.1150436; stored sparse), SRHT (subsampled randomized Hadamard transform, Tropp 2011,
https://arxiv.org/abs/1011.1595; fast Walsh-Hadamard transform, O(m log m) per column) and CountSketch (Clarkson and
Woodruff 2013, https://arxiv.org/abs/1207.6365; one scatter-add, O(nnz)). Every sketch is reproducible from its seed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from rankwise.linalg._checks import check_matrix, check_positive_int, compute_dtype, make_generator, randn
from rankwise.linalg.lowrank import LowRank

SKETCHES = ("gaussian", "sparse_sign", "srht", "countsketch")


class Sketch(ABC):
    """A ``(k, m)`` linear map applied as ``sketch @ A`` (or ``sketch.apply(A)``)."""

    k: int
    m: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.k, self.m

    @abstractmethod
    def apply(self, A: torch.Tensor) -> torch.Tensor:
        """``S @ A`` for ``A`` of shape ``(m, n)`` (or ``(m,)``), in ``A``'s dtype."""

    def __matmul__(self, A: torch.Tensor) -> torch.Tensor:
        return self.apply(A)

    def to_dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The explicit ``(k, m)`` matrix, for tests and small problems."""
        return self.apply(torch.eye(self.m, dtype=dtype))

    def _check(self, A: torch.Tensor) -> tuple[torch.Tensor, bool]:
        vector = A.ndim == 1
        A2 = A[:, None] if vector else A
        if A2.ndim != 2 or A2.shape[0] != self.m:
            raise ValueError(f"sketch expects an input with {self.m} rows, got shape {tuple(A.shape)}")
        return A2, vector


@dataclass
class GaussianSketch(Sketch):
    """Dense i.i.d. ``N(0, 1/k)`` entries."""

    k: int
    m: int
    generator: torch.Generator | int | None = None

    def __post_init__(self) -> None:
        self._matrix = randn((self.k, self.m), make_generator(self.generator), torch.float64, torch.device("cpu"))
        self._matrix /= math.sqrt(self.k)

    def apply(self, A: torch.Tensor) -> torch.Tensor:
        A2, vector = self._check(A)
        out = self._matrix.to(A2.device, A2.dtype) @ A2
        return out[:, 0] if vector else out


@dataclass
class SparseSignSketch(Sketch):
    """Very sparse random projection: entries ``+-sqrt(1 / (k * density))`` with probability ``density / 2`` each.

    ``density`` defaults to ``1 / sqrt(m)`` (Li, Hastie, Church 2006). Only the non-zeros are drawn (a binomial
    count, then positions; the rare repeated position is summed) and stored as a sparse COO matrix, so memory is
    ``O(density * k * m)``.
    """

    k: int
    m: int
    density: float | None = None
    generator: torch.Generator | int | None = None

    def __post_init__(self) -> None:
        density = self.density if self.density is not None else 1.0 / math.sqrt(self.m)
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        gen = make_generator(self.generator)
        total = self.k * self.m
        count = torch.tensor([float(total)], dtype=torch.float64)
        nnz = max(1, int(torch.binomial(count, torch.tensor([density], dtype=torch.float64), generator=gen)))
        flat = torch.randint(0, total, (nnz,), generator=gen)
        signs = (torch.randint(0, 2, (nnz,), generator=gen) * 2 - 1).to(torch.float64)
        indices = torch.stack((flat // self.m, flat % self.m))
        scale = math.sqrt(1.0 / (self.k * density))
        sparse = torch.sparse_coo_tensor(indices, signs * scale, (self.k, self.m), check_invariants=True)
        self._sparse = sparse.coalesce()

    def apply(self, A: torch.Tensor) -> torch.Tensor:
        A2, vector = self._check(A)
        dtype = compute_dtype(A2.dtype)
        out = torch.sparse.mm(self._sparse.to(A2.device, dtype), A2.to(dtype)).to(A2.dtype)
        return out[:, 0] if vector else out


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform along dim 0 (length a power of two)."""
    m = x.shape[0]
    if m & (m - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {m}")
    rest = x.shape[1:]
    h = 1
    y = x
    while h < m:
        y = y.reshape(m // (2 * h), 2, h, *rest)  # pairs of blocks of size h
        a, b = y[:, 0], y[:, 1]
        y = torch.stack((a + b, a - b), dim=1)
        h *= 2
    return y.reshape(m, *rest) / math.sqrt(m)


@dataclass
class SRHTSketch(Sketch):
    """Subsampled randomized Hadamard transform ``sqrt(p / k) R H D`` (inputs zero-padded to ``p = 2^ceil(log2 m)``)."""

    k: int
    m: int
    generator: torch.Generator | int | None = None

    def __post_init__(self) -> None:
        gen = make_generator(self.generator)
        self._padded = 1 << max(0, (self.m - 1).bit_length())
        if self.k > self._padded:
            raise ValueError(f"SRHT sketch size k={self.k} exceeds the padded dimension {self._padded}")
        self._signs = torch.randint(0, 2, (self.m,), generator=gen, dtype=torch.int8) * 2 - 1
        self._rows = torch.randperm(self._padded, generator=gen)[: self.k]

    def apply(self, A: torch.Tensor) -> torch.Tensor:
        A2, vector = self._check(A)
        dtype = compute_dtype(A2.dtype)
        x = A2.to(dtype) * self._signs.to(A2.device, dtype)[:, None]
        if self._padded > self.m:
            x = torch.cat((x, x.new_zeros(self._padded - self.m, x.shape[1])))
        y = fwht(x)[self._rows.to(A2.device)] * math.sqrt(self._padded / self.k)
        out = y.to(A2.dtype)
        return out[:, 0] if vector else out


@dataclass
class CountSketch(Sketch):
    """Each input row is added, with a random sign, to one random output row."""

    k: int
    m: int
    generator: torch.Generator | int | None = None

    def __post_init__(self) -> None:
        gen = make_generator(self.generator)
        self._buckets = torch.randint(0, self.k, (self.m,), generator=gen)
        self._signs = torch.randint(0, 2, (self.m,), generator=gen, dtype=torch.int8) * 2 - 1

    def apply(self, A: torch.Tensor) -> torch.Tensor:
        A2, vector = self._check(A)
        signed = A2 * self._signs.to(A2.device, A2.dtype)[:, None]
        out = A2.new_zeros(self.k, A2.shape[1]).index_add_(0, self._buckets.to(A2.device), signed)
        return out[:, 0] if vector else out


def make_sketch(kind: str, k: int, m: int, *, generator: torch.Generator | int | None = None) -> Sketch:
    """Build a ``(k, m)`` sketch by name: one of ``gaussian``, ``sparse_sign``, ``srht``, ``countsketch``."""
    k = check_positive_int(k, "k", minimum=1)
    m = check_positive_int(m, "m", minimum=1)
    classes = {"gaussian": GaussianSketch, "sparse_sign": SparseSignSketch, "srht": SRHTSketch,
               "countsketch": CountSketch}
    if kind not in classes:
        raise ValueError(f"kind must be one of {', '.join(SKETCHES)}, got {kind!r}")
    return classes[kind](k=k, m=m, generator=generator)


def sketch_lstsq(A: torch.Tensor, b: torch.Tensor, sketch_size: int | None = None, *, kind: str = "srht",
                 generator: torch.Generator | int | None = None) -> torch.Tensor:
    """Sketch-and-solve least squares: ``argmin_x ||S (A x - b)||`` for a tall ``A`` (Sarlos 2006).

    With ``sketch_size`` a few times ``n`` (default ``4 n``) the residual is within a small factor of optimal with
    high probability, at the cost of one sketch plus an ``(k, n)`` solve instead of ``(m, n)``.

    Args:
        A: ``(m, n)`` with ``m >= n``.
        b: ``(m,)`` or ``(m, p)`` right-hand side.
        sketch_size: rows ``k`` of the sketch, ``n <= k <= m``.
        kind: sketch name, see :func:`make_sketch`.

    Reference: Sarlos (2006) https://doi.org/10.1109/FOCS.2006.37.
    """
    A = check_matrix(A, "A")
    m, n = A.shape
    if m < n:
        raise ValueError(f"A must be tall (m >= n) for sketched least squares, got shape {(m, n)}")
    if not isinstance(b, torch.Tensor) or b.shape[0] != m or b.ndim not in (1, 2):
        got = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
        raise ValueError(f"b must have shape ({m},) or ({m}, p) to match A, got {got}")
    check_matrix(b[:, None] if b.ndim == 1 else b, "b")
    k = min(m, 4 * n) if sketch_size is None else check_positive_int(sketch_size, "sketch_size", minimum=1)
    if not n <= k <= m:
        raise ValueError(f"sketch_size must be between n={n} and m={m}, got {k}")
    S = make_sketch(kind, k, m, generator=generator)
    dtype = compute_dtype(A.dtype)
    SA, Sb = S.apply(A.to(dtype)), S.apply(b.to(dtype))
    rhs = Sb[:, None] if b.ndim == 1 else Sb
    x = torch.linalg.lstsq(SA, rhs).solution  # (n, p)
    return (x[:, 0] if b.ndim == 1 else x).to(A.dtype)


def nystrom(A: torch.Tensor, rank: int, *, oversample: int = 8,
            generator: torch.Generator | int | None = None) -> LowRank:
    """Randomized Nystrom approximation ``A ~= U diag(L) U^T`` of a symmetric PSD matrix.

    Uses the numerically stable shifted form of Tropp, Yurtsever, Udell, Cevher (2017, Alg. 3),
    https://arxiv.org/abs/1706.05736, with ``rank + oversample`` test vectors, truncated to ``rank``.
    """
    A = check_matrix(A, "A")
    n = A.shape[0]
    if A.shape[1] != n:
        raise ValueError(f"A must be square and symmetric PSD, got shape {tuple(A.shape)}")
    rank = check_positive_int(rank, "rank")
    rank = min(rank, n)
    if rank == 0:
        return LowRank(A.new_zeros(n, 0), A.new_zeros(0), A.new_zeros(0, n), {"solver": "nystrom"})
    size = min(n, rank + check_positive_int(oversample, "oversample"))
    dtype = compute_dtype(A.dtype)
    M = A.to(dtype)
    Omega = torch.linalg.qr(randn((n, size), make_generator(generator), dtype, A.device)).Q  # (n, l)
    Y = M @ Omega
    shift = torch.finfo(dtype).eps * math.sqrt(n) * float(torch.linalg.matrix_norm(Y, ord=2))
    Y = Y + shift * Omega
    core = Omega.mT @ Y
    Lc = torch.linalg.cholesky(0.5 * (core + core.mT))
    B = torch.linalg.solve_triangular(Lc, Y.mT, upper=False).mT  # Y Lc^-T, (n, l)
    U, s, _ = torch.linalg.svd(B, full_matrices=False)
    lam = (s.pow(2) - shift).clamp_min(0.0)[:rank]
    U = U[:, :rank]
    return LowRank(U.to(A.dtype), lam.to(A.dtype), U.mT.to(A.dtype), {"solver": "nystrom", "shift": shift})
