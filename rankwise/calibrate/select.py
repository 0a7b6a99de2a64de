"""Choose ``n`` calibration windows from a larger pool by what they add to the targeted layers' input covariances.

The pool's ``P`` windows run through the model once, one decoder block at a time (no gradients). In each block,
for each distinct input of the targeted linear layers (q/k/v share one, gate/up another), the pooled second moment
``C = sum_i C_i`` of all pool tokens is whitened with a ridge (``C + lam I = L L^T``, ``lam = ridge * mean
diag(C)``), and every window ``i`` gets ``r`` features ``f_ij = ||X_i L^-T g_j||`` for ``r`` Gaussian directions
``g_j / sqrt(r)``: a Johnson-Lindenstrauss sketch (as in Drineas et al. 2012, https://arxiv.org/abs/1109.3843) of
the window's whitened contribution, with ``E sum_j f_ij^2 = tr(C_i (C + lam I)^-1)``, the sum of its tokens' ridge
leverage scores. Stacking the features of every input gives a ``(P, D)`` matrix ``F`` whose squared row norms are
the windows' leverage-type scores.

* ``first``: the first ``n`` windows (no model run; the behaviour without selection).
* ``leverage``: ``n`` distinct windows drawn one after another with probability proportional to their score
  ``||F_i||^2`` (the windows whose tokens the pooled covariance explains least).
* ``sensitivity``: the same draw by the l_p Lewis weights (``p`` = 1 by default; Cohen and Peng 2015,
  https://arxiv.org/abs/1412.0588) of ``F`` reduced to its top ``n`` principal directions.
* ``volume``: ``n`` windows from the projection DPP of that reduced ``F`` (probability ``det(F_S)^2``: windows whose
  feature vectors span the most volume; Derezinski and Warmuth 2017, https://arxiv.org/abs/1705.06908). When ``F``
  has rank below ``n`` (fewer distinct windows than asked), the draw is by the reduced rows' leverage instead.

Weights are ``1 / (P q_i)`` for a window drawn with probability ``q_i`` (ones for ``first`` and ``volume``): the
rescaling that would make the mean of the selected windows' contributions an unbiased estimate of the pool's. The
covariance collection of :mod:`rankwise.calibrate.stats` ignores them (every selected window counts once); they are
returned for callers that weight.

Memory: the pool's hidden states (``P * seq_len * hidden`` floats) and one block's targeted inputs over the pool
(``P * seq_len * sum of input widths`` floats, about 110 MB for SmolLM2-135M at ``P = 32``, ``seq_len = 256``), so
``blocks`` can limit the run to the first blocks of a large model. Deterministic: same seed, same windows.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.linalg.sampling import lewis_weights, projection_dpp
from rankwise.progress import progress_bar

SELECTIONS = ("first", "leverage", "sensitivity", "volume")


@dataclass(frozen=True)
class SelectConfig:
    """How calibration windows are chosen from the pool."""

    how: str = "first"  # one of SELECTIONS
    features: int = 16  # Gaussian directions per targeted input (the JL sketch's width r)
    ridge: float = 1e-2  # ridge on each pooled covariance, relative to its mean diagonal
    p: float = 1.0  # the l_p of sensitivity sampling
    blocks: int | None = None  # only the first blocks' targeted inputs (None: every block)
    seed: int = 0  # seed of the sketch and of the draws

    def __post_init__(self) -> None:
        if self.how not in SELECTIONS:
            raise ValueError(f"calib_select must be one of {', '.join(SELECTIONS)}, got {self.how!r}")
        for name, value, low in (("features", self.features, 1), ("blocks", self.blocks, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                      or value < low):
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not (isinstance(self.ridge, numbers.Real) and math.isfinite(self.ridge) and self.ridge > 0):
            raise ValueError(f"ridge must be a finite number > 0, got {self.ridge!r}")
        if not (isinstance(self.p, numbers.Real) and math.isfinite(self.p) and self.p >= 1):
            raise ValueError(f"p must be a finite number >= 1, got {self.p!r}")


@dataclass
class Selection:
    """The chosen windows: ``indices`` into the pool (ascending), their ``weights``, the pool's ``scores``."""

    indices: torch.Tensor  # (n,) int64
    weights: torch.Tensor  # (n,) float64, see the module docstring (ignored by the covariance collection)
    scores: torch.Tensor | None  # (P,) leverage-type score of every pool window (None for "first")
    how: str
    pool: int
    seconds: float  # model run and choice

    def describe(self, timed: bool = True) -> str:
        """One line for a report (``timed``: with the selection's seconds; provenance leaves them out)."""
        return (f"calibration windows: {self.how}, {len(self.indices)} of a pool of {self.pool}"
                + (f" (chosen in {self.seconds:.1f} s)" if timed and self.how != "first" else ""))


