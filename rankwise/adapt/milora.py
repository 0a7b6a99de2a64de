"""MiLoRA: LoRA whose factors start at the weight's minor (smallest) ``r`` singular components.

With ``W = U Σ Vᵀ`` and the last ``r`` triplets ``U_min``, ``Σ_min``, ``V_min``: ``B₀ = U_min sqrt(Σ_min / s)``,
``A₀ = sqrt(Σ_min / s) V_minᵀ`` and the frozen principal part ``W - s B₀ A₀``, so ``s B₀ A₀`` is exactly the minor
matrix. ``s = lora_alpha / r`` with the division by ``s`` from PEFT's PiSSA init, which the authors' code copies
(their experiments use ``lora_alpha = r``, ``s = 1``, the default here). Stored as a delta on the untouched base
weight with ``B₀``, ``A₀`` kept as frozen buffers: ``ΔW = s (B A - B₀ A₀)``, the same map, so the adapted model
starts equal to the base model and a saved adapter applies to the original checkpoint.

Wang et al. (2024), "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient LLM Finetuning",
https://arxiv.org/abs/2406.09044
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rankwise.adapt._base import SeedConfig, SeedLayer, SeedModel
from rankwise.adapt._register import register
from rankwise.linalg import svd_flip


@dataclass
class MiLoRAConfig(SeedConfig):
    """MiLoRA: trainable ``B (out, r)`` and ``A (r, in)`` per adapted layer (``r (in + out)`` parameters each)."""

    lora_alpha: float | None = field(default=None, metadata={
        "help": "LoRA's alpha, the update is scaled by s = lora_alpha / r; None means r (s = 1, as in the paper)"})
    peft_name = "milora"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"MiLoRAConfig.lora_alpha must be > 0 or None, got {self.lora_alpha!r}")


def minor_components(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``r`` smallest singular triplets ``(U_min (m, r), S_min (r,), Vh_min (r, n))`` of ``weight``.

    Computed in float64 (the small singular values are the least accurate ones), signs fixed by ``svd_flip``,
    returned in ``weight``'s dtype.
    """
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    U_min, Vh_min = svd_flip(U[:, -r:], Vh[-r:])
    return U_min.to(weight.dtype), S[-r:].to(weight.dtype), Vh_min.to(weight.dtype)


class MiLoRALayer(SeedLayer):
    adapter_layer_names = ("milora_A", "milora_B")
    other_param_names = ("milora_A0", "milora_B0", "milora_scale")
    compressed_refusal = ("its minor singular values are zero (its rank is below min(out, in)), so both factors "
                       "would start at zero and never train; use lora or svfit there, or target dense layers")

    def init_adapter(self, adapter_name: str, config: MiLoRAConfig, r: int, weight: torch.Tensor, **kwargs: Any
                     ) -> None:
        scale = (r if config.lora_alpha is None else config.lora_alpha) / r
        U_min, S_min, Vh_min = minor_components(weight, r)
        root = (S_min / scale).sqrt()  # (r,)
        B0 = (U_min * root).contiguous()  # (out, r)
        A0 = (root[:, None] * Vh_min).contiguous()  # (r, in)
        self.milora_B0[adapter_name] = B0
        self.milora_A0[adapter_name] = A0
        self.milora_scale[adapter_name] = weight.new_tensor(scale)
        self.milora_B[adapter_name] = nn.Parameter(B0.clone())
        self.milora_A[adapter_name] = nn.Parameter(A0.clone())

    def delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        trained = nn.functional.linear(nn.functional.linear(x, self.milora_A[adapter_name]),  # (..., r) then (..., out)
                                       self.milora_B[adapter_name])
        initial = nn.functional.linear(nn.functional.linear(x, self.milora_A0[adapter_name]),
                                       self.milora_B0[adapter_name])
        return self.milora_scale[adapter_name] * (trained - initial)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        trained = self.milora_B[adapter_name] @ self.milora_A[adapter_name]  # (out, in)
        initial = self.milora_B0[adapter_name] @ self.milora_A0[adapter_name]
        return self.milora_scale[adapter_name] * (trained - initial)


class MiLoRAModel(SeedModel):
    """MiLoRA as a PEFT tuner: ``get_peft_model(model, MiLoRAConfig(r=...))``."""

    prefix = "milora_"
    tuner_layer_cls = MiLoRALayer


register("milora", MiLoRAConfig, MiLoRAModel)
