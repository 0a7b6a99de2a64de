"""EoRA: training-free compensation of a compressed model in the eigenspace of its input activations.
Liu et al., "EoRA: Training-free compensation for compressed LLM with eigenspace low-rank approximation", 2024,
https://arxiv.org/abs/2410.21271.

For each layer the residual ``dW = W - W_c`` is projected into the eigenspace of the input covariance
``X X^T = Q L Q^T`` (``dW Q L^1/2``), truncated to rank ``r`` by SVD and mapped back, giving ``B A`` with
``B = U_r S_r^1/2`` and ``A = S_r^1/2 V_r^T L^-1/2 Q^T``. This is the rank-r minimiser of ``||(dW - B A) X||_F``,
so it is computed with :func:`~rankwise.linalg.whitened_svd` (any square root of ``X X^T`` gives the same answer).
Not a compression method of its own: it adds ``r (m + n)`` parameters per layer on top of any compressed model.
"""

from __future__ import annotations

import torch

from rankwise.calibrate import LayerStats
from rankwise.linalg import LowRank, whitened_svd


def eora(original: torch.Tensor, compressed: torch.Tensor, stats: LayerStats, rank: int) -> LowRank:
    """Rank-``rank`` compensation ``B A ~= original - compressed`` in the activation eigenspace.

    Args:
        original: ``(out, in)`` weight of the uncompressed layer.
        compressed: ``(out, in)`` effective weight of the compressed (or quantised) layer.
        stats: input statistics of the layer (``X X^T``).
        rank: adapter rank, at most ``min(out, in)``.
    """
    if original.shape != compressed.shape:
        raise ValueError(f"original {tuple(original.shape)} and compressed {tuple(compressed.shape)} weights differ "
                         "in shape")
    m, n = original.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be between 1 and min(out, in) = {min(m, n)} for this layer, got {rank}")
    dtype = torch.float64 if torch.float64 in (original.dtype, compressed.dtype) else torch.float32
    delta = original.detach().to(dtype) - compressed.detach().to(dtype)
    lr = whitened_svd(delta, stats.whitening(), rank)
    return lr.to(original.dtype)
