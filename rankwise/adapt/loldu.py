"""LoLDU: train only ``r`` diagonal entries and one scale of an LDU factorisation of each adapted weight.

LU with partial pivoting gives ``W = P L D U`` (``L`` unit lower, ``D`` diagonal, ``U`` unit upper). The paper keeps
``P``, ``L[:, :r]`` and ``U[:r]`` frozen, trains the diagonal ``z`` (initialised to ``D[:r]``) and a scalar scale
``σ`` (initialised to ``lora_alpha / r``, the authors' code), and forms the residual so the model starts unchanged:
``W = (W - σ₀ P L_r diag(z₀) U_r) + σ P L_r diag(z) U_r``. Stored as a delta on the untouched base weight:
``ΔW = P L_r diag(σ z - σ₀ z₀) U_r``, with ``P L_r`` kept as one frozen ``(out, r)`` matrix (the rows of ``L_r``
in ``W``'s row order) rather than the ``out x out`` permutation.

Shi et al. (2024), "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient
Fine-Tuning", https://arxiv.org/abs/2410.13618
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rankwise.adapt._base import SeedConfig, SeedLayer, SeedModel
from rankwise.adapt._register import register


@dataclass
class LoLDUConfig(SeedConfig):
    """LoLDU: ``r + 1`` trainable parameters per adapted layer (the diagonal and the scale)."""

    lora_alpha: float = field(default=1.0, metadata={
        "help": "the trainable scale sigma starts at lora_alpha / r (the authors' code; its from_linear default is 1)"})
    peft_name = "loldu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lora_alpha > 0:
            raise ValueError(f"LoLDUConfig.lora_alpha must be > 0, got {self.lora_alpha!r}")


def ldu(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight = PL diag(d) U`` from LU with partial pivoting, computed in float64.

    Returns:
        ``PL`` (``(m, k)``, the unit lower factor with rows in ``weight``'s order), ``d`` (``(k,)``, the pivots) and
        ``U`` (``(k, n)``, unit upper), ``k = min(m, n)``, in ``weight``'s dtype. A zero pivot leaves its row of
        ``U`` unnormalised (it multiplies a zero entry of ``d``).
    """
    P, L, U = torch.linalg.lu(weight.double())  # weight = P L U
    d = U.diagonal()  # (k,)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    unit_upper = U / safe[:, None]  # (k, n)
    return (P @ L).to(weight.dtype), d.to(weight.dtype), unit_upper.to(weight.dtype)


class LoLDULayer(SeedLayer):
    adapter_layer_names = ("loldu_z", "loldu_sigma")
    other_param_names = ("loldu_L", "loldu_U", "loldu_z0", "loldu_sigma0")

    def init_adapter(self, adapter_name: str, config: LoLDUConfig, r: int, weight: torch.Tensor, **kwargs: Any
                     ) -> None:
        PL, d, U = ldu(weight)
        sigma0 = weight.new_tensor(config.lora_alpha / r)
        self.loldu_L[adapter_name] = PL[:, :r].contiguous()  # (out, r)
        self.loldu_U[adapter_name] = U[:r].contiguous()  # (r, in)
        self.loldu_z0[adapter_name] = d[:r].clone()
        self.loldu_sigma0[adapter_name] = sigma0
        self.loldu_z[adapter_name] = nn.Parameter(d[:r].clone())
        self.loldu_sigma[adapter_name] = nn.Parameter(sigma0.clone())

    def _scale(self, adapter_name: str) -> torch.Tensor:
        trained = self.loldu_sigma[adapter_name] * self.loldu_z[adapter_name]
        return trained - self.loldu_sigma0[adapter_name] * self.loldu_z0[adapter_name]  # (r,)

    def delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.linear(x, self.loldu_U[adapter_name]) * self._scale(adapter_name)  # (..., r)
        return nn.functional.linear(h, self.loldu_L[adapter_name])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return (self.loldu_L[adapter_name] * self._scale(adapter_name)) @ self.loldu_U[adapter_name]

    def delta_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loldu_L[adapter_name] * self._scale(adapter_name), self.loldu_U[adapter_name]  # (out, r), (r, in)


class LoLDUModel(SeedModel):
    """LoLDU as a PEFT tuner: ``get_peft_model(model, LoLDUConfig(r=...))``."""

    prefix = "loldu_"
    tuner_layer_cls = LoLDULayer


register("loldu", LoLDUConfig, LoLDUModel)
