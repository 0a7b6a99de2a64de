"""Block-shared LoRA: one down-projection ``A`` per layer type, shared by every transformer block; ``B`` per layer.

Layers of one type are those whose names agree once the block indices are replaced by ``*`` (every ``q_proj`` of
``model.layers.*.self_attn.q_proj`` is one type, and so is every ``down_proj``); each type has a single trainable
``A (r, in)``, each layer its own ``B (out, r)``: ``ΔW_i = s B_i A`` with ``s = lora_alpha / r``. ``B`` starts at zero,
so the adapted model starts equal to the base model; ``A`` is Kaiming-uniform (as LoRA's) drawn from a generator
seeded by ``seed`` and the layer type, so it is reproducible and differs between types. This is the "ShareA"
configuration of ShareLoRA, shared across the blocks of one layer type; Tied-LoRA ties both factors instead.

``A`` is one ``nn.Parameter``: it is registered (counted, saved and loaded) on the first layer of its type and the
other layers of that type use it through a reference to that layer's parameter dictionary, so PEFT's device and
dtype moves, which replace dictionary entries, keep it shared.

Song et al. (2024), "ShareLoRA: Parameter Efficient and Robust Large Language Model Fine-tuning via Shared Low-Rank
Adaptation", https://arxiv.org/abs/2406.10785; Renduchintala et al. (2023), "Tied-LoRA: Enhancing parameter
efficiency of LoRA with weight tying", https://arxiv.org/abs/2311.09578
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from rankwise.adapt._base import SeedConfig, SeedLayer, SeedModel
from rankwise.adapt._register import register


@dataclass
class BlockLoRAConfig(SeedConfig):
    """Block-shared LoRA: ``r x in`` parameters per layer type plus ``out x r`` per adapted layer."""

    lora_alpha: float = field(default=8.0, metadata={
        "help": "LoRA's alpha: the update is scaled by lora_alpha / r (PEFT's LoRA default 8)"})
    seed: int = field(default=0, metadata={
        "help": "seed of the shared down-projections' Kaiming-uniform init (mixed with the layer type's name)"})
    peft_name = "block_lora"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lora_alpha > 0:
            raise ValueError(f"BlockLoRAConfig.lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"BlockLoRAConfig.seed must be an integer >= 0, got {self.seed!r}")


def layer_type(module_name: str) -> str:
    """The module name with its block indices replaced by ``*``.

    ``model.layers.3.mlp.up_proj`` -> ``model.layers.*.mlp.up_proj``; encoder and decoder layers stay distinct.
    """
    return ".".join("*" if part.isdigit() else part for part in module_name.split("."))


class SharedDown:
    """Where the layers of one type find their shared ``A``: the first layer's parameter dictionary, per adapter."""

    def __init__(self, name: str, first: str, in_features: int) -> None:
        self.name = name  # the layer type
        self.first = first  # the first layer of the type, which registers A
        self.in_features = in_features
        self.homes: dict[str, nn.ParameterDict] = {}  # adapter -> ParameterDict holding that adapter's A


class BlockLoRALayer(SeedLayer):
    adapter_layer_names = ("block_lora_B", "block_lora_A")
    other_param_names = ("block_lora_scale",)

    def init_adapter(self, adapter_name: str, config: BlockLoRAConfig, r: int, weight: torch.Tensor,
                     *, shared: SharedDown, **kwargs: Any) -> None:
        home = shared.homes.get(adapter_name)
        if home is None or adapter_name not in home:  # the first layer of its type: create and register A here
            A = torch.empty(r, self.in_features)
            generator = torch.Generator().manual_seed(config.seed + zlib.crc32(shared.name.encode()))
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
            self.block_lora_A[adapter_name] = nn.Parameter(A.to(weight.device))
            shared.homes[adapter_name] = self.block_lora_A
        elif home[adapter_name].shape[0] != r:
            raise ValueError(f"rank {r} differs from the rank {home[adapter_name].shape[0]} of {shared.first}, which "
                             f"shares its down-projection: give every {shared.name} the same rank")
        # a plain dict, so the first layer's ParameterDict is referenced here, not registered a second time
        self.__dict__.setdefault("block_lora_down", {})[adapter_name] = shared.homes[adapter_name]
        self.block_lora_B[adapter_name] = nn.Parameter(weight.new_zeros(self.out_features, r))
        self.block_lora_scale[adapter_name] = weight.new_tensor(config.lora_alpha / r)

    def shared_down(self, adapter_name: str) -> nn.Parameter:
        """The ``(r, in)`` down-projection this layer shares with the other layers of its type."""
        return self.block_lora_down[adapter_name][adapter_name]

    def delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        # a no-op unless the blocks of one type sit on several devices
        A = self.shared_down(adapter_name).to(device=x.device, dtype=x.dtype)  # (r, in)
        h = nn.functional.linear(x, A)  # (..., r)
        return self.block_lora_scale[adapter_name] * nn.functional.linear(h, self.block_lora_B[adapter_name])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        B = self.block_lora_B[adapter_name]
        return self.block_lora_scale[adapter_name] * (B @ self.shared_down(adapter_name).to(B))

    def delta_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        B = self.block_lora_B[adapter_name]  # (out, r)
        return self.block_lora_scale[adapter_name] * B, self.shared_down(adapter_name).to(B)


class BlockLoRAModel(SeedModel):
    """Block-shared LoRA as a PEFT tuner: ``get_peft_model(model, BlockLoRAConfig(r=...))``."""

    prefix = "block_lora_"
    tuner_layer_cls = BlockLoRALayer

    def _layer_kwargs(self, config: BlockLoRAConfig, current_key: str) -> dict[str, Any]:
        module = self.model.get_submodule(current_key)
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        in_features = getattr(base, "in_features", None)
        groups: dict[str, SharedDown] = self.__dict__.setdefault("_block_lora_groups", {})
        name = layer_type(current_key)
        shared = groups.setdefault(name, SharedDown(name, current_key, in_features))
        if in_features != shared.in_features:
            raise ValueError(f"{current_key} has in_features {in_features} but {shared.first} has "
                             f"{shared.in_features}: layers of type {name} share one down-projection and need equal "
                             "in_features")
        return {"shared": shared}


register("block_lora", BlockLoRAConfig, BlockLoRAModel)
