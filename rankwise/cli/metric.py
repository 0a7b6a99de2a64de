"""``--metric``: what ``rankwise eval`` and ``rankwise compare`` measure on the evaluation windows (one option, one
meaning: both commands import it from here)."""

from __future__ import annotations

from typing import Annotated

import typer

from rankwise.eval.measure import METRICS, check_metrics

MetricOpt = Annotated[list[str] | None, typer.Option(
    "--metric", metavar="LIST", help=f"what to measure on the evaluation windows, a comma list or repeated: "
    f"{', '.join(METRICS)} (default perplexity). nuclear is the label-free Matrix Nuclear-Norm of the last hidden "
    "state (arXiv 2410.10672; L1,2 approximation, lower reads as better), nuclear_exact the same with the exact "
    "nuclear norm; compare always measures perplexity too, its table's reference")]


def metric_names(values: list[str] | None) -> tuple[str, ...]:
    """The metric names of ``--metric`` (comma lists and repeats, in order, without duplicates); perplexity if none.

    Raises:
        ValueError: an empty item or an unknown name (the message lists the valid ones).
    """
    if not values:
        return ("perplexity",)
    names = [item.strip() for value in values for item in value.split(",")]
    if any(not name for name in names):
        raise ValueError(f"--metric takes a comma list of {', '.join(METRICS)}, got {','.join(values)!r}")
    try:
        return check_metrics(names)
    except ValueError as err:
        raise ValueError(f"--{err}") from None
