"""Monarch matrices: products of two block-diagonal factors, and the projection of a dense matrix onto them.

Dao et al., "Monarch: Expressive Structured Matrices for Efficient and Accurate Training", ICML 2022,
https://arxiv.org/abs/2204.00595. A Monarch matrix is ``M = P L P^T R`` with ``R`` and ``L`` block-diagonal and
``P`` the permutation that reads a vector as a matrix and transposes it. Here it is generalised (as in the authors'
``fly`` code) to rectangular ``(m, n)`` matrices and to rank ``r`` per block pair, with ``b`` blocks on each side:

* the input ``x`` (``n``) is cut into ``b`` contiguous blocks of ``p = n / b``; block ``k`` of ``R`` maps its block to
  ``b r`` intermediates, ordered ``(l, rho)``: ``r`` for each output group ``l``;
* the intermediates are permuted ``(k, l, rho) -> (l, k, rho)`` (the ``P^T`` of the paper), so block ``l`` of ``L``
  sees ``r`` intermediates from every input block, and maps those ``b r`` values to ``q = m / b`` outputs;
* output ``a`` of block ``l`` is row ``a b + l`` of ``M`` (the paper's final ``P``: group ``l`` is strided).

Entry-wise, ``M[a b + l, k p + j] = sum_rho L[l, a, k r + rho] R[k, l r + rho, j]``: the ``(q, p)`` submatrix of rows
``{a b + l}`` and columns of input block ``k`` is a product of rank ``r`` whose two factors appear nowhere else. So
the Frobenius-nearest Monarch matrix is a truncated SVD of each of the ``b^2`` submatrices (Eckart-Young, one block
at a time): the paper's closed-form projection for ``r = 1``, ``m = n = b^2``. It stores ``b r (m + n)`` values, as a
rank-``b r`` factorisation would; ``b = 1`` is plain low rank; ``r = min(p, q)`` represents every ``(m, n)`` matrix.

The *whitened* projection targets the layer's output error ``||(W - M) X||_F`` with ``X X^T = C``. Whitening by a
full square root ``S`` of ``C`` (``W S``, then ``S^-1`` on the right) would mix the input blocks and destroy the
block structure of ``R``, so :func:`whitened_monarch_project` whitens each input block by a square root of its own
diagonal block ``C_kk``, which is exact when ``C`` is block-diagonal: each block pair is then the whitened low-rank
problem of SVD-LLM. The cross-block correlations that this ignores are then used, exactly, by refitting ``L`` by
least squares against the full ``C`` with ``R`` fixed (optional, on by default); that step never raises the error.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from rankwise.linalg._checks import check_matrix, compute_dtype
from rankwise.linalg.whiten import whiten


def monarch_shape_error(m: int, n: int, nblocks: object, rank: object | None = None) -> str | None:
    """``None`` if ``nblocks`` (and ``rank``, when given) describe a Monarch matrix of ``m`` rows (outputs) and ``n``
    columns (inputs), else a one-line ``"field: what is wrong and what is allowed"``."""
    if isinstance(nblocks, bool) or not isinstance(nblocks, numbers.Integral) or nblocks < 1:
        return f"nblocks: must be an integer >= 1 dividing out_features and in_features, got {nblocks!r}"
    if m % nblocks or n % nblocks:
        return (f"nblocks: {nblocks} does not divide out_features = {m} and in_features = {n}; allowed are the "
                f"common divisors of both")
    if rank is None:
        return None
    top = min(m, n) // nblocks
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= top:
        return f"rank: the rank per block must be an integer in [1, min(m, n) / nblocks = {top}], got {rank!r}"
    return None


def _check_shape(m: int, n: int, nblocks: object, rank: object) -> None:
    error = monarch_shape_error(m, n, nblocks, rank)
    if error is not None:
        raise ValueError(error)


@dataclass(frozen=True)
class Monarch:
    """The two block-diagonal factors of a Monarch matrix (layout in the module docstring).

    Attributes:
        left: ``(b, q, b r)``: block ``l`` of ``L`` maps the ``(k, rho)`` intermediates to ``q = m / b`` outputs.
        right: ``(b, b r, p)``: block ``k`` of ``R`` maps input block ``k`` (``p = n / b``) to its ``(l, rho)``
            intermediates.
        whitening: per input block, how its covariance block was factored (``"cholesky"``, ``"ridge"`` or
            ``"eigh"``, see :func:`~rankwise.linalg.whiten`); empty for the plain projection.
    """

    left: torch.Tensor
    right: torch.Tensor
    whitening: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        L, R = self.left, self.right
        if L.ndim != 3 or R.ndim != 3 or L.shape[0] != R.shape[0] or L.shape[2] != R.shape[1] \
                or L.shape[2] % L.shape[0]:
            raise ValueError(f"Monarch factors must have shapes (b, q, b r) and (b, b r, p); got left "
                             f"{tuple(L.shape)}, right {tuple(R.shape)}")

    @property
    def nblocks(self) -> int:
        return self.left.shape[0]

    @property
    def rank(self) -> int:
        """Rank ``r`` of each ``(q, p)`` block pair."""
        return self.left.shape[2] // self.nblocks

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` of the represented matrix."""
        return self.nblocks * self.left.shape[1], self.nblocks * self.right.shape[2]

    @property
    def num_params(self) -> int:
        """Stored values: ``b r (m + n)``."""
        return self.left.numel() + self.right.numel()

    def to_dense(self) -> torch.Tensor:
        """The ``(m, n)`` matrix, in the factors' dtype."""
        return monarch_dense(self.left, self.right)

    def to(self, *args, **kwargs) -> Monarch:
        """Move or cast both factors like :meth:`torch.Tensor.to`."""
        return Monarch(self.left.to(*args, **kwargs), self.right.to(*args, **kwargs), self.whitening)


