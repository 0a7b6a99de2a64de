"""The streamed passes over a model's blocks: capture the calibration inputs, and the gradient (scoring) pass.

The gradient pass is what global choices need (``allocation="loss"`` scores every matrix from its whitened spectrum
and output sensitivity, FWSVD needs the Fisher of the LM loss, or of an encoder's contrastive embedding loss): a
forward pass block by block stores every block's input, the model's own loss gives the gradient at the last block's
output, then blocks are recomputed one at a time from last to first, backpropagating the gradient that arrives from
the block above. Only one block's weights and statistics are in memory at any time; the block-boundary activations
live in the :class:`ActivationStore`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from rankwise._memory import trim
from rankwise.allocate import AllocationPolicy
from rankwise.arch import is_encoder
from rankwise.calibrate import LayerStats
from rankwise.calibrate.cache import pack, unpack
from rankwise.calibrate.stats import GRADIENT_KINDS, StatsObserver, input_groups
from rankwise.nn import linear_weight
from rankwise.progress import progress_bar
from rankwise.stream import ActivationStore, BlockCall, capture_calls, first, loss_and_grad, run_block


@dataclass
class Streams:
    """Calibration batches, every block's call per batch, and the block-boundary activations in ``store``.

    ``store[(stream, b)]`` holds batch ``b`` of a stream (``"dense"``, ``"compressed"``, ``"original"`` or
    ``"scoring"``) at the input of the block being worked on.
    """

    batches: list[torch.Tensor]
    calls: list[list[BlockCall]]  # [batch][block]
    store: ActivationStore
    as_tuple: bool = False  # whether the blocks return tuples (set when a real block first runs)

    def call(self, b: int, i: int, device: torch.device) -> BlockCall:
        return self.calls[b][i].to(device)


def capture(source, batches: list[torch.Tensor], store: ActivationStore, streams: tuple[str, ...]) -> Streams:
    """Run the embeddings once per batch; put the first block's inputs into each named stream."""
    source.load_rest()
    calls = []
    for b, batch in enumerate(batches):
        hidden, block_calls = capture_calls(source.model, source.blocks, batch.to(source.input_device))
        for stream in streams:
            store.put((stream, b), hidden)
        calls.append(block_calls)
    return Streams(batches, calls, store)


def gradient_pass(source, targets: Mapping[int, list[str]], streams: Streams, kinds: frozenset[str],
                  policy: AllocationPolicy, *, progress: bool = True, samples: int | None = None,
                  keep_inputs: KeptInputs | None = None) -> tuple[dict[str, torch.Tensor], dict[str, LayerStats]]:
    """Score every target for ``policy`` and collect gradient statistics, one block in memory at a time.

    Args:
        source: the block source (its embeddings and head must be loaded).
        targets: block index -> names of that block's targets.
        streams: the captured calibration inputs (stream ``"scoring"`` at block 0).
        kinds: statistics to collect (``xxt``, ``gout``, ``fisher``).
        policy: the allocation policy whose scores are wanted (``None`` scores are skipped).
        samples: score on the first batches holding this many windows (``None``: all); the rest of stream
            ``"scoring"`` is dropped.
        keep_inputs: where each block's input statistics go once scored (``None``: dropped). They are those of
            the dense model on every scored window, which a non-sequential fit would otherwise collect again.

    Returns:
        ``(scores, stats)``: per target, the policy's scores (empty if it has none) and the gradient statistics
        (Fisher sums, output-gradient energy; input covariances are dropped once scored, or handed to ``keep_inputs``).
    """
    scoring = score_batches(streams, samples)
    if not needs_gradients(kinds):
        return _forward_scores(source, targets, scoring, kinds, policy, progress=progress,
                               keep_inputs=keep_inputs), {}
    blocks, store, device = source.blocks, streams.store, source.device
    n, nb = len(blocks), len(scoring.batches)
    for i in progress_bar(range(n), "gradient pass: forward", enabled=progress):
        block = source.load(i)
        with torch.no_grad():
            for b in range(nb):
                h = store.get(("scoring", b)).to(device)
                store.put(("boundary", i, b), h)
                call = streams.call(b, i, device)
                out = block(h, *call.args, **call.kwargs)
                streams.as_tuple = isinstance(out, tuple | list)
                store.put(("scoring", b), first(out))
        source.release(i)
        trim()  # the block's freed temporaries lie between the stored activations: hand those pages back
    for b, batch in enumerate(scoring.batches):
        store.put(("grad", b), _batch_loss_grad(source, batch, store.get(("scoring", b)), streams.as_tuple))
        store.drop(("scoring", b))
    scores: dict[str, torch.Tensor] = {}
    kept: dict[str, LayerStats] = {}
    for i in progress_bar(range(n - 1, -1, -1), "gradient pass: backward", enabled=progress):
        block = source.load(i)
        mine = {name: source.model.get_submodule(name) for name in targets.get(i, [])}
        flags = {p: p.requires_grad for p in block.parameters()}
        for p in block.parameters():
            p.requires_grad_(False)
        for module in mine.values():
            module.weight.requires_grad_(bool(kinds & {"fisher", "grad"}))
        try:
            with StatsObserver(mine, kinds) as observer:
                for b in range(nb):
                    h = store.get(("boundary", i, b)).to(device).requires_grad_(True)
                    with torch.enable_grad():
                        out = run_block(block, streams.call(b, i, device), h)
                        out.backward(store.get(("grad", b)).to(device))
                    if "fisher" in kinds:
                        observer.add_fisher()
                    if "grad" in kinds:
                        observer.add_grad()
                    for module in mine.values():
                        module.weight.grad = None
                    store.put(("grad", b), h.grad)
                    store.drop(("boundary", i, b))
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
        if keep_inputs is not None:
            keep_inputs.put(i, observer.stats)
        for name, module in mine.items():
            stats = observer.stats.get(name)
            if policy.score is not None:
                scores[name] = policy.score(name, linear_weight(module).detach(), stats).cpu()
            if stats is not None:
                stats.grad_windows.pop(name, None)  # per-window gradients ("gwin"): scored, freed before the next block
                kept[name] = gradient_part(name, stats)
        source.release(i)
        trim()
    for b in range(nb):
        store.drop(("grad", b))
    return scores, kept


