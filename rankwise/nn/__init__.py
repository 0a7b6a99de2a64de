"""Factorised layers that replace ``nn.Linear`` (and GPT-2's ``Conv1D``)."""

from rankwise.nn.affine import AffineLowRankLinear
from rankwise.nn.dictionary import DictionaryLinear
from rankwise.nn.dictionary_q import Int8DictionaryLinear
from rankwise.nn.fused import fuse_inputs_, unfuse_
from rankwise.nn.kinds import (
    KINDS,
    CompressedLinear,
    compressed_modules,
    kind_class,
    model_num_params,
    register_kind,
)
from rankwise.nn.linear import LowRankLinear, effective_weight, input_dim, is_linear_like, linear_weight
from rankwise.nn.lowrank_int8 import Int8LowRankLinear
from rankwise.nn.lq import QuantLowRankLinear
from rankwise.nn.maestro import MaestroLinear, MaestroSchedule
from rankwise.nn.monarch import MonarchLinear
from rankwise.nn.narrow import NarrowLinear, narrow_attention_, restore_attention_
from rankwise.nn.scatterbrain import ScatterbrainConfig, scatterbrain_attention, use_scatterbrain
from rankwise.nn.shared import SharedBasisLinear
from rankwise.nn.shared_dictionary import SharedDictionaryLinear
from rankwise.nn.train_layers import LOSTLinear, SLTrainLinear, SSTLinear, SSTSchedule, replace_linears

__all__ = [
    "KINDS",
    "AffineLowRankLinear",
    "CompressedLinear",
    "DictionaryLinear",
    "Int8DictionaryLinear",
    "Int8LowRankLinear",
    "LOSTLinear",
    "LowRankLinear",
    "MaestroLinear",
    "MaestroSchedule",
    "MonarchLinear",
    "NarrowLinear",
    "QuantLowRankLinear",
    "SLTrainLinear",
    "SSTLinear",
    "SSTSchedule",
    "ScatterbrainConfig",
    "SharedBasisLinear",
    "SharedDictionaryLinear",
    "compressed_modules",
    "effective_weight",
    "fuse_inputs_",
    "input_dim",
    "is_linear_like",
    "kind_class",
    "linear_weight",
    "model_num_params",
    "narrow_attention_",
    "register_kind",
    "replace_linears",
    "restore_attention_",
    "scatterbrain_attention",
    "unfuse_",
    "use_scatterbrain",
]
