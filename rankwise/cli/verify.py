"""``rankwise verify``: check a directory's files against their checksums, on its own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from rankwise.cli.common import JsonOpt, one_line_errors, say


@one_line_errors
def verify(
    paths: Annotated[list[str], typer.Argument(help="directories written by rankwise (compress, heal, adapt, "
                                               "export, compare ...) or Hugging Face cache snapshots")],
    as_json: JsonOpt = False,
) -> None:
    """Check every file of each PATH against its SHA256SUMS (what rankwise writes into every output directory) or,
    for a Hugging Face cache snapshot, against the SHA-256 its blobs are stored under. Exit 0 when all match; exit
    2 with one line naming the first file that is missing or differs, or a directory with nothing to check against.
    """
    from rankwise.io.integrity import SUMS, verify_dir

    results = []
    for path in paths:
        where = Path(path)
        if not where.is_dir():
            raise ValueError(f"{path!r} is not a directory")
        result = verify_dir(where)
        if result.against is None:
            raise ValueError(f"{path}: nothing to verify against (no {SUMS}, and not a Hugging Face cache snapshot)")
        results.append(result)
    if as_json:
        say(json.dumps([{"path": str(r.directory), "against": r.against, "files": r.files, "bytes": r.bytes,
                         "seconds": round(r.seconds, 3), "unlisted": r.unlisted} for r in results], indent=1))
        return
    for result in results:
        say(f"ok: {result.describe()}")
