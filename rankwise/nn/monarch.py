"""``MonarchLinear``: ``y = M x + bias`` with ``M`` a Monarch matrix, two block-diagonal factors (layer kind
``"monarch"``). Dao et al. (2022), https://arxiv.org/abs/2204.00595; layout in :mod:`rankwise.linalg.monarch`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.linalg.monarch import Monarch, monarch_dense, monarch_matmul, monarch_shape_error
from rankwise.nn.kinds import CompressedLinear, register_kind

_SPEC = frozenset({"nblocks", "rank"})


@register_kind("monarch")
class MonarchLinear(CompressedLinear):
    """A Monarch linear map storing ``nblocks * rank * (in + out)`` weights (+ ``out`` bias).

    ``right`` is ``(b, b r, in / b)`` (applied first, one block per contiguous input block) and ``left`` is
    ``(b, out / b, b r)``; the forward pass is two batched matrix products and a permutation, never the dense
    matrix. Layer kind ``"monarch"``, spec ``{"nblocks": b, "rank": r}``.
    """

    def __init__(self, in_features: int, out_features: int, nblocks: int, rank: int, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, device=device, dtype=dtype)
        error = monarch_shape_error(out_features, in_features, nblocks, rank)
        if error is not None:
            raise ValueError(error)
        self.nblocks, self.rank = nblocks, rank
        b, r = nblocks, rank
        kw = {"device": device, "dtype": dtype}
        self.right = nn.Parameter(torch.empty(b, b * r, in_features // b, **kw))
        self.left = nn.Parameter(torch.empty(b, out_features // b, b * r, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        bound = (in_features // b) ** -0.5  # each intermediate reads one input block
        nn.init.uniform_(self.right, -bound, bound)
        nn.init.zeros_(self.left)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @classmethod
    def from_monarch(cls, factors: Monarch, bias: torch.Tensor | None = None) -> MonarchLinear:
        """Build from the factors of a :class:`~rankwise.linalg.Monarch` (in their dtype and device)."""
        out_features, in_features = factors.shape
        left = factors.left
        layer = cls(in_features, out_features, factors.nblocks, factors.rank, bias is not None, device=left.device,
                    dtype=left.dtype)
        with torch.no_grad():
            layer.left.copy_(left)
            layer.right.copy_(factors.right)
            if bias is not None:
                layer.bias.copy_(bias.to(left.dtype))
        return layer

    @classmethod
    def check_spec(cls, in_features: int, out_features: int, spec: dict[str, Any]) -> str | None:
        if set(spec) != _SPEC:
            return f"{sorted(set(spec) ^ _SPEC)[0]}: a monarch layer's spec is exactly {{nblocks, rank}}"
        return monarch_shape_error(out_features, in_features, spec["nblocks"], spec["rank"])

    @classmethod
    def from_spec(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any], *,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MonarchLinear:
        return cls(in_features, out_features, spec["nblocks"], spec["rank"], bias, device=device, dtype=dtype)

    def spec(self) -> dict[str, Any]:
        return {"nblocks": self.nblocks, "rank": self.rank}

    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in)`` Monarch matrix."""
        return monarch_dense(self.left, self.right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = monarch_matmul(x, self.left, self.right)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, " \
               f"rank={self.rank}, bias={self.bias is not None}"
