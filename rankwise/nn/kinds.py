"""Compressed linear layers: one base class, one registered *kind* per representation.

A kind (``"lowrank"`` today) is a subclass of :class:`CompressedLinear` that knows its dense equivalent
(:meth:`~CompressedLinear.dense_weight`), its exact parameter count and stored bytes, a JSON-able
:meth:`~CompressedLinear.spec` of its shape knobs, how to validate such a spec (:meth:`~CompressedLinear.check_spec`)
and how to build an empty layer from one (:meth:`~CompressedLinear.from_spec`). Saving, loading, the
transformers-native format and counting go through this interface only, so a new representation is one new file
registered with :func:`register_kind`.

Every compressed layer also carries an empty persistent buffer named ``weight`` (shape ``(0,)``). It costs nothing,
and it is what makes a compressed checkpoint *refuse* to load where rankwise is not installed: plain ``transformers``
finds ``<layer>.weight`` of shape ``(0,)`` where the dense architecture expects ``(out, in)`` and raises a size-mismatch
error, instead of initialising the layer at random and only warning.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

KINDS: dict[str, type[CompressedLinear]] = {}
_KIND_NAME = re.compile(r"[a-z][a-z0-9_]*")


def register_kind(name: str):
    """Class decorator registering a :class:`CompressedLinear` subclass under a unique lowercase ``name``."""

    def decorate(cls: type[CompressedLinear]) -> type[CompressedLinear]:
        if not _KIND_NAME.fullmatch(name):
            raise ValueError(f"layer kind names are lowercase identifiers, got {name!r}")
        if name in KINDS and KINDS[name] is not cls:
            raise ValueError(f"layer kind {name!r} is already registered by {KINDS[name].__name__}")
        if not issubclass(cls, CompressedLinear):
            raise TypeError(f"{cls.__name__} must subclass CompressedLinear to be a layer kind")
        cls.kind = name
        KINDS[name] = cls
        return cls

    return decorate


def kind_class(name: str) -> type[CompressedLinear]:
    """The class registered as ``name``; a ``ValueError`` listing the known kinds otherwise."""
    if name not in KINDS:
        raise ValueError(f"unknown layer kind {name!r}; this rankwise knows {', '.join(sorted(KINDS))}")
    return KINDS[name]


class CompressedLinear(nn.Module):
    """Base of every compressed replacement of an ``nn.Linear`` ``(out_features x in_features)``.

    Subclasses set their parameters in ``__init__`` (after calling this one) and implement the abstract methods.
    """

    kind: ClassVar[str] = ""
    # A kind that applies ``... + up @ down`` with parameters ``up`` (out, r), ``down`` (r, in) and an int ``rank``
    # (its spec's "rank"): a rank-r update merges into it exactly by appending factors (adapters, EoRA).
    grows_rank: ClassVar[bool] = False
    # Layers of this kind may read tensors stored by another layer (see :meth:`resolve`), possibly in another block.
    shares_tensors: ClassVar[bool] = False
    # The streamed checkpoint reader (one block at a time) can load layers of this kind.
    streamable: ClassVar[bool] = True
    in_features: int
    out_features: int

    def __init__(self, in_features: int, out_features: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # The load guard of the module docstring: stored with the layer, empty, never read.
        self.register_buffer("weight", torch.empty(0, device=device, dtype=dtype))
        self.bias: nn.Parameter | None = None

    def set_bias(self, bias: torch.Tensor | None) -> None:
        """Give the layer ``bias`` (``(out,)``, cast to the layer's floating dtype), or none."""
        if bias is None:
            self.bias = None
            return
        like = next(t for t in self._stored() if t.is_floating_point() and t.numel())
        self.bias = nn.Parameter(bias.detach().to(like.device, like.dtype).clone())

    @classmethod
    @abstractmethod
    def check_spec(cls, in_features: int, out_features: int, spec: dict[str, Any]) -> str | None:
        """``None`` if ``spec`` describes a valid layer of this shape, else ``"field: what is wrong"``."""

    @classmethod
    @abstractmethod
    def from_spec(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any], *,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> CompressedLinear:
        """An (uninitialised) layer of this kind with the shape knobs of ``spec``."""

    @classmethod
    def check_together(cls, specs: dict[str, dict[str, Any]]) -> str | None:
        """Checks across the layers of one model: ``specs`` holds every module's full spec (kind, shape, bias and
        knobs) by name. ``None`` when consistent, else ``"<module>.<field>: what is wrong"``; for kinds whose layers
        share tensors (a basis stored once for several layers)."""
        return None

    def resolve(self, model: nn.Module) -> None:
        """Link this layer to tensors it shares with other layers of ``model`` (after loading); nothing by default."""

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """The JSON-able shape knobs :meth:`from_spec` needs (not the values)."""

    @abstractmethod
    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in)`` matrix this layer applies."""

    def dense_bias(self) -> torch.Tensor | None:
        """The ``(out,)`` bias of the dense slot, or ``None``."""
        return self.bias

    @property
    def io_shape(self) -> tuple[int, int]:
        """``(inputs, outputs)`` of the forward pass: the slot's shape, except for kinds that narrow it."""
        return self.in_features, self.out_features

    @property
    def narrowed(self) -> bool:
        """Whether the forward pass reads or writes fewer features than the slot (structured compression)."""
        return self.io_shape != (self.in_features, self.out_features)

    @property
    def num_params(self) -> int:
        """Stored values: parameters and persistent buffers, each counted once."""
        return sum(t.numel() for t in self._stored())

    @property
    def nbytes(self) -> int:
        """Bytes of everything this layer stores, at the dtypes it holds now."""
        return sum(t.numel() * t.element_size() for t in self._stored())

    @property
    def float_numel(self) -> int:
        """Floating-point values stored (the bias included): what the storage dtype applies to."""
        return sum(t.numel() for t in self._stored() if t.is_floating_point())

    @property
    def fixed_nbytes(self) -> int:
        """Bytes of the integer tensors (codes, indices), stored as they are whatever the storage dtype."""
        return sum(t.numel() * t.element_size() for t in self._stored() if not t.is_floating_point())

    def stored_bytes(self, value_bytes: int) -> int:
        """Bytes on disk when floating-point tensors are stored at ``value_bytes`` each."""
        return self.float_numel * value_bytes + self.fixed_nbytes

    def _stored(self) -> list[torch.Tensor]:
        seen: set[int] = set()
        out = []
        for t in [*self.parameters(), *self.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out

    def full_spec(self) -> dict[str, Any]:
        """The manifest entry: kind, shape, bias and the kind's own knobs."""
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "bias": getattr(self, "bias", None) is not None, **self.spec()}


def compressed_modules(model: nn.Module) -> dict[str, CompressedLinear]:
    """Every compressed layer of ``model`` by dotted name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CompressedLinear)}


def resolve_kinds(model: nn.Module) -> None:
    """Let every compressed layer of ``model`` link the tensors it shares (see :meth:`CompressedLinear.resolve`)."""
    for layer in compressed_modules(model).values():
        layer.resolve(model)


def model_num_params(model: nn.Module) -> int:
    """Parameters of ``model`` with each compressed layer counted by its own :attr:`CompressedLinear.num_params`
    (quantised codes are values even where they are buffers), each shared tensor once."""
    layers = compressed_modules(model)
    inside = {id(t) for m in layers.values() for t in [*m.parameters(), *m.buffers()]}
    return sum(p.numel() for p in model.parameters() if id(p) not in inside) + sum(
        m.num_params for m in layers.values())
