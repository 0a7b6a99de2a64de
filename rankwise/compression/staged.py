"""Sequential compression inside a block: each input group (q/k/v, then o, then gate/up, then down) is calibrated
on the inputs it will see once the groups before it are compressed.

Calibrating a whole block in one pass would give the output projection the inputs of the *dense* q/k/v; once those
are compressed it sees others. That mismatch is mild for a plain whitened truncation but compounds for a fit
towards the original model's outputs (``anchored``, ``update_u``): each layer would correct its input's drift from
the original activations, which the layers before it in the block have already corrected, so the correction is
applied twice (AA-SVD, https://arxiv.org/abs/2604.02119, recomputes the statistics per group for this reason).

For the paired statistics ``X Xh^T`` a dense copy of the block runs the original stream alongside: one block's
weights more in memory, never the model's.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from rankwise.calibrate import LayerStats
from rankwise.calibrate.stats import StatsObserver, input_groups
from rankwise.stream import run_block


class _StageDoneError(Exception):
    """Raised once a stage's inputs were seen: the rest of the block need not run."""


def call_order_groups(block: nn.Module, modules: Mapping[str, nn.Module], run_one: Callable[[], None]
                      ) -> list[list[str]]:
    """The input groups of ``modules`` in the order the block calls them, from one cheap forward (``run_one``);
    modules the block never called come last, one group each."""
    with torch.no_grad(), StatsObserver(modules, ()) as observer:
        run_one()
    called = list(observer.stats)  # insertion order is call order
    groups = [list(g.names) for g in input_groups(called, observer.stats)]
    return groups + [[name] for name in modules if name not in observer.stats]


def observe_stage(block: nn.Module, modules: Mapping[str, nn.Module], kinds: frozenset[str], n_batches: int,
                  compressed_input: Callable[[int], tuple], twin: tuple[nn.Module, dict[str, nn.Module]] | None,
                  original_input: Callable[[int], tuple] | None, *, last: bool
                  ) -> tuple[dict[str, LayerStats], list[torch.Tensor]]:
    """One stage: the statistics of ``modules`` (one input group) on the compressed stream through the partly
    compressed ``block``, stopping once the group has seen its input. With ``twin`` (the dense block and its
    modules by name), the original stream runs through it alongside for ``X Xh^T``; on the ``last`` stage it runs
    to the end and its outputs (the next block's original inputs) are returned."""
    names = list(modules)
    lead = names[0]
    outs: list[torch.Tensor] = []
    with torch.no_grad(), StatsObserver(modules, kinds, record=twin is not None) as observer:
        # Registered after the observer's hooks: the leader's input is recorded, then the block stops before the
        # group's (still dense) layers run, which nothing here reads.
        stop = modules[lead].register_forward_pre_hook(_raise_before)
        try:
            for b in range(n_batches):
                call, hidden = compressed_input(b)
                with contextlib.suppress(_StageDoneError):
                    run_block(block, call, hidden)
                if b == 0 and lead in observer.stats:
                    observer.share(names)  # the members never run: they read the leader's input
                if twin is not None:
                    assert original_input is not None
                    call, hidden = original_input(b)
                    out = _run_twin(twin, call, hidden, observer, lead, stop_early=not last)
                    if out is not None:
                        outs.append(out)
        finally:
            stop.remove()
    return observer.stats, outs


def _raise_before(_module: nn.Module, _args: tuple) -> None:
    raise _StageDoneError


def _run_twin(twin: tuple[nn.Module, dict[str, nn.Module]], call, hidden: torch.Tensor, observer: StatsObserver,
              lead: str, *, stop_early: bool) -> torch.Tensor | None:
    block, modules = twin

    def cross(_m: nn.Module, args: tuple) -> None:
        observer.stats[lead].add_cross(args[0], observer.last_inputs[lead])
        if stop_early:
            raise _StageDoneError

    handle = modules[lead].register_forward_pre_hook(cross)
    try:
        return run_block(block, call, hidden)
    except _StageDoneError:
        return None
    finally:
        handle.remove()


def dense_twin(block: nn.Module, names: list[str], prefix: str) -> tuple[nn.Module, dict[str, nn.Module]]:
    """A dense copy of ``block`` and its modules under the model-level ``names`` (``prefix`` is the block's)."""
    twin = copy.deepcopy(block)
    return twin, {name: twin.get_submodule(name.removeprefix(prefix)) for name in names}


