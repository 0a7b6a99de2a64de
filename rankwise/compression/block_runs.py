"""Forwards through a block that pause at given layers and resume through whatever stands there by then.

Sequential compression fits a block one input group at a time (:mod:`rankwise.compression.staged`). A
:class:`BlockRun` runs one calibration batch's forward in a thread of its own that pauses on entering each group's
first layer (:func:`pausing_at` redirects those layers' ``forward``) while the group is fitted, then resumes through
the fitted layers: one forward per batch instead of one per group. :class:`StageRuns` keeps a block's runs paused
from stage to stage within a memory allowance (:func:`paused_bytes`, :func:`pause_allowance`), or starts them afresh
for each stage, which gives the same statistics.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from rankwise.calibrate import LayerStats
from rankwise.calibrate.stats import StatsObserver
from rankwise.nn import input_dim
from rankwise.stream import ActivationStore, BlockCall, run_block


class _AbortError(BaseException):
    """Raised inside a paused run to unwind it (a stage failed, or the runs' outputs are not wanted)."""


_CURRENT = threading.local()  # .run: the BlockRun whose forward this thread executes


class BlockRun:
    """One batch's forward through a block, run in a thread of its own that pauses at each stage's leader.

    Each stage used to run the block from its start up to the group it calibrates, and the finished block ran once
    more to advance the compressed stream: about 2.7 forwards of a Llama block where one does. Here the forward
    runs once: it pauses on entering the leader of stage ``k`` (its input goes to the statistics hooks, which run
    in this thread, before the pause), the stage is fitted meanwhile, and on resuming the forward calls whatever
    module now stands at that name (the fitted one), then goes on to the next leader. The values are those of
    runs restarted from the block's start, operation for operation.

    The caller waits while a run advances, the run waits while paused: one of them computes at a time. The run
    computes without gradients, under the caller's autocast setting and, on a GPU, its device and stream. Tensors
    the paused forward holds (its locals up to the leader) stay alive meanwhile, for every batch: about one block's
    activations per batch, so runs are kept paused across stages only within :func:`pause_allowance`
    (:class:`StageRuns`); otherwise each stage starts one afresh per batch, ``passed`` the other stages, and unwinds
    it once read.

    Args:
        block: the block (its forward is run as :func:`~rankwise.stream.run_block` runs it).
        call: the block's other arguments for this batch.
        hidden: the batch's hidden states at the block's input.
        passed: stages not to pause at (a run started for one stage passes the others).
    """

    def __init__(self, block: nn.Module, call: BlockCall, hidden: torch.Tensor, *, passed: Iterable[int] = ()
                 ) -> None:
        self._block, self._call, self._hidden = block, call, hidden
        self._to_run: queue.SimpleQueue[bool] = queue.SimpleQueue()  # True: go on; False: unwind
        self._to_caller: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self.passed: set[int] = set(passed)  # stages whose leader this run has entered (or need not pause at)
        self.stage: int | None = None  # the stage it is paused at
        self.done = False
        self.output: torch.Tensor | None = None
        self._thread: threading.Thread | None = None
        self._aborted = False
        kind = hidden.device.type  # the caller's per-thread state, for the run's thread
        self._autocast = (torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None)
        self._stream = torch.cuda.current_stream(hidden.device) if kind == "cuda" else None

    def _main(self) -> None:
        _CURRENT.run = self
        try:
            if not self._to_run.get():
                return
            with contextlib.ExitStack() as context:
                context.enter_context(torch.no_grad())
                if self._autocast is not None:
                    context.enter_context(torch.autocast(self._hidden.device.type, dtype=self._autocast))
                if self._stream is not None:
                    context.enter_context(torch.cuda.device(self._stream.device))
                    context.enter_context(torch.cuda.stream(self._stream))
                out = run_block(self._block, self._call, self._hidden)
            self._to_caller.put(("done", out))
        except _AbortError:
            return  # unwound: nothing to hand back
        except BaseException as exc:  # handed to the caller, which raises it
            self._to_caller.put(("error", exc))

    def pause(self, stage: int) -> None:
        """Called in this run's thread on entering stage ``stage``'s leader: wait for the caller."""
        if self._aborted:  # a forward that caught the unwinding and went on
            raise _AbortError
        self.passed.add(stage)
        self._to_caller.put(("paused", stage))
        if not self._to_run.get():
            raise _AbortError

    def advance(self) -> int | None:
        """Run until the next pause (returns its stage, also in :attr:`stage`) or the end of the forward (``None``,
        :attr:`done`, the block's output in :attr:`output`); a failure inside the forward is raised here."""
        if self._aborted:
            raise RuntimeError("this block run was aborted; it cannot advance")
        if self.done:
            return None
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="rankwise-block-run", daemon=True)
            self._thread.start()
        self._to_run.put(True)
        kind, value = self._to_caller.get()
        if kind == "paused":
            self.stage = value
            return value
        self.done, self.stage = True, None
        self._thread.join()
        self._hidden = self._call = None
        if kind == "error":
            raise value
        self.output = value
        return None

    def abort(self) -> None:
        """Unwind the run, wherever it is (paused, unstarted, finished, or still running after an interrupted
        :meth:`advance`: it unwinds at its next pause), and wait for its thread."""
        abort_all([self])

    def _signal_abort(self) -> None:
        self._aborted = True
        if self._thread is not None:
            self._to_run.put(False)

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
        self._hidden = self._call = None


