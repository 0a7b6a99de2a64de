"""SNELL: sparse tuning with kernelized LoRA. Two low-rank factor sets are merged through a nonlinear kernel into a
high-rank ``(out, in)`` matrix, of which only the entries of largest magnitude survive ("competition among
weights"), so no index of tunable weights is stored.

The kernel is the authors' (their code's ``pathIntegrals``): with two groups ``h = 0, 1`` of factors
``A_h (out, r/2)`` and ``B_h (in, r/2)``, ``K[o, i] = c (‖A_0[o] - B_0[i]‖_p - ‖A_1[o] - B_1[i]‖_p)``, a difference of
distance kernels (piecewise linear for ``p = 1``; the authors' default, kept here, is ``p = 2``), whose matrix has full
rank in general where the inner product ``A Bᵀ`` has rank ``r``. ``r (out + in)`` parameters, LoRA's count at rank
``r``; ``r`` must be even.

Sparsification: the ``keep = round((1 - sparsity) · out · in)`` entries of largest ``|K|`` (chosen anew at every
forward from the current values, the mask held out of the gradient) are kept and the others zeroed:
``ΔW = K ⊙ M``, exactly ``keep`` entries selected. The authors' code multiplies the kept entries by their magnitude
as well (``K ⊙ |K| ⊙ M``); this follows the paper's description, ``K ⊙ M``.

Start (a deviation from the authors, whose two groups are drawn independently and so start with ``ΔW ≠ 0``): group
1 starts as a copy of group 0, so the two distance kernels cancel and ``ΔW = 0`` exactly; the groups get opposite
gradients and separate from the first step. Group 0 is Kaiming-uniform (as the authors' code) from a generator seeded
by ``seed`` and the layer's name. At ``ΔW = 0`` every entry ties; the first mask is then ``topk``'s choice among the
ties (deterministic for a given device), and the gradient flows through the kept entries into every factor row they
touch. A conv layer's weight is adapted as the ``(out, in / groups · kernel)`` matrix, as LoRA's conv adapter does.

Shen et al. (2024), "Expanding Sparse Tuning for Low Memory Usage", NeurIPS 2024, https://arxiv.org/abs/2411.01800
(code: https://github.com/ssfgunner/SNELL)
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rankwise.adapt._base import SeedConfig, SeedModel
from rankwise.adapt._nd import NDSeedLayer
from rankwise.adapt._register import register


@dataclass
class SNELLConfig(SeedConfig):
    """SNELL: ``r (out + in)`` trainable parameters per adapted layer, a ``1 - sparsity`` fraction of the merged
    update non-zero."""

    sparsity: float = field(default=0.9, metadata={
        "help": "fraction of the merged update's entries zeroed by the competition (the paper's s), in [0, 1)"})
    scaling: float = field(default=0.1, metadata={
        "help": "the kernel's coefficient c (the authors' 0.1); rankwise adapt --alpha A sets it to A / r"})
    norm_p: float = field(default=2.0, metadata={"help": "the distance kernels' p-norm (the authors' 2)"})
    seed: int = field(default=0, metadata={"help": "seed of the factors' init (mixed with the layer's name)"})
    peft_name = "snell"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r % 2:
            raise ValueError(f"SNELLConfig.r must be even (two kernel groups of r/2 columns), got {self.r!r}")
        for name in ("sparsity", "scaling", "norm_p"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"SNELLConfig.{name} must be finite, got {getattr(self, name)!r}")
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"SNELLConfig.sparsity must be in [0, 1), got {self.sparsity!r}")
        if not self.scaling > 0:
            raise ValueError(f"SNELLConfig.scaling must be > 0, got {self.scaling!r}")
        if not self.norm_p >= 1:
            raise ValueError(f"SNELLConfig.norm_p must be >= 1, got {self.norm_p!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"SNELLConfig.seed must be an integer >= 0, got {self.seed!r}")


def kernel_matrix(A: torch.Tensor, B: torch.Tensor, scaling: float, p: float = 2.0) -> torch.Tensor:
    """``c Σ_h (-1)^h ‖A_h[o] - B_h[i]‖_p`` for ``A (2, out, q)`` and ``B (2, in, q)``: the ``(out, in)`` merge."""
    dist = torch.cdist(A, B, p=p, compute_mode="donot_use_mm_for_euclid_dist")  # (2, out, in)
    return scaling * (dist[0] - dist[1])


def competition_mask(K: torch.Tensor, keep: int) -> torch.Tensor:
    """A boolean mask of ``K``'s shape selecting its ``keep`` entries of largest magnitude (ties: ``topk``'s pick)."""
    index = torch.topk(K.detach().abs().flatten(), keep, sorted=False).indices
    mask = torch.zeros(K.numel(), dtype=torch.bool, device=K.device)
    mask[index] = True
    return mask.view_as(K)


class SNELLLayer(NDSeedLayer):
    adapter_layer_names = ("snell_A", "snell_B")
    other_param_names = ()
    compressed_refusal = ("its update is a sparse high-rank matrix, with no low-rank factors to append to a factorised "
                          "layer; use tucker, lora, svfit, loldu or block_lora")

    def init_adapter(self, adapter_name: str, config: SNELLConfig, r: int, weight: torch.Tensor, *, key: str = "",
                     **kwargs: Any) -> None:
        if r % 2:
            raise ValueError(f"snell needs an even rank (two kernel groups of r/2 columns), got {r}")
        rows, cols = weight.shape[0], weight[0].numel()  # (out, in / groups · kernel)
        keep = round((1 - config.sparsity) * rows * cols)
        if keep < 1:
            raise ValueError(f"sparsity {config.sparsity} keeps no entry of a {rows} x {cols} update; use sparsity "
                             f"< {1 - 0.5 / (rows * cols):.6g}")
        q = r // 2
        generator = torch.Generator().manual_seed(config.seed + zlib.crc32(key.encode()))
        A = (torch.rand(rows, q, generator=generator) * 2 - 1) / math.sqrt(rows * q)  # Kaiming-uniform, a = √5
        B = (torch.rand(cols, q, generator=generator) * 2 - 1) / math.sqrt(cols * q)
        self.snell_A[adapter_name] = nn.Parameter(torch.stack([A, A]).to(weight.device))  # (2, out, q)
        self.snell_B[adapter_name] = nn.Parameter(torch.stack([B, B]).to(weight.device))  # (2, in, q)
        self.__dict__.setdefault("snell_settings", {})[adapter_name] = (config.scaling, config.norm_p, keep)

    def kernel(self, adapter_name: str) -> torch.Tensor:
        """The dense merged ``(out, in)`` matrix before sparsification."""
        scaling, p, _ = self.snell_settings[adapter_name]
        return kernel_matrix(self.snell_A[adapter_name], self.snell_B[adapter_name], scaling, p)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        K = self.kernel(adapter_name)  # (out, in)
        delta = K * competition_mask(K, self.snell_settings[adapter_name][2])
        return delta.view(self.base_weight().shape) if self.is_conv else delta

    def delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        return self.apply_weight(x, self.get_delta_weight(adapter_name))

    def delta_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise ValueError(f"snell cannot adapt a compressed layer: {self.compressed_refusal}")


class SNELLModel(SeedModel):
    """SNELL as a PEFT tuner: ``get_peft_model(model, SNELLConfig(r=..., sparsity=..., target_modules=[...]))``;
    targets may be linear or conv (1-D, 2-D, 3-D) layers."""

    prefix = "snell_"
    tuner_layer_cls = SNELLLayer

    def _layer_kwargs(self, config: SNELLConfig, current_key: str) -> dict[str, Any]:
        return {"key": current_key}


register("snell", SNELLConfig, SNELLModel)
