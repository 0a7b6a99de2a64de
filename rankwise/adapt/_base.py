"""What rankwise's PEFT tuners share: a config with PEFT's targeting fields, a layer that adds ``delta(x)`` to the
frozen base layer's output (with merge / unmerge), and a tuner model that builds one layer per target.

A tuner file then holds only its method: the config fields it adds, how the adapter is initialised from the base
weight, its forward contribution, its dense ``delta`` weight and that delta as factors. The base layer is an
``nn.Linear`` or a compressed layer (initialised from its ``dense_weight()``; merging into a ``LowRankLinear``
appends the delta's factors, so the merged layer stays factorised); a method that cannot adapt a compressed layer
says why in ``compressed_refusal``. Trainable tensors live in ``nn.ParameterDict``s
named in ``adapter_layer_names``; frozen ones (bases, initial values) in persistent ``BufferDict``s named in
``other_param_names``, so PEFT moves, saves and loads both and never makes a frozen one trainable.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from peft.config import PeftConfig
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import get_pattern_key
from torch import nn

from rankwise.adapt.compressed import append_factors, base_device_and_dtype, drop_factors
from rankwise.nn import CompressedLinear, effective_weight


@dataclass
class SeedConfig(PeftConfig):
    """Fields every rankwise tuner shares with PEFT's LoRA (same meaning, same matching rules)."""

    r: int = field(default=8, metadata={"help": "adapter rank"})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "module names (list: exact or suffix match) or a regex; 'all-linear' for every linear layer but the "
                "output layer; None: PEFT's LoRA defaults for the architecture"})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "modules never adapted"})
    rank_pattern: dict = field(default_factory=dict, metadata={"help": "module name or regex -> rank, overriding r"})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "only these layer indices"})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "name of the layer list"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "other modules trained and saved"})

    peft_name: ClassVar[str] = ""  # the registered name; PeftType member is its upper case
    adapts_compressed_layers: ClassVar[bool] = True  # "all-linear" includes compressed layers (the layer may refuse)

    def __post_init__(self) -> None:
        super().__post_init__()
        from peft.utils.peft_types import PeftType

        self.peft_type = PeftType[self.peft_name.upper()]
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"{type(self).__name__}.r must be an integer >= 1, got {self.r!r}")


