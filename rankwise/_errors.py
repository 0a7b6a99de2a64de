"""Exceptions and warnings shared across rankwise.

Bad input raises :class:`ValueError` (or a subclass) whose message names the argument and what is allowed, so the
CLI can print it as a single line.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path


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


# "... (os error 28)"; older safetensors: "IoError(Os { code: 28, ..."
_OS_ERROR = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")


def wrapped_os_error(err: BaseException, filename: str | Path | None = None) -> OSError | None:
    """The operating-system error a safetensors error's message holds (``... No space left on device (os error
    28)``) as an :class:`OSError` naming ``filename``; ``None`` when it holds none."""
    match = _OS_ERROR.search(str(err))
    if match is None:
        return None
    code = int(match[1] or match[2])
    return OSError(code, os.strerror(code), None if filename is None else str(filename))


@contextlib.contextmanager
def os_errors(filename: str | Path) -> Iterator[None]:
    """Turn a safetensors error raised while writing ``filename`` (the disk full, permission denied ...) into the
    :class:`OSError` it wraps, so that callers see the usual errno and message (the CLI prints it in one line)."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as err:
        converted = wrapped_os_error(err, filename)
        if converted is None:
            raise
        raise converted from err
