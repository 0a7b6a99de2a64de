"""Method registry: one config dataclass and one function per compression method, keyed by config type."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from rankwise.allocate import AllocationPolicy, allocation_policy
from rankwise.calibrate import LayerStats
from rankwise.linalg import LowRank

TARGET_GROUPS = ("attn", "mlp")


@dataclass(frozen=True)
class CompressConfig:
    """Fields shared by every method.

    Attributes:
        ratio: fraction of the targeted parameters to **remove**, in (0, 1) (SVD-LLM's convention).
        targets: which projections to factorise: any of ``"attn"`` and ``"mlp"``. Embeddings and the LM head are
            never targeted by default.
        allocation: how ranks are spread under the budget: ``"uniform"`` (same fraction per matrix), ``"welore"``
            (data-free threshold on normalised singular values), ``"loss"`` (from the whitened truncation loss), a
            ``(shapes, ratio) -> ranks`` callable or an :class:`~rankwise.allocate.AllocationPolicy`.
        sequential: calibrate each block on the activations of the blocks already compressed.
        update_u: after truncation, refit the left factor by least squares on the calibration activations
            (towards the original model's outputs when ``sequential``).
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()  # calibration statistics: "xxt", "abs", "fisher"

    @property
    def policy(self) -> AllocationPolicy:
        """The allocation policy this config names."""
        return allocation_policy(self.allocation)

    ratio: float = 0.2
    targets: tuple[str, ...] = TARGET_GROUPS
    allocation: str | Callable | AllocationPolicy = "uniform"
    sequential: bool = False
    update_u: bool = False

    def __post_init__(self) -> None:
        allocation_policy(self.allocation)  # validates: a known name, a callable or a policy
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, numbers.Real) or not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio must be a fraction of parameters removed in (0, 1), got {self.ratio!r}")
        bad = [t for t in self.targets if t not in TARGET_GROUPS]
        if not self.targets or bad:
            raise ValueError(f"targets must be a non-empty subset of {', '.join(TARGET_GROUPS)}, got {self.targets!r}")


class MethodFn(Protocol):
    """Factorise one ``(out, in)`` weight at a given rank using its layer's calibration statistics."""

    def __call__(self, weight: torch.Tensor, stats: LayerStats | None, rank: int, config: CompressConfig,
                 name: str) -> LowRank: ...


_REGISTRY: dict[type[CompressConfig], MethodFn] = {}
_BY_NAME: dict[str, type[CompressConfig]] = {}


def register_method(config_cls: type[CompressConfig]) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn`` as the implementation for ``config_cls``; names must be lowercase and unique."""
    name = config_cls.name
    if not name or name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"method name must be a non-empty lowercase identifier, got {name!r}")
    if name in _BY_NAME and _BY_NAME[name] is not config_cls:
        raise ValueError(f"method name {name!r} is already registered")

    def decorator(fn: MethodFn) -> MethodFn:
        _REGISTRY[config_cls] = fn
        _BY_NAME[name] = config_cls
        return fn

    return decorator


def method_names() -> list[str]:
    return sorted(_BY_NAME)


def config_class(name: str) -> type[CompressConfig]:
    """The config class registered under ``name``; the error lists the valid names."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(method_names())}")
    return _BY_NAME[name]


def method_for(config: CompressConfig) -> MethodFn:
    if type(config) not in _REGISTRY:
        raise ValueError(f"no method registered for {type(config).__name__}; valid methods: "
                         f"{', '.join(method_names())}")
    return _REGISTRY[type(config)]