class SeedLayer(nn.Module, BaseTunerLayer):
    """A frozen ``nn.Linear`` plus, per adapter, a method-specific ``delta(x)``; the tuner files subclass this."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    compressed_refusal: ClassVar[str | None] = None  # why the method cannot adapt a compressed layer; None: it can
    base_types: ClassVar[tuple[type, ...]] = (nn.Linear, CompressedLinear)  # the layers it adapts
    accepts: ClassVar[str] = "nn.Linear and compressed layers"  # the same, for the error message

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SeedConfig, r: int, **kwargs: Any) -> None:
        super().__init__()
        if not isinstance(base_layer, self.base_types):
            raise TypeError(f"{type(self).__name__} adapts {self.accepts} only, got {type(base_layer).__name__}")
        if isinstance(base_layer, CompressedLinear) and self.compressed_refusal is not None:
            raise ValueError(f"{config.peft_name} cannot adapt a compressed layer: {self.compressed_refusal}")
        if isinstance(base_layer, CompressedLinear) and base_layer.narrowed:
            raise ValueError(f"{config.peft_name} cannot adapt a {base_layer.kind} layer narrowed by structured "
                             "compression (modegpt); use plain LoRA (rankwise adapt --method lora)")
        self.base_layer = base_layer
        self.in_features, self.out_features = self.features(base_layer)
        self.r: dict[str, int] = {}
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict({}))
        for name in self.other_param_names:
            setattr(self, name, BufferDict({}, persistent=True))
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._appended: list[int] = []  # ranks appended to a LowRankLinear base by merge, in order
        self.target_name = ""  # the layer's name in the model, for messages (set by SeedModel)
        self.kwargs = kwargs
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, r, **kwargs)

    @staticmethod
    def features(base_layer: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)`` of the adapted layer."""
        return base_layer.in_features, base_layer.out_features

    # -- what a method defines --------------------------------------------------------------------------------------
    def init_adapter(self, adapter_name: str, config: SeedConfig, r: int, weight: torch.Tensor, **kwargs: Any
                     ) -> None:
        """Create the adapter's tensors from the ``(out, in)`` float32 base ``weight``."""
        raise NotImplementedError

    def delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to the output for input ``x`` (equal to ``x @ get_delta_weight().T``)."""
        raise NotImplementedError

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The ``(out, in)`` matrix the adapter adds to the base weight."""
        raise NotImplementedError

    def delta_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``get_delta_weight`` as ``(up (out, q), down (q, in))``, appended to a compressed base layer at merge."""
        raise NotImplementedError

    def merge_rank(self, adapter_name: str) -> int:
        """How much merging ``adapter_name`` grows a compressed base layer's rank (``q`` of ``delta_factors``)."""
        return self.r[adapter_name]

    # -- shared machinery -------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: SeedConfig, r: int, **kwargs: Any) -> None:
        limit = min(self.in_features, self.out_features)
        if r < 1 or r > limit:
            raise ValueError(f"rank {r} is not allowed for a {self.out_features} x {self.in_features} layer: use "
                             f"1 <= r <= {limit}")
        self.r[adapter_name] = r
        weight = effective_weight(self.get_base_layer())  # (out, in); a product for a LowRankLinear
        if weight.device.type == "meta":
            raise ValueError("cannot initialise a data-driven adapter on a meta-device weight; load the model first")
        with torch.no_grad():
            self.init_adapter(adapter_name, config, r, weight.detach().float(), **kwargs)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _owns(self, adapter_name: str) -> bool:
        return adapter_name in self.r

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device | None,
                                                                               torch.dtype | None]:
        return base_device_and_dtype(base_layer)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for name in check_adapters_to_merge(self, adapter_names):
            if not self._owns(name):
                continue
            base = self.get_base_layer()
            if isinstance(base, CompressedLinear):  # a LowRankLinear: rank k -> k + q, still factorised
                up, down = self.delta_factors(name)
                append_factors(base, up, down, safe=safe_merge, layer=self.target_name)
                self._appended.append(up.shape[1])
                self.merged_adapters.append(name)
                continue
            weight = base.weight
            delta = self.get_delta_weight(name).detach().to(weight.dtype)
            merged = weight.data + delta
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights; it is broken")
            weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("already unmerged; nothing to do", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            base = self.get_base_layer()
            if isinstance(base, CompressedLinear):  # exact: the appended factors are dropped
                drop_factors(base, self._appended.pop())
                continue
            weight = base.weight
            weight.data -= self.get_delta_weight(name).detach().to(weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if self._owns(name):
                result = result + self.delta(name, x.to(self._adapter_dtype(name))).to(result.dtype)
        return result

    def _adapter_dtype(self, adapter_name: str) -> torch.dtype:
        for group in self.adapter_layer_names:
            tensors = getattr(self, group)
            if adapter_name in tensors:
                return tensors[adapter_name].dtype
        return base_device_and_dtype(self.get_base_layer())[1]


class SeedModel(BaseTuner):
    """PEFT tuner building one ``layer_cls`` per targeted linear layer; subclasses set ``prefix`` and the classes."""

    prefix: str = ""
    tuner_layer_cls: type[SeedLayer] = SeedLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _layer_kwargs(self, config: SeedConfig, current_key: str) -> dict[str, Any]:
        """Extra per-layer arguments (e.g. statistics gathered before injection); none by default."""
        return {}

    def _create_and_replace(self, config: SeedConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **optional_kwargs: Any) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), current_key), config.r)
        kwargs = self._layer_kwargs(config, current_key)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config, r, **kwargs)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        try:
            new_module = self.tuner_layer_cls(base, adapter_name, config, r, **kwargs)
        except TypeError as err:  # a target that is not a linear layer (e.g. a whole MLP matched by name)
            raise ValueError(f"{current_key}: {err}") from None
        except ValueError as err:
            raise ValueError(f"{current_key}: {err}") from None
        new_module.target_name = current_key
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)
