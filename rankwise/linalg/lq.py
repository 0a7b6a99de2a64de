"""Low-rank plus quantised decomposition ``W ~= Q + L1 L2`` (LQ-LoRA).

Guo et al., "LQ-LoRA: Low-rank plus Quantized Matrix Decomposition for Efficient Language Model Finetuning",
ICLR 2024, https://arxiv.org/abs/2311.12023. Starting from ``Q = 0``, alternate

* ``L1 L2 = SVD_r(W - Q)`` (the best rank-``r`` fit of what the quantised part misses), then
* ``Q = quant(W - L1 L2)`` (NF-``b`` with double-quantised block scales, :mod:`rankwise.linalg.quant`, or HQQ's
  group-wise affine quantisation, :mod:`rankwise.linalg.affine`),

and stop as soon as the error ``||W - Q - L1 L2||_F`` no longer falls (or after ``iterations`` rounds). Neither step
is guaranteed to lower the error (quantisation is not a projection: its scales move), which is why the paper stops on
a rise; here the best pair seen is returned, so the result is never worse than any earlier iterate, and equals plain
NF quantisation at rank 0.

Data-aware variants minimise a weighted error instead:

* ``whitening`` (this library's, in the spirit of SVD-LLM): ``||(W - Q - L1 L2) X||_F`` for the calibration inputs
  ``X`` (``X X^T = S S^T``); the low-rank step is the whitened SVD of ``W - Q``;
* ``row_weights``/``col_weights`` (the paper's Fisher-weighted variant with its "two-sided" reduction of the
  elementwise Fisher to row and column weights): ``||diag(a) (W - Q - L1 L2) diag(b)||_F``; the low-rank step is
  the weighted SVD of ``W - Q``.

Unlike the paper's Fisher variant, which alternates in the weighted norm from ``Q = 0``, both start from the plain
decomposition: the weighted low-rank fit of ``W`` has large entries along the directions the weights neglect (for
whitening, ``S^-1`` amplifies them), which inflates the block scales of the next quantisation step and with them the
error everywhere; from ``Q = 0`` the weighted error came out worse than the plain decomposition's on several random
test matrices. Here, from the plain ``Q``, each round refits the low-rank part for the weighted error (an exact
minimiser for that ``Q``, so the first round already does no worse than the plain pair), measures that error, and
re-quantises ``W - L1 L2``; the loop stops when the weighted error stops falling. The quantisation step stays plain
nearest-level rounding, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankwise.linalg._checks import check_matrix, check_positive_int, check_rank, compute_dtype, make_generator
from rankwise.linalg.affine import AffineQuant, hqq_quantize
from rankwise.linalg.lowrank import LowRank
from rankwise.linalg.quant import NFQuant, check_bits, nf_quantize
from rankwise.linalg.svd import SVDSolver, truncated_svd
from rankwise.linalg.whiten import Whitening, weighted_svd, whitened_svd

QUANTISERS = ("nf", "hqq")


@dataclass(frozen=True)
class LQ:
    """``W ~= Q + L`` with ``Q`` quantised and ``L`` of low rank.

    Attributes:
        quant: the quantised part as stored.
        lowrank: the rank-``r`` part (rank 0: empty factors), in the dtype the decomposition computed in.
        errors: the objective (Frobenius, or the weighted error of a data-aware decomposition) of each pair
            tried, in order; the last one may be the rise that stopped the loop.
        kept: index into ``errors`` of the pair returned (the smallest error).
        whitening_fallback: the covariance of a whitened decomposition was not positive definite.
        start_errors: for a data-aware decomposition, the Frobenius errors of the plain alternation it started
            from; else empty.
    """

    quant: NFQuant | AffineQuant
    lowrank: LowRank
    errors: tuple[float, ...]
    kept: int
    whitening_fallback: bool = False
    start_errors: tuple[float, ...] = ()

    @property
    def error(self) -> float:
        """The objective of the returned pair."""
        return self.errors[self.kept]

    def to_dense(self) -> torch.Tensor:
        """``Q + L`` as an ``(m, n)`` matrix in the low-rank factors' dtype."""
        return self.quant.dequantize().to(self.lowrank.dtype) + self.lowrank.to_dense()


