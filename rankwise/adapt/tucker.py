"""FLoRA-style Tucker adapters: the update of an N-mode weight is a small trainable core multiplied by one trainable
factor per mode, ``ΔW = s · G ×₁ U₁ ×₂ U₂ … ×_N U_N``.

A linear layer's ``(out, in)`` weight gives ``ΔW = s U₁ G U₂ᵀ`` with an ``r x r`` core; a ``Conv2d``'s
``(out, in, kh, kw)`` weight gives a 4-mode core ``(r₁, r₂, r₃, r₄)`` and factors ``(out, r₁)``, ``(in, r₂)``,
``(kh, r₃)``, ``(kw, r₄)``, so the spatial structure of the kernel is kept rather than flattened as LoRA's conv
adapter does (Conv1d and Conv3d likewise, with 3 and 5 modes). ``s = lora_alpha / r``.

Ranks: ``r`` (or ``rank_pattern``) is a cap applied to every mode, clamped to the mode's size (a 3 x 3 kernel's
spatial modes get rank ≤ 3); ``ranks`` gives every mode's rank exactly and a rank above its mode's size is an error.

Start: the core is zero and each factor has orthonormal columns (QR of a Gaussian drawn from a generator seeded by
``seed`` and the layer's name), so ``ΔW = 0`` and the adapted model starts equal to the base model, as LoRA's
``B = 0``.

Forward: a linear layer applies the factors in sequence (``x U₂ Gᵀ U₁ᵀ``). A conv layer either runs one conv with
the dense ``ΔW`` ("dense") or the factorised sequence of a 1x1 channel map ``U₂ᵀ``, a ``r₁ x r₂`` conv with the
spatial kernel ``G ×₃ U₃ ×₄ U₄`` (the base's stride, padding and dilation) and a 1x1 map ``U₁`` ("factorised");
"auto" picks the one with fewer multiply-adds per output position (``out·in·k`` against
``in·r₂·stride + r₁·r₂·k + out·r₁``, ``k`` the kernel's size), and always "dense" for a grouped conv.

Si et al. (2024), "FLoRA: Low-Rank Core Space for N-dimension", https://arxiv.org/abs/2405.14739
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

MAX_MODES = 5  # a Conv3d weight (out, in, kd, kh, kw)
CONV_PATHS = ("auto", "dense", "factorised")


@dataclass
class TuckerConfig(SeedConfig):
    """Tucker adapter: ``prod(ranks) + sum(size_i * rank_i)`` trainable parameters per adapted layer."""

    ranks: list[int] | None = field(default=None, metadata={
        "help": "every mode's rank, exactly (out, in, then the kernel's modes); a rank above its mode's size is an "
                "error. None: r, clamped to each mode's size"})
    lora_alpha: float = field(default=8.0, metadata={"help": "the update is scaled by lora_alpha / r"})
    seed: int = field(default=0, metadata={"help": "seed of the orthonormal factors (mixed with the layer's name)"})
    conv_path: str = field(default="auto", metadata={
        "help": "how a conv layer applies the update: dense (one conv with ΔW), factorised (1x1, core conv, 1x1) or "
                "auto (fewer multiply-adds)"})
    peft_name = "tucker"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lora_alpha > 0:
            raise ValueError(f"TuckerConfig.lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"TuckerConfig.seed must be an integer >= 0, got {self.seed!r}")
        if self.conv_path not in CONV_PATHS:
            raise ValueError(f"TuckerConfig.conv_path must be one of {', '.join(CONV_PATHS)}, got {self.conv_path!r}")
        if self.ranks is not None:
            self.ranks = list(self.ranks)
            if not 2 <= len(self.ranks) <= MAX_MODES or not all(isinstance(k, int) and k >= 1 for k in self.ranks):
                raise ValueError(f"TuckerConfig.ranks must be 2 to {MAX_MODES} integers >= 1 (one per mode of the "
                                 f"weight), got {self.ranks!r}")


def mode_ranks(shape: tuple[int, ...] | torch.Size, r: int, ranks: list[int] | None = None) -> tuple[int, ...]:
    """The core's shape for a weight of ``shape``: ``r`` clamped to every mode's size, or ``ranks`` checked.

    Raises:
        ValueError: ``ranks`` has the wrong length, or a rank above its mode's size (the error names the mode).
    """
    if ranks is None:
        return tuple(min(r, size) for size in shape)
    if len(ranks) != len(shape):
        raise ValueError(f"ranks {list(ranks)} give {len(ranks)} modes but the weight {tuple(shape)} has "
                         f"{len(shape)}: give one rank per mode (out, in, then the kernel's)")
    for mode, (rank, size) in enumerate(zip(ranks, shape, strict=True)):
        if rank > size:
            raise ValueError(f"ranks[{mode}] = {rank} exceeds mode {mode} of the weight {tuple(shape)} (size {size}); "
                             f"use 1 <= ranks[{mode}] <= {size}")
    return tuple(ranks)


def orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A ``(rows, cols)`` matrix with orthonormal columns (``cols <= rows``): QR of a Gaussian, signs fixed so the
    result is a function of the Gaussian alone (the Haar distribution)."""
    gauss = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(gauss)
    signs = torch.where(R.diagonal() < 0, -1.0, 1.0).to(Q.dtype)
    return (Q * signs).float()


def mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """``tensor ×_mode matrix``: contract ``tensor``'s ``mode`` (size ``R``) with ``matrix (I, R)``'s columns."""
    return torch.movedim(torch.tensordot(matrix, tensor, dims=([1], [mode])), 0, mode)


def tucker_to_tensor(core: torch.Tensor, factors: list[torch.Tensor], skip: tuple[int, ...] = ()) -> torch.Tensor:
    """``core ×₁ U₁ … ×_N U_N``, leaving the modes in ``skip`` uncontracted (at the core's size)."""
    out = core
    for mode, factor in enumerate(factors):
        if mode not in skip:
            out = mode_product(out, factor, mode)
    return out


class TuckerLayer(NDSeedLayer):
    adapter_layer_names = ("tucker_core", *(f"tucker_U{mode}" for mode in range(MAX_MODES)))
    other_param_names = ("tucker_scale",)

    def init_adapter(self, adapter_name: str, config: TuckerConfig, r: int, weight: torch.Tensor, *, key: str = "",
                     **kwargs: Any) -> None:
        shape = weight.shape
        if len(shape) > MAX_MODES:
            raise ValueError(f"tucker adapts weights of 2 to {MAX_MODES} modes, got {tuple(shape)}")
        ranks = mode_ranks(shape, r, config.ranks)
        generator = torch.Generator().manual_seed(config.seed + zlib.crc32(key.encode()))
        for mode, (size, rank) in enumerate(zip(shape, ranks, strict=True)):
            factor = orthonormal(size, rank, generator)  # (size, rank)
            getattr(self, f"tucker_U{mode}")[adapter_name] = nn.Parameter(factor.to(weight.device))
        self.tucker_core[adapter_name] = nn.Parameter(weight.new_zeros(ranks))
        self.tucker_scale[adapter_name] = weight.new_tensor(config.lora_alpha / r)
        self.__dict__.setdefault("tucker_conv_path", {})[adapter_name] = config.conv_path

    def factors(self, adapter_name: str) -> list[torch.Tensor]:
        """The ``(size_i, rank_i)`` factors, one per mode of the weight."""
        return [getattr(self, f"tucker_U{mode}")[adapter_name] for mode in range(self.tucker_core[adapter_name].ndim)]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        core = self.tucker_core[adapter_name]
        return self.tucker_scale[adapter_name] * tucker_to_tensor(core, self.factors(adapter_name))

    def delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        core, factors = self.tucker_core[adapter_name], self.factors(adapter_name)
        scale = self.tucker_scale[adapter_name]
        if not self.is_conv:
            h = nn.functional.linear(x, factors[1].T)  # (..., r_in)
            h = nn.functional.linear(h, core)  # (..., r_out)
            return scale * nn.functional.linear(h, factors[0])  # (..., out)
        if self.conv_path(adapter_name, x) == "dense":
            return self.apply_weight(x, self.get_delta_weight(adapter_name))
        channel = x.ndim - core.ndim + 1  # 1 for a batch, 0 for one unbatched sample
        h = torch.movedim(torch.movedim(x, channel, -1) @ factors[1], -1, channel)  # (B, r_in, *spatial)
        kernel = tucker_to_tensor(core, factors, skip=(0, 1))  # (r_out, r_in, *kernel)
        h = self.get_base_layer()._conv_forward(h, kernel, None)  # (B, r_out, *spatial_out)
        return scale * torch.movedim(torch.movedim(h, channel, -1) @ factors[0].T, -1, channel)  # (B, out, ...)

    def conv_path(self, adapter_name: str, x: torch.Tensor) -> str:
        """Which way the conv update is applied for ``adapter_name`` (see the module docstring)."""
        base = self.get_base_layer()
        chosen = self.tucker_conv_path[adapter_name]
        if base.groups != 1:
            return "dense"
        if chosen != "auto":
            return chosen
        r_out, r_in, *_ = self.tucker_core[adapter_name].shape
        out, n_in, *kernel = base.weight.shape
        k, stride = math.prod(kernel), math.prod(base.stride)
        dense = out * n_in * k
        factorised = n_in * r_in * stride + r_out * r_in * k + out * r_out
        return "factorised" if factorised < dense else "dense"

    def delta_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        U_out, U_in = self.factors(adapter_name)  # a linear (compressed) layer: two modes
        up = self.tucker_scale[adapter_name] * U_out @ self.tucker_core[adapter_name]  # (out, r_in)
        return up, U_in.T  # (out, r_in), (r_in, in)

    def merge_rank(self, adapter_name: str) -> int:
        return self.tucker_core[adapter_name].shape[1]


class TuckerModel(SeedModel):
    """Tucker adapters as a PEFT tuner: ``get_peft_model(model, TuckerConfig(r=..., target_modules=[...]))``;
    targets may be linear, conv (1-D, 2-D, 3-D) or compressed linear layers."""

    prefix = "tucker_"
    tuner_layer_cls = TuckerLayer

    def _layer_kwargs(self, config: TuckerConfig, current_key: str) -> dict[str, Any]:
        return {"key": current_key}


register("tucker", TuckerConfig, TuckerModel)
