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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.nn import is_linear_like, kind_class, linear_weight

MANIFEST = "rankwise.json"
FORMAT_VERSION = 2  # 2: layers in config.json's quantization_config; 1: layers in rankwise.json (still read)
QUANT_METHOD = "rankwise"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
"""Short names accepted wherever a dtype is named (PyTorch's and the anchors' spellings)."""
_FIELDS = ("format_version", "model_class", "dtype", "modules", "report", "provenance")
_MODULE_FIELDS = {"in_features": int, "out_features": int, "bias": bool}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_MAX_FEATURES = 2**24  # no linear layer in any released model has 16 M inputs or outputs; bounds allocations


@dataclass(frozen=True)
class ModuleSpec:
    """One compressed module: an ``out_features x in_features`` map stored as layer kind ``kind`` with the kind's
    own knobs ``params`` (for ``"lowrank"``: ``{"rank": r}``)."""

    in_features: int
    out_features: int
    bias: bool
    kind: str = "lowrank"
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int | None:
        """The rank of a low-rank kind, ``None`` for kinds without one."""
        return self.params.get("rank")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias, **self.params}

    def build(self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        """An empty layer of this kind and shape."""
        return kind_class(self.kind).from_spec(self.in_features, self.out_features, self.bias, self.params,
                                               device=device, dtype=dtype)


@dataclass(frozen=True)
class Manifest:
    """A validated ``rankwise.json`` (with, from format 2 on, the layers of ``config.json``'s
    ``quantization_config``)."""

    model_class: str
    dtype: torch.dtype
    modules: dict[str, ModuleSpec]
    report: dict[str, Any] | None
    file: Path
    provenance: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def modules_file(self) -> Path:
        """The file that lists the layers: ``config.json`` from format 2 on."""
        return self.file if self.format_version == 1 else self.file.parent / "config.json"


def causal_lm_classes() -> frozenset[str]:
    """Names of the causal-LM classes ``transformers`` registers for ``AutoModelForCausalLM``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return _class_names(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def model_classes() -> frozenset[str]:
    """The model classes a compressed directory may name: causal LMs, and encoders as base models (``BertModel``)
    or with a masked-LM head."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    return causal_lm_classes() | _class_names(MODEL_MAPPING_NAMES) | _class_names(MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def _class_names(mapping: Any) -> frozenset[str]:
    names: set[str] = set()
    for value in mapping.values():
        names.update([value] if isinstance(value, str) else value)
    return frozenset(names)


def read_manifest(path: str | Path) -> Manifest:
    """The validated manifest of a compressed directory; a one-line ``ValueError`` naming the file and field
    otherwise.

    Format 2 keeps the layers in ``config.json``'s ``quantization_config`` (what ``transformers`` reads) and the
    model class, dtype, report and provenance in ``rankwise.json``; a directory written by ``save_pretrained`` of a
    loaded compressed model has only the former, and the class and dtype come from ``config.json``. Format 1 kept
    everything in ``rankwise.json``.
    """
    from rankwise.io.checkpoint import read_json

    path = Path(path)
    file = path / MANIFEST
    if file.is_file():
        return parse_manifest(read_json(file, MANIFEST), file)
    config_file = path / "config.json"
    config = read_json(config_file, "config.json")
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if not is_rankwise_quantization(quant):
        raise ValueError(f"{path} is not a rankwise directory (no {MANIFEST}, and config.json has no rankwise "
                         "quantization_config)")
    architectures = config.get("architectures")
    raw = {"format_version": quant.get("format_version"),
           "model_class": architectures[0] if isinstance(architectures, list) and architectures else None,
           "dtype": config.get("dtype", config.get("torch_dtype")), "modules": None}
    return parse_manifest(raw, config_file, quant)


def is_rankwise_quantization(quant: Any) -> bool:
    return isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(file: Path):
    def bad(field: str, message: str) -> ValueError:
        return ValueError(f"{file}: field {field!r} {message}")

    return bad


def parse_manifest(raw: Any, file: Path, quant: Any = None) -> Manifest:
    """Validate a parsed manifest (see the module docstring); a format-2 manifest takes its layers from the
    ``quantization_config`` of the ``config.json`` beside it (``quant``, read here when not given)."""
    from rankwise.io.checkpoint import read_json

    bad = _bad(file)
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: must hold a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise bad(unknown[0], f"is not a rankwise.json field (allowed: {', '.join(_FIELDS)})")
    version = raw.get("format_version")
    if not _int(version) or version not in (1, FORMAT_VERSION):
        raise bad("format_version", f"is {version!r}; this rankwise reads versions 1 and {FORMAT_VERSION}")
    for name in ("model_class", "dtype") + (("modules",) if version == 1 else ()):
        if name not in raw:
            raise bad(name, "is missing")
    model_class = raw["model_class"]
    if not isinstance(model_class, str) or model_class not in model_classes():
        raise bad("model_class", f"is {model_class!r}: not a causal-LM or encoder class of transformers "
                  "(e.g. LlamaForCausalLM, BertModel)")
    dtype = raw["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad("dtype", f"is {dtype!r}; allowed: {', '.join(DTYPES)}")
    for optional in ("report", "provenance"):
        if raw.get(optional) is not None and not isinstance(raw[optional], dict):
            raise bad(optional, f"must be an object or null, got {type(raw[optional]).__name__}")
    if version == 1:
        specs = parse_modules(raw["modules"], bad)
    else:
        if raw.get("modules") is not None:
            raise bad("modules", "belongs in config.json's quantization_config from format 2 on")
        config_file = file.parent / "config.json"
        if quant is None:
            config = read_json(config_file, "config.json")
            quant = config.get("quantization_config") if isinstance(config, dict) else None
        specs = parse_quantization_config(quant, config_file)
    return Manifest(model_class, DTYPES[dtype], specs, raw.get("report"), file, raw.get("provenance"), version)


def parse_quantization_config(quant: Any, file: Path | str) -> dict[str, ModuleSpec]:
    """The layers of a ``quantization_config`` object (``quant_method: rankwise``), validated."""
    bad = _bad(Path(file))
    if not is_rankwise_quantization(quant):
        raise bad("quantization_config", f"must be an object with quant_method {QUANT_METHOD!r}")
    allowed = {"quant_method", "format_version", "modules"}
    extra = sorted(set(quant) - allowed)
    if extra:
        raise bad(f"quantization_config.{extra[0]}", f"is not a field (allowed: {', '.join(sorted(allowed))})")
    version = quant.get("format_version")
    if version != FORMAT_VERSION or not _int(version):
        raise bad("quantization_config.format_version", f"is {version!r}; this rankwise reads version "
                  f"{FORMAT_VERSION} (upgrade rankwise for a newer one)")
    return parse_modules(quant.get("modules"), bad, "quantization_config.modules")


def parse_modules(modules: Any, bad, where: str = "modules") -> dict[str, ModuleSpec]:
    if not isinstance(modules, dict):
        raise bad(where, f"must be an object of module name -> spec, got {type(modules).__name__}")
    specs = {name: _module_spec(name, spec, bad, where) for name, spec in modules.items()}
    full = {name: {**spec.to_json()} for name, spec in specs.items()}
    for kind in dict.fromkeys(spec.kind for spec in specs.values()):
        problem = kind_class(kind).check_together(full)
        if problem is not None:
            field_name, _, message = problem.partition(": ")
            raise bad(f"{where}.{field_name}", message)
    return specs


def _module_spec(name: Any, spec: Any, bad, where: str) -> ModuleSpec:
    if not isinstance(name, str) or len(name) > 512 or not _NAME.fullmatch(name):
        raise bad(where, f"has a key {name!r} that is not a dotted module name like model.layers.0.mlp.up_proj")
    where = f"{where}.{name}"
    if not isinstance(spec, dict):
        raise bad(where, f"must be an object, got {type(spec).__name__}")
    for field_name, kind in _MODULE_FIELDS.items():
        value = spec.get(field_name)
        if field_name not in spec:
            raise bad(f"{where}.{field_name}", "is missing")
        if kind is bool and not isinstance(value, bool):
            raise bad(f"{where}.{field_name}", f"must be true or false, got {value!r}")
        if kind is int and (not _int(value) or not 1 <= value <= _MAX_FEATURES):
            raise bad(f"{where}.{field_name}", f"must be an integer in [1, {_MAX_FEATURES}], got {value!r}")
    kind = spec.get("kind", "lowrank")  # format 1 had one kind and no field for it
    try:
        cls = kind_class(kind) if isinstance(kind, str) else kind_class(repr(kind))
    except ValueError as err:
        raise bad(f"{where}.kind", str(err)) from None
    params = {k: v for k, v in spec.items() if k not in _MODULE_FIELDS and k != "kind"}
    problem = cls.check_spec(spec["in_features"], spec["out_features"], params)
    if problem is not None:
        field_name, _, message = problem.partition(": ")
        raise bad(f"{where}.{field_name}", message)
    return ModuleSpec(spec["in_features"], spec["out_features"], spec["bias"], kind, params)


def check_against_model(manifest: Manifest, model: nn.Module) -> None:
    """Each manifest module must be a linear layer of ``model`` with the stated shape and bias."""
    check_specs_against_model(manifest.modules, model, manifest.modules_file)


def check_specs_against_model(specs: dict[str, ModuleSpec], model: nn.Module, file: Path | str) -> None:
    """Each listed module must be a linear layer of ``model`` with the stated shape and bias."""
    for name, spec in specs.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{file}: module {name!r} does not exist in {type(model).__name__}") from None
        if not is_linear_like(module):
            raise ValueError(f"{file}: module {name!r} is a {type(module).__name__}, not a linear layer")
        out_features, in_features = linear_weight(module).shape
        if (in_features, out_features) != (spec.in_features, spec.out_features):
            raise ValueError(f"{file}: module {name!r} is {out_features} x {in_features} in the model but "
                             f"{spec.out_features} x {spec.in_features} in the manifest")
        if (module.bias is not None) != spec.bias:
            raise ValueError(f"{file}: module {name!r} bias is {spec.bias} in the manifest but "
                             f"{module.bias is not None} in the model")
