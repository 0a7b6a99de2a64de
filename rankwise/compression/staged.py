"""Sequential compression inside a block: each input group (q/k/v, then o, then gate/up, then down) is calibrated
on the inputs it will see once the groups before it are compressed.

Calibrating a whole block in one pass would give the output projection the inputs of the *dense* q/k/v; once those
are compressed it sees others. That mismatch is mild for a plain whitened truncation but compounds for a fit
towards the original model's outputs (``anchored``, ``update_u``): each layer would correct its input's drift from
the original activations, which the layers before it in the block have already corrected, so the correction is
applied twice (AA-SVD, https://arxiv.org/abs/2604.02119, recomputes the statistics per group for this reason).

For the paired statistics ``X Xh^T`` the block, still dense, first runs the original stream once, keeping each
group's input (:func:`record_original`); each stage pairs them with the compressed stream's.

The compressed stream's forward through the block runs once per batch
(:class:`~rankwise.compression.block_runs.BlockRun`): it pauses at each group's input while the group is fitted and
resumes through the fitted layers, and its output advances the stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from rankwise.calibrate import LayerStats
from rankwise.calibrate.stats import StatsObserver, input_groups
from rankwise.compression.block_runs import StageRuns, pause_allowance, paused_bytes, pausing_at
from rankwise.stream import ActivationStore, run_block


def call_order_groups(block: nn.Module, modules: Mapping[str, nn.Module], run_one: Callable[[], None]
                      ) -> list[list[str]]:
    """The input groups of ``modules`` in the order the block calls them, from one cheap forward (``run_one``);
    modules the block never called come last, one group each."""
    with torch.no_grad(), StatsObserver(modules, ()) as observer:
        run_one()
    called = list(observer.stats)  # insertion order is call order
    groups = [list(g.names) for g in input_groups(called, observer.stats)]
    return groups + [[name] for name in modules if name not in observer.stats]


def record_original(block: nn.Module, leaders: list[nn.Module], n_batches: int,
                    original_input: Callable[[int], tuple], store: ActivationStore) -> None:
    """Run the still dense ``block`` once per batch on the original stream: leader ``k``'s first input in batch
    ``b`` goes to ``store[("paired", k, b)]`` and the block's output becomes the original stream's next input
    (``("original", b)``). The stages read the leaders' inputs from there: the dense block's inputs do not depend on
    what the stages compress."""
    seen: set[int] = set()

    def recorder(k: int) -> Callable[[nn.Module, tuple], None]:
        def hook(_m: nn.Module, args: tuple) -> None:
            if k not in seen:  # a module called twice pairs its first call, as a stage stops at the first
                seen.add(k)
                x = args[0].detach()
                store.put(("paired", k, b), x.clone() if x.device.type == "cpu" else x)  # put copies off a GPU
        return hook

    handles = [leader.register_forward_pre_hook(recorder(k)) for k, leader in enumerate(leaders)]
    try:
        with torch.no_grad():
            for b in range(n_batches):
                seen.clear()
                call, hidden = original_input(b)
                store.put(("original", b), run_block(block, call, hidden))
    finally:
        for handle in handles:
            handle.remove()


def compress_staged(source, block: nn.Module, i: int, modules: Mapping[str, nn.Module], plan, streams,
                    ranks: Mapping[str, int], gradient_stats: Mapping[str, LayerStats], method, mapper=None
                    ) -> tuple[list, bool]:
    """Compress block ``i``'s ``modules`` one input group at a time, in call order, each calibrated on the
    compressed stream through the block as compressed so far; advances the original stream (paired mode).

    Each batch's forward on the compressed stream runs once (:class:`BlockRun`), pausing at each stage; once the
    last stage is fitted the runs finish, and their outputs advance the compressed stream. When the paused runs
    would hold more than :func:`pause_allowance` (:func:`paused_bytes`), each stage runs the block from its start
    instead: the same result, at about 2.7 block forwards per batch instead of 1 (Llama). While a stage is fitted,
    its layers carry no redirection (:meth:`Redirects.suspended`): a Ray ``mapper`` pickles them.

    Returns:
        ``(done, advanced)``: the fitted layers (``(name, new layer, report row)`` each), and whether the compressed
        stream was advanced here (not with restarted stages, nor when a block refinement changed the factors after
        the runs: the caller then runs the finished block).
    """
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
    done: list = []
    groups = []
    if modules:
        relative = tuple(name.removeprefix(prefix) for name in modules)
        if relative not in plan.call_groups:  # blocks alike in their targets are called alike: found once
            call, hidden = compressed_input(0)  # one batch whole: the call's masks are sized for it
            plan.call_groups[relative] = [[n.removeprefix(prefix) for n in group] for group in
                                          call_order_groups(block, modules, lambda: run_block(block, call, hidden))]
        groups = [[prefix + n for n in group] for group in plan.call_groups[relative]]
    if paired:  # before any stage, while the block is still dense (with no groups: it only advances the stream)
        record_original(block, [modules[names[0]] for names in groups], n_batches, original_input, store)
    if not groups:
        return done, False

    def paired_input(k: int) -> Callable[[int], torch.Tensor | None]:
        return lambda b: store.get(("paired", k, b)).to(device) if ("paired", k, b) in store else None

    epochs = getattr(config, "refine_epochs", 0)
    settings = getattr(source.model, "config", None)
    eager = getattr(settings, "_attn_implementation", None) == "eager"
    held = paused_bytes(store.get(("compressed", 0)), modules.values(), n_batches,
                        eager_heads=getattr(settings, "num_attention_heads", 0) if eager else 0)
    keep = held <= pause_allowance(store, device, n_batches)
    outputs = None
    runs = StageRuns(block, len(groups), n_batches, compressed_input, keep=keep)
    with pausing_at(source.model, groups, modules) as redirects:
        try:
            for k, names in enumerate(groups):
                stage = {name: modules[name] for name in names}
                stats = runs.observe(k, stage, plan.block_kinds, paired_input(k) if paired else None)
                for b in range(n_batches):
                    store.drop(("paired", k, b))  # read: freed before the next stage's
                group = input_groups(names, stats)[0]
                work = [(name, modules[name], add_fisher(group, gradient_stats), ranks[name]) for name in names]
                with redirects.suspended():
                    result = (factorise_group(work, config=config, method=method) if mapper is None
                              else mapper(factorise_group, [work], {"config": config, "method": method})[0])
                for name, new, _row in result:
                    set_submodule(source.model, name, new)
                done += result
                del stats, group, work
            outputs = runs.finish() if not epochs else None
            for b, out in enumerate(outputs or []):  # the rest of each forward, through the finished block
                store.put(("compressed", b), out)
        finally:  # what a failed stage left paused or unread (unwound while the runs can still pause)
            runs.close()
            for key in [("paired", k, b) for k in range(len(groups)) for b in range(n_batches)]:
                store.drop(key)
    if epochs and done:
        layers = [new for _name, new, _row in done if new is not None]
        plan.refined.append(refine_block(block, layers, n_batches, compressed_input,
                                         lambda b: store.get(("original", b)).to(device), epochs=epochs,
                                         lr=config.refine_lr))
    return done, outputs is not None


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
