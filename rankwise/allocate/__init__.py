"""Rank allocation: how many ranks each targeted matrix gets under a parameter budget."""

from rankwise.allocate.budget import layer_params, loss_scores, threshold_ranks, welore_scores
from rankwise.allocate.uniform import uniform_ranks

__all__ = ["layer_params", "loss_scores", "threshold_ranks", "uniform_ranks", "welore_scores"]