class KeptInputs:
    """Each block's input statistics (``xxt``, ``abs``) from the gradient pass, kept on disk through the activation
    store until the block is compressed (in memory they would hold about 0.8 GB for a 135M-parameter model).

    The gradient pass runs every block of the dense model on the calibration windows with the statistics hooks on;
    a non-sequential fit calibrates on exactly those inputs, so it takes them from here instead of running the dense
    model a second time.
    """

    def __init__(self, store: ActivationStore) -> None:
        self.store = store
        self._meta: dict[int, tuple[list[str], dict[str, str]]] = {}
        self.bytes = 0  # written so far

    def put(self, i: int, stats: Mapping[str, LayerStats]) -> None:
        """Keep block ``i``'s input statistics (layers sharing an input keep sharing them)."""
        inputs = {}
        for group in input_groups(stats, stats):
            s = group.stats
            part = LayerStats(n=s.n, xxt=s.xxt, abs_sum=s.abs_sum, count=s.count)
            inputs.update(dict.fromkeys(group.names, part))
        tensors, meta = pack(inputs)
        for key, tensor in tensors.items():
            self.store.put(("inputs", i, key), tensor, spill=True)
            self.bytes += tensor.numel() * tensor.element_size()
        self._meta[i] = (list(tensors), meta)

    def take(self, i: int, device: torch.device) -> dict[str, LayerStats]:
        """Block ``i``'s statistics, removed from the store."""
        keys, meta = self._meta.pop(i)
        tensors = {}
        for key in keys:
            tensors[key] = self.store.get(("inputs", i, key)).to(device)
            self.store.drop(("inputs", i, key))
        return unpack(tensors, meta)


def kept_bytes_bound(shapes: Mapping[str, tuple[int, int]]) -> int:
    """An upper bound on the bytes :class:`KeptInputs` writes for targets of these ``(out, in)`` shapes: a float64
    ``in x in`` covariance each (layers sharing an input share one, so this over-counts them)."""
    return sum(8 * n * n for _out, n in shapes.values())


def scored_batches(batches: list[torch.Tensor], samples: int | None) -> int:
    """How many of the first ``batches`` the scoring pass runs on: those holding ``samples`` windows, rounded up to a
    whole batch (``None``: all of them)."""
    if samples is None:
        return len(batches)
    keep, total = 0, 0
    while keep < len(batches) and total < samples:
        total += batches[keep].shape[0]
        keep += 1
    return keep


def score_batches(streams: Streams, samples: int | None) -> Streams:
    """``streams`` cut to its first batches holding ``samples`` windows (rounded up to a whole batch; ``None``:
    all of them); stream ``"scoring"`` of the batches left out is dropped."""
    if samples is None:
        return streams
    keep = scored_batches(streams.batches, samples)
    for b in range(keep, len(streams.batches)):
        streams.store.drop(("scoring", b))
    return Streams(streams.batches[:keep], streams.calls[:keep], streams.store, streams.as_tuple)


