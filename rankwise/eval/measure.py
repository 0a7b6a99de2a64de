"""Perplexity (and other metrics) over fixed windows, parameter counts, prefill throughput and peak memory."""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from rankwise.progress import progress_bar
from rankwise.targets import find_targets

# What an evaluation can measure on its windows, by name (``--metric``): the nuclear ones are Li et al.'s Matrix
# Nuclear-Norm of the last hidden state (:mod:`rankwise.eval.nuclear`, https://arxiv.org/abs/2410.10672).
METRICS = {
    "perplexity": "exp of the mean next-token NLL (lower is better)",
    "nuclear": "Matrix Nuclear-Norm, the paper's L1,2 approximation (label-free; the paper reads lower as better)",
    "nuclear_exact": "Matrix Nuclear-Norm with the exact nuclear norm (an SVD per window)",
}


def check_metrics(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` in order without repeats, each a key of :data:`METRICS`.

    Raises:
        ValueError: an unknown name (the message lists the valid ones), or none at all.
    """
    found = tuple(dict.fromkeys(names))
    unknown = [n for n in found if n not in METRICS]
    if unknown or not found:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {', '.join(unknown) or 'none'}")
    return found


@dataclass
class EvalResult:
    """What ``rankwise eval`` reports. ``eval_tokens`` counts predicted tokens (``windows * (seq_len - 1)``)."""

    perplexity: float | None  # None when the metrics asked for leave it out
    eval_tokens: int
    windows: int
    seq_len: int
    params_total: int
    params_targeted: int
    tokens_per_s: float | None  # prefill throughput on the evaluation windows; None unless timing was asked for
    peak_rss_mb: float
    model_mb: float
    storage: dict[str, Any] | None = None  # the directory's size on disk (see :func:`storage`), when one was read
    speed: dict[str, Any] | None = None  # decode and prefill timings (:class:`~rankwise.eval.speed.SpeedResult`)
    nuclear: float | None = None  # Matrix Nuclear-Norm, L1,2 approximation (:mod:`rankwise.eval.nuclear`)
    nuclear_exact: float | None = None  # Matrix Nuclear-Norm, exact nuclear norm

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        speed = "" if self.tokens_per_s is None else f"prefill {self.tokens_per_s:,.0f} tokens/s; "
        scores = [f"{name} {value:.{3 if name == 'perplexity' else 4}f}" for name, value in self.metrics().items()]
        return (f"{', '.join(scores)} on {self.windows} windows x {self.seq_len} tokens "
                f"({self.eval_tokens:,} predicted tokens); params {self.params_total:,} total, "
                f"{self.params_targeted:,} in attention/MLP projections; {speed}"
                f"model {self.model_mb:.1f} MB, peak RSS {self.peak_rss_mb:.0f} MB" + describe_storage(self.storage)
                + (f"\n{describe_speed(self.speed)}" if self.speed else ""))


    def metrics(self) -> dict[str, float]:
        """The measured metrics by name (those not asked for are left out)."""
        values = {name: getattr(self, name) for name in METRICS}
        return {name: value for name, value in values.items() if value is not None}


def storage(path: Any) -> dict[str, Any] | None:
    """Size on disk of a model directory's weights, and for a compressed one the dense model's size in the same
    dtype and the stored bits per targeted weight (from its report); ``None`` for anything but a local directory."""
    from pathlib import Path

    path = Path(path) if isinstance(path, str | Path) else None
    if path is None or not path.is_dir():
        return None
    from rankwise.io.shards import weights_bytes

    out: dict[str, Any] = {"bytes_on_disk": weights_bytes(path),
                           "bytes_dense": None, "bits_per_targeted_weight": None}
    from rankwise.io.save import is_compressed_dir

    if is_compressed_dir(path):
        from rankwise.io.manifest import read_manifest

        report = read_manifest(path).report or {}
        out.update(bytes_dense=report.get("bytes_dense"), bits_per_targeted_weight=report.get(
            "bits_per_targeted_weight"))
    return out


def describe_speed(speed: dict[str, Any]) -> str:
    from rankwise.eval.speed import SpeedResult

    return SpeedResult(**speed).describe()


def describe_storage(found: dict[str, Any] | None) -> str:
    if not found:
        return ""
    text = f"; weights on disk {found['bytes_on_disk'] / 1e6:,.1f} MB"
    if found.get("bytes_dense"):
        dense = found["bytes_dense"]
        text += f" ({found['bytes_on_disk'] / dense:.3f}x the dense {dense / 1e6:,.1f} MB)"
    if found.get("bits_per_targeted_weight") is not None:
        text += f", {found['bits_per_targeted_weight']:.2f} bits per targeted weight"
    return text


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = False) -> float:
    """``exp`` of the mean next-token NLL over all windows (each window scored independently, no overlap)."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be token ids of shape (n, seq_len >= 2), got {tuple(windows.shape)}")
    total, count = 0.0, 0
    device = _device(model)
    for batch in progress_bar(list(windows.split(batch_size)), "perplexity", enabled=progress):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()  # (b, L-1, vocab)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def prefill_throughput(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8, repeats: int = 5) -> float:
    """Tokens per second of a full forward pass over ``batch_size`` windows: the fastest of ``repeats`` runs after a
    warm-up (the least disturbed by other work on the machine)."""
    batch = windows[:batch_size].to(_device(model))
    model(input_ids=batch)  # warm-up
    times = []
    for _ in range(repeats):
        if batch.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=batch)
        if batch.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return batch.numel() / min(times)


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(total, targeted)`` parameters; targeted = attention and MLP projections (dense or compressed). A
    compressed layer counts its stored values (:attr:`~rankwise.nn.CompressedLinear.num_params`: quantised codes are
    values, a dictionary's indices are not)."""
    from rankwise.nn import compressed_modules, model_num_params

    targeted = sum(p.numel() for m in find_targets(model).values() for p in m.parameters())
    targeted += sum(m.num_params for m in compressed_modules(model).values())
    return model_num_params(model), targeted


def targeted_bytes(model: nn.Module, value_bytes: int) -> int:
    """Bytes the targeted layers (dense or compressed) store with floating-point values at ``value_bytes`` each."""
    from rankwise.nn import compressed_modules

    dense = sum(p.numel() for m in find_targets(model).values() for p in m.parameters()) * value_bytes
    return dense + sum(m.stored_bytes(value_bytes) for m in compressed_modules(model).values())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def evaluate(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = False,
             throughput: bool = False, metrics: Sequence[str] = ("perplexity",)) -> EvalResult:
    """``metrics`` (names in :data:`METRICS`), parameter counts and memory of ``model`` on ``windows``; with
    ``throughput``, also the prefill throughput on them (:func:`prefill_throughput`: a warm-up and 5 timed passes over
    one batch, several times the cost of the perplexity on a short evaluation, so it is off unless asked for).

    Raises:
        ValueError: an unknown metric name.
    """
    metrics = check_metrics(metrics)
    ppl = perplexity(model, windows, batch_size=batch_size, progress=progress) if "perplexity" in metrics else None
    tps = prefill_throughput(model, windows, batch_size=batch_size) if throughput else None
    result = result_for(model, windows, ppl, tps)
    result.nuclear, result.nuclear_exact = nuclear_metrics(model, windows, metrics, batch_size=batch_size,
                                                           progress=progress)
    return result


def nuclear_metrics(model: nn.Module, windows: torch.Tensor, metrics: Sequence[str], *, batch_size: int = 8,
                    progress: bool = False) -> tuple[float | None, float | None]:
    """``(nuclear, nuclear_exact)`` of ``model`` on ``windows`` from one pass, each ``None`` unless in ``metrics``."""
    from rankwise.eval.nuclear import NuclearConfig, nuclear_scores

    wanted = {"nuclear": NuclearConfig(approx=True), "nuclear_exact": NuclearConfig(approx=False)}
    wanted = {name: config for name, config in wanted.items() if name in metrics}
    if not wanted:
        return None, None
    found = dict(zip(wanted, nuclear_scores(model, windows, list(wanted.values()), batch_size=batch_size,
                                             progress=progress), strict=True))
    return found.get("nuclear"), found.get("nuclear_exact")


def result_for(model: nn.Module, windows: torch.Tensor, ppl: float | None, tokens_per_s: float | None
               ) -> EvalResult:
    """An :class:`EvalResult` for ``model`` (which may sit on the ``meta`` device: only shapes are read)."""
    total, targeted = count_params(model)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    n, seq_len = windows.shape
    return EvalResult(ppl, n * (seq_len - 1), n, seq_len, total, targeted, tokens_per_s, peak_rss_mb(), model_mb)
