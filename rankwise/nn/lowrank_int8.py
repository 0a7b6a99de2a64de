"""``Int8LowRankLinear``: ``y = B (A x) + bias`` with both factors stored as int8 codes and one scale per row (layer
kind ``"lowrank_int8"``).

A low-rank factorisation's factors quantise almost losslessly at 8 bits (each row of ``up = U S^1/2`` and of
``down = S^1/2 V^T`` is a well-scaled vector), so at a budget in bytes the same storage buys about twice the rank of
bfloat16 factors. Symmetric absmax per row (:func:`~rankwise.linalg.quant.int8_rows`), as LLM.int8 quantises
weights per row: Dettmers et al., "LLM.int8()", 2022, https://arxiv.org/abs/2208.07339.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.linalg import LowRank
from rankwise.linalg.quant import int8_rows, int8_rows_decode
from rankwise.nn.kinds import CompressedLinear, register_kind
from rankwise.nn.linear import LowRankLinear


@register_kind("lowrank_int8")
class Int8LowRankLinear(CompressedLinear):
    """``x -> up(down(x)) + bias`` with ``up`` ``(out, r)`` and ``down`` ``(r, in)`` stored as ``int8`` buffers
    ``up_codes``/``down_codes`` times per-row scales ``up_scale`` ``(out,)`` and ``down_scale`` ``(r,)``
    (floating-point parameters in the layer's dtype).

    :attr:`num_params` counts the ``r (in + out)`` factor values (and the bias), as for ``"lowrank"``; the scales are
    overhead, counted in bytes. A rank-``r`` update cannot be merged exactly into int8 codes, so adapters and EoRA on
    this kind stay unmerged (``grows_rank`` is false). Spec ``{"rank": r}``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, device=device, dtype=dtype)
        problem = self.check_spec(in_features, out_features, {"rank": rank})
        if problem is not None:
            raise ValueError(problem)
        self.rank = rank
        kw = {"device": device, "dtype": dtype}
        self.register_buffer("up_codes", torch.zeros(out_features, rank, dtype=torch.int8, device=device))
        self.register_buffer("down_codes", torch.zeros(rank, in_features, dtype=torch.int8, device=device))
        self.up_scale = nn.Parameter(torch.zeros(out_features, **kw))
        self.down_scale = nn.Parameter(torch.zeros(rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_lowrank(cls, lr: LowRank, bias: torch.Tensor | None = None) -> Int8LowRankLinear:
        """Quantise a :class:`LowRank` of the ``(out, in)`` weight (``S`` split evenly between the factors)."""
        out_features, in_features = lr.shape
        up, down = lr.factors(0.5)  # (out, r), (r, in)
        layer = cls(in_features, out_features, lr.rank, bias is not None, device=up.device, dtype=up.dtype)
        (up_codes, up_scale), (down_codes, down_scale) = int8_rows(up), int8_rows(down)
        with torch.no_grad():
            layer.up_codes.copy_(up_codes)
            layer.down_codes.copy_(down_codes)
            layer.up_scale.copy_(up_scale)
            layer.down_scale.copy_(down_scale)
            if bias is not None:
                layer.bias.copy_(bias.to(up.dtype))
        return layer

    check_spec = LowRankLinear.__dict__["check_spec"]  # the same rule: one rank in [1, min(out, in)]

    @classmethod
    def from_spec(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any], *,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Int8LowRankLinear:
        return cls(in_features, out_features, spec["rank"], bias, device=device, dtype=dtype)

    def spec(self) -> dict[str, Any]:
        return {"rank": self.rank}

    @property
    def num_params(self) -> int:
        """The ``r (in + out)`` factor values and the bias."""
        return self.up_codes.numel() + self.down_codes.numel() + (self.bias.numel() if self.bias is not None else 0)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up, down)`` decoded, ``(out, r)`` and ``(r, in)`` in the layer's dtype."""
        return int8_rows_decode(self.up_codes, self.up_scale), int8_rows_decode(self.down_codes, self.down_scale)

    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in)`` product of the decoded factors."""
        up, down = self.factors()
        return up @ down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.factors()
        return F.linear(F.linear(x, down), up, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")
