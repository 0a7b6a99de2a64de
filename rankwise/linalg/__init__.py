"""Matrix approximation engine: pure tensor code, no ``nn.Module``.

Everything here takes and returns tensors (or :class:`LowRank` results), computes in float32/float64 and returns
the input dtype, and takes a seed or ``torch.Generator`` wherever randomness is involved.
"""

from rankwise.linalg.completion import Completion, complete
from rankwise.linalg.dictionary import SparseDictionary, sparse_dictionary, whitened_dictionary
from rankwise.linalg.lowrank import LowRank
from rankwise.linalg.lq import LQ, lq_decompose
from rankwise.linalg.monarch import (
    Monarch,
    monarch_dense,
    monarch_matmul,
    monarch_project,
    monarch_shape_error,
    whitened_monarch_project,
)
from rankwise.linalg.omp import omp
from rankwise.linalg.quant import NFQuant, nf_codebook, nf_dequantize, nf_quantize, pack_codes, unpack_codes
from rankwise.linalg.rank import (
    Energy,
    RankSpec,
    break_even_rank,
    rank_for_energy,
    rank_for_params_kept,
    resolve_rank,
    saves_params,
)
from rankwise.linalg.sampling import (
    VOLUME_METHODS,
    greedy_volume,
    leverage_scores,
    lewis_weights,
    projection_dpp,
    sensitivity_sample,
    sketch_lstsq_linf,
    volume_sample,
)
from rankwise.linalg.shared import shared_basis
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
from rankwise.linalg.structured import (
    nystrom_columns,
    ridge_leverage_scores,
    rope_pair_selection,
    whitened_value_output,
)
from rankwise.linalg.svd import SOLVERS, squared_singular_values, subspace_basis, svd_flip, truncated_svd
from rankwise.linalg.tucker import TuckerFactors, tucker
from rankwise.linalg.tucker import validate_ranks as validate_tucker_ranks
from rankwise.linalg.whiten import Whitening, anchored_svd, gram, refit_left, weighted_svd, whiten, whitened_svd

__all__ = [
    "LQ",
    "SKETCHES",
    "SOLVERS",
    "VOLUME_METHODS",
    "Completion",
    "CountSketch",
    "Energy",
    "GaussianSketch",
    "LowRank",
    "Monarch",
    "NFQuant",
    "RankSpec",
    "SRHTSketch",
    "Sketch",
    "SparseDictionary",
    "SparseSignSketch",
    "TuckerFactors",
    "Whitening",
    "anchored_svd",
    "break_even_rank",
    "complete",
    "fwht",
    "gram",
    "greedy_volume",
    "leverage_scores",
    "lewis_weights",
    "lq_decompose",
    "make_sketch",
    "monarch_dense",
    "monarch_matmul",
    "monarch_project",
    "monarch_shape_error",
    "nf_codebook",
    "nf_dequantize",
    "nf_quantize",
    "nystrom",
    "nystrom_columns",
    "omp",
    "pack_codes",
    "projection_dpp",
    "rank_for_energy",
    "rank_for_params_kept",
    "refit_left",
    "resolve_rank",
    "ridge_leverage_scores",
    "rope_pair_selection",
    "saves_params",
    "sensitivity_sample",
    "shared_basis",
    "sketch_lstsq",
    "sketch_lstsq_linf",
    "sparse_dictionary",
    "squared_singular_values",
    "subspace_basis",
    "svd_flip",
    "truncated_svd",
    "tucker",
    "unpack_codes",
    "validate_tucker_ranks",
    "volume_sample",
    "weighted_svd",
    "whiten",
    "whitened_dictionary",
    "whitened_monarch_project",
    "whitened_svd",
    "whitened_value_output",
]
