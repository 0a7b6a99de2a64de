"""Save and reload compressed models: ``model.safetensors`` + HF ``config.json`` + ``rankwise.json``.

``rankwise.json`` lists every factorised module with its rank; nothing is pickled. :func:`load` rebuilds the same
Hugging Face model class from the config, swaps in :class:`~rankwise.nn.LowRankLinear` layers of the saved ranks and
loads the tensors, so logits are identical to the in-memory compressed model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from rankwise._errors import first_line
from rankwise.io.atomic import atomic_dir
from rankwise.io.checkpoint import (
    SAFETENSORS_DTYPES,
    SafeOpen,
    check_model_dir,
    load_config,
    parameter_groups,
    weight_map,
)
from rankwise.io.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    Manifest,
    causal_lm_classes,
    check_against_model,
    read_manifest,
)
from rankwise.nn import LowRankLinear, linear_weight
from rankwise.targets import set_submodule


def _lowrank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared (tied) tensor stored once, under its first name (e.g. the input embedding)."""
    seen: set[tuple[int, torch.Size]] = set()
    out = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size(), t.shape)
        if key not in seen:
            seen.add(key)
            out[name] = t.detach().contiguous()
    return out


def is_compressed_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def save(model: nn.Module, out: str | Path, *, tokenizer: Any = None, report: Any = None, overwrite: bool = False,
         export: str = "factored", provenance: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``out`` atomically.

    Args:
        model: a Hugging Face model, possibly containing ``LowRankLinear`` layers.
        out: output directory; refused if it exists unless ``overwrite``.
        tokenizer: saved alongside when given.
        report: a :class:`~rankwise.report.CompressionReport` (or its dict) stored in the manifest.
        export: ``"factored"`` (rankwise format) or ``"dense"`` (a plain HF checkpoint: factors multiplied out,
            loadable by ``transformers`` alone).
        provenance: where the model came from (:func:`rankwise.io.provenance.provenance`), kept in the manifest.
    """
    if export not in ("factored", "dense"):
        raise ValueError(f"export must be 'factored' or 'dense', got {export!r}")
    with atomic_dir(out, overwrite) as tmp:
        if export == "dense":
            dense = _densified(model)
            dense.save_pretrained(tmp, safe_serialization=True)
        else:
            model.config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            save_file(unique_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            write_factored_metadata(model, tmp, next(model.parameters()).dtype, report, provenance)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def write_factored_metadata(model: nn.Module, out: Path, dtype: torch.dtype, report: Any = None,
                            provenance: dict[str, Any] | None = None) -> None:
    """Write ``rankwise.json``: the model class, dtype, every factorised module with its rank, the report and the
    provenance."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "dtype": str(dtype).removeprefix("torch."),
        "modules": {name: {"in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
                           "bias": m.bias is not None} for name, m in _lowrank_modules(model).items()},
        "report": report.to_dict() if hasattr(report, "to_dict") else report,
        "provenance": provenance,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


def dense_state(module: nn.Module, model_type: str = "") -> dict[str, torch.Tensor]:
    """``module``'s state dict with every ``LowRankLinear`` multiplied out into the dense ``weight`` a plain
    checkpoint expects (``(in, out)`` for GPT-2's ``Conv1D``)."""
    state = unique_state(module)
    for name, m in _lowrank_modules(module).items():
        prefix = f"{name}." if name else ""
        for key in ("up", "down"):
            state.pop(prefix + key)
        weight = m.dense_weight().detach()  # (out, in)
        state[prefix + "weight"] = (weight.T if model_type == "gpt2" else weight).contiguous()
    return state


def _densified(model: nn.Module) -> nn.Module:
    """A deep copy with every ``LowRankLinear`` multiplied back into an ``nn.Linear``."""
    import copy

    dense = copy.deepcopy(model)
    for name, m in _lowrank_modules(dense).items():
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.up.device,
                        dtype=m.up.dtype)
        with torch.no_grad():
            lin.weight.copy_(m.dense_weight())
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        original = _original_kind(dense, name)
        set_submodule(dense, name, _as_conv1d(lin) if original == "Conv1D" else lin)
    return dense


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
         offload_dir: str | Path | None = None) -> nn.Module:
    """Load a directory written by :func:`save` (factored format) as the same Hugging Face model class.

    Everything is checked before it is used: the manifest against its schema and the architecture, and the
    weights against the manifest (no tensor missing, none unexpected, each of the right shape and dtype, read from
    the safetensors headers), so a damaged directory raises a one-line ``ValueError`` naming the file and never
    yields randomly initialised layers.

    Args:
        path: the directory.
        device: where the whole model is loaded (when ``device_map`` is ``None``).
        trust_remote_code: allow a model that ships its own code (refused by default).
        device_map: for models larger than memory, accelerate's placement (``"auto"`` or a module -> device dict);
            blocks that fit nowhere go to ``offload_dir`` on disk and are read back as they run.
        max_memory: accelerate's per-device limits for ``device_map="auto"``, e.g. ``{"cpu": "2GiB"}``.
        offload_dir: folder for disk-offloaded weights (required when anything is offloaded).
    """
    from accelerate import init_empty_weights

    path = Path(path)
    check_model_dir(path)
    if not is_compressed_dir(path):
        raise ValueError(f"{str(path)!r} is not a rankwise directory (no {MANIFEST}); load it with transformers")
    manifest = read_manifest(path)
    config = load_config(path, trust_remote_code)
    wmap = weight_map(path)
    # Non-persistent buffers such as rotary frequencies are computed for real in both cases (never on meta).
    with init_empty_weights(include_buffers=False) if device_map is not None else torch.device(device):
        model = _build(manifest, config, trust_remote_code)
        install_lowrank(model, manifest)
    model.to(manifest.dtype)
    model.tie_weights()
    _check_tensors(path, wmap, model)
    if device_map is not None:
        from accelerate import load_checkpoint_and_dispatch

        try:
            return load_checkpoint_and_dispatch(
                model, str(path), device_map=device_map, max_memory=max_memory, offload_folder=offload_dir,
                no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []), dtype=manifest.dtype,
            ).eval()
        except (ValueError, RuntimeError, OSError) as err:  # accelerate's placement errors, and safetensors' own
            raise ValueError(f"could not place {path} with device_map={device_map!r}, max_memory={max_memory!r} "
                             f"({first_line(err)}); give more memory, or an offload_dir for what does not fit"
                             ) from None
    for file in sorted(set(wmap.values())):
        with SafeOpen(path / file, device) as f:
            state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
        model.load_state_dict(state, strict=False)
        del state
    model.tie_weights()  # tied tensors were stored once; this points their other names at them again
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
    """An instance of the manifest's causal-LM class (from the allow-list, or the checkpoint's own code when
    trusted), checked to be what ``config.json`` describes."""
    import transformers

    if manifest.model_class in causal_lm_classes() and hasattr(transformers, manifest.model_class):
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


def install_lowrank(model: nn.Module, manifest: Manifest) -> None:
    """Replace the modules the manifest lists by ``LowRankLinear`` of the saved ranks (on the current device),
    after checking each is a linear layer of the stated shape."""
    check_against_model(manifest, model)
    for name, spec in manifest.modules.items():
        set_submodule(model, name, LowRankLinear(spec.in_features, spec.out_features, spec.rank, spec.bias))
