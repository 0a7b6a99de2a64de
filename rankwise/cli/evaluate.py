"""``rankwise eval``: perplexity, parameters, throughput and memory of a dense or compressed model."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from rankwise.cli.common import (
    BatchOpt,
    DatasetOpt,
    DeviceOpt,
    EvalOpt,
    ModelArg,
    SeqLenOpt,
    TextOpt,
    ThreadsOpt,
    one_line_errors,
    prepare,
    say,
)


@one_line_errors
def evaluate(
    model: ModelArg = "smollm2",
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON object instead of text")] = False,
    seq_len: SeqLenOpt = 256,
    eval_samples: EvalOpt = 64,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
) -> None:
    """Evaluate MODEL (dense or a rankwise directory) on held-out windows from the end of the text."""
    from rankwise.eval import evaluate as run

    work = prepare(model, text, dataset, seq_len, 0, eval_samples, device, threads)
    result = run(work.model, work.evaluation, batch_size=batch_size, progress=not as_json)
    if as_json:
        say(json.dumps({**result.to_dict(), "model": work.source, "text": work.text_name}))
    else:
        say(f"{work.source} on {work.text_name}: {result.describe()}")
