"""One basis for several matrices that read inputs of the same kind: Basis Sharing's whitened joint SVD.

Wang et al., "Basis Sharing: Cross-layer parameter sharing for large language model compression", ICLR 2025,
https://arxiv.org/abs/2410.03765.

Matrices ``W_1 .. W_g`` (each ``m_i x n``, outputs x inputs) stacked along their outputs form ``W = [W_1; ..; W_g]``.
With ``C = sum_i X_i X_i^T = S S^T`` (the inputs of all of them), the rank-``k`` truncation of ``W S`` mapped back by
``S^-1`` gives ``W ~= U_k diag(s_k) V_k^T S^-1``: the shared basis ``B = diag(s_k)^1/2 V_k^T S^-1`` (``k x n``)
and each matrix's coefficients ``U_k[rows of i] diag(s_k)^1/2`` (``m_i x k``). It minimises
``sum_i ||(W_i - W_i') X_i||_F^2`` only approximately (exactly when every ``X_i X_i^T`` is proportional to ``C``), as in
the paper.
"""

from __future__ import annotations

import torch

from rankwise.linalg.whiten import Whitening, whiten, whitened_svd


def shared_basis(weights: list[torch.Tensor], C: torch.Tensor | Whitening, rank: int, *, damp: float = 0.0
                 ) -> tuple[torch.Tensor, list[torch.Tensor], Whitening]:
    """The shared basis ``(k, n)`` and each matrix's coefficients ``(m_i, k)``, in the weights' dtype.

    Args:
        weights: ``(m_i, n)`` matrices with the same number of inputs ``n``.
        C: ``(n, n)`` summed input second moment of all of them, or its :class:`Whitening`.
        rank: ``k``, at most ``min(n, sum m_i)``.
        damp: relative ridge for :func:`~rankwise.linalg.whiten`, when ``C`` is a tensor.

    Returns:
        ``(basis, coefficients, whitening)`` with ``coefficients[i] @ basis ~= weights[i]``.
    """
    if not weights:
        raise ValueError("shared_basis needs at least one matrix")
    n = weights[0].shape[1]
    if any(w.ndim != 2 or w.shape[1] != n for w in weights):
        raise ValueError(f"every matrix must have {n} inputs (columns), got shapes "
                         f"{[tuple(w.shape) for w in weights]}")
    total = sum(w.shape[0] for w in weights)
    if not 1 <= rank <= min(n, total):
        raise ValueError(f"rank must be between 1 and min(n, sum of outputs) = {min(n, total)}, got {rank}")
    wh = C if isinstance(C, Whitening) else whiten(C, damp=damp)
    stacked = torch.cat([w.detach() for w in weights])  # (sum m_i, n)
    lr = whitened_svd(stacked, wh, rank)
    up, basis = lr.factors(0.5)  # (sum m_i, k), (k, n)
    return basis, list(up.split([w.shape[0] for w in weights])), wh
