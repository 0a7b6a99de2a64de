"""CoSpaDi: calibration-guided sparse dictionary learning. Shopkhoev et al., "CoSpaDi: Compressing LLMs via
Calibration-Guided Sparse Dictionary Learning", 2025, https://arxiv.org/abs/2509.22075.

Each weight becomes ``W ~= S D``: a dense dictionary ``D`` of ``k`` atoms over the input space and ``s`` codes per
output row (``k / s = 2`` by default, as in the paper), so the rows live in a union of ``s``-dimensional subspaces
instead of one rank-``k`` subspace. The dictionary is learnt on the whitened weight ``W L`` (``X X^T = L L^T``), so
the layer's output error ``||(W - S D) X||_F`` is what is minimised, by K-SVD with orthogonal matching pursuit,
started from the top-``k`` right singular vectors; see :func:`~rankwise.linalg.whitened_dictionary`. Each atom
sweep is followed by a least-squares refit of the whole dictionary (cheap, and it never raises the error).

The knob is the number of atoms ``k``. A matrix stores ``k n + m s`` values (the paper's count, :attr:`Cost.params`)
and ``m s`` indices of 2 bytes (4 beyond 32767 atoms) on top (:attr:`Cost.bytes`); with ``value_bits=8`` the values
take one byte each (plus one scale per row of the dictionary and of the codes) and the indices ``ceil(log2 k)`` bits
each (layer kind ``"dictionary_int8"``).

With ``group_size > 1`` the same projection (``shared``: q, k, v, gate and up by default) of ``group_size`` consecutive
blocks shares one dictionary, learnt on the stacked weights whitened by the group's summed input covariance (as Basis
Sharing does for a basis), and each layer keeps its own codes (layer kind ``"shared_dictionary"``, the dictionary
stored once); the cross-layer sharing of "Share Your Attention" (Zhussip et al. 2025,
https://arxiv.org/abs/2508.04581), with CoSpaDi's row atoms rather than its whole-matrix atoms.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from rankwise.calibrate import LayerStats
from rankwise.calibrate.stats import pooled_second_moment
from rankwise.linalg import sparse_dictionary, whitened_dictionary
from rankwise.linalg.dictionary import nonzeros_for
from rankwise.methods.base import (
    CompressConfig,
    Cost,
    SharedAcrossBlocks,
    register_group_method,
    register_method,
)
from rankwise.nn.dictionary import DictionaryLinear, index_dtype
from rankwise.nn.dictionary_q import Int8DictionaryLinear, int8_dictionary_bytes
from rankwise.nn.shared_dictionary import SharedDictionaryLinear
from rankwise.targets import SHARED_PROJECTIONS


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class DictionaryConfig(SharedAcrossBlocks, CompressConfig):
    """Sparse dictionary (CoSpaDi); the knob is the number of atoms ``k``.

    Attributes:
        atoms_per_nonzero: ``k / s``, atoms per code of a row, ``>= 1`` (``s = max(1, floor(k / ratio))``). The
            paper's ablation finds 2 best; ``1`` makes every row use every atom (plain rank ``k``).
        iterations: orthogonal-matching-pursuit recodings after the start (the top-``k`` singular vectors of the
            whitened weight, whose codes are hard thresholds: OMP on orthonormal atoms). A pursuit is what moves a
            row to other atoms; it costs about ``s^3`` per row, the most of any stage. Default 0: on the default
            model's layers one more pursuit lowers the whitened error by a further 3-13 % but triples the time
            (about 4 against 12 minutes on one core for the whole model).
        sweeps: K-SVD atom sweeps after the start and after each pursuit, each followed by a least-squares refit
            of the whole dictionary; cheap next to a pursuit (``0``: one refit only).
        omp_steps: greedy steps of each pursuit; each adds ``ceil(s / omp_steps)`` atoms per row (generalised OMP),
            ``s`` or more is exact OMP. It bounds the per-step overhead (the least squares cost about ``s^3`` per
            row whatever the steps); on real layers 8, 16 and 32 steps give the same error.
        whiten: minimise the layer's output error on the calibration inputs (needs their covariance), as the paper
            does; ``False`` fits the weight itself (no calibration).
        damp: relative ridge added to the covariance diagonal before factorising (``whiten`` only).
        seed: seed of the atoms drawn beyond ``min(m, n)`` (the only random step): same seed, same bytes.
        value_bits: ``None``: values in floating point and int16 indices (kind ``"dictionary"``); ``8``: int8
            values with per-row scales and indices packed at ``ceil(log2 k)`` bits (kind ``"dictionary_int8"``),
            for budgets in bits.
        group_size: consecutive blocks sharing one dictionary per projection named in ``shared``; 1 (default):
            a dictionary per layer.
        shared: leaf names of the projections that share when ``group_size > 1``; others get their own.
    """

    name: ClassVar[str] = "dictionary"
    knob: ClassVar[str] = "atoms"
    atoms_per_nonzero: float = 2.0
    iterations: int = 0
    sweeps: int = 2
    omp_steps: int = 16
    whiten: bool = True
    damp: float = 0.0
    seed: int = 0
    value_bits: int | None = None
    group_size: int = 1
    shared: tuple[str, ...] = SHARED_PROJECTIONS

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        """Calibration statistics: the input covariance when whitening, none otherwise."""
        return frozenset({"xxt"}) if self.whiten else frozenset()

    def __post_init__(self) -> None:
        super().__post_init__()
        ratio = self.atoms_per_nonzero
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(ratio) or ratio < 1:
            raise ValueError(f"atoms_per_nonzero must be a finite number >= 1 (atoms per code, k / s), got {ratio!r}")
        if not _is_int(self.iterations) or self.iterations < 0:
            raise ValueError(f"iterations must be an integer >= 0 (pursuits after the start), got {self.iterations!r}")
        if not _is_int(self.sweeps) or self.sweeps < 0:
            raise ValueError(f"sweeps must be an integer >= 0 (K-SVD atom sweeps per stage), got {self.sweeps!r}")
        if not _is_int(self.omp_steps) or self.omp_steps < 1:
            raise ValueError(f"omp_steps must be an integer >= 1 (greedy steps per pursuit), got {self.omp_steps!r}")
        if not isinstance(self.whiten, bool):
            raise ValueError(f"whiten must be True or False, got {self.whiten!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, numbers.Real) or not math.isfinite(self.damp) \
                or self.damp < 0.0:
            raise ValueError(f"damp must be a finite number >= 0, got {self.damp!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.value_bits is not None and (not _is_int(self.value_bits) or self.value_bits != 8):
            raise ValueError(f"value_bits must be None (floating-point values) or 8, got {self.value_bits!r}")
        self.check_sharing(1)
        if self.group_size > 1 and self.value_bits is not None:
            raise ValueError("value_bits=8 with group_size > 1 is not implemented: a shared dictionary is stored in "
                             "floating point")

    def nonzeros(self, atoms: int) -> int:
        """Codes per row ``s`` for ``atoms`` atoms."""
        return nonzeros_for(atoms, self.atoms_per_nonzero)

    def cost(self, m: int, n: int, knob: int, value_bytes: int) -> Cost:
        """``k n + m s`` values (dictionary and code values) and ``m s`` indices of :func:`index_dtype`'s size; with
        ``value_bits=8``, :func:`~rankwise.nn.dictionary_q.int8_dictionary_bytes`."""
        if self.value_bits == 8:
            return Cost(*int8_dictionary_bytes(m, n, knob, self.nonzeros(knob), value_bytes))
        codes = m * self.nonzeros(knob)
        params = knob * n + codes
        return Cost(params, params * value_bytes + codes * index_dtype(knob).itemsize)

    def group_cost(self, shapes: list[tuple[int, int]], knob: int, value_bytes: int) -> Cost:
        """One ``k x n`` dictionary plus each layer's ``m_i s`` code values and indices."""
        codes = sum(m for m, _ in shapes) * self.nonzeros(knob)
        params = knob * shapes[0][1] + codes
        return Cost(params, params * value_bytes + codes * index_dtype(knob).itemsize)

    def knob_range(self, m: int, n: int) -> tuple[int, int]:
        """From 1 atom to ``m`` (one atom per row is already exact), and never more than ``n`` codes per row."""
        top = min(m, math.floor((n + 1) * self.atoms_per_nonzero))
        while top > 1 and self.nonzeros(top) > n:
            top -= 1
        return 1, top


