"""Exceptions and warnings shared across rankwise.

Bad input raises :class:`ValueError` (or a subclass) whose message names the argument and what is allowed, so the
CLI can print it as a single line.
"""

from __future__ import annotations


class RankwiseWarning(UserWarning):
    """Something was adjusted rather than refused (a clamped rank, a damped covariance)."""
