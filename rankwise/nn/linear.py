"""``LowRankLinear``: ``y = B (A x) + bias`` with exact parameter counts."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.linalg import LowRank
from rankwise.nn.kinds import CompressedLinear, register_kind


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``transformers.pytorch_utils.Conv1D`` (weight stored as ``(in, out)``), detected without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2 ``Conv1D``: the layers rankwise knows how to factorise."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def linear_weight(module: nn.Module, tensor: torch.Tensor | None = None) -> torch.Tensor:
    """The weight of a linear-like layer (or a weight-shaped ``tensor`` such as its gradient) as ``(out, in)``.

    Returns a view, never a copy.
    """
    t = module.weight if tensor is None else tensor
    if isinstance(module, nn.Linear):
        return t
    if _is_conv1d(module):
        return t.T
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def input_dim(module: nn.Module) -> int:
    """Input features a linear-like or compressed layer reads (a narrowed layer's own width, not its slot's)."""
    if isinstance(module, CompressedLinear):
        return module.io_shape[0]
    return linear_weight(module).shape[1]


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` matrix a linear-like or compressed layer applies (a product for ``LowRankLinear``)."""
    if isinstance(module, CompressedLinear):
        return module.dense_weight()
    return linear_weight(module)


@register_kind("lowrank")
class LowRankLinear(CompressedLinear):
    """A rank-``r`` linear map ``x -> up(down(x)) + bias`` storing ``r * (in + out)`` weights (+ ``out`` bias).

    ``down`` is ``(r, in)`` and ``up`` is ``(out, r)``; ``in_features``/``out_features`` mirror ``nn.Linear`` so
    code that inspects layers keeps working. Layer kind ``"lowrank"``, spec ``{"rank": r}``.
    """

    grows_rank = True
    # Set by :func:`rankwise.nn.fused.fuse_inputs_`: the group whose one matmul computes this layer's ``down(x)``.
    input_group = None

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, device=device, dtype=dtype)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = rank
        kw = {"device": device, "dtype": dtype}
        self.down = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.up = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        nn.init.kaiming_uniform_(self.down, a=5**0.5)
        nn.init.zeros_(self.up)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @classmethod
    def from_lowrank(cls, lr: LowRank, bias: torch.Tensor | None = None) -> LowRankLinear:
        """Build from a :class:`LowRank` of the ``(out, in)`` weight, splitting ``S`` evenly between factors."""
        out_features, in_features = lr.shape
        up, down = lr.factors(0.5)  # (out, r), (r, in)
        layer = cls(in_features, out_features, lr.rank, bias is not None, device=up.device, dtype=up.dtype)
        with torch.no_grad():
            layer.up.copy_(up)
            layer.down.copy_(down)
            if bias is not None:
                layer.bias.copy_(bias.to(up.dtype))
        return layer

    @classmethod
    def check_spec(cls, in_features: int, out_features: int, spec: dict[str, Any]) -> str | None:
        if set(spec) != {"rank"}:
            return f"{sorted(set(spec) ^ {'rank'})[0]}: a {cls.kind} layer's spec is exactly {{rank}}"
        rank = spec["rank"]
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= 2**24:
            return f"rank: must be an integer in [1, min(out_features, in_features)], got {rank!r}"
        if rank > min(in_features, out_features):
            return f"rank: is {rank}, above min(out_features, in_features) = {min(in_features, out_features)}"
        return None

    @classmethod
    def from_spec(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any], *,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LowRankLinear:
        return cls(in_features, out_features, spec["rank"], bias, device=device, dtype=dtype)

    def spec(self) -> dict[str, Any]:
        return {"rank": self.rank}

    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in)`` product ``up @ down``."""
        return self.up @ self.down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_group is None or torch.compiler.is_compiling():
            return F.linear(F.linear(x, self.down), self.up, self.bias)
        return F.linear(self.input_group.down(self, x), self.up, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"bias={self.bias is not None}"
