"""Factorised layers that replace ``nn.Linear`` (and GPT-2's ``Conv1D``)."""

from rankwise.nn.linear import LowRankLinear, effective_weight, input_dim, is_linear_like, linear_weight

__all__ = ["LowRankLinear", "effective_weight", "input_dim", "is_linear_like", "linear_weight"]