def monarch_dense(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The ``(m, n)`` matrix of the factors ``left`` ``(b, q, b r)`` and ``right`` ``(b, b r, p)``."""
    b, q, br = left.shape
    r, p = br // b, right.shape[2]
    L4 = left.reshape(b, q, b, r)  # [l, a, k, rho]
    R4 = right.reshape(b, b, r, p)  # [k, l, rho, j]
    return torch.einsum("lakr,klrj->alkj", L4, R4).reshape(q * b, b * p)  # row a b + l, column k p + j


def monarch_matmul(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``x @ M^T`` for ``x`` of shape ``(..., n)`` with two batched matrix products (``M`` is never formed)."""
    b, q, br = left.shape
    r, p = br // b, right.shape[2]
    lead = x.shape[:-1]
    xb = x.reshape(-1, b, p).transpose(0, 1)  # (b, N, p): input blocks
    z = torch.bmm(xb, right.mT)  # (b, N, b r): [k, N, (l, rho)]
    z = z.reshape(b, -1, b, r).permute(2, 1, 0, 3).reshape(b, -1, br)  # (b, N, b r): [l, N, (k, rho)]
    y = torch.bmm(z, left.mT)  # (b, N, q): [l, N, a]
    return y.permute(1, 2, 0).reshape(*lead, q * b)  # output a b + l


def _blocks(W: torch.Tensor, b: int) -> torch.Tensor:
    """``(b, b, q, p)``: ``[l, k]`` is the submatrix of rows ``{a b + l}`` and the columns of input block ``k``."""
    m, n = W.shape
    return W.reshape(m // b, b, b, n // b).permute(1, 2, 0, 3)


def _truncate(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced rank-``rank`` factors ``(U sqrt(s), sqrt(s) Vh)`` of every matrix in the batch ``A`` ``(..., q, p)``.

    Signs are fixed per component: the largest-magnitude entry of each left vector is positive.
    """
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    U, s, Vh = U[..., :rank], s[..., :rank], Vh[..., :rank, :]
    idx = U.abs().argmax(dim=-2, keepdim=True)  # (..., 1, r)
    signs = torch.sign(U.gather(-2, idx))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    root = s.sqrt()
    return U * (signs * root[..., None, :]), Vh * (signs.mT * root[..., :, None])


def _assemble(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-pair factors ``U`` ``(b, b, q, r)`` and ``Vh`` ``(b, b, r, p)`` (indexed ``[l, k]``) as ``left``,
    ``right``."""
    b, _, q, r = U.shape
    left = U.permute(0, 2, 1, 3).reshape(b, q, b * r)  # [l, a, (k, rho)]
    right = Vh.permute(1, 0, 2, 3).reshape(b, b * r, Vh.shape[-1])  # [k, (l, rho), j]
    return left, right


def monarch_project(W: torch.Tensor, nblocks: int, rank: int) -> Monarch:
    """The Monarch matrix with ``nblocks`` blocks and rank ``rank`` per block pair nearest to ``W`` in Frobenius norm.

    Args:
        W: ``(m, n)`` matrix (outputs x inputs); ``nblocks`` must divide ``m`` and ``n``.
        nblocks: ``b``, the number of diagonal blocks of each factor.
        rank: ``r`` in ``[1, min(m, n) / b]``; ``1`` with ``m = n = b^2`` is the paper's Monarch class.

    Returns:
        :class:`Monarch` in ``W``'s dtype and device (computed in float32, or float64 for float64 input).

    Reference: Dao et al. (2022), https://arxiv.org/abs/2204.00595: their closed-form projection (rank 1 per block).
    """
    W = check_matrix(W, "W")
    _check_shape(*W.shape, nblocks, rank)
    A = _blocks(W.to(compute_dtype(W.dtype)), nblocks)  # (b, b, q, p)
    left, right = _assemble(*_truncate(A, rank))
    return Monarch(left.to(W.dtype), right.to(W.dtype))


def whitened_monarch_project(W: torch.Tensor, C: torch.Tensor, nblocks: int, rank: int, *, damp: float = 0.0,
                             refit: bool = True) -> Monarch:
    """A Monarch matrix ``M`` with small output error ``||(W - M) X||_F``, given ``C = X X^T``.

    Each input block ``k`` is whitened by a square root ``S_k`` of its covariance block ``C_kk`` (robustly, see
    :func:`~rankwise.linalg.whiten`), each block pair is truncated as ``[W_lk S_k]_r S_k^-1``, and with ``refit``
    every block of ``L`` is then refitted by least squares against the full ``C`` (``R`` fixed). The result is the
    exact optimum when ``C`` is block-diagonal over the input blocks; otherwise the block-diagonal whitening is an
    approximation (a full ``S^-1`` would break the block structure of ``R``) whose error the refit can only lower.

    Args:
        W: ``(m, n)`` weight (outputs x inputs).
        C: ``(n, n)`` input second moment, at any scale (a sum over tokens is fine: the solution does not change).
        nblocks: ``b``, dividing ``m`` and ``n``.
        rank: ``r`` in ``[1, min(m, n) / b]``.
        damp: relative ridge added to each covariance block before factorising, see :func:`whiten`.
        refit: refit ``L`` against the full ``C``.

    Returns:
        :class:`Monarch` in ``W``'s dtype and device, ``whitening`` naming how each block was factored.

    References: Dao et al. (2022), https://arxiv.org/abs/2204.00595; whitening as in SVD-LLM, Wang et al. (2024),
    https://arxiv.org/abs/2403.07378.
    """
    W = check_matrix(W, "W")
    m, n = W.shape
    _check_shape(m, n, nblocks, rank)
    if not isinstance(C, torch.Tensor) or C.shape != (n, n):
        got = tuple(C.shape) if isinstance(C, torch.Tensor) else type(C).__name__
        raise ValueError(f"C must have shape (n, n) = {(n, n)} to match W {tuple(W.shape)}, got {got}")
    b, p = nblocks, n // nblocks
    dtype = compute_dtype(W.dtype)
    C = C.to(W.device, torch.float64)
    whitenings = [whiten(C[k * p:(k + 1) * p, k * p:(k + 1) * p], damp=damp) for k in range(b)]
    S = torch.stack([wh.factor for wh in whitenings]).to(dtype)  # (b, p, p): S_k S_k^T = C_kk
    A = _blocks(W.to(dtype), b) @ S  # (b, b, q, p): [l, k] = W_lk S_k
    U, Vh = _truncate(A, rank)
    Vh = torch.stack([wh.right_solve(Vh[:, k]) for k, wh in enumerate(whitenings)], dim=1)  # (b, b, r, p), f64
    left, right = _assemble(U.double(), Vh)
    if refit:
        left = _refit_left(W.double(), C, right)
    return Monarch(left.to(W.dtype), right.to(W.dtype), tuple(wh.method for wh in whitenings))


def _refit_left(W: torch.Tensor, C: torch.Tensor, right: torch.Tensor, ridge: float = 1e-10) -> torch.Tensor:
    """``argmin_L ||(W - M(L, R)) X||_F`` over ``L`` for fixed ``R``, in float64; ``(b, q, b r)``.

    Rows of output group ``l`` are ``L_l D_l`` with ``D_l`` ``(b r, n)`` block-diagonal (block ``k`` is the
    ``l``-th slice of ``R_k``), so ``L_l = W_l C D_l^T (D_l C D_l^T)^-1``, one ``(b r)``-sized system per group.
    ``ridge`` (relative to the Gram's mean diagonal) keeps it solvable when ``C`` is singular.
    """
    b, br, p = right.shape
    r, n = br // b, b * p
    q = W.shape[0] // b
    Cb = C.reshape(b, p, n)  # [k, j, :]: the rows of input block k
    R5 = right.reshape(b, b, r, p)  # [k, l, rho, j]
    left = W.new_empty(b, q, br)
    for g in range(b):
        D = R5[:, g]  # (b, r, p): the diagonal blocks of D_g
        DC = torch.bmm(D, Cb).reshape(br, n)  # D_g C
        gram = torch.einsum("xkj,kyj->xky", DC.reshape(br, b, p), D).reshape(br, br)  # D_g C D_g^T
        rhs = DC @ W[g::b].mT  # (b r, q): D_g C W_g^T, rows a b + g of W
        gram.diagonal().add_(ridge * float(gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)))
        factor, info = torch.linalg.cholesky_ex(gram)
        sol = torch.cholesky_solve(rhs, factor) if int(info) == 0 else torch.linalg.lstsq(gram, rhs).solution
        left[g] = sol.mT
    return left
