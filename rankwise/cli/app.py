"""Typer application wiring the commands together, with one-line errors for every kind of bad input."""

from __future__ import annotations

import signal
import sys
import warnings
from typing import Any

import typer
from typer.core import TyperGroup

from rankwise.cli import adapt as adapt_cmd
from rankwise.cli import cache as cache_cmd
from rankwise.cli import compare as compare_cmd
from rankwise.cli import compensate as compensate_cmd
from rankwise.cli import compress as compress_cmd
from rankwise.cli import evaluate as evaluate_cmd
from rankwise.cli import export as export_cmd
from rankwise.cli import generate as generate_cmd
from rankwise.cli import heal as heal_cmd
from rankwise.cli import info as info_cmd
from rankwise.cli import verify as verify_cmd
from rankwise.cli.common import Command


def _show_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class OneLineGroup(TyperGroup):
    """Click's own usage errors (a bad option value, an unknown option) as ``error: ...`` and exit 2, like
    rankwise's; warnings as ``warning: ...`` lines."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                rv = super().main(*args, standalone_mode=False, **kwargs)
            except typer.TyperException as err:  # typer's click exceptions (usage errors, bad option values)
                if not standalone_mode:
                    raise
                if type(err).__name__ == "NoArgsIsHelpError":  # plain `rankwise`: the help text
                    err.show()
                else:
                    message = err.format_message().replace("Value error, ", "")  # typer's choice errors
                    print(f"error: {message}", file=sys.stderr, flush=True)
                sys.exit(err.exit_code)
            except typer.Abort:
                if not standalone_mode:
                    raise
                print("aborted", file=sys.stderr, flush=True)
                sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(cls=OneLineGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Low-rank compression of language models: compress, evaluate, compare, compensate, generate, "
                  "info, verify; heal a compressed model; list or clear the calibration cache (cache); adapt a model "
                  "with an adapter.")
app.command("compress", cls=Command)(compress_cmd.compress)
app.command("eval", cls=Command)(evaluate_cmd.evaluate)
app.command("compare", cls=Command)(compare_cmd.compare)
app.command("compensate", cls=Command)(compensate_cmd.compensate)
app.command("generate", cls=Command)(generate_cmd.generate)
app.command("info", cls=Command)(info_cmd.info)
app.command("heal", cls=Command)(heal_cmd.heal)
app.command("adapt", cls=Command)(adapt_cmd.adapt)
app.command("export", cls=Command)(export_cmd.export)
app.command("verify", cls=Command)(verify_cmd.verify)
app.add_typer(cache_cmd.app, name="cache")


def _terminate(signum: int, _frame: Any) -> None:
    """SIGTERM (sent by ``timeout``, ``docker stop`` and batch schedulers) is handled like Ctrl-C: the run stops,
    its temporary output is removed, nothing is left half-written."""
    raise KeyboardInterrupt(signum)


BLOCKWISE_COMMANDS = frozenset({"compress", "compare", "compensate"})
TRAINING_COMMANDS = frozenset({"heal", "adapt"})


def main() -> None:
    from rankwise._memory import pin_mmap_threshold, reuse_freed_memory

    signal.signal(signal.SIGTERM, _terminate)
    if BLOCKWISE_COMMANDS.intersection(sys.argv[1:2]):
        # Large temporaries are unmapped when freed, so peak memory does not creep block by block (a streamed eval
        # pins it too). Not where every step allocates the same tensors again (training, an in-memory eval,
        # generation): mapping them afresh each time costs page faults, about 1 s per eval batch of the default
        # model.
        pin_mmap_threshold()
    elif TRAINING_COMMANDS.intersection(sys.argv[1:2]):
        reuse_freed_memory()  # every step allocates the same tensors: keep them (heal at 0.4: 11.3 s a step, not 14.3)
    app()
