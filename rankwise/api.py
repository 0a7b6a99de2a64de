"""The one-call Python API: :func:`compress` does what ``rankwise compress`` does, with the same options and defaults.

It takes a model as the CLI does (``"smollm2"``, a directory, a ``.gguf`` file, a hub id) or as an object, reads and
windows the calibration text, compresses, writes ``out`` when given, and returns the model with its report, in the
shape of llm-compressor's ``oneshot`` and torchao's ``quantize_``::

    import rankwise

    result = rankwise.compress("smollm2", method="svd_llm", ratio=0.2, out="smol-02")
    result.model.generate(...)            # the compressed model, in memory
    print(result.report.summary())        # parameters kept and removed, bytes, time

The calibration-statistics cache behaves as in the CLI: on by default, in ``$RANKWISE_CALIBRATION_CACHE`` (default
``~/.cache/rankwise/calibration``); ``cache=False`` is ``--no-cache``. The low-level verb
:func:`rankwise.compress_` (a model object and a config) uses a cache only when given one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from rankwise.methods import CompressConfig
from rankwise.report import CompressionReport

DEFAULT_TARGETS = ("attn", "mlp")


@dataclass
class Compressed:
    """What :func:`compress` returns: the compressed model, its tokenizer, the report, and where it was saved."""

    model: nn.Module
    tokenizer: Any
    report: CompressionReport
    out: Path | None = None


def build_config(method: str = "svd_llm", ratio: float | None = 0.2, *, recipe: str | None = None,
                 bits: float | None = None, targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
                 allocation: str = "uniform", sequential: bool = False, update_u: bool = False,
                 anchored: bool = False, objective: str | None = None,
                 settings: dict[str, Any] | list[str] | None = None) -> CompressConfig:
    """The method config for these options, named as ``rankwise compress``'s: a ``method`` with its options, or a
    ``recipe`` (``"best"``, ``"svd_llm+loss+seq"``: then ``method`` and the option flags must keep their defaults),
    plus the method's own fields as ``settings`` (``{"anchor": 0.3}``, or the CLI's ``["anchor=0.3"]``).

    Raises:
        ValueError: one line naming the option, for an unknown method or field, a recipe combined with options it
            replaces, or an option the method does not have.
    """
    from rankwise.methods import config_class
    from rankwise.methods.recipes import parse_recipe, parse_settings

    if recipe is not None:
        given = [flag for flag, on in (("--method", method != "svd_llm"), ("--allocation", allocation != "uniform"),
                                       ("--sequential", sequential), ("--update-u", update_u),
                                       ("--anchored", anchored)) if on]
        if given:  # errors name the CLI's flags; the Python keywords are the same words
            raise ValueError(f"--recipe replaces {', '.join(given)}: give one or the other")
        base = parse_recipe(recipe, ratio, bits=bits)  # a named recipe may expand by budget
        config_cls = type(base)
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)
                  if f.init and f.name not in ("ratio", "bits", "targets")}
    else:
        config_cls = config_class(method)
        fields = {"allocation": allocation, "sequential": sequential, "update_u": update_u}
        if anchored:
            if "anchored" not in {f.name for f in dataclasses.fields(config_cls)}:
                raise ValueError(f"--anchored applies to svd_llm; {method} has no anchored fit")
            fields["anchored"] = True
    if isinstance(settings, dict):
        settings = [f"{k}={v}" for k, v in settings.items()]
    fields.update(parse_settings(config_cls, list(settings or [])))
    if objective is not None:
        if "objective" not in {f.name for f in dataclasses.fields(config_cls)}:
            raise ValueError(f"--objective applies to the low-rank methods ({', '.join(_objective_methods())}); "
                             f"{config_cls.name} has none")
        fields["objective"] = objective
    return config_cls(ratio=ratio, bits=bits, targets=tuple(targets), **fields)


def _objective_methods() -> list[str]:
    from rankwise.methods import config_class, method_names

    return [m for m in method_names() if "objective" in {f.name for f in dataclasses.fields(config_class(m))}]


def default_cache() -> Path:
    """Where the calibration statistics are cached by default: ``$RANKWISE_CALIBRATION_CACHE``, else
    ``~/.cache/rankwise/calibration`` (under ``$RANKWISE_CACHE``)."""
    import os

    from rankwise.io.models import cache_root

    return Path(os.environ.get("RANKWISE_CALIBRATION_CACHE") or cache_root() / "calibration").expanduser()


def _cache_dir(cache: bool | str | Path | None) -> Path | None:
    if cache is True:
        return default_cache()
    if cache is False or cache is None:
        return None
    return Path(cache).expanduser()


def compress(model: str | Path | nn.Module = "smollm2", method: str = "svd_llm", ratio: float | None = 0.2, *,
             recipe: str | None = None, bits: float | None = None, out: str | Path | None = None,
             text: str | Path | None = None, dataset: str | None = None, tokenizer: Any = None,
             targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS, allocation: str = "uniform",
             sequential: bool = False, update_u: bool = False, anchored: bool = False, objective: str | None = None,
             calib_samples: int = 32, seq_len: int = 256, batch_size: int = 4, dtype: str | None = "auto",
             device: str | None = None, export: str = "factored", overwrite: bool = False,
             cache: bool | str | Path | None = True, verify: bool = True, trust_remote_code: bool = False,
             progress: bool = True, calib_select: str = "first", calib_pool: int | None = None,
             **settings: Any) -> Compressed:
    """Compress ``model`` as ``rankwise compress`` does, with the same option names and defaults.

    Args:
        model: ``"smollm2"`` (the default model), a directory, a ``.gguf`` file, a hub id, or a model object
            (compressed in place; pass its ``tokenizer``).
        method, ratio, recipe, bits, targets, allocation, sequential, update_u, anchored, objective: the method and
            its budget, as :func:`build_config` reads them (``ratio`` is the fraction of targeted parameters
            removed).
        out: save the compressed model there (atomically; refused if it exists unless ``overwrite``). With a
            model given by name or path, this is exactly the CLI's job (a safetensors checkpoint is streamed block
            by block), and the saved directory is what is loaded back and returned.
        text: a text file to calibrate on (default: the standard library's pydoc topics), or ``dataset``, a
            Hugging Face ``datasets`` name; the first ``calib_samples`` windows of ``seq_len`` tokens are used.
        calib_select, calib_pool: which ``calib_samples`` windows calibrate: the first ones (``"first"``), or
            those chosen by ``"leverage"``, ``"sensitivity"`` or ``"volume"`` from the first ``calib_pool`` windows
            (default ``4 * calib_samples``; see :mod:`rankwise.calibrate.select`).
        tokenizer: needed with a model object (read from the model's directory otherwise).
        dtype: ``"auto"`` (as the CLI): the dtype the weights are stored in, computing half-precision weights in
            float32 on a CPU (:func:`rankwise.stream.compute_dtype`), the model returned and saved in its own
            dtype; or ``"float32"``, ``"bfloat16"``, ``"float16"`` (aliases ``fp32``, ``bf16``, ``fp16``) to convert;
            ``None`` computes in the stored dtype whatever the device.
        device: where blocks are compressed (default: ``"cpu"`` for a model given by name, where a model object
            already is).
        cache: ``True`` (the CLI's default cache, :func:`default_cache`), ``False``, or a directory.
        verify: check the input's checksums where it has them (see :mod:`rankwise.io.integrity`).
        settings: the method's own config fields, e.g. ``anchor=0.3`` (the CLI's ``--set anchor=0.3``).

    Returns:
        :class:`Compressed`: the model, its tokenizer, the report (also in ``out/rankwise.json``) and ``out``.

    Raises:
        ValueError: one line, for bad options, text or model (as the CLI's ``error:`` lines).
    """
    from rankwise.calibrate import load_text, split_windows
    from rankwise.calibrate.select import SelectConfig, check_pool, check_room, select_windows
    from rankwise.compression import compress_
    from rankwise.io import save
    from rankwise.stream import AUTO, compute_dtype, dtype_name, parse_dtype

    dtype = dtype_name(dtype)
    config = build_config(method, ratio, recipe=recipe, bits=bits, targets=targets, allocation=allocation,
                          sequential=sequential, update_u=update_u, anchored=anchored, objective=objective,
                          settings=settings)
    where = _cache_dir(cache)
    selecting = SelectConfig(calib_select)
    pool_size = check_pool(calib_samples, calib_pool, calib_select)
    if export not in ("factored", "dense"):
        raise ValueError(f"export must be 'factored' or 'dense', got {export!r}")
    if out is not None:
        from rankwise.io.atomic import check_output_dir

        check_output_dir(out, overwrite)  # before any work: a model object is changed in place
    if not isinstance(model, nn.Module):
        device = device or "cpu"
        from rankwise.compression.job import compress_model
        from rankwise.io.models import load_model

        if out is not None:
            report = compress_model(str(model), config, out, text=None if text is None else str(text),
                                    dataset=dataset, seq_len=seq_len, calib_samples=calib_samples,
                                    batch_size=batch_size, device=device, dtype=dtype, export=export,
                                    overwrite=overwrite, trust_remote_code=trust_remote_code, cache=where,
                                    progress=progress, verify=verify, calib_select=calib_select,
                                    calib_pool=calib_pool)
            loaded = load_model(out, device=device, trust_remote_code=trust_remote_code, verify=False)  # just written
            return Compressed(loaded.model, loaded.tokenizer, report, Path(out))
        raw = load_text(None if text is None else str(text), dataset=dataset)  # text errors before the model
        loaded = load_model(str(model), device=device, trust_remote_code=trust_remote_code, verify=verify,
                            dtype=None if dtype == AUTO else parse_dtype(dtype))
        model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
        if tokenizer is None:
            raise ValueError(f"{str(model)!r} has no tokenizer files: pass tokenizer= to cut the calibration text")
    else:
        if tokenizer is None:
            raise ValueError("a model object needs its tokenizer= to cut the calibration text into windows")
        raw = load_text(None if text is None else str(text), dataset=dataset)
    first = next(model.parameters())
    original = first.dtype
    stored = original if dtype == AUTO else dtype  # "auto" may compute in float32; it stores what it read
    compute = compute_dtype(dtype, original, device or first.device)
    ids = tokenizer(raw, return_tensors="pt", add_special_tokens=False).input_ids[0]
    check_room(ids.numel(), seq_len, pool_size, calib_select)
    calibration = split_windows(ids, seq_len, pool_size, 0)[0]
    if compute != original:
        model.to(compute)
    try:
        selection = None
        if calib_select != "first":
            selection = select_windows(model, calibration, calib_samples, selecting, targets=config.targets,
                                       batch_size=batch_size, progress=progress)
            calibration = calibration[selection.indices]
        report = compress_(model, config, calibration, batch_size=batch_size, cache=where, save_dtype=stored,
                           device=device, progress=progress)
        if selection is not None:
            report.notes.append(selection.describe())
    finally:
        if compute != original or dtype not in (None, AUTO):
            model.to(parse_dtype(stored) or original)  # returned in the dtype it came in (or was asked for)
    if out is not None:
        save(model, out, tokenizer=tokenizer, report=report, overwrite=overwrite, export=export, dtype=stored)
    return Compressed(model, tokenizer, report, None if out is None else Path(out))

