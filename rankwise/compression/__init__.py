"""``compress_`` (a model in memory, in place) and ``compress_checkpoint`` (a checkpoint on disk, block by block):
one pipeline (:mod:`rankwise.compression.pipeline`) behind both."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.calibrate import LayerStats
from rankwise.calibrate.cache import StatsCache
from rankwise.calibrate.stats import relative_output_error
from rankwise.compression.pipeline import Mapper, run
from rankwise.io.atomic import atomic_dir, refuse_overlap
from rankwise.io.save import resolve_dtype
from rankwise.io.shards import DEFAULT_MAX_SHARD_SIZE
from rankwise.methods import CompressConfig
from rankwise.report import CompressionReport
from rankwise.stream import ActivationStore, CheckpointSource, InPlaceSink, ModelSource, ShardSink, check_offload_dir
from rankwise.stream.source import AUTO, parse_dtype
from rankwise.targets import FilterFn

DEFAULT_ACTIVATION_MB = 1024

__all__ = ["DEFAULT_ACTIVATION_MB", "compress_", "compress_checkpoint", "relative_output_error"]


@contextlib.contextmanager
def _fan_out(address: str | None) -> Iterator[Mapper | None]:
    """``None`` (factorise in this process), or a mapper onto Ray tasks for the duration of the block."""
    if address is None:
        yield None
        return
    from rankwise.distributed import map_on_ray, ray_session

    with ray_session(address):
        yield functools.partial(map_on_ray, description="factorisations", progress=False)


def compress_(
    model: nn.Module,
    config: CompressConfig,
    calibration: torch.Tensor | Iterable[torch.Tensor] | None = None,
    *,
    stats: Mapping[str, LayerStats] | None = None,
    filter_fn: FilterFn | None = None,
    batch_size: int = 4,
    progress: bool = True,
    device: str | torch.device | None = None,
    activation_mb: float = DEFAULT_ACTIVATION_MB,
    offload_dir: str | Path | None = None,
    ray: str | None = None,
    cache: str | Path | None = None,
    save_dtype: str | torch.dtype | None = None,
) -> CompressionReport:
    """Replace the targeted linear layers of ``model`` by compressed layers (one :class:`~rankwise.nn.CompressedLinear`
    kind per method: :class:`~rankwise.nn.LowRankLinear` for the SVD family) in place, block by block.

    Args:
        model: a Hugging Face causal LM or encoder (BERT family), or any module whose blocks sit in one
            ``nn.ModuleList`` and whose projections are ``nn.Linear``/``Conv1D``.
        config: a registered method config, e.g. ``SVDLLMConfig(ratio=0.2)``; its type selects the method and its
            fields the rank allocation, sequential calibration and left-factor update.
        calibration: token ids ``(samples, seq_len)`` or batches; required by data-aware methods, by
            ``allocation="loss"``, ``sequential`` and ``update_u``, and used for the report's output errors.
        stats: precomputed statistics of the dense model (from :func:`~rankwise.calibrate.collect_stats`), which
            replace the calibration passes outside sequential mode.
        filter_fn: ``(name, module) -> bool`` to narrow the targets further.
        batch_size: windows per calibration forward pass.
        progress: show progress bars.
        device: run each block there (e.g. ``"cuda"``) and move it back after; default: where the model is.
        activation_mb: block-boundary activations (and, for a sequential paired fit, the current block's
            group inputs on the original stream) kept in memory before spilling to ``offload_dir``.
        offload_dir: where activations spill (default: the system temporary directory), and where a non-sequential
            run on a CPU keeps its scoring pass's per-block input covariances whatever ``activation_mb`` (about
            0.8 GB for a 135M-parameter model; on a memory-backed temporary directory, that is memory).
        ray: fan each block's factorisations out to Ray workers (one task per input group): ``"local"``,
            ``"auto"`` or ``HOST:PORT`` (needs ``pip install 'rankwise[ray]'``); the result equals the serial one.
        cache: a directory for calibration statistics (see :mod:`rankwise.calibrate.cache`): a later run on the same
            weights and calibration reads them instead of running the model; the result is identical.
        save_dtype: the dtype the result will be stored in, which a budget in ``bits`` counts floating-point values
            at (default: the targeted weights' own dtype).

    Returns:
        A :class:`~rankwise.report.CompressionReport` with each layer's rank, parameters and output error.
    """
    from rankwise.io.hf_quantizer import attach

    with ActivationStore(int(activation_mb * 2**20), offload_dir) as store, _fan_out(ray) as mapper:
        report = run(ModelSource(model, device), InPlaceSink(), config, calibration, stats=stats,
                     filter_fn=filter_fn, batch_size=batch_size, progress=progress, store=store, mapper=mapper,
                     cache=StatsCache(cache) if cache is not None else None,
                     value_dtype=resolve_dtype(save_dtype, None) if save_dtype is not None else None)
    attach(model)  # model.save_pretrained now writes a directory that from_pretrained loads
    return report


def compress_checkpoint(
    path: str | Path,
    config: CompressConfig,
    calibration: torch.Tensor | Iterable[torch.Tensor] | None,
    out: str | Path,
    *,
    tokenizer: Any = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    export: str = "factored",
    overwrite: bool = False,
    filter_fn: FilterFn | None = None,
    batch_size: int = 4,
    progress: bool = True,
    activation_mb: float = DEFAULT_ACTIVATION_MB,
    offload_dir: str | Path | None = None,
    trust_remote_code: bool = False,
    ray: str | None = None,
    provenance: dict[str, Any] | None = None,
    cache: str | Path | None = None,
    save_dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    extras: Callable[[Path], Any] | None = None,
    verify: bool = True,
) -> CompressionReport:
    """Compress a safetensors checkpoint directory into ``out`` without ever holding the whole model in memory.

    The model skeleton is built on the ``meta`` device; each decoder block is read from the shards, calibrated,
    factorised and written as its own output shard, then freed. The output is a rankwise directory (sharded
    ``model-*.safetensors`` + index, ``config.json``, ``rankwise.json``) that :func:`rankwise.load` reads, or with
    ``export="dense"`` a plain Hugging Face checkpoint. It is written atomically: nothing appears at ``out`` unless
    the whole run succeeds.

    Args:
        path: a Hugging Face checkpoint directory with safetensors weights.
        config: the method config, as for :func:`compress_`.
        calibration: token ids ``(samples, seq_len)`` or batches.
        out: the output directory; refused if it exists unless ``overwrite``.
        tokenizer: saved alongside when given.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (or an alias such as ``"bf16"``) for weights and
            activations (default: the checkpoint's), or ``"auto"``: the checkpoint's, but float32 on a CPU for
            half-precision weights, stored in the checkpoint's dtype (:func:`rankwise.stream.compute_dtype`);
            covariances and decompositions stay in float64/float32.
        device: where each block runs (``"cuda"`` streams blocks through the GPU).
        export: ``"factored"`` or ``"dense"``.
        activation_mb: block-boundary activations (and, for a sequential paired fit, the current block's
            group inputs on the original stream) kept in memory before spilling to ``offload_dir``.
        offload_dir: where activations spill, and where a non-sequential run on a CPU keeps its scoring pass's
            per-block input covariances whatever ``activation_mb``; default a temporary directory beside ``out``.
        trust_remote_code: allow a checkpoint that ships its own model code (refused by default).
        ray: fan each block's factorisations out to Ray workers, as for :func:`compress_`.
        provenance: where the model came from, kept in ``rankwise.json`` (see :mod:`rankwise.io.provenance`).
        cache: a directory for calibration statistics, as for :func:`compress_`.
        save_dtype: the dtype the output stores (default: ``dtype`` when given, else the dtype the source's
            ``config.json`` declares, else the checkpoint's own).
        max_shard_size: the largest output shard (transformers' ``max_shard_size`` convention).
        extras: called with the temporary output directory before it is renamed into place (files of the
            caller's, inside the atomic write).
        verify: check ``path``'s files against its checksums when it has them (``SHA256SUMS``, a Hugging Face
            cache's blob names), before any block is read.

    Raises:
        ValueError: one line, for a damaged checkpoint (see :class:`~rankwise.stream.CheckpointSource`), an
            ``out`` that is, is inside or contains ``path``, or an ``out`` another run is writing.
    """
    if export not in ("factored", "dense"):
        raise ValueError(f"export must be 'factored' or 'dense', got {export!r}")
    refuse_overlap(out, path)
    source = CheckpointSource(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code, verify=verify)
    out = Path(out)
    offload = check_offload_dir(offload_dir if offload_dir is not None else out.absolute().parent)
    with (atomic_dir(out, overwrite) as tmp, ActivationStore(int(activation_mb * 2**20), offload) as store,
          _fan_out(ray) as mapper):
        asked = None if dtype == AUTO else parse_dtype(dtype)  # "auto" computes in float32 on CPU, stores as is
        stored = resolve_dtype(save_dtype, asked or source.declared_dtype or source.weights_dtype)
        sink = ShardSink(tmp, source.blocks_name, dtype=stored, export=export,
                         model_type=getattr(source.config, "model_type", ""), max_shard_size=max_shard_size)
        report = run(source, sink, config, calibration, filter_fn=filter_fn, batch_size=batch_size,
                     progress=progress, store=store, mapper=mapper,
                     cache=StatsCache(cache) if cache is not None else None, value_dtype=stored)
        sink.write_rest(source.rest_tensors())
        sink.finish(source.model, report, tokenizer, provenance)
        if extras is not None:
            extras(tmp)
    return report
