"""Per-layer calibration statistics gathered with hooks.

For each targeted linear layer (input dimension ``n``): the input second moment ``sum x x^T`` (``n x n``, float64,
with its token count), optionally ``sum |x|`` per input channel (ASVD), the row and column sums of the diagonal
empirical Fisher ``sum (dL/dW)^2`` of the language-modelling loss (for an encoder: of its contrastive embedding
loss, :mod:`rankwise.calibrate.objective`) (FWSVD) and the output-gradient energy
``sum ||dL/dy||^2`` (loss-aware allocation), and, for M-FAC allocation, the weight gradient of every calibration
window kept separately (``"gwin"``: the gradient of each window's own mean loss, ``(windows, out, in)``; one block's
layers at a time in the streamed gradient pass, which frees them once scored). Layers that read the same input
tensor (q/k/v, gate/up) share one :class:`LayerStats`, so each covariance is computed once. Memory is bounded by
the statistics, not the number of batches: batches are streamed.

:class:`StatsObserver` attaches the hooks to any set of modules (one decoder block, or a whole model);
:func:`collect_stats` runs a whole in-memory model over calibration batches with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType

import torch
from torch import nn

from rankwise.arch import is_encoder
from rankwise.calibrate.objective import encoder_loss
from rankwise.linalg import Whitening, gram, whiten
from rankwise.nn import input_dim, linear_weight
from rankwise.progress import progress_bar

KINDS = ("xxt", "abs", "fisher", "gout", "grad", "gwin")
INPUT_KINDS = frozenset({"xxt", "abs"})
GRADIENT_KINDS = frozenset({"fisher", "gout", "grad", "gwin"})


@dataclass
class LayerStats:
    """Streaming statistics of one layer's inputs (and, optionally, its weight's Fisher and output gradients)."""

    n: int
    xxt: torch.Tensor | None = None  # (n, n) float64, sum over tokens of x x^T
    abs_sum: torch.Tensor | None = None  # (n,) float64, sum over tokens of |x|
    count: int = 0
    fisher_out: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> (out,) sum_j of sum (dL/dW_ij)^2
    fisher_in: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> (in,) sum_i of sum (dL/dW_ij)^2
    cross: torch.Tensor | None = None  # (n, n) float64, sum of x_original x_compressed^T (sequential mode)
    grad_out: dict[str, float] = field(default_factory=dict)  # module name -> sum over tokens of ||dL/dy||^2
    grad_tokens: dict[str, int] = field(default_factory=dict)  # module name -> tokens behind grad_out
    grad_channels: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> (out,) float64, sum of (dL/dy)^2
    grad_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> (out, in) float32, sum of dL/dW
    # module -> list of (windows, out, in) float32: the weight gradient of each calibration window, per batch
    grad_windows: dict[str, list[torch.Tensor]] = field(default_factory=dict)
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
        """``E ||dL/dy||^2`` surrogate: mean squared output gradient per token (needs ``"gout"``)."""
        if name not in self.grad_out or not self.grad_tokens.get(name):
            raise ValueError(f"no output gradients were collected for {name}; calibrate with kinds=('gout',)")
        return self.grad_out[name] / self.grad_tokens[name]

    def whitening(self, damp: float = 0.0) -> Whitening:
        """The robust square root of the covariance, cached per damping (shared by layers reading this input)."""
        if damp not in self._whitening:
            if self.xxt is None or self.count == 0:
                raise ValueError("no input covariance was collected for this layer")
            # The sum X X^T scaled inside whiten: no extra n x n copy (0.5 GB at n = 8192).
            self._whitening[damp] = whiten(self.xxt, damp=damp, scale=1.0 / self.count)
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
            part = gram(x2)  # float32 within a batch, float64 across batches (added in place: no float64 copy)
            self.xxt = part.double() if self.xxt is None else self.xxt.add_(part)
        if "abs" in kinds:
            part = x2.abs().sum(0)
            self.abs_sum = part.double() if self.abs_sum is None else self.abs_sum.add_(part)
        self.count += x2.shape[0]

    def add_fisher(self, name: str, module: nn.Module) -> None:
        """Add the squared gradient of ``module``'s weight (one batch's loss), reduced along each axis."""
        sq = linear_weight(module, module.weight.grad).detach().double().pow(2)  # (out, in)
        for sums, part in ((self.fisher_out, sq.sum(1)), (self.fisher_in, sq.sum(0))):
            sums[name] = part if name not in sums else sums[name].add_(part)

    def add_grad(self, name: str, module: nn.Module) -> None:
        """Add the gradient of ``module``'s weight (one batch's loss) to :attr:`grad_sum`."""
        g = linear_weight(module, module.weight.grad).detach().float()  # (out, in)
        self.grad_sum[name] = g if name not in self.grad_sum else self.grad_sum[name].add_(g)

    def add_grad_windows(self, name: str, x: torch.Tensor, grad: torch.Tensor) -> None:
        """Add one batch's per-window weight gradients ``B sum_t (dL/dy_t) x_t^T`` (``(windows, out, in)``) of a
        linear map ``y = W x (+ b)`` from its input ``x`` and output gradient (leading axis: windows; a 2-D input is
        one window). ``L`` is the batch's mean loss, so the factor ``B`` (the batch's windows) makes each entry the
        gradient of that window's own mean loss, whatever the batch size (a short last batch weighs the same)."""
        x3 = x.detach().float().reshape(x.shape[0] if x.ndim > 2 else 1, -1, x.shape[-1])  # (windows, tokens, in)
        g3 = grad.detach().float().reshape(x3.shape[0], -1, grad.shape[-1])  # (windows, tokens, out)
        self.grad_windows.setdefault(name, []).append((g3.mT @ x3).mul_(x3.shape[0]))  # (windows, out, in)

    def output_channel_weights(self, name: str) -> torch.Tensor | None:
        """Per output channel, the root mean squared loss gradient ``sqrt(E (dL/dy_j)^2)`` (the diagonal of the
        output Fisher), floored at a thousandth of its largest value; ``None`` when not collected (``"gout"``)."""
        if name not in self.grad_channels or not self.grad_tokens.get(name):
            return None
        rms = (self.grad_channels[name] / self.grad_tokens[name]).sqrt()
        return rms.clamp_min(1e-3 * float(rms.max()) if float(rms.max()) > 0 else 1.0)

    def add_grad_out(self, name: str, grad: torch.Tensor) -> None:
        g2 = grad.detach().float().pow(2)
        per_channel = g2.reshape(-1, g2.shape[-1]).sum(0, dtype=torch.float64)  # (out,)
        self.grad_channels[name] = (per_channel if name not in self.grad_channels
                                    else self.grad_channels[name].add_(per_channel))
        self.grad_out[name] = self.grad_out.get(name, 0.0) + float(per_channel.sum())
        self.grad_tokens[name] = self.grad_tokens.get(name, 0) + g2.numel() // g2.shape[-1]