def abort_all(runs: Iterable[BlockRun]) -> None:
    """Unwind every run: all are told first, then waited for (an interrupted wait leaves none of them paused)."""
    runs = list(runs)
    for run in runs:
        run._signal_abort()
    for run in runs:
        run._join()


_MISSING = object()


class Redirects:
    """The instance ``forward`` :func:`pausing_at` gives each module of a block's stages (see there)."""

    def __init__(self, model: nn.Module, groups: list[list[str]], modules: Mapping[str, nn.Module]) -> None:
        self._model, self._modules = model, dict(modules)
        self._stage_of = {names[0]: k for k, names in enumerate(groups)}
        self._saved = {name: module.__dict__.get("forward", _MISSING) for name, module in self._modules.items()}
        self._wrappers = {name: self._redirect(name, module) for name, module in self._modules.items()}

    def _current(self, name: str) -> nn.Module:
        module = self._model.get_submodule(name)
        if module is not self._modules[name] and module.__dict__.get("forward") is self._wrappers[name]:
            del module.forward  # a copy of the layer made while redirected (deepcopy keeps functions) is itself
        return module

    def _redirect(self, name: str, module: nn.Module) -> Callable[..., object]:
        original = module.forward
        stage = self._stage_of.get(name)

        def forward(*args: object, **kwargs: object) -> object:
            run = getattr(_CURRENT, "run", None)
            if run is None:
                return original(*args, **kwargs)
            if stage is not None and stage not in run.passed:
                run.pause(stage)
            now = self._current(name)
            return original(*args, **kwargs) if now is module else now(*args, **kwargs)
        return forward

    def install(self) -> None:
        for name, module in self._modules.items():
            module.forward = self._wrappers[name]  # an instance attribute: nn.Module.__call__ calls it

    def remove(self) -> None:
        """Give each module back the ``forward`` it had (its class's, or an instance one set before)."""
        for name, module in self._modules.items():
            if self._saved[name] is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = self._saved[name]
            self._current(name)

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Without the redirection meanwhile (the fits: their layers are pickled for a Ray ``mapper``, copied)."""
        self.remove()
        try:
            yield
        finally:
            self.install()


@contextlib.contextmanager
def pausing_at(model: nn.Module, groups: list[list[str]], modules: Mapping[str, nn.Module]) -> Iterator[Redirects]:
    """While active, a :class:`BlockRun` pauses on first entering each group's leader, and every call of a module
    of ``modules`` (by name in ``model``) goes to the module standing at its name then (the fitted one, once its
    stage is done: also when the block took a reference to the old one before the stage ran). Calls outside a run
    are unchanged. Yields the :class:`Redirects`, whose :meth:`~Redirects.suspended` lifts them for a while."""
    redirects = Redirects(model, groups, modules)
    redirects.install()
    try:
        yield redirects
    finally:
        redirects.remove()


PAUSED_HIDDEN = 4
"""Hidden-state-sized tensors a paused Llama-like forward holds, besides its widest layer input: the block's input,
the residual, the normalised input and the attention's query and output (measured on SmolLM2's block: 2.1 to 5.7
hidden states, the most before ``down_proj``, whose input is 2.7)."""

PAUSED_THREADS = 512
"""At most this many threads paused runs may hold (a run's thread and, on a CPU, its OpenMP team: the intra-op
threads)."""


def paused_bytes(hidden: torch.Tensor, modules: Iterable[nn.Module], n_batches: int, *,
                 eager_heads: int = 0) -> int:
    """An estimate of what ``n_batches`` paused forwards through a block hold, twice what was measured: per batch
    :data:`PAUSED_HIDDEN` tensors the size of the block's input ``hidden`` (``(windows, tokens, width)``) and one of
    its widest target's input, plus, with eager attention of ``eager_heads`` heads, its ``windows x heads x tokens
    x tokens`` weights (kept by the attention until it returns)."""
    widest = max((input_dim(m) for m in modules), default=0)
    tokens = hidden.numel() // max(hidden.shape[-1], 1)
    per_batch = PAUSED_HIDDEN * hidden.numel() + tokens * widest + tokens * eager_heads * hidden.shape[-2]
    return 2 * n_batches * hidden.element_size() * per_batch


def pause_allowance(store: ActivationStore, device: torch.device, n_batches: int) -> int:
    """What paused runs may hold: the activation store's memory budget (``--activation-mb``) again, on a CPU, for
    at most :data:`PAUSED_THREADS` threads; nothing elsewhere (on a GPU a block's forward is cheap next to the fits,
    and each live thread would hold its own cuBLAS workspace): there each stage restarts the block."""
    if device.type != "cpu" or n_batches * (1 + torch.get_num_threads()) > PAUSED_THREADS:
        return 0
    return store.budget_bytes


class _OutOfStepError(Exception):
    """A kept run did not pause at the stage being observed (its batch skips that stage's leader, or calls the
    leaders in another order): the block's stages restart instead."""


