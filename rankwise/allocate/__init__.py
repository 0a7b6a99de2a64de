"""Rank allocation: how many ranks each targeted matrix gets under a parameter budget."""

from rankwise.allocate.uniform import uniform_ranks

__all__ = ["uniform_ranks"]