def pooled_second_moment(stats: Iterable[LayerStats]) -> torch.Tensor:
    """``sum_i X_i X_i^T / sum_i tokens_i``: the second moment of the inputs of several layers taken together (a
    cross-block method's group), ``(n, n)`` float64."""
    stats = list(stats)
    if any(s.xxt is None for s in stats):
        raise ValueError("pooled_second_moment needs every layer's input covariance")
    return sum(s.xxt for s in stats) / max(sum(s.count for s in stats), 1)


@dataclass(frozen=True)
class InputGroup:
    """Layers that read one input (q/k/v, gate/up) and that input's statistics, shared by all of them.

    Attributes:
        names: the layers, in model order.
        stats: their one :class:`LayerStats` (``None``: no statistics were collected).
    """

    names: tuple[str, ...]
    stats: LayerStats | None


def input_groups(names: Iterable[str], stats: Mapping[str, LayerStats] | None) -> list[InputGroup]:
    """The input groups of ``names``, in order of first appearance.

    Layers reading one input hold one :class:`LayerStats` object: :class:`StatsObserver` gives the group's members
    their leader's, and the statistics cache restores that sharing when it reads them back. A layer without
    statistics is a group of its own.
    """
    groups: dict[int, list[str]] = {}
    owner: dict[int, LayerStats | None] = {}
    for k, name in enumerate(names):
        s = stats.get(name) if stats is not None else None
        key = id(s) if s is not None else -1 - k  # the one place a group is recognised by its shared object
        groups.setdefault(key, []).append(name)
        owner[key] = s
    return [InputGroup(tuple(members), owner[key]) for key, members in groups.items()]


