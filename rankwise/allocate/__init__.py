"""Rank allocation: how many ranks each targeted matrix gets under a parameter budget."""

from rankwise.allocate.budget import layer_params, loss_scores, threshold_ranks, welore_scores
from rankwise.allocate.policy import ALLOCATIONS, AllocationPolicy, allocation_policy
from rankwise.allocate.uniform import uniform_ranks

__all__ = ["ALLOCATIONS", "AllocationPolicy", "allocation_policy", "layer_params", "loss_scores",
           "threshold_ranks", "uniform_ranks", "welore_scores"]
