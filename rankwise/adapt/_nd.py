"""The rankwise tuner layer for adapters whose update is a whole weight tensor, not only a matrix: besides
``nn.Linear`` and compressed layers it adapts ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``, whose update has the
conv weight's shape ``(out, in / groups, *kernel)`` and is applied as a conv with the base layer's stride, padding,
dilation, groups and padding mode. Merging adds that update to the conv weight (``SeedLayer.merge``).

It differs from :class:`~rankwise.adapt._base.SeedLayer` only in the layers it accepts (``base_types``) and in
leaving the rank check to the method (a Tucker adapter has one rank per mode of the weight).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.adapt._base import SeedConfig, SeedLayer
from rankwise.nn import CompressedLinear, effective_weight

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class NDSeedLayer(SeedLayer):
    """A frozen linear, compressed or conv layer plus, per adapter, a method-specific ``delta(x)``."""

    base_types = (nn.Linear, CompressedLinear, *CONVS)
    accepts = "nn.Linear, nn.Conv1d/2d/3d and compressed layers"

    @staticmethod
    def features(base_layer: nn.Module) -> tuple[int, int]:
        if isinstance(base_layer, CONVS):
            return base_layer.in_channels, base_layer.out_channels
        return base_layer.in_features, base_layer.out_features

    @property
    def is_conv(self) -> bool:
        return isinstance(self.get_base_layer(), CONVS)

    def base_weight(self) -> torch.Tensor:
        """The base layer's weight: ``(out, in)`` for a linear or compressed layer, the conv weight for a conv."""
        base = self.get_base_layer()
        return base.weight if isinstance(base, CONVS) else effective_weight(base)

    def update_layer(self, adapter_name: str, config: SeedConfig, r: int, **kwargs: Any) -> None:
        weight = self.base_weight()
        if weight.device.type == "meta":
            raise ValueError("cannot initialise an adapter on a meta-device weight; load the model first")
        self.r[adapter_name] = r
        with torch.no_grad():
            self.init_adapter(adapter_name, config, r, weight.detach().float(), **kwargs)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x`` through the base layer's operation with ``weight`` in place of its weight and no bias."""
        base = self.get_base_layer()
        if isinstance(base, CONVS):
            return base._conv_forward(x, weight.to(x.dtype), None)  # stride, padding (mode), dilation, groups
        return nn.functional.linear(x, weight.to(x.dtype))
