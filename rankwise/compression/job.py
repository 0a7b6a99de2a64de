"""``compress_model``: the whole job of ``rankwise compress`` as one library call (text, model, calibration,
compression, provenance, atomic save), for a model name, a directory, a GGUF file or a hub id.

A safetensors checkpoint (the default model, a local directory, a hub id) is streamed block by block with
:func:`~rankwise.compression.compress_checkpoint`, so models larger than memory compress; other models are loaded whole
and compressed with :func:`~rankwise.compression.compress_`, then saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rankwise.methods import CompressConfig
from rankwise.report import CompressionReport


def compress_model(model: str, config: CompressConfig, out: str | Path, *, text: str | None = None,
                   dataset: str | None = None, seq_len: int = 256, calib_samples: int = 32, batch_size: int = 4,
                   device: str = "cpu", dtype: str | None = None, export: str = "factored", overwrite: bool = False,
                   activation_mb: float = 1024, offload_dir: str | Path | None = None,
                   trust_remote_code: bool = False, ray: str | None = None, cache: str | Path | None = None,
                   progress: bool = True, verify: bool = True, calib_select: str = "first",
                   calib_pool: int | None = None) -> CompressionReport:
    """Compress ``model`` with ``config``, calibrated on ``calib_samples`` windows of ``seq_len`` tokens of ``text``
    (a file; default: the standard library's pydoc topics) or of ``dataset``, and save it to ``out``.

    The windows are the first ``calib_samples`` (``calib_select="first"``), or chosen from the first ``calib_pool``
    windows (default ``4 * calib_samples``) by :func:`rankwise.calibrate.select.select_windows` (``leverage``,
    ``sensitivity`` or ``volume``): one extra no-grad pass of the model over the pool, block by block.

    Args:
        model: ``"smollm2"`` (the default model), a directory, a ``.gguf`` file or a hub id.
        config: a registered method config.
        out: the output directory, written atomically (refused if it exists unless ``overwrite``).
        dtype: weights and activations dtype (default: the checkpoint's); the output stores it, else the source's
            declared dtype. ``"auto"`` computes half-precision weights in float32 on a CPU and stores the
            checkpoint's dtype (:func:`rankwise.stream.compute_dtype`).
        export: ``"factored"`` (the compressed layers) or ``"dense"`` (a plain checkpoint of the same weights).
        cache: a directory for calibration statistics (see :mod:`rankwise.calibrate.cache`).
        verify: check the model's files against their checksums where it has them (``SHA256SUMS``, a Hugging Face
            cache's blob names) before any block is compressed.
        calib_select: ``first``, ``leverage``, ``sensitivity`` or ``volume``.
        calib_pool: windows from the start of the text to choose from (``calib_select`` other than ``first``).
        Others: as for :func:`~rankwise.compression.compress_checkpoint`.

    Returns:
        The report, also stored in ``out/rankwise.json``.
    """
    from rankwise.calibrate import load_text, split_windows
    from rankwise.calibrate.select import SelectConfig, check_pool, check_room, select_windows
    from rankwise.calibrate.text import DEFAULT_TEXT_NAME
    from rankwise.compression import compress_, compress_checkpoint
    from rankwise.io import save
    from rankwise.io.atomic import check_output_dir, claim, refuse_overlap
    from rankwise.io.models import checkpoint_dir, load_model, load_tokenizer, resolve
    from rankwise.io.provenance import provenance
    from rankwise.io.sentence import copy_sentence_files
    from rankwise.stream import compute_dtype, dtype_name
    from rankwise.stream.source import AUTO

    if export not in ("factored", "dense"):
        raise ValueError(f"export must be 'factored' or 'dense', got {export!r}")
    dtype = dtype_name(dtype)
    selecting = SelectConfig(calib_select)
    pool_size = check_pool(calib_samples, calib_pool, calib_select)
    check_output_dir(out, overwrite)  # fail before the slow part
    raw = load_text(text, dataset=dataset)  # the text's errors come before any model is read
    text_name = text or (f"dataset {dataset}" if dataset else DEFAULT_TEXT_NAME)
    path, _ = checkpoint_dir(model)
    source = path if path is not None else resolve(model)[0]
    for where in {str(p) for p in (source, model) if isinstance(p, Path) or Path(p).exists()}:
        refuse_overlap(out, where)  # the cached conversion and, for a .gguf input, the file itself

    def calibration_windows(tokenizer: Any) -> torch.Tensor:
        ids = tokenizer(raw, return_tensors="pt", add_special_tokens=False).input_ids[0]
        check_room(ids.numel(), seq_len, pool_size, calib_select)
        return split_windows(ids, seq_len, pool_size, 0)[0]

    notes: list[str] = []  # the selection, for the returned report

    def chosen(pool: torch.Tensor, model_or_source: Any) -> tuple[torch.Tensor, str]:
        """The calibration windows out of ``pool``, and the text's name with how they were chosen."""
        if calib_select == "first":
            return pool, text_name
        selection = select_windows(model_or_source, pool, calib_samples, selecting, targets=config.targets,
                                   batch_size=batch_size, progress=progress)
        notes.append(selection.describe())
        return pool[selection.indices], f"{text_name}; {selection.describe(timed=False)}"

    def sentence_files(tmp: Path) -> None:  # an encoder's sentence-transformers pooling and configs, kept as-is
        if isinstance(source, Path):
            copy_sentence_files(source, tmp)

    with claim(out):  # no other run writes OUT until this one is done
        if path is not None:
            tokenizer = load_tokenizer(path, trust_remote_code)
            calibration, described = calibration_windows(tokenizer), text_name
            if calib_select != "first":
                from rankwise.stream import CheckpointSource

                reader = CheckpointSource(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                          verify=verify)
                calibration, described = chosen(calibration, reader)
                del reader
            origin = provenance(model, source, config, described, tuple(calibration.shape))
            report = compress_checkpoint(path, config, calibration, out, tokenizer=tokenizer, dtype=dtype,
                                         device=device, export=export, overwrite=overwrite, batch_size=batch_size,
                                         activation_mb=activation_mb, offload_dir=offload_dir,
                                         trust_remote_code=trust_remote_code, ray=ray, provenance=origin,
                                         cache=cache, extras=sentence_files, progress=progress, verify=verify)
            report.notes.extend(notes)
            return report
        calibration = calibration_windows(load_tokenizer(resolve(model)[0], trust_remote_code))
        loaded = load_model(model, device=device, trust_remote_code=trust_remote_code, verify=verify)
        weights = next(loaded.model.parameters()).dtype
        stored = weights if dtype == AUTO else dtype  # "auto" may compute in float32 but stores as loaded
        loaded.model.to(compute_dtype(dtype, weights, device))
        calibration, described = chosen(calibration, loaded.model)
        report = compress_(loaded.model, config, calibration, batch_size=batch_size, activation_mb=activation_mb,
                           offload_dir=offload_dir, ray=ray, cache=cache, save_dtype=stored, progress=progress)
        report.notes.extend(notes)  # also in the saved report: the selection was made before compressing
        origin = provenance(model, source, config, described, tuple(calibration.shape))
        save(loaded.model, out, tokenizer=loaded.tokenizer, report=report, overwrite=overwrite, export=export,
             provenance=origin, dtype=stored, extras=sentence_files)
        return report