def _forward_scores(source, targets: Mapping[int, list[str]], streams: Streams, kinds: frozenset[str],
                    policy: AllocationPolicy, *, progress: bool = True, keep_inputs: KeptInputs | None = None
                    ) -> dict[str, torch.Tensor]:
    """Scores that need input statistics but no gradients: the dense model forward, one block at a time."""
    store, device = streams.store, source.device
    scores: dict[str, torch.Tensor] = {}
    for i in progress_bar(range(len(source.blocks)), "scoring pass", enabled=progress):
        block = source.load(i)
        mine = {name: source.model.get_submodule(name) for name in targets.get(i, [])}
        with torch.no_grad(), StatsObserver(mine, kinds) as observer:
            for b in range(len(streams.batches)):
                h = store.get(("scoring", b)).to(device)
                store.put(("scoring", b), run_block(block, streams.call(b, i, device), h))
        if keep_inputs is not None:
            keep_inputs.put(i, observer.stats)
        for name, module in mine.items():
            scores[name] = policy.score(name, linear_weight(module).detach(), observer.stats.get(name)).cpu()
        source.release(i)
    for b in range(len(streams.batches)):
        store.drop(("scoring", b))
    return scores


def influence_pass(source, streams: Streams, *, progress: bool = True) -> list[float]:
    """Each block's influence ``1 - mean cos(x_in, x_out)`` over the calibration tokens (ShortGPT's block influence,
    MoDeGPT's allocation score), running the dense blocks on stream ``"scoring"`` (dropped at the end)."""
    store, device = streams.store, source.device
    scores = []
    for i in progress_bar(range(len(source.blocks)), "block influence", enabled=progress):
        block = source.load(i)
        total, count = 0.0, 0
        with torch.no_grad():
            for b in range(len(streams.batches)):
                h = store.get(("scoring", b)).to(device)
                out = run_block(block, streams.call(b, i, device), h)
                cos = torch.nn.functional.cosine_similarity(h.float(), out.float(), dim=-1)  # (batch, tokens)
                total += float((1.0 - cos).sum(dtype=torch.float64))
                count += cos.numel()
                store.put(("scoring", b), out)
        source.release(i)
        scores.append(total / max(count, 1))
    for b in range(len(streams.batches)):
        store.drop(("scoring", b))
    return scores


def weight_scores(source, targets: Mapping[int, list[str]], policy: AllocationPolicy,
                  stats: Mapping[str, LayerStats] | None, *, progress: bool = True) -> dict[str, torch.Tensor]:
    """Scores from the weights alone (data-free policies) or from precomputed statistics, block by block."""
    scores = {}
    for i in progress_bar(sorted(targets), "scoring", enabled=progress):
        source.load(i)
        for name in targets[i]:
            weight = linear_weight(source.model.get_submodule(name)).detach()
            scores[name] = policy.score(name, weight, stats.get(name) if stats is not None else None).cpu()
        source.release(i)
    return scores


def _batch_loss_grad(source, batch: torch.Tensor, hidden: torch.Tensor, as_tuple: bool) -> torch.Tensor:
    """Gradient of the batch's mean loss at the last block's output.

    A causal LM's is taken one window at a time: the batch loss is the token-weighted mean of the window losses, so
    each window's gradient is scaled by its share of the tokens, and only one window's vocabulary-sized logits exist
    at a time. An encoder's contrastive loss couples the windows of a batch, so its gradient is taken over the whole
    batch at once (its outputs are small: one embedding per window)."""
    device = source.input_device
    if is_encoder(source.model):
        return loss_and_grad(source.model, source.blocks, batch.to(device), hidden.to(device), as_tuple)[1]
    weights = batch[:, 1:].shape[1] / batch[:, 1:].numel()  # equal-length windows: each holds 1/B of the tokens
    grads = [loss_and_grad(source.model, source.blocks, batch[j:j + 1].to(device), hidden[j:j + 1].to(device),
                           as_tuple)[1] * weights for j in range(batch.shape[0])]
    return torch.cat(grads)


def gradient_part(name: str, stats: LayerStats) -> LayerStats:
    """Only this layer's gradient statistics (small), without the shared input covariance."""
    part = LayerStats(n=stats.n)
    for attr in ("fisher_out", "fisher_in", "grad_out", "grad_tokens", "grad_channels"):
        source = getattr(stats, attr)
        if name in source:
            getattr(part, attr)[name] = source[name]
    return part


def needs_gradients(kinds: frozenset[str]) -> bool:
    return bool(kinds & GRADIENT_KINDS)

