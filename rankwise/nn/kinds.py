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
    in_features: int
    out_features: int

    def __init__(self, in_features: int, out_features: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # The load guard of the module docstring: stored with the layer, empty, never read.
        self.register_buffer("weight", torch.empty(0, device=device, dtype=dtype))

    @classmethod
    @abstractmethod
    def check_spec(cls, in_features: int, out_features: int, spec: dict[str, Any]) -> str | None:
        """``None`` if ``spec`` describes a valid layer of this shape, else ``"field: what is wrong"``."""

    @classmethod
    @abstractmethod
    def from_spec(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any], *,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> CompressedLinear:
        """An (uninitialised) layer of this kind with the shape knobs of ``spec``."""

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """The JSON-able shape knobs :meth:`from_spec` needs (not the values)."""

    @abstractmethod
    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in)`` matrix this layer applies."""

    @property
    def num_params(self) -> int:
        """Stored values: parameters and persistent buffers, each counted once."""
        return sum(t.numel() for t in self._stored())

    @property
    def nbytes(self) -> int:
        """Bytes of everything this layer stores, at the dtypes it holds now."""
        return sum(t.numel() * t.element_size() for t in self._stored())

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
