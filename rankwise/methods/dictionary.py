"""CoSpaDi: calibration-guided sparse dictionary learning. Shopkhoev et al., "CoSpaDi: Compressing LLMs via
Calibration-Guided Sparse Dictionary Learning", 2025, https://arxiv.org/abs/2509.22075.

Each weight becomes ``W ~= S D``: a dense dictionary ``D`` of ``k`` atoms over the input space and ``s`` codes per
output row (``k / s = 2`` by default, as in the paper), so the rows live in a union of ``s``-dimensional subspaces
instead of one rank-``k`` subspace. The dictionary is learnt on the whitened weight ``W L`` (``X X^T = L L^T``), so
the layer's output error ``||(W - S D) X||_F`` is what is minimised, by K-SVD with orthogonal matching pursuit,
started from the top-``k`` right singular vectors; see :func:`~rankwise.linalg.whitened_dictionary`. Each atom
sweep is followed by a least-squares refit of the whole dictionary (cheap, and it never raises the error).

The knob is the number of atoms ``k``. A matrix stores ``k n + m s`` values (the paper's count, :attr:`Cost.params`)
and ``m s`` indices of 2 bytes (4 beyond 32767 atoms) on top (:attr:`Cost.bytes`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from rankwise.calibrate import LayerStats
from rankwise.linalg import sparse_dictionary, whitened_dictionary
from rankwise.linalg.dictionary import nonzeros_for
from rankwise.methods.base import CompressConfig, Cost, register_method
from rankwise.nn.dictionary import DictionaryLinear, index_dtype


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class DictionaryConfig(CompressConfig):
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

    def nonzeros(self, atoms: int) -> int:
        """Codes per row ``s`` for ``atoms`` atoms."""
        return nonzeros_for(atoms, self.atoms_per_nonzero)

    def cost(self, m: int, n: int, knob: int, value_bytes: int) -> Cost:
        """``k n + m s`` values (dictionary and code values) and ``m s`` indices of :func:`index_dtype`'s size."""
        codes = m * self.nonzeros(knob)
        params = knob * n + codes
        return Cost(params, params * value_bytes + codes * index_dtype(knob).itemsize)

    def knob_range(self, m: int, n: int) -> tuple[int, int]:
        """From 1 atom to ``m`` (one atom per row is already exact), and never more than ``n`` codes per row."""
        top = min(m, math.floor((n + 1) * self.atoms_per_nonzero))
        while top > 1 and self.nonzeros(top) > n:
            top -= 1
        return 1, top


@register_method(DictionaryConfig)
def dictionary(weight: torch.Tensor, stats: LayerStats | None, knob: int, config: DictionaryConfig,
               name: str) -> DictionaryLinear:
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
    return DictionaryLinear.from_dictionary(result)
