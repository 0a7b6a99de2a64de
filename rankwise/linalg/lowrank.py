"""The ``LowRank`` result type: ``W ~= U @ diag(S) @ Vh``."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from rankwise.linalg._checks import check_rank


@dataclass(frozen=True)
class LowRank:
    """A rank-``r`` factorisation ``U @ diag(S) @ Vh`` of an ``m x n`` matrix.

    Attributes:
        U: ``(m, r)`` left factor.
        S: ``(r,)`` non-negative weights in descending order. For a plain SVD these are the singular values; for a
            whitened or weighted SVD they are the singular values of the transformed matrix, so truncating to the
            leading ``k`` stays optimal for that method's objective.
        Vh: ``(r, n)`` right factor.
        info: what the routine did (solver, a clamped rank, covariance repairs); for reports, never for logic.
        whitening_fallback: the input covariance this came from was not positive definite, so it was factored
            after a ridge or by a clamped eigen-decomposition (whitened methods only).
        anchored_fallback: an anchored fit (:func:`~rankwise.linalg.anchored_svd`) was asked for and refused, so
            these are the plain whitened truncation's factors (``info["anchored_skipped"]`` says why).
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict, compare=False)
    whitening_fallback: bool = field(default=False, compare=False)
    anchored_fallback: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        r = self.S.shape[0]
        if self.U.ndim != 2 or self.Vh.ndim != 2 or self.S.ndim != 1 or self.U.shape[1] != r or self.Vh.shape[0] != r:
            raise ValueError(
                f"LowRank factors must have shapes (m, r), (r,), (r, n); got U {tuple(self.U.shape)}, "
                f"S {tuple(self.S.shape)}, Vh {tuple(self.Vh.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(m, n)`` of the approximated matrix."""
        return self.U.shape[0], self.Vh.shape[1]

    @property
    def rank(self) -> int:
        """Number of retained components ``r``."""
        return self.S.shape[0]

    @property
    def num_params(self) -> int:
        """Parameters when deployed as two factors with ``S`` absorbed: ``r * (m + n)``."""
        m, n = self.shape
        return self.rank * (m + n)

    @property
    def dtype(self) -> torch.dtype:
        return self.U.dtype

    def to_dense(self) -> torch.Tensor:
        """The ``(m, n)`` matrix ``U @ diag(S) @ Vh`` in the factors' dtype."""
        return (self.U * self.S) @ self.Vh  # (m, r) @ (r, n)

    def truncate(self, rank: int) -> LowRank:
        """Keep the leading ``rank`` components (clamped to the current rank, with a warning)."""
        rank = check_rank(rank, self.rank)
        return replace(self, U=self.U[:, :rank], S=self.S[:rank], Vh=self.Vh[:rank], info=dict(self.info))

    def factors(self, alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """Split into ``(A, B)`` with ``A @ B == to_dense()``: ``A = U S^alpha``, ``B = S^(1-alpha) Vh``.

        ``alpha=0.5`` balances the factors' norms, which is kind to low-precision storage.
        """
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        return self.U * self.S.pow(alpha), self.S.pow(1.0 - alpha)[:, None] * self.Vh

    def to(self, *args: Any, **kwargs: Any) -> LowRank:
        """Move or cast every factor like :meth:`torch.Tensor.to`."""
        return replace(self, U=self.U.to(*args, **kwargs), S=self.S.to(*args, **kwargs),
                       Vh=self.Vh.to(*args, **kwargs), info=dict(self.info))
