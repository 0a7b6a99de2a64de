"""``SharedBasisLinear``: ``y = up (B x) + bias`` where the basis ``B`` is shared by several layers and stored once.

Layer kind ``"shared_basis"``, spec ``{"rank": k, "basis": owner}``. The layer whose ``basis`` is ``null`` stores
``B`` as its parameter ``down`` ``(k, in)``; every other layer of its group names that layer (its dotted module name)
and stores only its own coefficients ``up`` ``(out, k)``. Nothing is copied: the members read the owner's ``down``,
linked after loading by :meth:`SharedBasisLinear.resolve` (transformers' loader calls it through the rankwise
quantizer), so the basis is counted, saved and trained once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.nn.kinds import CompressedLinear, register_kind


@register_kind("shared_basis")
class SharedBasisLinear(CompressedLinear):
    """A rank-``k`` map whose input projection ``(k, in)`` is shared with other layers of the same model.

    Args:
        in_features, out_features: the shape of the ``nn.Linear`` it replaces.
        rank: ``k``, the number of shared basis vectors.
        bias: whether the layer has a bias.
        basis: ``None`` for the layer that stores the basis, else the dotted name of that layer.
    """

    shares_tensors = True

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 basis: str | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, device=device, dtype=dtype)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank, self.basis_owner = rank, basis
        kw = {"device": device, "dtype": dtype}
        self.up = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.down = nn.Parameter(torch.empty(rank, in_features, **kw)) if basis is None else None
        if self.down is not None:
            nn.init.kaiming_uniform_(self.down, a=5**0.5)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        object.__setattr__(self, "_owner", None)  # the owner module, not registered (its basis is counted there)

    def share(self, owner: SharedBasisLinear) -> None:
        """Read the basis of ``owner`` (a layer of the same group that stores it)."""
        if owner.down is None or owner.rank != self.rank or owner.in_features != self.in_features:
            raise ValueError("a shared basis must come from a layer that stores one of the same rank and inputs")
        object.__setattr__(self, "_owner", owner)

    def basis(self) -> torch.Tensor:
        """The ``(k, in)`` basis this layer reads."""
        if self.down is not None:
            return self.down
        if self._owner is None:
            raise RuntimeError(f"this layer reads the shared basis of {self.basis_owner!r}, which was never linked: "
                               "load the model with rankwise (rankwise.load or from_pretrained after import rankwise)")
        return self._owner.down

    def resolve(self, model: nn.Module) -> None:
        if self.basis_owner is not None:
            self.share(model.get_submodule(self.basis_owner))

    @classmethod
    def check_spec(cls, in_features: int, out_features: int, spec: dict[str, Any]) -> str | None:
        if set(spec) != {"rank", "basis"}:
            extra = sorted(set(spec) ^ {"rank", "basis"})[0]
            return f"{extra}: a shared_basis layer's spec is exactly {{rank, basis}}"
        rank, basis = spec["rank"], spec["basis"]
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= in_features:
            # a basis shared by several layers may hold more vectors than one layer has outputs, never more than
            # its inputs
            return f"rank: must be an integer in [1, in_features], got {rank!r}"
        if basis is not None and (not isinstance(basis, str) or not basis):
            return f"basis: must be null (this layer stores the basis) or the name of the layer that does, got " \
                   f"{basis!r}"
        return None

    @classmethod
    def check_together(cls, specs: dict[str, dict[str, Any]]) -> str | None:
        for name, spec in specs.items():
            owner = spec.get("basis") if spec["kind"] == "shared_basis" else None
            if owner is None:
                continue
            other = specs.get(owner)
            if other is None or other["kind"] != "shared_basis" or other.get("basis") is not None:
                return f"{name}.basis: names {owner!r}, which is not a layer that stores a shared basis"
            if (other["rank"], other["in_features"]) != (spec["rank"], spec["in_features"]):
                return (f"{name}.basis: {owner!r} stores a basis of rank {other['rank']} over {other['in_features']} "
                        f"inputs, this layer needs rank {spec['rank']} over {spec['in_features']}")
        return None

    @classmethod
    def from_spec(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any], *,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SharedBasisLinear:
        return cls(in_features, out_features, spec["rank"], bias, basis=spec["basis"], device=device, dtype=dtype)

    def spec(self) -> dict[str, Any]:
        return {"rank": self.rank, "basis": self.basis_owner}

    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in)`` product ``up @ basis``."""
        return self.up @ self.basis()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.basis()), self.up, self.bias)

    def extra_repr(self) -> str:
        where = "stores the basis" if self.basis_owner is None else f"basis of {self.basis_owner}"
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, {where}"
