"""``SharedBasisLinear``: ``y = up (B x) + bias`` where the basis ``B`` is shared by several layers and stored once.

Layer kind ``"shared_basis"``, spec ``{"rank": k, "basis": owner}``. The layer whose ``basis`` is ``null`` stores
``B`` as its parameter ``down`` ``(k, in)``; every other layer of its group names that layer (its dotted module name)
and stores only its own coefficients ``up`` ``(out, k)``. Nothing is copied: the members read the owner's ``down``,
linked after loading by :meth:`SharedBasisLinear.resolve` (transformers' loader calls it through the rankwise
quantizer), so the basis is counted, saved and trained once.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.nn.kinds import CompressedLinear, register_kind


class SharedTensor:
    """Mixin of the kinds whose layers in a group read one tensor stored once, by the group's first layer (the
    *owner*): a shared basis, a shared dictionary.

    The owner's spec names no owner (``null``) and it holds the tensor as its parameter :attr:`shared_param`; every
    other layer's spec field :attr:`owner_key` names the owner's dotted module name, and :meth:`resolve` links it
    after loading. Nothing is copied, so the tensor is counted, saved and trained once.
    """

    shares_tensors = True
    owner_key: ClassVar[str]  # the spec field naming the owner ("basis")
    shared_param: ClassVar[str]  # the owner's parameter read by the group ("down")
    what: ClassVar[str]  # the shared tensor in words, for messages ("shared basis")
    same: ClassVar[tuple[str, ...]]  # spec fields owner and members agree on, besides in_features
    owner_name: str | None
    in_features: int

    def _link(self, owner_name: str | None) -> None:
        self.owner_name = owner_name
        object.__setattr__(self, "_owner", None)  # the owner module, not registered (its tensor is counted there)

    def share(self, owner: nn.Module) -> None:
        """Read the shared tensor of ``owner`` (a layer of the same group that stores it)."""
        if type(owner) is not type(self) or getattr(owner, self.shared_param) is None or any(
                getattr(owner, key) != getattr(self, key) for key in (*self.same, "in_features")):
            raise ValueError(f"a {self.what} must come from a layer that stores one of the same "
                             f"{', '.join(self.same)} and inputs")
        object.__setattr__(self, "_owner", owner)

    def shared(self) -> torch.Tensor:
        """The tensor this layer reads: its own when it is the owner, else the owner's."""
        own = getattr(self, self.shared_param)
        if own is not None:
            return own
        if self._owner is None:
            raise RuntimeError(f"this layer reads the {self.what} of {self.owner_name!r}, which was never linked: "
                               "load the model with rankwise (rankwise.load or from_pretrained after import rankwise)")
        return getattr(self._owner, self.shared_param)

    def resolve(self, model: nn.Module) -> None:
        if self.owner_name is not None:
            self.share(model.get_submodule(self.owner_name))

    @classmethod
    def check_together(cls, specs: dict[str, dict[str, Any]]) -> str | None:
        kind = cls.kind  # type: ignore[attr-defined]
        for name, spec in specs.items():
            owner = spec.get(cls.owner_key) if spec["kind"] == kind else None
            if owner is None:
                continue
            other = specs.get(owner)
            if other is None or other["kind"] != kind or other.get(cls.owner_key) is not None:
                return f"{name}.{cls.owner_key}: names {owner!r}, which is not a layer that stores a {cls.what}"
            keys = (*cls.same, "in_features")
            if any(other[key] != spec[key] for key in keys):
                theirs = ", ".join(f"{key} {other[key]}" for key in keys)
                ours = ", ".join(f"{key} {spec[key]}" for key in keys)
                return f"{name}.{cls.owner_key}: {owner!r} stores a {cls.what} of {theirs}, this layer needs {ours}"
        return None


@register_kind("shared_basis")
class SharedBasisLinear(SharedTensor, CompressedLinear):
    """A rank-``k`` map whose input projection ``(k, in)`` is shared with other layers of the same model.

    Args:
        in_features, out_features: the shape of the ``nn.Linear`` it replaces.
        rank: ``k``, the number of shared basis vectors.
        bias: whether the layer has a bias.
        basis: ``None`` for the layer that stores the basis, else the dotted name of that layer.
    """

    owner_key, shared_param, what, same = "basis", "down", "shared basis", ("rank",)

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 basis: str | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, device=device, dtype=dtype)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = rank
        self._link(basis)
        kw = {"device": device, "dtype": dtype}
        self.up = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.down = nn.Parameter(torch.empty(rank, in_features, **kw)) if basis is None else None
        if self.down is not None:
            nn.init.kaiming_uniform_(self.down, a=5**0.5)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @property
    def basis_owner(self) -> str | None:
        """The dotted name of the layer storing the basis (``None``: this one)."""
        return self.owner_name

    def basis(self) -> torch.Tensor:
        """The ``(k, in)`` basis this layer reads."""
        return self.shared()

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
