"""Matrix approximation engine: pure tensor code, no ``nn.Module``.

Everything here takes and returns tensors (or :class:`LowRank` results), computes in float32/float64 and returns
the input dtype, and takes a seed or ``torch.Generator`` wherever randomness is involved.
"""

from rankwise.linalg.lowrank import LowRank
from rankwise.linalg.rank import (
    Energy,
    RankSpec,
    break_even_rank,
    rank_for_energy,
    rank_for_params_kept,
    resolve_rank,
    saves_params,
)
from rankwise.linalg.sketch import (
    SKETCHES,
    CountSketch,
    GaussianSketch,
    Sketch,
    SparseSignSketch,
    SRHTSketch,
    fwht,
    make_sketch,
    nystrom,
    sketch_lstsq,
)
from rankwise.linalg.svd import SOLVERS, subspace_basis, svd_flip, truncated_svd
from rankwise.linalg.whiten import Whitening, refit_left, weighted_svd, whiten, whitened_svd

__all__ = [
    "SKETCHES",
    "SOLVERS",
    "CountSketch",
    "Energy",
    "GaussianSketch",
    "LowRank",
    "RankSpec",
    "SRHTSketch",
    "Sketch",
    "SparseSignSketch",
    "Whitening",
    "break_even_rank",
    "fwht",
    "make_sketch",
    "nystrom",
    "rank_for_energy",
    "rank_for_params_kept",
    "refit_left",
    "resolve_rank",
    "saves_params",
    "sketch_lstsq",
    "subspace_basis",
    "svd_flip",
    "truncated_svd",
    "weighted_svd",
    "whiten",
    "whitened_svd",
]