def iter_batches(data: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Calibration token batches from ``(samples, seq_len)`` ids (split by ``batch_size``) or an iterable."""
    if isinstance(data, torch.Tensor):
        if data.ndim != 2 or data.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"calibration data must be integer token ids of shape (samples, seq_len), "
                             f"got {data.dtype} {tuple(data.shape)}")
        yield from data.split(batch_size)
    else:
        yield from data


def check_kinds(kinds: Iterable[str]) -> frozenset[str]:
    kinds = frozenset(kinds)
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; allowed: {', '.join(KINDS)}")
    return kinds


class StatsObserver:
    """Hooks that accumulate :class:`LayerStats` for ``modules`` while they run (a context manager).

    Modules that receive the very same input tensor in a forward pass (q/k/v, gate/up) share one ``LayerStats``:
    the first of them (in call order) is the group's leader and its hook does the accumulation. Groups are fixed
    on the first forward pass. ``"gout"`` registers gradient hooks on the outputs (run a backward pass);
    ``"fisher"`` is added per backward pass by :meth:`add_fisher`; ``"gwin"`` hooks the outputs too and keeps each
    window's weight gradient. With ``record=True`` each leader's latest input
    is kept in :attr:`last_inputs` (for paired original / compressed statistics).
    """

    def __init__(self, modules: Mapping[str, nn.Module], kinds: Iterable[str], *, record: bool = False) -> None:
        self.modules = dict(modules)
        self.kinds = check_kinds(kinds)
        self.record = record
        self.stats: dict[str, LayerStats] = {}
        self.leader: dict[str, str] = {}
        self.last_inputs: dict[str, torch.Tensor] = {}
        self.paused = False  # while True the hooks do nothing (another stream runs through the same modules)
        self._first_call: list[tuple[torch.Tensor, str]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> StatsObserver:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._input_hook(name)))
            if "gout" in self.kinds:
                self._handles.append(module.register_forward_hook(self._output_hook(name)))
            if "gwin" in self.kinds:
                self._handles.append(module.register_forward_hook(self._window_hook(name)))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._first_call.clear()

    def _input_hook(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if self.paused:
                return
            if name not in self.leader:
                lead = next((lead for seen, lead in self._first_call if seen is x), name)
                self.leader[name] = lead
                if lead == name:
                    self._first_call.append((x, name))
                    self.stats[name] = LayerStats(n=input_dim(self.modules[name]))
                self.stats[name] = self.stats[lead]
                if len(self.leader) == len(self.modules):
                    self._first_call.clear()  # every group is known: hold no references to activations
            if self.leader[name] != name:
                return
            if self.kinds & INPUT_KINDS:
                self.stats[name].add(x, self.kinds)
            if self.record:
                self.last_inputs[name] = x.detach()
        return hook

    def _output_hook(self, name: str):
        def hook(_module: nn.Module, _args: tuple, output: object) -> None:
            if not self.paused and isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda grad: self.stats[name].add_grad_out(name, grad))
        return hook

    def _window_hook(self, name: str):
        def hook(_module: nn.Module, args: tuple, output: object) -> None:
            if not self.paused and isinstance(output, torch.Tensor) and output.requires_grad:
                x = args[0].detach()
                output.register_hook(lambda grad: self.stats[name].add_grad_windows(name, x, grad))
        return hook

    def share(self, names: Iterable[str]) -> None:
        """Give ``names`` the statistics of the first of them, which observed their common input (for members of
        a known input group that were stopped before they ran)."""
        lead, *rest = names
        for name in rest:
            self.leader[name] = lead
            self.stats[name] = self.stats[lead]
        if len(self.leader) == len(self.modules):
            self._first_call.clear()  # every group is known: hold no references to activations

    def add_fisher(self) -> None:
        """Accumulate the weight gradients of the last backward pass into the Fisher sums."""
        for name, module in self.modules.items():
            if name in self.stats and module.weight.grad is not None:
                self.stats[name].add_fisher(name, module)

    def add_grad(self) -> None:
        """Accumulate the weight gradients of the last backward pass into the gradient sums."""
        for name, module in self.modules.items():
            if name in self.stats and module.weight.grad is not None:
                self.stats[name].add_grad(name, module)

    def leads(self) -> Iterator[tuple[str, LayerStats]]:
        """``(leader name, shared stats)`` for each input group."""
        return ((name, s) for name, s in self.stats.items() if self.leader.get(name) == name)


def collect_stats(
    model: nn.Module,
    data: torch.Tensor | Iterable[torch.Tensor],
    modules: Mapping[str, nn.Module],
    *,
    kinds: Iterable[str] = ("xxt",),
    batch_size: int = 4,
    progress: bool = False,
) -> dict[str, LayerStats]:
    """Stream calibration batches through a whole in-memory ``model`` and return statistics per module name.

    Args:
        model: a causal LM taking ``input_ids`` (and ``labels`` when gradient statistics are requested), or an
            encoder (gradient statistics then come from its contrastive embedding loss,
            :mod:`rankwise.calibrate.objective`, and need batches of an even number >= 4 of windows).
        data: token ids ``(samples, seq_len)`` or an iterable of such batches.
        modules: name -> linear-like module to observe.
        kinds: any of ``"xxt"`` (input second moment), ``"abs"`` (mean |x|), ``"fisher"`` (diagonal Fisher row
            and column sums), ``"gout"`` (output-gradient energy), ``"grad"`` (the loss gradient of each weight),
            ``"gwin"`` (the weight gradient of each window, kept per window: memory ``windows x out x in`` per layer).
        batch_size: windows per forward pass when ``data`` is a tensor.
        progress: show a progress bar.
    """
    kinds = check_kinds(kinds)
    batches = list(iter_batches(data, batch_size))
    if not batches:
        raise ValueError("calibration data is empty: need at least one window of tokens")
    device = next(model.parameters()).device
    want_grad = bool(kinds & GRADIENT_KINDS)
    encoder = is_encoder(model)
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
        with StatsObserver(modules, kinds) as observer:
            for batch in progress_bar(batches, "calibrating", enabled=progress):
                batch = batch.to(device)
                if want_grad:
                    model.zero_grad(set_to_none=True)
                    loss = encoder_loss(model, batch) if encoder else model(input_ids=batch, labels=batch).loss
                    loss.backward()
                    if "fisher" in kinds:
                        observer.add_fisher()
                    if "grad" in kinds:
                        observer.add_grad()
                else:
                    with torch.no_grad():
                        body(input_ids=batch)
    finally:
        for p, flag in saved_grad.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    missing = [name for name in modules if name not in observer.stats]
    if missing:
        raise ValueError(f"layer {missing[0]} never ran during calibration; it cannot be calibrated")
    return observer.stats


def _inside(modules: Mapping[str, nn.Module], model: nn.Module) -> bool:
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return False
    inner = {id(m) for m in base.modules()}
    return all(id(m) in inner for m in modules.values())


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, stats: LayerStats | None) -> float | None:
    """``||(W - W') X||_F / ||W X||_F`` from the input covariance, or ``None`` without one.

    A report figure, computed in float32 (float64 products cost as much as the factorisation itself here); the
    covariance is scaled to unit trace first so float32 cannot overflow."""
    if stats is None or stats.xxt is None:
        return None
    trace = float(stats.xxt.diagonal().sum())
    if not trace > 0:
        return None
    C = (stats.xxt / trace).float()  # (n, n); the scale cancels in the ratio
    num = den = 0.0
    for start in range(0, weight.shape[0], 512):  # row chunks: temporaries of 512 x n, not m x n
        W = weight[start:start + 512].to(C.device, C.dtype)
        D = W - approx[start:start + 512].to(C.device, C.dtype)
        num += float(((D @ C) * D).sum(dtype=torch.float64))
        den += float(((W @ C) * W).sum(dtype=torch.float64))
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else None
