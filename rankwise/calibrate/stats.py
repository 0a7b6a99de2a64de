"""Per-layer calibration statistics gathered with forward hooks.

For each targeted linear layer (input dimension ``n``): the input second moment ``sum x x^T`` (``n x n``, float64,
with its token count), optionally ``sum |x|`` per input channel (ASVD) and the diagonal empirical Fisher
``sum (dL/dW)^2`` of the language-modelling loss (FWSVD). Layers that read the same input tensor (q/k/v, gate/up)
share one :class:`LayerStats`, so each covariance is computed once. Memory is bounded by the statistics, not the
number of batches: batches are streamed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from rankwise.linalg import Whitening, whiten
from rankwise.nn import input_dim, linear_weight
from rankwise.progress import progress_bar

KINDS = ("xxt", "abs", "fisher", "gout")


@dataclass
class LayerStats:
    """Streaming statistics of one layer's inputs (and, optionally, its weight's Fisher)."""

    n: int
    xxt: torch.Tensor | None = None  # (n, n) float64, sum over tokens of x x^T
    abs_sum: torch.Tensor | None = None  # (n,) float64, sum over tokens of |x|
    count: int = 0
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> (out, in) sum of grad^2
    cross: torch.Tensor | None = None  # (n, n) float64, sum of x_original x_compressed^T (sequential mode)
    grad_out: dict[str, float] = field(default_factory=dict)  # module name -> sum over tokens of ||dL/dy||^2
    grad_tokens: dict[str, int] = field(default_factory=dict)  # module name -> tokens behind grad_out
    _whitening: dict[float, Whitening] = field(default_factory=dict, repr=False)

    @property
    def covariance(self) -> torch.Tensor:
        """``X X^T / tokens`` (the scale does not change any whitened solution)."""
        if self.xxt is None or self.count == 0:
            raise ValueError("no input covariance was collected for this layer")
        return self.xxt / self.count

    @property
    def cross_covariance(self) -> torch.Tensor | None:
        """``X Xh^T / tokens`` (original x compressed-model inputs), or ``None`` outside sequential mode."""
        return None if self.cross is None else self.cross / self.count

    @property
    def abs_mean(self) -> torch.Tensor:
        if self.abs_sum is None or self.count == 0:
            raise ValueError("no activation magnitudes were collected for this layer")
        return self.abs_sum / self.count

    def output_sensitivity(self, name: str) -> float:
        """``E ||dL/dy||^2 / out_features`` surrogate: mean squared output gradient per token (needs ``"gout"``)."""
        if name not in self.grad_out or not self.grad_tokens.get(name):
            raise ValueError(f"no output gradients were collected for {name}; calibrate with kinds=('gout',)")
        return self.grad_out[name] / self.grad_tokens[name]

    def whitening(self, damp: float = 0.0) -> Whitening:
        """The robust square root of the covariance, cached per damping (shared by layers reading this input)."""
        if damp not in self._whitening:
            self._whitening[damp] = whiten(self.covariance, damp=damp)
        return self._whitening[damp]

    def add_cross(self, original: torch.Tensor, compressed: torch.Tensor) -> None:
        """Accumulate ``X Xh^T`` from paired original / compressed-model inputs of the same tokens."""
        a = original.detach().reshape(-1, self.n).float()
        b = compressed.detach().reshape(-1, self.n).float()
        part = (a.T @ b).double()
        self.cross = part if self.cross is None else self.cross.add_(part)

    def add(self, x: torch.Tensor, kinds: frozenset[str]) -> None:
        x2 = x.detach().reshape(-1, self.n).float()  # (tokens, n)
        if "xxt" in kinds:
            part = (x2.T @ x2).double()  # float32 within a batch, float64 across batches
            self.xxt = part if self.xxt is None else self.xxt.add_(part)
        if "abs" in kinds:
            part = x2.abs().sum(0).double()
            self.abs_sum = part if self.abs_sum is None else self.abs_sum.add_(part)
        self.count += x2.shape[0]


def _batches(data: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        if data.ndim != 2 or data.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"calibration data must be integer token ids of shape (samples, seq_len), "
                             f"got {data.dtype} {tuple(data.shape)}")
        yield from data.split(batch_size)
    else:
        yield from data


def _group_by_input(model: nn.Module, modules: Mapping[str, nn.Module], probe: torch.Tensor) -> dict[str, str]:
    """Map each module to the first module that receives an identical input on a short probe."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_mod, args):
            seen[name] = args[0].detach().clone()
        return fn

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    leaders: dict[str, str] = {}
    reps: list[str] = []
    for name in modules:
        x = seen.get(name)
        match = next((r for r in reps if x is not None and seen[r].shape == x.shape and torch.equal(seen[r], x)), None)
        if match is None:
            reps.append(name)
            match = name
        leaders[name] = match
    return leaders


