"""``rankwise.json``: the manifest of a factored checkpoint, validated completely before any weight is read.

Every field is checked for type and range, module names for shape (dotted identifiers only, so nothing like
``../../x`` reaches a lookup), ranks against the matrix they factorise, ``model_class`` against the causal-LM classes
``transformers`` registers (never an arbitrary attribute of the package), and ``dtype`` against a fixed list. Each
violation is one ``ValueError`` line naming the file and the field. :func:`check_against_model` then checks the
modules against the architecture built from ``config.json``: each must exist and be a linear layer of the stated
shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.nn import is_linear_like, linear_weight

MANIFEST = "rankwise.json"
FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_FIELDS = ("format_version", "model_class", "dtype", "modules", "report", "provenance")
_MODULE_FIELDS = {"in_features": int, "out_features": int, "rank": int, "bias": bool}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_MAX_FEATURES = 2**24  # no linear layer in any released model has 16 M inputs or outputs; bounds allocations


@dataclass(frozen=True)
class ModuleSpec:
    """One factorised module: ``out_features x in_features`` as ``up (out, rank) @ down (rank, in)``."""

    in_features: int
    out_features: int
    rank: int
    bias: bool


@dataclass(frozen=True)
class Manifest:
    """A validated ``rankwise.json``."""

    model_class: str
    dtype: torch.dtype
    modules: dict[str, ModuleSpec]
    report: dict[str, Any] | None
    file: Path
    provenance: dict[str, Any] | None = None

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def causal_lm_classes() -> frozenset[str]:
    """Names of the causal-LM classes ``transformers`` registers for ``AutoModelForCausalLM``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return frozenset(names)


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate ``path/rankwise.json``; a one-line ``ValueError`` naming the file and field otherwise."""
    from rankwise.io.checkpoint import read_json

    file = Path(path) / MANIFEST
    return parse_manifest(read_json(file, MANIFEST), file)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_manifest(raw: Any, file: Path) -> Manifest:
    """Validate a parsed manifest (see the module docstring)."""

    def bad(field: str, message: str) -> ValueError:
        return ValueError(f"{file}: field {field!r} {message}")

    if not isinstance(raw, dict):
        raise ValueError(f"{file}: must hold a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise bad(unknown[0], f"is not a rankwise.json field (allowed: {', '.join(_FIELDS)})")
    for field in _FIELDS[:4]:
        if field not in raw:
            raise bad(field, "is missing")
    version = raw["format_version"]
    if not _int(version) or version != FORMAT_VERSION:
        raise bad("format_version", f"is {version!r}; this rankwise reads version {FORMAT_VERSION}")
    model_class = raw["model_class"]
    if not isinstance(model_class, str) or model_class not in causal_lm_classes():
        raise bad("model_class", f"is {model_class!r}: not a causal-LM class of transformers "
                  "(e.g. LlamaForCausalLM)")
    dtype = raw["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad("dtype", f"is {dtype!r}; allowed: {', '.join(DTYPES)}")
    modules = raw["modules"]
    if not isinstance(modules, dict):
        raise bad("modules", f"must be an object of module name -> spec, got {type(modules).__name__}")
    specs = {name: _module_spec(name, spec, bad) for name, spec in modules.items()}
    for optional in ("report", "provenance"):
        if raw.get(optional) is not None and not isinstance(raw[optional], dict):
            raise bad(optional, f"must be an object or null, got {type(raw[optional]).__name__}")
    return Manifest(model_class, DTYPES[dtype], specs, raw.get("report"), file, raw.get("provenance"))


def _module_spec(name: Any, spec: Any, bad) -> ModuleSpec:
    if not isinstance(name, str) or len(name) > 512 or not _NAME.fullmatch(name):
        raise bad("modules", f"has a key {name!r} that is not a dotted module name like model.layers.0.mlp.up_proj")
    where = f"modules.{name}"
    if not isinstance(spec, dict):
        raise bad(where, f"must be an object, got {type(spec).__name__}")
    extra = sorted(set(spec) - set(_MODULE_FIELDS))
    if extra:
        raise bad(f"{where}.{extra[0]}", f"is not a module field (allowed: {', '.join(_MODULE_FIELDS)})")
    for field, kind in _MODULE_FIELDS.items():
        value = spec.get(field)
        if field not in spec:
            raise bad(f"{where}.{field}", "is missing")
        if kind is bool and not isinstance(value, bool):
            raise bad(f"{where}.{field}", f"must be true or false, got {value!r}")
        if kind is int and (not _int(value) or not 1 <= value <= _MAX_FEATURES):
            raise bad(f"{where}.{field}", f"must be an integer in [1, {_MAX_FEATURES}], got {value!r}")
    m, n, r = spec["out_features"], spec["in_features"], spec["rank"]
    if r > min(m, n):
        raise bad(f"{where}.rank", f"is {r}, above min(out_features, in_features) = {min(m, n)}")
    return ModuleSpec(n, m, r, spec["bias"])


def check_against_model(manifest: Manifest, model: nn.Module) -> None:
    """Each manifest module must be a linear layer of ``model`` with the stated shape and bias."""
    for name, spec in manifest.modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{manifest.file}: module {name!r} does not exist in {type(model).__name__}") from None
        if not is_linear_like(module):
            raise ValueError(f"{manifest.file}: module {name!r} is a {type(module).__name__}, not a linear layer")
        out_features, in_features = linear_weight(module).shape
        if (in_features, out_features) != (spec.in_features, spec.out_features):
            raise ValueError(f"{manifest.file}: module {name!r} is {out_features} x {in_features} in the model but "
                             f"{spec.out_features} x {spec.in_features} in the manifest")
        if (module.bias is not None) != spec.bias:
            raise ValueError(f"{manifest.file}: module {name!r} bias is {spec.bias} in the manifest but "
                             f"{module.bias is not None} in the model")
