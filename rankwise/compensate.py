"""Compensate a compressed model with EoRA adapters: compute, merge, export as a PEFT LoRA adapter.

EoRA: training-free compensation of a compressed model in the eigenspace of its input activations.
Liu et al., "EoRA: Training-free compensation for compressed LLM with eigenspace low-rank approximation", 2024,
https://arxiv.org/abs/2410.21271.

For each layer the residual ``dW = W - W_c`` is projected into the eigenspace of the input covariance
``X X^T = Q L Q^T`` (``dW Q L^1/2``), truncated to rank ``r`` by SVD and mapped back, giving ``B A`` with
``B = U_r S_r^1/2`` and ``A = S_r^1/2 V_r^T L^-1/2 Q^T``. This is the rank-r minimiser of ``||(dW - B A) X||_F``,
so it is computed with :func:`~rankwise.linalg.whitened_svd` (any square root of ``X X^T`` gives the same answer).
Not a compression method of its own: it adds ``r (m + n)`` parameters per layer on top of any compressed model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rankwise._errors import os_errors
from rankwise.calibrate import LayerStats, collect_stats
from rankwise.calibrate.stats import relative_output_error
from rankwise.io.atomic import atomic_dir
from rankwise.linalg import LowRank, whitened_svd
from rankwise.nn import CompressedLinear, effective_weight, is_linear_like, linear_weight
from rankwise.report import CompressionReport
from rankwise.targets import find_targets


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


def eora(original: torch.Tensor, compressed: torch.Tensor, stats: LayerStats, rank: int) -> LowRank:
    """Rank-``rank`` compensation ``B A ~= original - compressed`` in the activation eigenspace.

    Args:
        original: ``(out, in)`` weight of the uncompressed layer.
        compressed: ``(out, in)`` effective weight of the compressed (or quantised) layer.
        stats: input statistics of the layer (``X X^T``).
        rank: adapter rank, at most ``min(out, in)``.
    """
    if original.shape != compressed.shape:
        raise ValueError(f"original {tuple(original.shape)} and compressed {tuple(compressed.shape)} weights differ "
                         "in shape")
    m, n = original.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be between 1 and min(out, in) = {min(m, n)} for this layer, got {rank}")
    dtype = torch.float64 if torch.float64 in (original.dtype, compressed.dtype) else torch.float32
    delta = original.detach().to(dtype) - compressed.detach().to(dtype)
    lr = whitened_svd(delta, stats.whitening(), rank)
    return lr.to(original.dtype)


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
        if not (isinstance(other, CompressedLinear) or is_linear_like(other)):
            raise ValueError(f"layer {name} of the compressed model is a {type(other).__name__}, not a linear layer")
        if isinstance(other, CompressedLinear) and other.narrowed:
            raise ValueError(f"layer {name} is a {other.kind} layer narrowed to {other.io_shape[1]} x "
                             f"{other.io_shape[0]} (structured compression such as modegpt): EoRA adapts layers of "
                             "the original shape; train a PEFT LoRA adapter on it instead")
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
    """Fold the adapters into ``model``: a compressed layer that grows its rank (``LowRankLinear`` of rank ``k``, the
    ``lq`` kind) becomes rank ``k + r`` (exact), a dense layer gets ``B A`` added to its weight; other kinds are
    refused (export the adapters with :func:`export_peft` instead)."""
    from rankwise.adapt.compressed import append_factors

    for name, lr in compensation.adapters.items():
        module = model.get_submodule(name)
        B, A = lr.factors()  # (out, r), (r, in)
        with torch.no_grad():
            if isinstance(module, CompressedLinear):
                append_factors(module, B, A, layer=name, check_size=False)
            else:
                linear_weight(module).add_((B @ A).to(module.weight.dtype))


def merge_with_report(model: nn.Module, compensation: Compensation, source: str | Path) -> CompressionReport | None:
    """:func:`merge_`, then the compression report of the directory ``source`` the model was loaded from, with the
    merged layers' ranks, values and bytes as they are now and a note of the merge (``None`` when ``source`` holds
    no rankwise report, e.g. a dense model)."""
    from rankwise.io.manifest import read_manifest
    from rankwise.io.save import is_compressed_dir

    merge_(model, compensation)
    stored = read_manifest(source).report if is_compressed_dir(source) else None
    if not stored:
        return None
    report = CompressionReport.from_dict(stored)
    report.refresh(model)
    report.notes.append(f"EoRA compensation of rank {compensation.rank} merged into {len(compensation.adapters)} "
                        "layers (rankwise compensate --merge)")
    return report


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
        with os_errors(out):  # a full disk: an OSError naming the output, not safetensors' own error
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return Path(out)


def load_adapter(model: nn.Module, adapter_dir: str | Path, *, verify: bool = True) -> nn.Module:
    """``PeftModel.from_pretrained``: rankwise's compressed layers are LoRA targets like ``nn.Linear`` once
    :mod:`rankwise.adapt.compressed` has hooked into PEFT (importing rankwise arranges it). With ``verify``, the
    adapter directory is checked against its ``SHA256SUMS`` first (:func:`~rankwise.io.integrity.verify_dir`)."""
    from peft import PeftModel

    import rankwise.adapt.compressed  # noqa: F401 (the PEFT hooks, in case peft was imported before rankwise)
    from rankwise.io.integrity import verify_dir

    if verify and Path(adapter_dir).is_dir():
        verify_dir(adapter_dir)

    return PeftModel.from_pretrained(model, str(adapter_dir))
