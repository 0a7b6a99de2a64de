"""Layer-by-layer calibration: each block sees the activations of the blocks already compressed.

The inputs of the first transformer block are captured once per calibration batch (the forward pass is stopped
there). Then, block by block: the block's statistics are collected on the compressed-model stream, the caller
compresses the block, and the compressed block produces the next block's inputs. With ``paired=True`` an original
(uncompressed) stream runs alongside, so each layer also gets ``X Xh^T`` (original x compressed inputs) for
error-correcting updates. Works for any model whose blocks sit in one ``nn.ModuleList`` and take the hidden states
as their first argument (Llama, GPT-2, OPT and most Hugging Face decoders).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.calibrate.stats import LayerStats, _group_by_input
from rankwise.nn import linear_weight
from rankwise.progress import progress_bar


class _StopForwardError(Exception):
    """Raised by the capture hook to end a forward pass early."""


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest ``nn.ModuleList`` in the model: its transformer blocks."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError("sequential mode needs the model's blocks in an nn.ModuleList; none was found")
    return max(lists, key=lambda item: len(item[1]))


@dataclass
class _Call:
    hidden: torch.Tensor
    rest: tuple
    kwargs: dict


def _first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def _capture(model: nn.Module, block: nn.Module, batches: list[torch.Tensor]) -> list[_Call]:
    calls: list[_Call] = []

    def hook(_mod, args, kwargs):
        if args:
            calls.append(_Call(args[0], tuple(args[1:]), dict(kwargs)))
        else:
            kw = dict(kwargs)
            calls.append(_Call(kw.pop("hidden_states"), (), kw))
        raise _StopForwardError

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in batches:
                with contextlib.suppress(_StopForwardError):
                    model(input_ids=batch.to(device), use_cache=False)
    finally:
        handle.remove()
    return calls


def _run(block: nn.Module, call: _Call, hidden: torch.Tensor) -> torch.Tensor:
    return _first(block(hidden, *call.rest, **call.kwargs))


def _observe_block(block: nn.Module, calls: list[_Call], compressed: list[torch.Tensor],
                   original: list[torch.Tensor] | None, mine: Mapping[str, nn.Module], leads: set[str],
                   stats: Mapping[str, LayerStats], kinds: frozenset[str]) -> list[torch.Tensor]:
    """Run the (still dense) block on both streams, accumulating statistics; return the original stream's output."""
    next_original: list[torch.Tensor] = []
    seen: dict[str, torch.Tensor] = {}

    def remember(name: str):
        return lambda _m, args: seen.__setitem__(name, args[0])

    def observe(name: str):
        def hook(_m, args):
            stats[name].add(args[0], kinds)
            if name in seen:
                stats[name].add_cross(seen[name], args[0])
        return hook

    with torch.no_grad():
        for b, call in enumerate(calls):
            seen.clear()
            if original is not None:
                handles = [mine[n].register_forward_pre_hook(remember(n)) for n in leads]
                next_original.append(_run(block, call, original[b]))
                for h in handles:
                    h.remove()
            handles = [mine[n].register_forward_pre_hook(observe(n)) for n in leads]
            _run(block, call, compressed[b])
            for h in handles:
                h.remove()
    return next_original


def sequential_compress(
    model: nn.Module,
    batches: list[torch.Tensor],
    modules: Mapping[str, nn.Module],
    compress_block: Callable[[dict[str, nn.Module], dict[str, LayerStats]], None],
    *,
    kinds: frozenset[str] = frozenset({"xxt"}),
    paired: bool = False,
    progress: bool = False,
) -> list[str]:
    """Drive layer-by-layer compression.

    Args:
        model: the model being compressed in place.
        batches: calibration token batches.
        modules: all targeted modules by name.
        compress_block: called once per block with that block's targeted modules and their statistics (collected on
            the compressed-model stream); it must replace the modules inside the block.
        kinds: input statistics to collect (``"xxt"``, ``"abs"``).
        paired: also run the original block on the original stream and collect ``X Xh^T``.

    Returns:
        Names of targeted modules outside the blocks (not handled here).
    """
    blocks_name, blocks = decoder_blocks(model)
    prefix = {i: f"{blocks_name}.{i}." for i in range(len(blocks))}
    leaders = _group_by_input(model, modules, batches[0][:1, : min(16, batches[0].shape[1])]
                              .to(next(model.parameters()).device))
    calls = _capture(model, blocks[0], batches)
    compressed = [c.hidden for c in calls]
    original = [c.hidden for c in calls] if paired else None
    handled: set[str] = set()
    was_training = model.training
    model.eval()
    try:
        for i in progress_bar(range(len(blocks)), "sequential blocks", enabled=progress):
            block = blocks[i]
            mine = {n: m for n, m in modules.items() if n.startswith(prefix[i])}
            handled |= set(mine)
            stats: dict[str, LayerStats] = {}
            for n in mine:
                lead = leaders[n] if leaders[n] in mine else n
                stats.setdefault(lead, LayerStats(n=linear_weight(mine[lead]).shape[1]))
                stats[n] = stats[lead]
            leads = {n for n in mine if leaders.get(n, n) == n or leaders[n] not in mine}
            next_original = _observe_block(block, calls, compressed, original, mine, leads, stats, kinds)
            if mine:
                compress_block(mine, stats)
            with torch.no_grad():
                compressed = [_run(block, call, compressed[b]) for b, call in enumerate(calls)]
            if original is not None:
                original = next_original
    finally:
        model.train(was_training)
    return [n for n in modules if n not in handled]
