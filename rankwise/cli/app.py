"""Typer application wiring the commands together."""

from __future__ import annotations

import typer

from rankwise.cli import compare as compare_cmd
from rankwise.cli import compensate as compensate_cmd
from rankwise.cli import compress as compress_cmd
from rankwise.cli import evaluate as evaluate_cmd

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Low-rank compression of language models: compress, evaluate, compare, compensate.")
app.command("compress")(compress_cmd.compress)
app.command("eval")(evaluate_cmd.evaluate)
app.command("compare")(compare_cmd.compare)
app.command("compensate")(compensate_cmd.compensate)


def main() -> None:
    app()
