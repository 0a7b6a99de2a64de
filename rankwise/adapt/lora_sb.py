"""LoRA-SB: a LoRA-XS adapter ``s B R A`` (frozen ``B``, ``A``; trainable ``r x r`` core ``R``) initialised from the
truncated SVD of an approximate first full fine-tuning step.

The update of Adam's first step is ``-η g / (|g| + ε) ≈ -η sign(g)``; the paper accumulates the gradient ``G`` of each
adapted weight over a few training samples and takes ``ΔW_avg = -η sign(G)``. With ``ΔW_avg ≈ U S Vᵀ`` truncated to
rank ``r``: ``B = U_r``, ``A = V_rᵀ`` and ``R₀ = S_r / s``, so ``s B R₀ A`` is the best rank-``r`` approximation of
``ΔW_avg`` whatever the scale ``s``, and ``B``, ``A`` have orthonormal columns / rows (with which, the paper shows,
``s`` needs no tuning).

Stored as a delta on the untouched base weight with ``R₀`` kept as a frozen buffer: ``ΔW = s B (R - R₀) A``, so the
adapted model starts equal to the base model (the same function as subtracting ``s B R₀ A`` from ``W``, as LoRA-GA
and PiSSA do, without modifying the checkpoint). The authors' released code leaves ``W`` as is, so their model starts
at ``W + s B R₀ A``, about one full fine-tuning step in; ``start_at_first_step=True`` does that (the frozen offset is
then 0 instead of ``R₀``).

The gradients come from :func:`preprocess_lora_sb` (the pattern of PEFT's ``preprocess_loraga``): it runs the user's
``train_step`` with gradients enabled on the targeted weights only and attaches the accumulated gradient to each
targeted module, where the layer reads (and drops) it. ``PeftModel.from_pretrained`` needs no gradients: a config read
from a saved adapter has ``from_saved=True`` and the layers are built as placeholders that the saved tensors fill.

Ponkshe et al. (2024), "Initialization using Update Approximation is a Silver Bullet for Extremely Efficient
Low-Rank Fine-Tuning", https://arxiv.org/abs/2411.19557
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch import nn

from rankwise.adapt._base import SeedConfig, SeedLayer, SeedModel
from rankwise.adapt._register import register
from rankwise.linalg import truncated_svd

GRAD_ATTR = "_rankwise_lora_sb_grad"  # where preprocess_lora_sb leaves each targeted module's accumulated gradient


@dataclass
class LoRASBConfig(SeedConfig):
    """LoRA-SB: an ``r x r`` trainable core per adapted layer (``r²`` parameters each), initialised from gradients."""

    scaling: float = field(default=1.0, metadata={
        "help": "s in ΔW = s B R A; R₀ = S_r / s makes the initial update independent of it (the paper: no tuning)"})
    init_lr: float = field(default=1e-4, metadata={
        "help": "η in the approximate first Adam step -η sign(G); sets only the size of R₀ (the training learning "
                "rate in the paper), so it matters only with start_at_first_step"})
    start_at_first_step: bool = field(default=False, metadata={
        "help": "False: the model starts equal to the base model (ΔW = s B (R - R₀) A); True: it starts at "
                "W + s B R₀ A, one approximate full fine-tuning step in, as the authors' code does"})
    solver: str = field(default="exact", metadata={
        "help": "SVD solver of rankwise.linalg.truncated_svd for the top-r triplets of ΔW_avg: exact or randomized"})
    from_saved: bool = field(default=False, metadata={
        "help": "set when the config is read from a saved adapter: layers are built as placeholders that the saved "
                "tensors overwrite, so no gradients are needed"})
    peft_name = "lora_sb"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.scaling > 0:
            raise ValueError(f"LoRASBConfig.scaling must be > 0, got {self.scaling!r}")
        if not self.init_lr > 0:
            raise ValueError(f"LoRASBConfig.init_lr must be > 0, got {self.init_lr!r}")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any
                        ) -> LoRASBConfig:
        """Read a saved adapter's config (as ``PeftModel.from_pretrained`` does), marked ``from_saved``."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config.from_saved = True
        return config


