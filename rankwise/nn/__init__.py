"""Factorised layers that replace ``nn.Linear`` (and GPT-2's ``Conv1D``)."""

from rankwise.nn.kinds import KINDS, CompressedLinear, compressed_modules, kind_class, register_kind
from rankwise.nn.linear import LowRankLinear, effective_weight, input_dim, is_linear_like, linear_weight
from rankwise.nn.train_layers import LOSTLinear, SLTrainLinear, SSTLinear, SSTSchedule, replace_linears

__all__ = ["KINDS", "CompressedLinear", "LOSTLinear", "LowRankLinear", "SLTrainLinear", "SSTLinear", "SSTSchedule",
           "compressed_modules", "effective_weight", "input_dim", "is_linear_like", "kind_class", "linear_weight",
           "register_kind", "replace_linears"]
