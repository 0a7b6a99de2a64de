"""``AffineLowRankLinear``: ``y = x (Q + L1 L2)^T + bias`` with ``Q`` group-wise affine quantised (codes, scales and
zero points as HQQ fits them) and ``L1 L2`` of low rank.

Layer kind ``"affine"``. At rank 0 it is HQQ's weight-only quantisation held in rankwise's format (so it saves,
reloads with plain ``from_pretrained``, takes a PEFT adapter and merges EoRA compensation like every kind); with a
rank it is LQ-LoRA's decomposition with HQQ as the quantiser, or an HQQ model plus its EoRA compensation.
Badri and Shaji, "Half-Quadratic Quantization of Large Machine Learning Models", 2023,
https://mobiusml.github.io/hqq_blog/.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.linalg.affine import AFFINE_BITS, AffineQuant, affine_dequantize
from rankwise.linalg.lq import LQ
from rankwise.linalg.quant import packed_nbytes
from rankwise.nn.kinds import register_kind
from rankwise.nn.lq import QuantPlusLowRank

SPEC_KEYS = frozenset({"bits", "group_size", "rank"})


@register_kind("affine")
class AffineLowRankLinear(QuantPlusLowRank):
    """``x -> x Q^T + up(down(x)) + bias``: a ``bits``-bit affine-quantised ``Q`` plus a rank-``rank`` correction.

    Stored (``m = out_features``, ``n = in_features``, ``N = m n``):

    * ``codes``: ``uint8`` buffer, the ``N`` codes at ``bits`` bits each (``ceil(N / 8) * bits`` bytes,
      :func:`~rankwise.linalg.quant.pack_codes`);
    * ``scale`` and ``zero``: one each per group of ``group_size`` consecutive weights (row-major), floating-point
      parameters in the layer's dtype; ``Q = (code - zero) * scale``;
    * ``up`` ``(m, r)`` and ``down`` ``(r, n)``: floating-point parameters (empty at rank 0);
    * ``bias`` ``(m,)`` or none.

    ``num_params`` counts values (:class:`~rankwise.nn.lq.QuantPlusLowRank`). Spec ``{"bits", "group_size",
    "rank"}``.
    """

    spec_keys, block_key, code_bits = SPEC_KEYS, "group_size", AFFINE_BITS

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, rank: int,
                 bias: bool = True, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, device=device, dtype=dtype)
        problem = self.check_spec(in_features, out_features, {"bits": bits, "group_size": group_size, "rank": rank})
        if problem is not None:
            raise ValueError(problem)
        self.bits, self.group_size = bits, group_size
        numel = in_features * out_features
        kw = {"device": device, "dtype": dtype}
        self.register_buffer("codes", torch.zeros(packed_nbytes(numel, bits), dtype=torch.uint8, device=device))
        self.scale = nn.Parameter(torch.zeros(numel // group_size, **kw))
        self.zero = nn.Parameter(torch.zeros(numel // group_size, **kw))
        self._init_lowrank(rank, bias, kw)

    @classmethod
    def from_lq(cls, lq: LQ, *, dtype: torch.dtype, bias: torch.Tensor | None = None) -> AffineLowRankLinear:
        """Build from an :class:`~rankwise.linalg.lq.LQ` decomposition whose quantised part is an
        :class:`~rankwise.linalg.affine.AffineQuant`, storing floats in ``dtype``."""
        q = lq.quant
        if not isinstance(q, AffineQuant):
            raise TypeError(f"an affine layer holds an AffineQuant, got {type(q).__name__}")
        out_features, in_features = q.shape
        layer = cls(in_features, out_features, q.bits, q.group_size, lq.lowrank.rank, bias is not None,
                    device=q.codes.device, dtype=dtype)
        with torch.no_grad():
            layer.codes.copy_(q.packed())
            layer.scale.copy_(q.scale)
            layer.zero.copy_(q.zero)
        layer._copy_lowrank(lq.lowrank, bias)
        return layer

    @classmethod
    def from_spec(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any], *,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> AffineLowRankLinear:
        return cls(in_features, out_features, spec["bits"], spec["group_size"], spec["rank"], bias, device=device,
                   dtype=dtype)

    def spec(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "rank": self.rank}

    def quantized_weight(self) -> torch.Tensor:
        """The ``(out, in)`` decoded ``Q``, in the layer's floating-point dtype."""
        return affine_dequantize(self.codes, self.scale, self.zero, self.bits, self.group_size,
                                 (self.out_features, self.in_features))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, rank={self.rank}, bias={self.bias is not None}")