class LoRASBLayer(SeedLayer):
    adapter_layer_names = ("lora_sb_R",)
    other_param_names = ("lora_sb_B", "lora_sb_A", "lora_sb_R0", "lora_sb_scale")
    compressed_refusal = ("it starts from the gradient of a dense weight, which a compressed layer does not have; use "
                       "lora or svfit there, or target dense layers")

    def init_adapter(self, adapter_name: str, config: LoRASBConfig, r: int, weight: torch.Tensor,
                     grad: torch.Tensor | None = None, **kwargs: Any) -> None:
        if grad is None:
            if not (config.from_saved or config.inference_mode):
                raise ValueError("LoRA-SB is initialised from gradients but none is attached to this layer: run "
                                 "preprocess_lora_sb(model, config, train_step) before get_peft_model, or load a "
                                 "saved adapter with PeftModel.from_pretrained")
            B = weight.new_zeros(self.out_features, r)  # placeholders, overwritten by the saved state dict
            A = weight.new_zeros(r, self.in_features)
            R0 = weight.new_zeros(r, r)
        else:
            update = -config.init_lr * torch.sign(grad.to(device=weight.device, dtype=torch.float32))  # ΔW_avg
            top = truncated_svd(update, r, solver=config.solver)
            B, A = top.U.contiguous(), top.Vh.contiguous()  # (out, r), (r, in)
            R0 = torch.diag(top.S / config.scaling)  # (r, r)
        self.lora_sb_B[adapter_name] = B
        self.lora_sb_A[adapter_name] = A
        # the value of R at which the update vanishes: R₀ (start unchanged) or 0 (start one step in)
        self.lora_sb_R0[adapter_name] = torch.zeros_like(R0) if config.start_at_first_step else R0
        self.lora_sb_scale[adapter_name] = weight.new_tensor(config.scaling)
        self.lora_sb_R[adapter_name] = nn.Parameter(R0.clone())

    def _core(self, adapter_name: str) -> torch.Tensor:
        return self.lora_sb_scale[adapter_name] * (self.lora_sb_R[adapter_name] - self.lora_sb_R0[adapter_name])

    def delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.linear(x, self.lora_sb_A[adapter_name])  # (..., r)
        h = nn.functional.linear(h, self._core(adapter_name))  # (..., r)
        return nn.functional.linear(h, self.lora_sb_B[adapter_name])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.lora_sb_B[adapter_name] @ self._core(adapter_name) @ self.lora_sb_A[adapter_name]


class LoRASBModel(SeedModel):
    """LoRA-SB as a PEFT tuner: ``preprocess_lora_sb(model, config, step)`` then ``get_peft_model(model, config)``."""

    prefix = "lora_sb_"
    tuner_layer_cls = LoRASBLayer

    def _layer_kwargs(self, config: LoRASBConfig, current_key: str) -> dict[str, Any]:
        module = self.model.get_submodule(current_key)
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        grad = getattr(base, GRAD_ATTR, None)
        if grad is not None:
            delattr(base, GRAD_ATTR)  # consumed: the layer keeps only its rank-r factors
        return {"grad": grad}


def _targets(model: nn.Module, config: LoRASBConfig) -> list[tuple[str, nn.Linear]]:
    """The linear layers ``get_peft_model(model, config)`` will adapt (fills PEFT's default targets if unset)."""
    if config.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        defaults = LoRASBModel.target_module_mapping.get(model_type)
        if defaults is None:
            raise ValueError(f"no default target modules for model type {model_type!r}: set target_modules")
        config.target_modules = set(defaults)
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    matching = config
    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        get_output = getattr(model, "get_output_embeddings", None)
        output = get_output() if callable(get_output) else None  # PEFT's all-linear leaves the output layer out
        matching = replace(config, target_modules={name.rsplit(".", 1)[-1] for name, m in linears if m is not output})
    return [(name, module) for name, module in linears if check_target_module_exists(matching, name)]


def preprocess_lora_sb(model: nn.Module, config: LoRASBConfig, train_step: Callable[[], None]) -> None:
    """Accumulate the gradient of every targeted weight over ``train_step`` and attach it for LoRA-SB's init.

    Gradients are enabled on the targeted weights only (the rest of the model is frozen meanwhile), the model is in
    training mode during the call, and everything is restored afterwards. Call it before ``get_peft_model``.

    Args:
        model: the base model, before ``get_peft_model``.
        config: the LoRA-SB config that will be used (its ``target_modules`` is filled with PEFT's defaults if unset).
        train_step: runs forward and backward on a few training samples (the paper uses a small fraction of the
            training set); gradients accumulate across everything it does.

    Raises:
        ValueError: no layer is targeted, or ``train_step`` left a targeted weight without a gradient.
    """
    targets = _targets(model, config)
    if not targets:
        raise ValueError(f"no nn.Linear layer matches target_modules={config.target_modules!r}")
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    try:
        model.requires_grad_(False)
        for _, module in targets:
            module.weight.requires_grad_(True)
            module.weight.grad = None
        model.train()
        with torch.enable_grad():
            train_step()
        missing = [name for name, module in targets if module.weight.grad is None]
        if missing:
            raise ValueError(f"train_step left no gradient on {', '.join(missing)}: call backward on a loss that "
                             "depends on every targeted layer")
        for _, module in targets:
            setattr(module, GRAD_ATTR, module.weight.grad.detach())
    finally:
        for _, module in targets:
            module.weight.grad = None
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        model.train(was_training)


register("lora_sb", LoRASBConfig, LoRASBModel)