EVAL_ROOM = 16
"""Windows a pool must leave at the end of the text: ``rankwise eval``'s default ``--eval-samples``, so that the
evaluation windows never overlap text the selection may have calibrated on."""


def check_pool(n: int, pool: int | None, how: str = "leverage") -> int:
    """The number of windows to cut from the start of the text: ``n`` for ``how="first"`` (where a pool is refused:
    it would be ignored), else the pool (default ``4 n``, refused below ``n``)."""
    if how == "first":
        if pool is not None:
            raise ValueError("calib_pool (--calib-pool) needs calib_select (--calib-select) leverage, sensitivity or "
                             "volume; 'first' takes the first calib_samples windows")
        return n
    pool = 4 * n if pool is None else pool
    if isinstance(pool, bool) or not isinstance(pool, numbers.Integral) or pool < n:
        raise ValueError(f"calib_pool must be an integer >= calib_samples={n}, got {pool!r}")
    return int(pool)


def check_room(tokens: int, seq_len: int, pool: int, how: str) -> None:
    """Refuse a pool that leaves fewer than :data:`EVAL_ROOM` windows of the text after it for evaluation."""
    if how != "first" and tokens // seq_len < pool + EVAL_ROOM:
        raise ValueError(f"the text has {tokens // seq_len} windows of {seq_len} tokens: a calibration pool of {pool} "
                         f"leaves fewer than {EVAL_ROOM} after it for evaluation (rankwise eval's default); use a "
                         "smaller --calib-pool or a longer text")


def select_windows(model: nn.Module | object, pool: torch.Tensor, n: int, config: SelectConfig = SelectConfig(), *,
                   targets: Iterable[str] = ("attn", "mlp"), batch_size: int = 4,
                   progress: bool = False) -> Selection:
    """Choose ``n`` of the ``(P, seq_len)`` token windows ``pool`` for calibration.

    Args:
        model: a model in memory, or a block source (:class:`~rankwise.stream.ModelSource`,
            :class:`~rankwise.stream.CheckpointSource`: a checkpoint read block by block).
        pool: ``(P, seq_len)`` integer token ids.
        n: windows to choose, ``1 <= n <= P``.
        config: the method and its knobs.
        targets: the layers whose inputs matter (as ``--targets``).
        batch_size: windows per forward pass.

    Returns:
        The :class:`Selection` (``pool[selection.indices]`` are the calibration windows).

    Raises:
        ValueError: ``n`` above the pool size, a pool that is not integer ids, no targeted layer.
    """
    start = time.perf_counter()
    if not isinstance(pool, torch.Tensor) or pool.ndim != 2 or pool.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"pool must be integer token ids of shape (P, seq_len), got {getattr(pool, 'shape', pool)}")
    P = pool.shape[0]
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= P:
        raise ValueError(f"calib_samples={n!r} exceeds the pool of {P} windows (or is below 1); pick 1 to {P}")
    if config.how == "first" or n == P:
        idx = torch.arange(n)
        return Selection(idx, torch.ones(n, dtype=torch.float64), None, config.how, P, time.perf_counter() - start)
    F = window_features(model, pool, config, targets=targets, batch_size=batch_size, progress=progress)
    idx, weights = choose(F, n, config)
    order = idx.argsort()
    return Selection(idx[order], weights[order], F.pow(2).sum(1), config.how, P, time.perf_counter() - start)