def _grad_out_hook(name: str, stats: LayerStats):
    """Forward hook that registers a gradient hook on the layer's output to accumulate ``sum ||dL/dy||^2``."""

    def on_grad(grad: torch.Tensor) -> None:
        g = grad.detach().float()
        stats.grad_out[name] = stats.grad_out.get(name, 0.0) + float(g.pow(2).sum())
        stats.grad_tokens[name] = stats.grad_tokens.get(name, 0) + g.numel() // g.shape[-1]

    def hook(_module, _args, output):
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(on_grad)

    return hook


def _inside(modules: Mapping[str, nn.Module], model: nn.Module) -> bool:
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return False
    inner = {id(m) for m in base.modules()}
    return all(id(m) in inner for m in modules.values())


def collect_stats(
    model: nn.Module,
    data: torch.Tensor | Iterable[torch.Tensor],
    modules: Mapping[str, nn.Module],
    *,
    kinds: Iterable[str] = ("xxt",),
    batch_size: int = 4,
    progress: bool = False,
) -> dict[str, LayerStats]:
    """Stream calibration batches through ``model`` and return statistics per module name.

    Args:
        model: a causal LM taking ``input_ids`` (and ``labels`` when Fisher is requested).
        data: token ids ``(samples, seq_len)`` or an iterable of such batches.
        modules: name -> linear-like module to observe.
        kinds: any of ``"xxt"`` (input second moment), ``"abs"`` (mean |x|), ``"fisher"`` (diagonal Fisher).
        batch_size: windows per forward pass when ``data`` is a tensor.
        progress: show a progress bar.
    """
    kinds = frozenset(kinds)
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; allowed: {', '.join(KINDS)}")
    batches = list(_batches(data, batch_size))
    if not batches:
        raise ValueError("calibration data is empty: need at least one window of tokens")
    device = next(model.parameters()).device
    leaders = _group_by_input(model, modules, batches[0][:1, : min(16, batches[0].shape[1])].to(device))
    stats: dict[str, LayerStats] = {}
    for name in modules:
        lead = leaders[name]
        if lead not in stats:
            stats[lead] = LayerStats(n=input_dim(modules[lead]))
        stats[name] = stats[lead]

    input_kinds = kinds & {"xxt", "abs"}
    handles = []
    if input_kinds:
        for name, module in modules.items():
            if leaders[name] == name:
                handles.append(module.register_forward_pre_hook(
                    lambda _m, args, s=stats[name]: s.add(args[0], input_kinds)))
    want_fisher = "fisher" in kinds
    want_grad = want_fisher or "gout" in kinds
    if "gout" in kinds:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(_grad_out_hook(name, stats[name])))
    saved_grad = {p: p.requires_grad for p in model.parameters()}
    if want_grad:
        for p in model.parameters():
            p.requires_grad_(False)
        for module in modules.values():
            module.weight.requires_grad_(True)
    # Input statistics need only the transformer body: skip the LM head's vocabulary-sized logits.
    body = getattr(model, "base_model", model) if _inside(modules, model) else model
    was_training = model.training
    model.eval()
    try:
        for batch in progress_bar(batches, "calibrating", enabled=progress):
            batch = batch.to(device)
            if want_grad:
                model.zero_grad(set_to_none=True)
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                for name, module in modules.items() if want_fisher else ():
                    sq = linear_weight(module, module.weight.grad).detach().double().pow(2)  # (out, in)
                    fisher = stats[name].fisher
                    fisher[name] = sq if name not in fisher else fisher[name].add_(sq)
            else:
                with torch.no_grad():
                    body(input_ids=batch)
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved_grad.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return stats
