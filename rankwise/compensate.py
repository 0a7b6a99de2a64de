"""Compensate a compressed model with EoRA adapters: compute, merge, export as a PEFT LoRA adapter."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rankwise.calibrate import collect_stats
from rankwise.compress import relative_output_error
from rankwise.io.atomic import atomic_dir
from rankwise.linalg import LowRank
from rankwise.methods.eora import eora
from rankwise.nn import LowRankLinear, effective_weight, is_linear_like, linear_weight
from rankwise.targets import find_targets, set_submodule


@dataclass
class Compensation:
    """Per-layer rank-``rank`` adapters ``B A`` (``B = U S^1/2``, ``A = S^1/2 Vh``) and their effect on the
    calibration output error of each layer (relative to the original layer's output)."""

    rank: int
    adapters: dict[str, LowRank] = field(default_factory=dict)
    error_before: dict[str, float | None] = field(default_factory=dict)
    error_after: dict[str, float | None] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return sum(lr.num_params for lr in self.adapters.values())

    def summary(self) -> str:
        before = [e for e in self.error_before.values() if e is not None]
        after = [e for e in self.error_after.values() if e is not None]
        errs = (f"; mean relative output error {sum(before) / len(before):.4f} -> {sum(after) / len(after):.4f}"
                if before and after else "")
        return (f"EoRA rank {self.rank} on {len(self.adapters)} layers: +{self.num_params:,} parameters{errs}")


def check_compatible(base: nn.Module, compressed: nn.Module) -> None:
    """Raise ``ValueError`` if ``compressed`` was not made from a model shaped like ``base``."""
    for key in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size"):
        a, b = getattr(base.config, key, None), getattr(compressed.config, key, None)
        if a != b:
            raise ValueError(f"the compressed model does not match the base model: {key} is {b!r} vs {a!r}")


def _pairs(base: nn.Module, compressed: nn.Module) -> dict[str, tuple[torch.Tensor, nn.Module]]:
    pairs = {}
    for name, module in find_targets(base).items():
        try:
            other = compressed.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the compressed model does not match the base model: it has no layer {name}") from None
        if not (isinstance(other, LowRankLinear) or is_linear_like(other)):
            raise ValueError(f"layer {name} of the compressed model is a {type(other).__name__}, not a linear layer")
        W = linear_weight(module).detach()
        Wc = effective_weight(other).detach()
        if W.shape != Wc.shape:
            raise ValueError(f"the compressed model does not match the base model: layer {name} is "
                             f"{tuple(Wc.shape)} vs {tuple(W.shape)}")
        if not torch.equal(W, Wc.to(W.dtype)):
            pairs[name] = (W, other)
    return pairs


def compensate(base: nn.Module, compressed: nn.Module, calibration: torch.Tensor | Iterable[torch.Tensor],
               rank: int, *, batch_size: int = 4, progress: bool = True) -> Compensation:
    """EoRA adapters for every layer where ``compressed`` differs from ``base``.

    Statistics are taken from the compressed model's own inputs (what the layers see at inference).

    Raises:
        ValueError: the models do not match, no layer differs, or ``rank`` exceeds a layer's ``min(m, n)``.
    """
    check_compatible(base, compressed)
    pairs = _pairs(base, compressed)
    if not pairs:
        raise ValueError("the compressed model is identical to the base model: nothing to compensate")
    for name, (W, _) in pairs.items():
        if not 1 <= rank <= min(W.shape):
            raise ValueError(f"rank {rank} is larger than layer {name} allows: it must be between 1 and "
                             f"min(out, in) = {min(W.shape)}")
    stats = collect_stats(compressed, calibration, {n: m for n, (_, m) in pairs.items()}, kinds={"xxt"},
                          batch_size=batch_size, progress=progress)
    result = Compensation(rank)
    for name, (W, module) in pairs.items():
        Wc = effective_weight(module).detach()
        lr = eora(W, Wc, stats[name], rank)
        result.adapters[name] = lr
        result.error_before[name] = relative_output_error(W, Wc, stats[name])
        result.error_after[name] = relative_output_error(W, Wc + lr.to_dense().to(Wc.dtype), stats[name])
    return result


def merge_(model: nn.Module, compensation: Compensation) -> None:
    """Fold the adapters into ``model``: a ``LowRankLinear`` of rank ``k`` becomes rank ``k + r`` (exact), a dense
    layer gets ``B A`` added to its weight."""
    for name, lr in compensation.adapters.items():
        module = model.get_submodule(name)
        B, A = lr.factors()  # (out, r), (r, in)
        with torch.no_grad():
            if isinstance(module, LowRankLinear):
                merged = LowRankLinear(module.in_features, module.out_features, module.rank + lr.rank,
                                       module.bias is not None, device=module.up.device, dtype=module.up.dtype)
                merged.up.copy_(torch.cat((module.up, B.to(module.up.dtype)), dim=1))
                merged.down.copy_(torch.cat((module.down, A.to(module.down.dtype)), dim=0))
                if module.bias is not None:
                    merged.bias.copy_(module.bias)
                set_submodule(model, name, merged)
            else:
                linear_weight(module).add_((B @ A).to(module.weight.dtype))


def export_peft(compensation: Compensation, out: str | Path, *, base_model_name: str | None = None,
                overwrite: bool = False) -> Path:
    """Write a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``), ``lora_alpha = r``
    so the scaling is 1, loadable by ``peft.PeftModel.from_pretrained`` on the compressed model."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    r = compensation.rank
    config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=sorted(compensation.adapters), base_model_name_or_path=base_model_name)
    tensors = {}
    for name, lr in compensation.adapters.items():
        B, A = lr.factors()
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
    with atomic_dir(out, overwrite) as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return Path(out)


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """``PeftModel.from_pretrained``: rankwise's compressed layers are LoRA targets like ``nn.Linear`` once
    :mod:`rankwise.adapt.compressed` has hooked into PEFT (importing rankwise arranges it)."""
    from peft import PeftModel

    import rankwise.adapt.compressed  # noqa: F401 (the PEFT hooks, in case peft was imported before rankwise)

    return PeftModel.from_pretrained(model, str(adapter_dir))
