"""The transformers-native side of the format: a quantization method named ``rankwise``.

A compressed directory's ``config.json`` carries ``"quantization_config": {"quant_method": "rankwise",
"format_version": 2, "modules": {name: {"kind": ..., "in_features": ..., "out_features": ..., "bias": ...,
<kind's knobs>}}}``. Once :func:`register` has run (importing ``rankwise`` arranges it, see :mod:`rankwise._hf_hook`),
``AutoModelForCausalLM.from_pretrained(dir)`` (``AutoModel`` for encoders) builds the architecture, the quantizer
swaps each listed ``nn.Linear`` for its layer kind before the weights are read, and transformers loads the factors,
with ``dtype``, ``device_map`` and disk offload working as for any model. ``save_pretrained`` of such a model writes
the same layout back. Without rankwise, transformers does not know the method and meets each layer's empty ``weight``
where a dense matrix belongs (:mod:`rankwise.nn.kinds`): a size-mismatch error, never random weights.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from rankwise.io.manifest import FORMAT_VERSION, QUANT_METHOD, ModuleSpec, parse_quantization_config
from rankwise.targets import set_submodule


class RankwiseConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a compressed model: every compressed layer with its kind and spec.

    Args:
        modules: module name -> layer entry (``ModuleSpec.to_json()``), validated on construction.
        format_version: the layout version; this rankwise reads and writes ``FORMAT_VERSION``.
    """

    def __init__(self, modules: dict[str, dict[str, Any]] | None = None, format_version: int = FORMAT_VERSION,
                 **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.modules = modules or {}
        if kwargs:
            raise ValueError(f"quantization_config field {next(iter(kwargs))!r} is not a rankwise field "
                             "(allowed: quant_method, format_version, modules)")
        self.specs  # noqa: B018 (validates now: a bad config fails when read, before any weight is)

    @property
    def specs(self) -> dict[str, ModuleSpec]:
        return parse_quantization_config(self.to_dict(), "quantization_config")

    @classmethod
    def from_specs(cls, specs: dict[str, ModuleSpec]) -> RankwiseConfig:
        return cls({name: spec.to_json() for name, spec in specs.items()})

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version, "modules": self.modules}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        fields = {k: v for k, v in config_dict.items() if k != "quant_method"}
        config = cls(**fields)
        return (config, kwargs) if return_unused_kwargs else config


class RankwiseQuantizer(HfQuantizer):
    """Replaces the listed linear layers by their compressed kinds on the empty model transformers builds."""

    requires_calibration = False

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        from rankwise.io.manifest import check_specs_against_model

        specs = self.quantization_config.specs
        check_specs_against_model(specs, model, "quantization_config")
        for name, spec in specs.items():
            old = model.get_submodule(name)
            layer = spec.build(device=old.weight.device, dtype=old.weight.dtype)
            set_submodule(model, name, layer)
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        from rankwise.nn.kinds import resolve_kinds

        resolve_kinds(model)  # layers that share a tensor stored once (a shared basis) link to it
        # The layers hold ordinary floating-point tensors: ``.float()``, ``.half()`` and training stay allowed
        # (transformers refuses them for models it marks as quantized).
        for module in model.modules():
            if getattr(module, "is_quantized", False):
                module.is_quantized = False
        return model

    def get_state_dict_and_metadata(self, model: Any) -> tuple[None, dict[str, Any]]:
        """Called by ``save_pretrained`` before it writes ``config.json``: the layer list is taken from the model as
        it is now (an adapter merged into the factors changes ranks)."""
        from rankwise.io.save import quantization_config

        self.quantization_config.modules = quantization_config(model)["modules"]
        return None, {}

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model: Any, dtype: Any = None) -> Any:
        from rankwise.io.save import densify_

        return densify_(model)


def attach(model: Any) -> Any:
    """Give a model compressed in memory what ``from_pretrained`` gives a loaded one: its ``quantization_config``
    and the quantizer, so that ``model.save_pretrained`` writes a directory that loads again (the layer list is
    taken when it saves). Returns ``model``."""
    from rankwise.io.save import quantization_config

    register()
    if not hasattr(model, "config"):
        return model
    config = RankwiseConfig.from_dict(quantization_config(model))
    model.config.quantization_config = config
    model.hf_quantizer = RankwiseQuantizer(config, pre_quantized=True)
    return model


def register() -> None:
    """Make ``rankwise`` a quantization method transformers knows (idempotent)."""
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return
    register_quantization_config(QUANT_METHOD)(RankwiseConfig)
    register_quantizer(QUANT_METHOD)(RankwiseQuantizer)
