"""``rankwise cache list`` and ``rankwise cache clear``: what the calibration-statistics cache holds; emptying it."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer

from rankwise.cli.common import Command, JsonOpt, one_line_errors, say, stats_cache

if TYPE_CHECKING:
    from rankwise.calibrate.cache_store import EntryInfo

app = typer.Typer(no_args_is_help=True, help="List or clear the cached calibration statistics "
                  "($RANKWISE_CALIBRATION_CACHE, default ~/.cache/rankwise/calibration), which hold at most "
                  "$RANKWISE_CACHE_MAX_GB gigabytes (default 4; least recently used entries go first).")


def _count(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _ago(when: float) -> str:
    seconds = max(0.0, time.time() - when)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _utc(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds")


def _holds(entry: EntryInfo) -> str:
    """``xxt, fisher of 14 layers; 2 blocks + gradient + scores``: the statistic kinds, then the parts."""
    blocks = sum(p.startswith("block-") for p in entry.parts)
    named = ([f"{blocks} blocks"] if blocks else []) + [p for p in entry.parts if not p.startswith("block-")]
    return f"{', '.join(entry.kinds) or '?'} of {entry.layers} layers; {' + '.join(named) or 'no parts'}"


@app.command("list", cls=Command)
@one_line_errors
def list_cache(
    as_json: JsonOpt = False,
) -> None:
    """List the cached calibrations, least recently used (evicted first) first: entry, model identity, statistics
    held, size, age and last use; then the total against the cap."""
    from rankwise.calibrate.cache_store import cache_cap, format_bytes, list_entries

    root = stats_cache(False)
    cap, source = cache_cap()
    entries = list_entries(root)
    total = sum(e.bytes for e in entries)
    if as_json:
        say(json.dumps({"root": str(root), "max_bytes": cap if cap != float("inf") else None, "cap_source": source,
                        "total_bytes": total, "entries": [
                            {"name": e.name, "model": e.model, "kinds": e.kinds, "layers": e.layers,
                             "parts": e.parts, "bytes": e.bytes,
                             "created_utc": _utc(e.created), "last_used_utc": _utc(e.last_used)} for e in entries]},
                       indent=1))
        return
    if not entries:
        say(f"calibration cache {root} is empty (cap {format_bytes(cap)}, {source})")
        return
    say(f"calibration cache {root}, least recently used first:")
    say(f"{'entry':<12}  {'model':<12}  {'size':>10}  {'created':>11}  {'last used':>11}  holds")
    for e in entries:
        say(f"{e.name[:12]:<12}  {(e.model[:12] or '?'):<12}  {_mb(e.bytes):>10}  {_ago(e.created):>11}  "
            f"{_ago(e.last_used):>11}  {_holds(e)}")
    share = f" ({total / cap:.0%})" if cap != float("inf") else ""
    say(f"total {_mb(total)} in {_count(len(entries))}, of a cap of {format_bytes(cap)}{share} ({source})")


@app.command("clear", cls=Command)
@one_line_errors
def clear_cache(
    model: Annotated[str | None, typer.Option("--model", metavar="PATH_OR_DIGEST", help=(
        "remove only this model's entries: a checkpoint directory (matched by its content, as the cache key "
        "is) or a hex prefix of the model identity that `rankwise cache list` shows"))] = None,
    everything: Annotated[bool, typer.Option("--all", help="remove every entry (the default without --model)")
                          ] = False,
) -> None:
    """Remove cached calibration statistics, without asking: all of them, or one model's with --model. Entries a
    running compression is reading are kept."""
    from rankwise.calibrate.cache_store import clear, list_entries

    if model is not None and everything:
        raise ValueError("give --model or --all, not both")
    root = stats_cache(False)
    if not list_entries(root):
        say(f"calibration cache {root} is empty; nothing to clear")
        return
    done = clear(root, model)
    whose = f" of model {done.model[:12]}" if done.model else ""
    say(f"removed {_count(len(done.removed))}{whose} from {root}, freed {_mb(sum(e.bytes for e in done.removed))}; "
        f"{_count(done.left)} left")
    if done.in_use:
        say(f"kept {_count(len(done.in_use))} in use by a running compression "
            f"({_mb(sum(e.bytes for e in done.in_use))}); clear again once it is done")
