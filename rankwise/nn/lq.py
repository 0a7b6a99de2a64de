"""``QuantLowRankLinear``: ``y = x (Q + L1 L2)^T + bias`` with ``Q`` NF-quantised and ``L1 L2`` of low rank.

Layer kind ``"lq"`` (LQ-LoRA, Guo et al. 2024, https://arxiv.org/abs/2311.12023). At rank 0 it is plain NF-``b``
weight-only quantisation, so quantised-only rows of a comparison are this kind too.
"""

from __future__ import annotations

import numbers
from abc import abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.linalg.lowrank import LowRank
from rankwise.linalg.lq import LQ
from rankwise.linalg.quant import NF_BITS, nf_dequantize, packed_nbytes, scale_storage
from rankwise.nn.kinds import CompressedLinear, register_kind

SPEC_KEYS = frozenset({"bits", "block_size", "scale_block", "rank"})
MAX_BLOCK = 2**20


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class QuantPlusLowRank(CompressedLinear):
    """Base of the kinds ``x -> x Q^T + up(down(x)) + bias``: a quantised matrix ``Q`` (decoded each call, nothing
    kept) plus a rank-``rank`` correction ``up (m, r) @ down (r, n)`` in floating point. A subclass stores ``Q`` its
    own way and implements :meth:`quantized_weight`; it calls :meth:`_init_lowrank` in ``__init__``.

    ``num_params`` counts values, as LQ-LoRA does: the ``m n`` quantised weights, ``r (m + n)`` and the bias; codes'
    packing and scales are overhead, counted in ``nbytes``.
    """

    grows_rank = True  # up/down/rank: EoRA and adapters merge by appending factors
    rank: int
    spec_keys: ClassVar[frozenset[str]]  # exactly these spec fields
    block_key: ClassVar[str]  # the spec field of the weights per scale ("block_size", "group_size")
    code_bits: ClassVar[tuple[int, ...]]  # the allowed "bits"

    @classmethod
    def check_spec(cls, in_features: int, out_features: int, spec: dict[str, Any]) -> str | None:
        """The fields every such kind has (``bits``, its block field, ``rank``), then :meth:`check_more`."""
        if set(spec) != cls.spec_keys:
            keys = ", ".join(sorted(cls.spec_keys))
            return f"{sorted(set(spec) ^ cls.spec_keys)[0]}: the {cls.kind} layer's spec is exactly {{{keys}}}"
        bits, block, rank = spec["bits"], spec[cls.block_key], spec["rank"]
        if not _is_int(bits) or bits not in cls.code_bits:
            return f"bits: must be one of {', '.join(map(str, cls.code_bits))}, got {bits!r}"
        if not _is_int(block) or not 1 <= block <= MAX_BLOCK:
            return f"{cls.block_key}: must be an integer in [1, {MAX_BLOCK}], got {block!r}"
        if (in_features * out_features) % block:
            return (f"{cls.block_key}: {block} does not divide the {out_features} x {in_features} = "
                    f"{in_features * out_features} weights; it must")
        if not _is_int(rank) or not 0 <= rank <= min(in_features, out_features):
            return (f"rank: must be an integer in [0, min(out_features, in_features)] = "
                    f"[0, {min(in_features, out_features)}], got {rank!r}")
        return cls.check_more(spec)

    @classmethod
    def check_more(cls, spec: dict[str, Any]) -> str | None:
        """A subclass's own spec fields, checked after the common ones."""
        return None

    def _init_lowrank(self, rank: int, bias: bool, kw: dict[str, Any]) -> None:
        self.rank = rank
        self.up = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        self.down = nn.Parameter(torch.zeros(rank, self.in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(self.out_features, **kw)) if bias else None

    def _copy_lowrank(self, lowrank: LowRank, bias: torch.Tensor | None) -> None:
        """Fill ``up``/``down`` from ``lowrank`` (singular values split evenly) and the bias."""
        up, down = lowrank.factors(0.5)  # (m, r), (r, n)
        with torch.no_grad():
            self.up.copy_(up)
            self.down.copy_(down)
            if bias is not None:
                self.bias.copy_(bias)

    @property
    def num_params(self) -> int:
        """Stored values: the ``m n`` quantised weights, ``r (m + n)`` low-rank values and the bias."""
        bias = self.bias.numel() if self.bias is not None else 0
        return self.out_features * self.in_features + self.up.numel() + self.down.numel() + bias

    @abstractmethod
    def quantized_weight(self) -> torch.Tensor:
        """The ``(out, in)`` decoded ``Q``, in the layer's floating-point dtype."""

    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in)`` matrix ``Q + up @ down``."""
        return self.quantized_weight() + self.up @ self.down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.quantized_weight(), self.bias)
        if self.rank:
            y = y + F.linear(F.linear(x, self.down), self.up)
        return y


@register_kind("lq")
class QuantLowRankLinear(QuantPlusLowRank):
    """``x -> x Q^T + up(down(x)) + bias``: an NF-``bits`` matrix ``Q`` plus a rank-``rank`` correction.

    Stored (``m = out_features``, ``n = in_features``, ``N = m n``):

    * ``codes``: ``uint8`` buffer, the ``N`` level indices at ``bits`` bits each (``ceil(N / 8) * bits`` bytes,
      :func:`~rankwise.linalg.quant.pack_codes`);
    * ``scale_codes``: ``uint8`` buffer, one per block of ``block_size`` entries (row-major, blocks may span rows);
    * ``scale_steps`` (one per ``scale_block`` block scales, the last group may be shorter) and ``scale_offset``
      (one): floating-point parameters in the layer's dtype;
    * ``up`` ``(m, r)`` and ``down`` ``(r, n)``: floating-point parameters (empty at rank 0);
    * ``bias`` ``(m,)`` or none.

    ``num_params`` counts values, as the paper does: the ``N`` quantised weights, ``r (m + n)`` and the bias; codes'
    packing and scales are overhead, counted in ``nbytes``. The forward pass decodes ``Q`` each call and keeps nothing.
    Spec ``{"bits", "block_size", "scale_block", "rank"}``.
    """

    spec_keys, block_key, code_bits = SPEC_KEYS, "block_size", NF_BITS

    def __init__(self, in_features: int, out_features: int, bits: int, block_size: int, rank: int,
                 scale_block: int = 256, bias: bool = True, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, device=device, dtype=dtype)
        spec = {"bits": bits, "block_size": block_size, "scale_block": scale_block, "rank": rank}
        problem = self.check_spec(in_features, out_features, spec)
        if problem is not None:
            raise ValueError(problem)
        self.bits, self.block_size, self.scale_block = bits, block_size, scale_block
        numel = in_features * out_features
        blocks, floats = scale_storage(numel, block_size, scale_block)
        kw = {"device": device, "dtype": dtype}
        self.register_buffer("codes", torch.zeros(packed_nbytes(numel, bits), dtype=torch.uint8, device=device))
        self.register_buffer("scale_codes", torch.zeros(blocks, dtype=torch.uint8, device=device))
        self.scale_steps = nn.Parameter(torch.zeros(floats - 1, **kw))
        self.scale_offset = nn.Parameter(torch.zeros(1, **kw))
        self._init_lowrank(rank, bias, kw)

    @classmethod
    def from_lq(cls, lq: LQ, *, dtype: torch.dtype, bias: torch.Tensor | None = None) -> QuantLowRankLinear:
        """Build from an :class:`~rankwise.linalg.lq.LQ` decomposition, storing floats in ``dtype`` and splitting the
        low-rank part's singular values evenly between ``up`` and ``down``."""
        q = lq.quant
        out_features, in_features = q.shape
        device = q.codes.device
        layer = cls(in_features, out_features, q.bits, q.block_size, lq.lowrank.rank, q.scale_block,
                    bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            layer.codes.copy_(q.packed())
            layer.scale_codes.copy_(q.scale_codes)
            layer.scale_steps.copy_(q.scale_steps)
            layer.scale_offset.copy_(q.scale_offset)
        layer._copy_lowrank(lq.lowrank, bias)
        return layer

    @classmethod
    def check_more(cls, spec: dict[str, Any]) -> str | None:
        scale_block = spec["scale_block"]
        if not _is_int(scale_block) or not 1 <= scale_block <= MAX_BLOCK:
            return f"scale_block: must be an integer in [1, {MAX_BLOCK}], got {scale_block!r}"
        return None

    @classmethod
    def from_spec(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any], *,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> QuantLowRankLinear:
        return cls(in_features, out_features, spec["bits"], spec["block_size"], spec["rank"], spec["scale_block"],
                   bias, device=device, dtype=dtype)

    def spec(self) -> dict[str, Any]:
        return {"bits": self.bits, "block_size": self.block_size, "scale_block": self.scale_block, "rank": self.rank}

    def quantized_weight(self) -> torch.Tensor:
        """The ``(out, in)`` decoded ``Q``, in the layer's floating-point dtype."""
        return nf_dequantize(self.codes, self.scale_codes, self.scale_steps, self.scale_offset, self.bits,
                             self.block_size, self.scale_block, (self.out_features, self.in_features))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"block_size={self.block_size}, scale_block={self.scale_block}, rank={self.rank}, "
                f"bias={self.bias is not None}")