def lq_decompose(
    W: torch.Tensor,
    rank: int,
    *,
    bits: int = 3,
    block_size: int = 64,
    scale_block: int = 256,
    iterations: int = 10,
    whitening: Whitening | None = None,
    row_weights: torch.Tensor | None = None,
    col_weights: torch.Tensor | None = None,
    solver: str | SVDSolver = "randomized",
    generator: torch.Generator | int | None = None,
    scale_dtype: torch.dtype | None = None,
    quantiser: str = "nf",
) -> LQ:
    """Decompose ``W ~= Q + L1 L2`` by LQ-LoRA's alternation.

    Args:
        W: ``(m, n)`` weight (outputs x inputs).
        rank: rank of the low-rank part, ``0 <= rank <= min(m, n)`` (0: plain NF quantisation).
        bits: bits of ``Q``'s codes: 2, 3, 4 or 8.
        block_size: entries per absmax block of ``Q`` (``"nf"``), or per scale and zero point (``"hqq"``, a multiple
            of 8); it must divide ``m * n``.
        scale_block: block scales per second-level group (``"nf"`` only).
        iterations: the most alternation rounds (>= 1).
        whitening: the input covariance's square root (``C = X X^T = S S^T``): fit the low-rank part and measure
            the error in ``||E X||_F``.
        row_weights: ``(m,)`` non-negative ``a``, and ``col_weights``: ``(n,)`` non-negative ``b``: fit and measure
            in ``||diag(a) E diag(b)||_F`` (Fisher-weighted); not together with ``whitening``. Either weighting
            starts from the plain decomposition (module docstring); ``iterations`` bounds each of the two loops.
        solver: the SVD solver of the plain low-rank step (see :func:`~rankwise.linalg.truncated_svd`); the weighted
            refits use exact solvers.
        generator: seed of randomized solvers; every round draws from it, so a seed fixes the result.
        scale_dtype: dtype the scales' floating-point parts will be stored in (default ``W``'s).
        quantiser: ``"nf"`` (NormalFloat with double-quantised absmax scales, :func:`~rankwise.linalg.nf_quantize`)
            or ``"hqq"`` (HQQ's optimised scales and zero points, :func:`~rankwise.linalg.affine.hqq_quantize`; needs
            the ``hqq`` package).

    Returns:
        :class:`LQ` with the pair of smallest error, computed in float32 (float64 for a float64 ``W``).
    """
    W = check_matrix(W, "W")
    m, n = W.shape
    rank = check_rank(rank, min(m, n))
    bits = check_bits(bits)
    if quantiser not in QUANTISERS:
        raise ValueError(f"quantiser must be one of {', '.join(QUANTISERS)}, got {quantiser!r}")
    iterations = check_positive_int(iterations, "iterations", 1)
    if whitening is not None and (row_weights is not None or col_weights is not None):
        raise ValueError("whitening and row_weights/col_weights are two objectives; pass one")
    if whitening is not None and whitening.size != n:
        raise ValueError(f"whitening is for {whitening.size} inputs but W has {n} columns")
    dtype = compute_dtype(W.dtype)
    A = W.to(dtype)  # (m, n)
    weighted = row_weights is not None or col_weights is not None
    ones = A.new_ones(1)
    a = ones if row_weights is None else row_weights.to(A.device, dtype).clamp_min(0)[:, None]  # (m, 1)
    b = ones if col_weights is None else col_weights.to(A.device, dtype).clamp_min(0)[None, :]  # (1, n)
    gen = make_generator(generator)

    empty = LowRank(A.new_zeros(m, 0), A.new_zeros(0), A.new_zeros(0, n))

    def quantise(E: torch.Tensor) -> tuple[NFQuant | AffineQuant, torch.Tensor]:
        if quantiser == "hqq":
            q: NFQuant | AffineQuant = hqq_quantize(E, bits, group_size=block_size, scale_dtype=scale_dtype or W.dtype)
        else:
            q = nf_quantize(E, bits, block_size=block_size, scale_block=scale_block, scale_dtype=scale_dtype or W.dtype)
        return q, q.dequantize().to(dtype)

    # The paper's alternation in the Frobenius norm: L from Q, then Q from L, error after the Q step.
    Q = torch.zeros_like(A)
    errors: list[float] = []
    best: tuple[NFQuant | AffineQuant, LowRank] | None = None
    kept = 0
    for t in range(iterations if rank > 0 else 1):  # at rank 0 the first round is the fixed point
        L = truncated_svd(A - Q, rank, solver=solver, generator=gen) if rank else empty
        Ld = L.to_dense()  # (m, n)
        q, Q = quantise(A - Ld)
        errors.append(float(torch.linalg.norm(A - Q - Ld)))
        if best is not None and errors[-1] >= errors[kept]:
            break  # the error stopped falling (LQ-LoRA's rule); keep the previous pair
        best, kept = (q, L), t
    assert best is not None
    if not rank or (whitening is None and not weighted):
        return LQ(best[0], best[1], tuple(errors), kept)

    # Weighted: from the plain Q, the weighted L for Q (error measured here), then Q from L.
    q = best[0]
    Q = q.dequantize().to(dtype)
    start, errors, best, kept = tuple(errors), [], None, 0
    for t in range(iterations):
        if whitening is not None:
            L = whitened_svd(A - Q, whitening, rank)  # exact (Gram) solver: an exact refit for this Q
        else:
            L = weighted_svd(A - Q, rank, row_weights, col_weights).to(dtype)
        E = A - Q - L.to_dense()  # (m, n)
        E = whitening.right_multiply(E.to(whitening.basis.device)) if whitening is not None else E * a * b  # E S
        errors.append(float(torch.linalg.norm(E)))
        if best is not None and errors[-1] >= errors[kept]:
            break
        best, kept = (q, L), t
        q, Q = quantise(A - L.to_dense())
    assert best is not None
    fallback = whitening is not None and whitening.method != "cholesky"
    return LQ(best[0], best[1], tuple(errors), kept, fallback, start)