def compress_staged(source, block: nn.Module, i: int, modules: Mapping[str, nn.Module], plan, streams,
                    ranks: Mapping[str, int], gradient_stats: Mapping[str, LayerStats], method, mapper=None) -> list:
    """Compress block ``i``'s ``modules`` one input group at a time, in call order, each calibrated on the
    compressed stream through the block as compressed so far; advances the original stream (paired mode). The
    compressed stream is advanced by the caller, through the finished block."""
    from rankwise.compression.layer import add_fisher, factorise_group
    from rankwise.targets import set_submodule

    config, device, store = plan.config, source.device, streams.store
    n_batches = len(streams.batches)
    paired = config.paired

    def compressed_input(b: int) -> tuple:
        return streams.call(b, i, device), store.get(("compressed", b)).to(device)

    def original_input(b: int) -> tuple:
        return streams.call(b, i, device), store.get(("original", b)).to(device)

    prefix = f"{source.blocks_name}.{i}."
    twin = dense_twin(block, list(modules), prefix) if paired and modules else None
    done: list = []
    groups = []
    if modules:
        relative = tuple(name.removeprefix(prefix) for name in modules)
        if relative not in plan.call_groups:  # blocks alike in their targets are called alike: found once
            call, hidden = compressed_input(0)  # one batch whole: the call's masks are sized for it
            plan.call_groups[relative] = [[n.removeprefix(prefix) for n in group] for group in
                                          call_order_groups(block, modules, lambda: run_block(block, call, hidden))]
        groups = [[prefix + n for n in group] for group in plan.call_groups[relative]]
    for k, names in enumerate(groups):
        stage = {name: modules[name] for name in names}
        last = k == len(groups) - 1
        stats, outs = observe_stage(block, stage, plan.block_kinds, n_batches, compressed_input,
                                    (twin[0], {n: twin[1][n] for n in names}) if twin else None,
                                    original_input if twin else None, last=last)
        missing = [name for name in names if name not in stats]
        if missing:
            raise ValueError(f"layer {missing[0]} never ran during calibration; it cannot be calibrated")
        group = input_groups(names, stats)[0]
        work = [(name, modules[name], add_fisher(group, gradient_stats), ranks[name]) for name in names]
        result = (factorise_group(work, config=config, method=method) if mapper is None
                  else mapper(factorise_group, [work], {"config": config, "method": method})[0])
        for name, new, _row in result:
            set_submodule(source.model, name, new)
        done += result
        for b, out in enumerate(outs):
            store.put(("original", b), out)
        del stats, group, work
    epochs = getattr(config, "refine_epochs", 0)
    if epochs and done:
        layers = [new for _name, new, _row in done if new is not None]
        plan.refined.append(refine_block(block, layers, n_batches, compressed_input,
                                         lambda b: store.get(("original", b)).to(device), epochs=epochs,
                                         lr=config.refine_lr))
    if paired and not groups:  # nothing compressed here: the original stream still crosses the block
        with torch.no_grad():
            for b in range(n_batches):
                call, hidden = original_input(b)
                store.put(("original", b), run_block(block, call, hidden))
    return done


def refine_block(block: nn.Module, layers: list[nn.Module], n_batches: int, compressed_input: Callable[[int], tuple],
                 target: Callable[[int], torch.Tensor], *, epochs: int, lr: float) -> tuple[float, float]:
    """AA-SVD's block refinement: a few epochs of AdamW (weight decay 0.01, gradient norm clipped at 1, 10 % linear
    warm-up then cosine decay to a tenth) on the compressed factors of ``layers`` only (not biases, not the rest of
    the block), minimising the mean squared error between the block's output on the compressed stream and the
    original block's output on the original stream. Returns the calibration error ``(before, after)``; the factors
    are put back if it did not go down."""
    params = [p for layer in layers for name, p in layer.named_parameters() if name != "bias" and p.is_floating_point()]
    saved = [p.detach().clone() for p in params]
    flags = {p: p.requires_grad for p in block.parameters()}

    def error() -> float:
        with torch.no_grad():
            return sum(float(torch.nn.functional.mse_loss(run_block(block, *compressed_input(b)).float(),
                                                         target(b).float())) for b in range(n_batches)) / n_batches

    before = error()
    steps = epochs * n_batches
    warm = max(1, round(0.1 * steps))
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.45 * (
        1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                for b in range(n_batches):
                    call, hidden = compressed_input(b)
                    loss = torch.nn.functional.mse_loss(run_block(block, call, hidden).float(), target(b).float())
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    after = error()
    if not after < before:  # never leave the block worse on its own objective
        with torch.no_grad():
            for p, old in zip(params, saved, strict=True):
                p.copy_(old)
        after = before
    return before, after
