"""Factorised layers that replace ``nn.Linear`` (and GPT-2's ``Conv1D``)."""

from rankwise.nn.linear import LowRankLinear, effective_weight, input_dim, is_linear_like, linear_weight
from rankwise.nn.train_layers import LOSTLinear, SLTrainLinear, SSTLinear, SSTSchedule, replace_linears

__all__ = ["LOSTLinear", "LowRankLinear", "SLTrainLinear", "SSTLinear", "SSTSchedule", "effective_weight", "input_dim",
           "is_linear_like", "linear_weight", "replace_linears"]