@register_method(DictionaryConfig)
def dictionary(weight: torch.Tensor, stats: LayerStats | None, knob: int, config: DictionaryConfig,
               name: str) -> DictionaryLinear | Int8DictionaryLinear:
    s = config.nonzeros(knob)
    options = {"iterations": config.iterations, "steps": config.omp_steps, "sweeps": config.sweeps,
               "generator": config.seed}
    if not config.whiten:
        result = sparse_dictionary(weight, knob, s, **options)
    elif stats is None or stats.xxt is None or stats.count == 0:
        raise ValueError(f"dictionary with whiten=True needs the input covariance for {name}; calibrate, or set "
                         f"whiten=False")
    else:
        result = whitened_dictionary(weight, stats.whitening(config.damp), knob, s, **options)
    kind = Int8DictionaryLinear if config.value_bits == 8 else DictionaryLinear
    return kind.from_dictionary(result)


@register_group_method(DictionaryConfig)
def dictionary_group(names: list[str], weights: list[torch.Tensor], stats: list[LayerStats | None], knob: int,
                     config: DictionaryConfig) -> list[SharedDictionaryLinear]:
    """The same projection of every block in a group: one dictionary learnt on the stacked weights (stored by the
    first layer), codes each; whitened by the group's summed input covariance unless ``whiten=False``."""
    s = config.nonzeros(knob)
    stacked = torch.cat([w.detach() for w in weights])  # (sum m_i, n)
    options = {"iterations": config.iterations, "steps": config.omp_steps, "sweeps": config.sweeps,
               "generator": config.seed}
    if not config.whiten:
        result = sparse_dictionary(stacked, knob, s, **options)
    elif any(st is None or st.xxt is None or st.count == 0 for st in stats):
        raise ValueError(f"dictionary with whiten=True needs the input covariance of {', '.join(names)}")
    else:
        result = whitened_dictionary(stacked, pooled_second_moment(stats), knob, s, damp=config.damp, **options)
    rows = [w.shape[0] for w in weights]
    n = weights[0].shape[1]
    layers = []
    for k, (values, indices) in enumerate(zip(result.values.split(rows), result.indices.split(rows), strict=True)):
        layer = SharedDictionaryLinear(n, values.shape[0], knob, s, bias=False, owner=None if k == 0 else names[0],
                                       device=values.device, dtype=weights[k].dtype)
        with torch.no_grad():
            if k == 0:
                layer.dictionary.copy_(result.dictionary)
            layer.values.copy_(values)
            layer.indices.copy_(indices)
        if k:
            layer.share(layers[0])
        layers.append(layer)
    return layers