class StageRuns:
    """The compressed stream's forwards through one block, one :class:`BlockRun` per batch: kept paused from stage
    to stage (``keep``), or started afresh for each stage, pausing at its leader only, and unwound once read.

    Kept runs are the faster, restarted ones the reference: when a kept run does not pause at the stage being
    observed (a batch whose forward skips that leader, or calls the leaders in another order), the kept runs are
    unwound and the block's stages from that one on restart, so both give the same statistics.
    """

    def __init__(self, block: nn.Module, n_stages: int, n_batches: int, inputs: Callable[[int], tuple], *,
                 keep: bool) -> None:
        self._block, self._stages, self._n, self._inputs = block, n_stages, n_batches, inputs
        self.runs = [BlockRun(block, *inputs(b)) for b in range(n_batches)] if keep else []
        self.keep = keep

    def observe(self, k: int, modules: Mapping[str, nn.Module], kinds: frozenset[str],
                original: Callable[[int], torch.Tensor | None] | None) -> dict[str, LayerStats]:
        """Stage ``k``: run each batch to the leader of ``modules`` (one input group), whose statistics hooks see
        its input on the compressed stream; with ``original`` (batch -> the group's input on the original stream,
        recorded by :func:`~rankwise.compression.staged.record_original`), ``X Xh^T`` is added too. A batch whose
        forward never calls the leader adds nothing.

        Raises:
            ValueError: no batch called the leader.
        """
        if self.keep:
            try:
                return self._observe(self.runs, k, modules, kinds, original)
            except _OutOfStepError:
                self.close()
                self.runs, self.keep = [], False
        others = [j for j in range(self._stages) if j != k]
        fresh = (BlockRun(self._block, *self._inputs(b), passed=others) for b in range(self._n))
        return self._observe(fresh, k, modules, kinds, original)

    def _observe(self, runs: Iterable[BlockRun], k: int, modules: Mapping[str, nn.Module], kinds: frozenset[str],
                 original: Callable[[int], torch.Tensor | None] | None) -> dict[str, LayerStats]:
        names = list(modules)
        lead = names[0]
        shared = False
        with torch.no_grad(), StatsObserver(modules, kinds, record=original is not None) as observer:
            for b, run in enumerate(runs):
                try:
                    observer.last_inputs.pop(lead, None)
                    run.advance()
                    if run.stage != k:
                        if self.keep:
                            raise _OutOfStepError
                        continue  # a fresh run that finished: this batch never calls the leader
                    if not shared:
                        observer.share(names)  # the members never run: they read the leader's input
                        shared = True
                    x = original(b) if original is not None else None
                    if x is not None:
                        observer.stats[lead].add_cross(x, observer.last_inputs[lead])
                finally:
                    if not self.keep:
                        run.abort()
        if lead not in observer.stats:
            raise ValueError(f"layer {lead} never ran during calibration; it cannot be calibrated")
        return observer.stats

    def finish(self) -> list[torch.Tensor] | None:
        """Each kept run's output, through the finished block (``None``: the stages were restarted)."""
        if not self.keep:
            return None
        for run in self.runs:
            if run.advance() is not None:  # each stage saw every kept run pause at it: none pauses again
                raise RuntimeError(f"a kept block run paused at stage {run.stage} after the last stage")
        return [run.output for run in self.runs]

    def close(self) -> None:
        """Unwind the kept runs (paused, or finished)."""
        abort_all(self.runs)