def choose(F: torch.Tensor, n: int, config: SelectConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` distinct rows of the ``(P, D)`` window features ``F`` by ``config.how``, with their weights."""
    P = F.shape[0]
    gen = torch.Generator().manual_seed(config.seed)
    if config.how == "leverage":
        q = F.pow(2).sum(1)
    else:
        U, s, _ = torch.linalg.svd(F, full_matrices=False)
        d = min(n, int((s > s.max() * max(F.shape) * torch.finfo(F.dtype).eps).sum()))
        if config.how == "volume" and d == n:
            return projection_dpp(U[:, :n], gen), torch.ones(n, dtype=torch.float64)
        reduced = U[:, :d] * s[:d]  # (P, d): F's top principal directions
        q = lewis_weights(reduced, config.p) if config.how == "sensitivity" else reduced.pow(2).sum(1)
    q = q.clamp_min(0.0)
    if int((q > 0).sum()) < n:  # fewer informative windows than asked: the rest at random among the others
        q = q + q.max().clamp_min(1.0) * 1e-12
    q = q / q.sum()
    idx = torch.multinomial(q, n, replacement=False, generator=gen)
    return idx, 1.0 / (P * q[idx])


@torch.no_grad()
def window_features(model: nn.Module | object, pool: torch.Tensor, config: SelectConfig, *,
                    targets: Iterable[str] = ("attn", "mlp"), batch_size: int = 4,
                    progress: bool = False) -> torch.Tensor:
    """The ``(P, D)`` float64 window features of the module docstring: ``r = config.features`` per distinct
    targeted input, over every block (or the first ``config.blocks``)."""
    from rankwise.stream import ModelSource, capture_calls, run_block
    from rankwise.targets import find_targets

    source = ModelSource(model) if isinstance(model, nn.Module) else model
    names = find_targets(source.model, tuple(targets))
    if not names:
        raise ValueError(f"no layer matches the targets {', '.join(targets)}: nothing to select windows for")
    source.load_rest()
    batches = list(pool.split(batch_size))
    hidden, calls = [], []
    for batch in batches:
        h, block_calls = capture_calls(source.model, source.blocks, batch.to(source.input_device))
        hidden.append(h)
        calls.append(block_calls)
    source.release_rest()
    prefix = f"{source.blocks_name}."
    nblocks = len(source.blocks) if config.blocks is None else min(config.blocks, len(source.blocks))
    gen = torch.Generator().manual_seed(config.seed)
    features = []
    for i in progress_bar(range(nblocks), "calibration selection", enabled=progress):
        block = source.load(i)
        inside = {name[len(prefix):].split(".", 1)[1]: module for name, module in names.items()
                  if name.startswith(f"{prefix}{i}.")}
        recorder = _InputRecorder(inside)
        try:
            for b in range(len(batches)):
                recorder.keys.clear()
                hidden[b] = run_block(block, calls[b][i].to(source.device), hidden[b].to(source.device))
        finally:
            recorder.remove()
        source.release(i)
        for name in sorted(recorder.seen):
            X = torch.cat(recorder.seen.pop(name))  # (P, T, n)
            features.append(_input_features(X, config, gen))
    if not features:
        raise ValueError(f"no targeted layer in the first {nblocks} blocks: nothing to select windows by")
    return torch.cat(features, 1)


class _InputRecorder:
    """Forward pre-hooks keeping the inputs of ``modules``, once per distinct input tensor (q/k/v read one)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.seen: dict[str, list[torch.Tensor]] = {}
        self.keys: dict[int, tuple[str, torch.Tensor]] = {}  # id(input) -> the first reader; the input is held,
        # so its id is not reused within the batch (cleared per batch)
        self.handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if self.keys.setdefault(id(x), (name, x))[0] == name:
                self.seen.setdefault(name, []).append(x.detach().float().cpu())  # (b, T, n)
        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _input_features(X: torch.Tensor, config: SelectConfig, gen: torch.Generator) -> torch.Tensor:
    """``(P, r)`` features of one input: ``||X_i L^-T g_j||`` with ``L L^T = C + lam I``."""
    P, T, n = X.shape
    flat = X.reshape(P * T, n)
    C = (flat.mT @ flat).double()  # (n, n), float32 products, float64 from here
    lam = config.ridge * float(C.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny))
    G = torch.randn((n, config.features), generator=gen, dtype=torch.float64) / math.sqrt(config.features)
    shifted = C + lam * torch.eye(n, dtype=torch.float64)
    L, info = torch.linalg.cholesky_ex(shifted)
    if int(info) == 0:
        B = torch.linalg.solve_triangular(L.mT, G, upper=True)  # L^-T G, (n, r)
    else:  # not positive definite after the ridge (rounding): a clamped eigen-decomposition
        evals, Q = torch.linalg.eigh(shifted)
        B = Q @ ((Q.mT @ G) / evals.clamp_min(lam).sqrt()[:, None])
    Z = (flat.double() @ B).reshape(P, T, -1)  # (P, T, r)
    return Z.pow(2).sum(1).sqrt()
