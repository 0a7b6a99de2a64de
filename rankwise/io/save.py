"""Save and reload compressed models in the transformers-native format.

A compressed directory is a Hugging Face checkpoint: ``config.json`` whose ``quantization_config`` lists every
compressed layer with its kind and spec (:mod:`rankwise.io.hf_quantizer`), safetensors shards by size
(:mod:`rankwise.io.shards`), and ``rankwise.json`` with the report and provenance. Nothing is pickled. It loads with
``AutoModelForCausalLM.from_pretrained`` once rankwise is imported, or with :func:`load`, which checks everything
first and then does exactly that.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise._errors import first_line, os_errors
from rankwise.io.atomic import atomic_dir
from rankwise.io.checkpoint import (
    SAFETENSORS_DTYPES,
    SafeOpen,
    check_model_dir,
    load_config,
    parameter_groups,
    weight_map,
)
from rankwise.io.integrity import check_finite_parameters, verify_dir
from rankwise.io.manifest import (
    DTYPE_ALIASES,
    DTYPES,
    FORMAT_VERSION,
    MANIFEST,
    Manifest,
    ModuleSpec,
    check_against_model,
    is_rankwise_quantization,
    model_classes,
    read_manifest,
)
from rankwise.io.shards import DEFAULT_MAX_SHARD_SIZE, ShardWriter
from rankwise.nn import compressed_modules, linear_weight
from rankwise.nn.narrow import restore_attentions_
from rankwise.targets import set_submodule


def module_specs(model: nn.Module) -> dict[str, ModuleSpec]:
    """The manifest entry of every compressed layer of ``model``."""
    out = {}
    for name, m in compressed_modules(model).items():
        spec = m.full_spec()
        out[name] = ModuleSpec(spec.pop("in_features"), spec.pop("out_features"), spec.pop("bias"),
                               spec.pop("kind"), spec)
    return out


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json`` describing ``model``'s compressed layers now."""
    from rankwise.io.hf_quantizer import RankwiseConfig

    return RankwiseConfig.from_specs(module_specs(model)).to_dict()


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared (tied) tensor stored once, under its first name (e.g. the input embedding).

    Empty tensors (the load guards of :mod:`rankwise.nn.kinds`) all share one address and are never deduplicated."""
    seen: set[tuple[int, torch.Size]] = set()
    out = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size(), t.shape)
        if t.numel() == 0 or key not in seen:
            seen.add(key)
            out[name] = t.detach().contiguous()
    return out


def is_compressed_dir(path: str | Path) -> bool:
    """A rankwise directory: ``rankwise.json``, or a ``config.json`` with a rankwise ``quantization_config``."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return True
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and is_rankwise_quantization(config.get("quantization_config"))


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype) -> torch.dtype:
    """``dtype`` as a torch dtype (names as in :data:`rankwise.io.manifest.DTYPES`, or their
    :data:`~rankwise.io.manifest.DTYPE_ALIASES`), or ``default``."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def save(model: nn.Module, out: str | Path, *, tokenizer: Any = None, report: Any = None, overwrite: bool = False,
         export: str = "factored", provenance: dict[str, Any] | None = None, dtype: str | torch.dtype | None = None,
         max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, extras: Callable[[Path], Any] | None = None) -> Path:
    """Write ``model`` to ``out`` atomically.

    Args:
        model: a Hugging Face model, possibly containing compressed layers (:class:`~rankwise.nn.CompressedLinear`).
        out: output directory; refused if it exists unless ``overwrite``.
        tokenizer: saved alongside when given.
        report: a :class:`~rankwise.report.CompressionReport` (or its dict) stored in the manifest.
        export: ``"factored"`` (compressed layers as they are; loads with ``from_pretrained`` after
            ``import rankwise``) or ``"dense"`` (a plain HF checkpoint: layers multiplied out).
        provenance: where the model came from (:func:`rankwise.io.provenance.provenance`), kept in the manifest.
        dtype: storage dtype of floating-point tensors (default: the model's); ``rankwise compress`` stores the
            source checkpoint's declared dtype, so pass it here to write the same bytes.
        max_shard_size: the largest safetensors shard (transformers' convention, e.g. ``"1GB"``).
        extras: called with the temporary directory before it is renamed into place, to add files of the
            caller's (e.g. an encoder's sentence-transformers configs) inside the atomic write.
    """
    if export not in ("factored", "dense"):
        raise ValueError(f"export must be 'factored' or 'dense', got {export!r}")
    dtype = resolve_dtype(dtype, next(model.parameters()).dtype)
    with atomic_dir(out, overwrite) as tmp:
        writer = ShardWriter(tmp, dtype=dtype, max_shard_size=max_shard_size)
        state = dense_state(model, getattr(model.config, "model_type", "")) if export == "dense" else \
            unique_state(model)
        with os_errors(out):  # a full disk is the OSError it is, naming the output, not a safetensors traceback
            writer.add(state.items())
            writer.finish()
        write_config(model, tmp, dtype, factored=export == "factored")
        if hasattr(report, "record_storage"):
            report.record_storage(tmp, dtype)
        if export == "factored":
            write_manifest(model, tmp, dtype, report, provenance)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extras is not None:
            extras(tmp)
    return Path(out)


def write_config(model: nn.Module, out: Path, dtype: torch.dtype, *, factored: bool) -> None:
    """``config.json`` (with the rankwise ``quantization_config`` when ``factored``) and ``generation_config.json``."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if factored:
        config.quantization_config = quantization_config(model)
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None and getattr(model, "can_generate", lambda: False)():
        model.generation_config.save_pretrained(out)


def write_manifest(model: nn.Module, out: Path, dtype: torch.dtype, report: Any = None,
                   provenance: dict[str, Any] | None = None) -> None:
    """Write ``rankwise.json``: the model class, dtype, the report and the provenance (the layers are in
    ``config.json``)."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "dtype": str(dtype).removeprefix("torch."),
        "report": report.to_dict() if hasattr(report, "to_dict") else report,
        "provenance": provenance,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


def dense_state(module: nn.Module, model_type: str = "") -> dict[str, torch.Tensor]:
    """``module``'s state dict with every compressed layer multiplied out into the dense ``weight`` a plain
    checkpoint expects (``(in, out)`` for GPT-2's ``Conv1D``)."""
    state = unique_state(module)
    for name, m in compressed_modules(module).items():
        prefix = f"{name}." if name else ""
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        weight = m.dense_weight().detach()  # (out, in)
        state[prefix + "weight"] = (weight.T if model_type == "gpt2" else weight).contiguous()
        bias = m.dense_bias()
        if bias is not None:
            state[prefix + "bias"] = bias.detach()
    return state


def densify_(model: nn.Module) -> nn.Module:
    """Replace every compressed layer of ``model`` by the dense layer it stands for (in place); returns ``model``."""
    for name, m in compressed_modules(model).items():
        bias = m.dense_bias()
        weight = m.dense_weight().detach()
        lin = nn.Linear(m.in_features, m.out_features, bias=bias is not None, device=weight.device,
                        dtype=weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(weight)
            if bias is not None:
                lin.bias.copy_(bias)
        set_submodule(model, name, _as_conv1d(lin) if _original_kind(model, name) == "Conv1D" else lin)
    restore_attentions_(model)  # narrowed attentions (MoDeGPT) back to their full head dimension
    return model


def _original_kind(model: nn.Module, name: str) -> str:
    """GPT-2 checkpoints expect Conv1D (``(in, out)`` weights) where the architecture has them."""
    return "Conv1D" if getattr(model.config, "model_type", "") == "gpt2" else "Linear"


def _as_conv1d(lin: nn.Linear) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(lin.out_features, lin.in_features).to(lin.weight.device, lin.weight.dtype)
    with torch.no_grad():
        linear_weight(conv).copy_(lin.weight)
        if lin.bias is not None:
            conv.bias.copy_(lin.bias)
    return conv


def load(path: str | Path, *, device: str | torch.device = "cpu", trust_remote_code: bool = False,
         device_map: str | dict[str, Any] | None = None, max_memory: dict[Any, Any] | None = None,
         offload_dir: str | Path | None = None, verify: bool = True) -> nn.Module:
    """Load a directory written by :func:`save` (factored format) as the same Hugging Face model class.

    Everything is checked before it is used: every file against the directory's ``SHA256SUMS`` (with ``verify``;
    a directory without one, e.g. from an older rankwise, is not checked), the manifest against its schema and the
    architecture, and the weights against the manifest (no tensor missing, none unexpected, each of the right
    shape and dtype, read from the safetensors headers), so a damaged directory raises a one-line ``ValueError``
    naming the file and never yields randomly initialised layers.

    Args:
        path: the directory.
        device: where the whole model is loaded (when ``device_map`` is ``None``).
        trust_remote_code: allow a model that ships its own code (refused by default).
        device_map: for models larger than memory, accelerate's placement (``"auto"`` or a module -> device dict);
            blocks that fit nowhere go to ``offload_dir`` on disk and are read back as they run.
        max_memory: accelerate's per-device limits for ``device_map="auto"``, e.g. ``{"cpu": "2GiB"}``.
        offload_dir: folder for disk-offloaded weights (required when anything is offloaded).
        verify: check the files' checksums first (:func:`rankwise.io.integrity.verify_dir`).
    """
    from accelerate import init_empty_weights

    path = Path(path)
    check_model_dir(path)
    if not is_compressed_dir(path):
        raise ValueError(f"{str(path)!r} is not a rankwise directory (no {MANIFEST}, no rankwise "
                         "quantization_config in config.json); load it with transformers")
    if verify:
        verify_dir(path)
    manifest = read_manifest(path)
    config = load_config(path, trust_remote_code)
    wmap = weight_map(path)
    with init_empty_weights(include_buffers=False):  # a skeleton on meta, to check the files against
        skeleton = _build(manifest, config, trust_remote_code)
        install_kinds(skeleton, manifest)
    skeleton.to(manifest.dtype)
    skeleton.tie_weights()
    _check_tensors(path, wmap, skeleton)
    del skeleton
    model = _from_pretrained(path, manifest, trust_remote_code, device, device_map, max_memory, offload_dir)
    check_finite_parameters(model, str(path))
    return model


def _from_pretrained(path: Path, manifest: Manifest, trust_remote_code: bool, device: str | torch.device,
                     device_map: Any, max_memory: Any, offload_dir: Any) -> nn.Module:
    """transformers' own loading, with the rankwise quantizer (format 1 directories name their layers in
    ``rankwise.json`` only: their quantization config is passed in)."""
    import transformers

    from rankwise.io.hf_quantizer import RankwiseConfig, register

    register()
    cls = getattr(transformers, manifest.model_class) if hasattr(transformers, manifest.model_class) else \
        transformers.AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": manifest.dtype, "trust_remote_code": trust_remote_code,
                              "output_loading_info": True}
    if manifest.format_version == 1:
        kwargs["quantization_config"] = RankwiseConfig.from_specs(manifest.modules)
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_dir)
    elif torch.device(device).type != "cpu":
        kwargs["device_map"] = {"": torch.device(device)}
    try:
        model, info = cls.from_pretrained(path, **kwargs)
    except (ValueError, RuntimeError, OSError, KeyError, TypeError) as err:  # placement, safetensors, config
        if device_map is not None:
            raise ValueError(f"could not place {path} with device_map={device_map!r}, max_memory={max_memory!r} "
                             f"({first_line(err)}); give more memory, or an offload_dir for what does not fit"
                             ) from None
        raise ValueError(f"could not load {path} ({first_line(err)})") from None
    guards = {f"{name}.weight" for name in manifest.modules}  # format 1 stored no load guards: nothing to read
    missing = sorted(set(info.get("missing_keys") or []) - (guards if manifest.format_version == 1 else set()))
    problems = [(kind, keys) for kind, keys in (("missing", missing),
                                                ("unexpected", sorted(info.get("unexpected_keys") or [])),
                                                ("mismatched", sorted(map(str, info.get("mismatched_keys") or []))))
                if keys]
    if problems:
        kind, keys = problems[0]
        raise ValueError(f"{path}: {len(keys)} {kind} tensors when loading (e.g. {keys[0]!r}); refusing the model")
    return model.eval()


def _check_tensors(path: Path, wmap: dict[str, str], model: nn.Module) -> None:
    """Compare the checkpoint's tensor names, shapes and dtypes (headers only) with the model's state; of the
    parameters sharing one tensor (tied embeddings), one name must be stored."""
    expected = model.state_dict(keep_vars=True)
    by_file: dict[str, list[str]] = {}
    for name, file in wmap.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with SafeOpen(path / file) as f:
            for name in names:
                if name not in expected:
                    raise ValueError(f"{path / file} holds tensor {name!r}, which {type(model).__name__} with the "
                                     f"manifest's factorised layers does not have")
                info, want = f.get_slice(name), expected[name]
                shape, dtype = tuple(info.get_shape()), SAFETENSORS_DTYPES.get(info.get_dtype())
                if shape != tuple(want.shape) or dtype != want.dtype:
                    raise ValueError(f"tensor {name!r} in {path / file} is {shape} {info.get_dtype()}, the model "
                                     f"needs {tuple(want.shape)} {str(want.dtype).removeprefix('torch.')}")
    missing = [names[0] for names in parameter_groups(model) if not any(n in wmap for n in names)]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensors its model needs, e.g. {missing[0]!r}")


def _build(manifest: Manifest, config: Any, trust_remote_code: bool) -> nn.Module:
    """An instance of the manifest's model class (from the allow-list, or the checkpoint's own code when
    trusted), checked to be what ``config.json`` describes."""
    import transformers

    if manifest.model_class in model_classes() and hasattr(transformers, manifest.model_class):
        cls = getattr(transformers, manifest.model_class)
        config_class = getattr(cls, "config_class", None)
        if config_class is not None and not isinstance(config, config_class):
            raise ValueError(f"{manifest.file}: model_class {manifest.model_class} needs a {config_class.__name__}, "
                             f"but config.json describes a {type(config).__name__}")
        try:
            model = cls(config)
        except (ValueError, TypeError, RuntimeError, KeyError, AttributeError) as err:
            raise ValueError(f"config.json beside {manifest.file} does not build a {manifest.model_class} "
                             f"({type(err).__name__}: {first_line(err)})") from None
    elif trust_remote_code:
        model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    else:
        raise ValueError(f"{manifest.file}: model_class {manifest.model_class!r} is not available in this "
                         "transformers")
    if type(model).__name__ != manifest.model_class:
        raise ValueError(f"{manifest.file}: model_class is {manifest.model_class!r}, the model built is "
                         f"{type(model).__name__}")
    return model


def install_kinds(model: nn.Module, manifest: Manifest) -> None:
    """Replace the modules the manifest lists by empty layers of their kinds (on the current device), after
    checking each is a linear layer of the stated shape."""
    check_against_model(manifest, model)
    for name, spec in manifest.modules.items():
        set_submodule(model, name, spec.build())
