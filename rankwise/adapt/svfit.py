"""SVFit: train only the top-``r`` singular values of each adapted weight.

``W = U_r diag(s) V_rᵀ + W_residual`` with ``U_r``, ``V_r`` and ``W_residual`` frozen and the ``r`` values ``s``
trainable, starting at the weight's own singular values (so the adapted model starts equal to the base model).
Stored as a delta on the untouched base weight: ``ΔW = U_r diag(s - s₀) V_rᵀ``, which is the same map and leaves
the base checkpoint unmodified, so a saved adapter applies to the original model.

Sun et al. (2024), "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values",
https://arxiv.org/abs/2409.05926
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rankwise.adapt._base import SeedConfig, SeedLayer, SeedModel
from rankwise.adapt._register import register
from rankwise.linalg import truncated_svd


@dataclass
class SVFitConfig(SeedConfig):
    """SVFit: ``r`` trainable singular values per adapted layer (``r`` parameters each)."""

    solver: str = field(default="exact", metadata={
        "help": "SVD solver of rankwise.linalg.truncated_svd for the top-r triplets: exact (the paper) or randomized"})
    peft_name = "svfit"


class SVFitLayer(SeedLayer):
    adapter_layer_names = ("svfit_s",)
    other_param_names = ("svfit_U", "svfit_Vh", "svfit_s0")

    def init_adapter(self, adapter_name: str, config: SVFitConfig, r: int, weight: torch.Tensor, **kwargs: Any
                     ) -> None:
        top = truncated_svd(weight, r, solver=config.solver)
        self.svfit_U[adapter_name] = top.U.contiguous()  # (out, r)
        self.svfit_Vh[adapter_name] = top.Vh.contiguous()  # (r, in)
        self.svfit_s0[adapter_name] = top.S.clone()
        self.svfit_s[adapter_name] = nn.Parameter(top.S.clone())

    def _scale(self, adapter_name: str) -> torch.Tensor:
        return self.svfit_s[adapter_name] - self.svfit_s0[adapter_name]  # (r,)

    def delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.linear(x, self.svfit_Vh[adapter_name]) * self._scale(adapter_name)  # (..., r)
        return nn.functional.linear(h, self.svfit_U[adapter_name])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return (self.svfit_U[adapter_name] * self._scale(adapter_name)) @ self.svfit_Vh[adapter_name]

    def delta_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.svfit_U[adapter_name] * self._scale(adapter_name), self.svfit_Vh[adapter_name]  # (out, r), (r, in)


class SVFitModel(SeedModel):
    """SVFit as a PEFT tuner: ``get_peft_model(model, SVFitConfig(r=...))``."""

    prefix = "svfit_"
    tuner_layer_cls = SVFitLayer


register("svfit", SVFitConfig, SVFitModel)
