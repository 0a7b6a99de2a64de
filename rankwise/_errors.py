"""Exceptions and warnings shared across rankwise.

Bad input raises :class:`ValueError` (or a subclass) whose message names the argument and what is allowed, so the
CLI can print it as a single line.
"""

from __future__ import annotations


class RankwiseWarning(UserWarning):
    """Something was adjusted rather than refused (a clamped rank, a damped covariance)."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type's name. A wrapper
    whose first line only introduces its cause (ends with ``:``) gives its innermost cause's line instead."""
    text = str(err).strip()
    line = text.splitlines()[0][:limit] if text else type(err).__name__
    cause = err.__cause__ or err.__context__
    if line.endswith(":") and cause is not None and cause is not err:
        return first_line(cause, limit)
    return line
