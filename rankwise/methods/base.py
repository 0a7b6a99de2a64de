"""Method registry: one config dataclass and one function per compression method, keyed by config type."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from rankwise.allocate import AllocationPolicy, allocation_policy
from rankwise.calibrate import LayerStats
from rankwise.linalg import LowRank
from rankwise.nn import CompressedLinear, Int8LowRankLinear, LowRankLinear
from rankwise.targets import TARGET_GROUPS, check_targets

UNITS = ("params", "bytes")
BUDGETS = {"params": "a ratio of parameters removed (ratio=, --ratio)", "bytes": "a budget in bits (bits=, --bits)"}


@dataclass(frozen=True)
class Cost:
    """What one compressed matrix stores (its bias excluded).

    Attributes:
        params: stored values, the papers' count (a dictionary's indices and a quantiser's scales are not values;
            quantised weights are).
        bytes: every stored byte: values, indices, codes and scales, floating-point tensors at the storage dtype.
    """

    params: int
    bytes: int

    def __getitem__(self, unit: str) -> int:
        return self.params if unit == "params" else self.bytes


@dataclass(frozen=True)
class CompressConfig:
    """Fields shared by every method.

    Attributes:
        ratio: fraction of the targeted parameters to **remove**, in (0, 1) (SVD-LLM's convention); ignored when
            ``bits`` is set.
        bits: a budget in bytes instead: average stored bits per targeted weight (``3.0`` stores the targeted layers
            in 3/8 of a byte per weight of the dense matrices they replace, indices and scales included); below the
            storage dtype's bits.
        targets: which projections to factorise: groups (``"attn"``, ``"mlp"``) and/or layer names such as
            ``"q_proj"`` (the last part of a layer's path). Embeddings and the LM head are never targeted.
        allocation: how ranks are spread under the budget: ``"uniform"`` (same fraction per matrix), ``"welore"``
            (data-free threshold on normalised singular values), ``"loss"`` (from the whitened truncation loss), a
            ``(shapes, ratio) -> ranks`` callable or an :class:`~rankwise.allocate.AllocationPolicy`.
        sequential: calibrate each block on the activations of the blocks already compressed.
        update_u: after truncation, refit the left factor by least squares on the calibration activations
            (towards the original model's outputs when ``sequential``).
        score_samples: how many calibration windows (the first ones, rounded up to whole batches) the scoring pass
            of an allocation that reads gradients (``loss``, ``zs``, ...) or of FWSVD's Fisher uses; ``None``, all.
            That pass is a backward through the whole model, the largest part of the time of ``--recipe best``.
            The layers are still fitted on every window, but what the fits read from that pass (FWSVD's Fisher,
            ``output_weighted``'s channel weights) comes from the subset too. ``rankwise compress`` only: compare
            scores every row on its shared statistics and refuses it.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()  # calibration statistics: "xxt", "abs", "fisher", "gout"
    knob: ClassVar[str] = "rank"  # the integer size knob the budget sets per matrix, as reports name it
    units: ClassVar[tuple[str, ...]] = UNITS  # budgets it takes: "params" (ratio), "bytes" (bits)
    # Structured methods narrow whole modules of a block together (a :func:`register_block_method` function) at a
    # per-block kept fraction, instead of compressing each matrix at its own knob.
    structured: ClassVar[bool] = False

    @property
    def policy(self) -> AllocationPolicy:
        """The allocation policy this config names."""
        return allocation_policy(self.allocation)

    ratio: float = 0.2
    bits: float | None = None
    targets: tuple[str, ...] = TARGET_GROUPS
    allocation: str | Callable | AllocationPolicy = "uniform"
    sequential: bool = False
    update_u: bool = False
    score_samples: int | None = None

    def __post_init__(self) -> None:
        allocation_policy(self.allocation)  # validates: a known name, a callable or a policy
        if self.score_samples is not None and (isinstance(self.score_samples, bool)
                                               or not isinstance(self.score_samples, int) or self.score_samples < 1):
            raise ValueError(f"score_samples must be a number of calibration windows >= 1 (or None: all), got "
                             f"{self.score_samples!r}")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, numbers.Real) or not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio must be a fraction of parameters removed in (0, 1), got {self.ratio!r}")
        if self.bits is not None and (isinstance(self.bits, bool) or not isinstance(self.bits, numbers.Real)
                                      or not 0.0 < self.bits < 64.0 or not math.isfinite(self.bits)):
            raise ValueError(f"bits must be the average stored bits per targeted weight, > 0, got {self.bits!r}")
        object.__setattr__(self, "targets", check_targets(self.targets))


    # The size contract: what a matrix costs at each knob. Low-rank by default; other representations override both.

    def cost(self, m: int, n: int, knob: int, value_bytes: int) -> Cost:
        """What one ``m x n`` (out x in) matrix stores at ``knob`` with floating-point values of ``value_bytes``
        each; equals the built layer's :attr:`~rankwise.nn.CompressedLinear.num_params` and its bytes at that
        storage dtype, and is non-decreasing in ``knob``. Low-rank: ``r (m + n)`` values."""
        return Cost(knob * (m + n), knob * (m + n) * value_bytes)

    def lowrank_layer(self, lr: LowRank, bias: torch.Tensor | None) -> CompressedLinear:
        """The layer holding a factorisation this method returned (``"lowrank"``; see :class:`LowRankConfig`)."""
        return LowRankLinear.from_lowrank(lr, bias)

    def knob_range(self, m: int, n: int) -> tuple[int, int]:
        """The smallest and largest knob this method accepts for an ``m x n`` matrix."""
        return 1, min(m, n)

    @property
    def speed_limited(self) -> bool:
        """Whether a matrix is factorised only at ranks faster than dense (``objective="speed"`` of the low-rank
        methods; see :mod:`rankwise.allocate.latency`)."""
        return False

    def check_model(self, model: torch.nn.Module) -> None:
        """A one-line ``ValueError`` if this method cannot compress ``model`` (checked at plan time, before any
        weight is read); every model is accepted by default."""

    @property
    def refit_anchor(self) -> float:
        """The weight ``a`` of the original outputs in the target of the left-factor refit (``update_u``),
        ``W (a X + (1 - a) Xh)``: 1 unless the method's own fit shrinks its target towards the layer's outputs."""
        return 1.0

    @property
    def paired(self) -> bool:
        """Whether sequential compression also runs the original (dense) model alongside, for the paired
        statistics ``X Xh^T`` (original x compressed inputs) a fit towards the original outputs needs."""
        return self.sequential and self.update_u

    @property
    def needs_influence(self) -> bool:
        """Whether compressing first measures every block's influence on the calibration data (the per-block
        budgets of a structured method), so calibration data is needed even with precomputed statistics."""
        return False

    def block_groups(self, n_blocks: int) -> list[list[int]]:
        """Decoder blocks compressed together: one each, unless a cross-block method groups them (then its
        :func:`register_group_method` function receives the same projection of every block in a group)."""
        return [[i] for i in range(n_blocks)]

    def share_key(self, name: str) -> str | None:
        """For a cross-block method: which layers of a block group are compressed together, by the layer's name
        inside its block (``self_attn.q_proj``); ``None`` compresses the layer on its own."""
        return None

    def group_cost(self, shapes: list[tuple[int, int]], knob: int, value_bytes: int) -> Cost:
        """What a group of layers compressed together stores at ``knob`` (cross-block methods override it)."""
        costs = [self.cost(m, n, knob, value_bytes) for m, n in shapes]
        return Cost(sum(c.params for c in costs), sum(c.bytes for c in costs))

    @property
    def unit(self) -> str:
        """What the budget counts: ``"params"`` (``ratio``) or ``"bytes"`` (``bits``)."""
        return "params" if self.bits is None else "bytes"

    def kept_fraction(self, value_bytes: int) -> float:
        """The share of the dense targets' cost (in :attr:`unit`) the budget keeps."""
        if self.unit not in self.units:
            given = "a ratio of parameters" if self.unit == "params" else "a budget in bits"
            raise ValueError(f"method {self.name!r} takes {' or '.join(BUDGETS[u] for u in self.units)}, not {given}")
        if self.bits is None:
            return 1.0 - self.ratio
        dense_bits = 8 * value_bytes
        if self.bits >= dense_bits:
            raise ValueError(f"bits must be below the {dense_bits} bits a dense weight is stored in, got {self.bits}")
        return self.bits / dense_bits

    def knob_for(self, m: int, n: int, budget: float, value_bytes: int) -> int | None:
        """The largest knob whose cost fits ``budget`` (in :attr:`unit`); ``None`` when even the smallest does not."""
        lo, hi = self.knob_range(m, n)
        unit = self.unit
        if self.cost(m, n, lo, value_bytes)[unit] > budget:
            return None
        while lo < hi:  # cost is non-decreasing in the knob: the last knob that fits
            mid = (lo + hi + 1) // 2
            if self.cost(m, n, mid, value_bytes)[unit] <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo


class SharedAcrossBlocks:
    """Mixin of cross-block method configs (fields ``group_size`` and ``shared``): blocks are taken ``group_size``
    at a time, and in each group the projections whose leaf name is in ``shared`` are compressed together."""

    group_size: int
    shared: tuple[str, ...]

    def check_sharing(self, least: int) -> None:
        """One-line ``ValueError`` unless ``group_size >= least`` and ``shared`` is a tuple of names."""
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < least:
            raise ValueError(f"group_size must be an integer >= {least} (consecutive blocks sharing), got "
                             f"{self.group_size!r}")
        if isinstance(self.shared, str) or not all(isinstance(s, str) and s for s in self.shared):
            raise ValueError(f"shared must be a tuple of projection names such as q_proj, got {self.shared!r}")

    def block_groups(self, n_blocks: int) -> list[list[int]]:
        return [list(range(i, min(i + self.group_size, n_blocks))) for i in range(0, n_blocks, self.group_size)]

    def share_key(self, name: str) -> str | None:
        return name if self.group_size > 1 and name.rsplit(".", 1)[-1] in self.shared else None


FACTOR_BITS = (8,)
OBJECTIVES = ("size", "speed")


@dataclass(frozen=True)
class LowRankConfig(CompressConfig):
    """Base of the methods that return a truncated factorisation (:class:`~rankwise.linalg.LowRank`), written as
    ``"lowrank"`` layers, or ``"lowrank_int8"`` ones with ``factor_bits=8``.

    Attributes:
        factor_bits: ``None``: the factors are floating-point values at the storage dtype; ``8``: int8 codes with one
            floating-point scale per row of each factor (:class:`~rankwise.nn.Int8LowRankLinear`), so a budget in
            bits buys about twice the rank. A ratio of parameters removed gives the same rank either way.
        objective: ``"size"``: a matrix is factorised whenever its rank stores fewer values than the dense matrix;
            ``"speed"``: only where the factor pair is also faster at decode on the machine compressing (one token
            through the dense matrix and through pairs of each rank, timed once per shape and cached,
            :mod:`rankwise.allocate.latency`); a matrix whose rank would not be faster stays dense and the budget
            is met by the others.
    """

    factor_bits: int | None = None
    objective: str = "size"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.factor_bits is not None and (not isinstance(self.factor_bits, int) or isinstance(self.factor_bits, bool)
                                             or self.factor_bits not in FACTOR_BITS):
            raise ValueError(f"factor_bits must be None (floating-point factors) or one of "
                             f"{', '.join(map(str, FACTOR_BITS))}, got {self.factor_bits!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective == "speed" and self.factor_bits is not None:
            raise ValueError("objective='speed' times floating-point factor pairs; it cannot be combined with "
                             "factor_bits (int8 factors are dequantised per call)")

    def cost(self, m: int, n: int, knob: int, value_bytes: int) -> Cost:
        """``r (m + n)`` values; with ``factor_bits=8`` one byte each plus ``m + r`` row scales at ``value_bytes``."""
        if self.factor_bits == 8:
            return Cost(knob * (m + n), knob * (m + n) + (m + knob) * value_bytes)
        return super().cost(m, n, knob, value_bytes)

    @property
    def speed_limited(self) -> bool:
        return self.objective == "speed"

    def lowrank_layer(self, lr: LowRank, bias: torch.Tensor | None) -> CompressedLinear:
        """The layer holding ``lr`` (and ``bias``) as this config stores factors."""
        if self.factor_bits == 8:
            return Int8LowRankLinear.from_lowrank(lr, bias)
        return super().lowrank_layer(lr, bias)


def dense_cost(m: int, n: int, value_bytes: int) -> Cost:
    """What the dense ``m x n`` matrix stores."""
    return Cost(m * n, m * n * value_bytes)


def choose_knobs(config: CompressConfig, shapes: dict[str, tuple[int, int]], fractions: dict[str, float],
                 value_bytes: int, limits: Mapping[str, int] | None = None) -> dict[str, int]:
    """Each matrix's knob under the budget: matrix ``k`` may keep ``fractions[k]`` of its dense cost (from the
    allocation policy; ``1.0`` keeps it dense), and the total may not exceed ``config``'s budget.

    A matrix gets the largest knob whose cost fits its share; one whose share is below the method's smallest
    representation gets that smallest one, and the shares of the others shrink until the total fits. A matrix
    whose knob would cost as much as the dense matrix, or reaches its entry in ``limits`` (the rank from which a
    factor pair is no faster, ``objective="speed"``), is left out of the result (kept dense).

    Raises:
        ValueError: even the smallest representation of every matrix exceeds the budget.
    """
    unit = config.unit
    limits = limits or {}
    dense = {k: dense_cost(*shapes[k], value_bytes)[unit] for k in shapes}
    total = config.kept_fraction(value_bytes) * sum(dense.values())
    lowest = {k: config.cost(*shapes[k], config.knob_range(*shapes[k])[0], value_bytes)[unit]
              if config.knob_range(*shapes[k])[0] < limits.get(k, math.inf) else dense[k] for k in shapes}
    floor = sum(min(lowest[k], dense[k]) for k in shapes)
    if floor > total:
        what = f"{config.bits} bits per weight" if config.bits is not None else f"ratio {config.ratio}"
        slow = sum(1 for k in shapes if lowest[k] >= dense[k] and k in limits)
        if slow:
            what += (f" with objective 'speed' ({slow} matrices stay dense: no rank of theirs is faster than "
                     "dense on this machine)")
        least = 8 * value_bytes * floor / sum(dense.values()) if unit == "bytes" else 1 - floor / sum(dense.values())
        allowed = f"at least {least:.3f} bits" if unit == "bytes" else f"a ratio of at most {least:.3f}"
        raise ValueError(f"the budget of {what} is below what {config.name} can represent for these layers: "
                         f"allowed is {allowed}")
    budgets = {k: fractions.get(k, 1.0) * dense[k] for k in shapes}
    closest = math.inf  # the smallest excess over the budget of any allocation tried
    for _ in range(64):
        knobs: dict[str, int] = {}
        spent: dict[str, float] = {}
        flexible: list[str] = []  # matrices whose knob fits their share: their share can shrink
        below: dict[str, float] = {}  # kept dense at or above their limit: the cost just below it
        for k, (m, n) in shapes.items():
            if budgets[k] >= dense[k]:  # a full share: dense (no representation saves anything there)
                flexible.append(k)
                spent[k] = dense[k]
                continue
            knob = config.knob_for(m, n, budgets[k], value_bytes)
            if knob is not None:
                flexible.append(k)
            else:
                knob = config.knob_range(m, n)[0]
            cost = config.cost(m, n, knob, value_bytes)[unit]
            limit = limits.get(k, math.inf)
            if cost >= dense[k] or knob >= limit:
                spent[k] = dense[k]
                if knob >= limit > config.knob_range(m, n)[0]:  # if the budget needs it: factorised below the limit
                    below[k] = config.cost(m, n, limit - 1, value_bytes)[unit]
                elif knob >= limit and k in flexible:  # no rank is fast enough: dense whatever the budget
                    flexible.remove(k)
            else:
                knobs[k], spent[k] = knob, cost
        if sum(spent.values()) <= total:
            return knobs
        closest = min(closest, sum(spent.values()) - total)
        fixed = sum(spent[k] for k in shapes if k not in flexible)
        basis = {k: below.get(k, spent[k]) for k in flexible}
        scale = min(0.999, max(0.0, total - fixed) / max(sum(basis.values()), 1e-300))
        budgets.update({k: basis[k] * scale for k in flexible})
    raise ValueError(f"could not meet the budget for {config.name}: the closest allocation found is over it by "
                     f"{closest / sum(dense.values()):.2%} of the targeted size; lower the ratio or raise bits"
                     + (" (or use objective 'size': 'speed' keeps slow ranks dense)" if limits else ""))


class MethodFn(Protocol):
    """Compress one ``(out, in)`` weight at a given knob (a rank for low-rank methods) using its layer's calibration
    statistics: a :class:`~rankwise.linalg.LowRank` or a :class:`~rankwise.nn.CompressedLinear` without bias."""

    def __call__(self, weight: torch.Tensor, stats: LayerStats | None, knob: int, config: CompressConfig,
                 name: str) -> LowRank | CompressedLinear: ...


_REGISTRY: dict[type[CompressConfig], MethodFn] = {}
_BY_NAME: dict[str, type[CompressConfig]] = {}


def _check_name(config_cls: type[CompressConfig]) -> str:
    name = config_cls.name
    if not name or name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"method name must be a non-empty lowercase identifier, got {name!r}")
    if name in _BY_NAME and _BY_NAME[name] is not config_cls:
        raise ValueError(f"method name {name!r} is already registered")
    return name


def register_method(config_cls: type[CompressConfig]) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn`` as the implementation for ``config_cls``; names must be lowercase and unique."""
    name = _check_name(config_cls)

    def decorator(fn: MethodFn) -> MethodFn:
        _REGISTRY[config_cls] = fn
        _BY_NAME[name] = config_cls
        return fn

    return decorator


GroupFn = Callable[..., list[CompressedLinear]]
_GROUP_REGISTRY: dict[type[CompressConfig], GroupFn] = {}


def register_group_method(config_cls: type[CompressConfig]) -> Callable[[GroupFn], GroupFn]:
    """Register ``fn(names, weights, stats, knob, config) -> layers`` compressing layers of several blocks together
    (one per name, without bias; see :meth:`CompressConfig.share_key`) for ``config_cls``."""

    def decorator(fn: GroupFn) -> GroupFn:
        _GROUP_REGISTRY[config_cls] = fn
        return fn

    return decorator


def group_method_for(config: CompressConfig) -> GroupFn:
    if type(config) not in _GROUP_REGISTRY:
        raise ValueError(f"method {config.name!r} shares layers across blocks but registered no group function")
    return _GROUP_REGISTRY[type(config)]


BlockFn = Callable[..., list]
_BLOCK_REGISTRY: dict[type[CompressConfig], BlockFn] = {}


def register_block_method(config_cls: type[CompressConfig]) -> Callable[[BlockFn], BlockFn]:
    """Register ``fn(model, modules, stats, keep, config) -> [(name, new layer or None, report row)]`` narrowing
    one block's targeted modules to ``keep`` of their width, for a ``structured`` method ``config_cls`` (which also
    defines ``check_model(model)``, ``needs_influence`` and ``block_keeps(influence, n_blocks)``)."""
    if not config_cls.structured:
        raise ValueError(f"{config_cls.__name__} must set structured = True to register a block method")
    name = _check_name(config_cls)

    def decorator(fn: BlockFn) -> BlockFn:
        _BLOCK_REGISTRY[config_cls] = fn
        _BY_NAME[name] = config_cls
        return fn

    return decorator


def block_method_for(config: CompressConfig) -> BlockFn:
    if type(config) not in _BLOCK_REGISTRY:
        raise ValueError(f"method {config.name!r} is structured but registered no block function")
    return _BLOCK_REGISTRY[type(config)]


def method_names() -> list[str]:
    return sorted(_BY_NAME)


def config_class(name: str) -> type[CompressConfig]:
    """The config class registered under ``name``; the error lists the valid names."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(method_names())}")
    return _BY_NAME[name]


def method_for(config: CompressConfig) -> MethodFn | BlockFn:
    """The function compressing with ``config``: per matrix, or per block for a structured method."""
    if type(config) in _BLOCK_REGISTRY:
        return _BLOCK_REGISTRY[type(config)]
    if type(config) not in _REGISTRY:
        raise ValueError(f"no method registered for {type(config).__name__}; valid methods: "
                         f"{', '.join(method_names())}")
    return _REGISTRY[type(config)]
