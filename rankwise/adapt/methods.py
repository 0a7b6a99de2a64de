"""Every adapter ``rankwise adapt`` offers, by name: PEFT's own initialisations (used through PEFT, never
re-implemented) and rankwise's tuners, with the data-driven pre-passes they need run for the user.

=============  ====================================================  ===========================================
name           what                                                   pre-pass on the training data
=============  ====================================================  ===========================================
lora           PEFT LoRA, default init (B = 0)                        none
pissa          PEFT LoRA from the principal singular triplets          none
olora          PEFT LoRA from a QR of the weight                       none
dora           PEFT DoRA (magnitude + direction)                       none
randlora       PEFT RandLoRA (random bases, trained scales)            none
eva            PEFT LoRA from SVDs of layer activations (EVA)          activations
corda          PEFT LoRA from covariance-oriented SVD (CorDA, IPM)     activations
lora_ga        PEFT LoRA aligned with the full gradient (LoRA-GA)      gradients
lora_sb        rankwise LoRA-SB (trainable r x r core)                 gradients
svfit          rankwise SVFit (top-r singular values)                  none
loldu          rankwise LoLDU (LDU diagonal + scale)                   none
block_lora     rankwise down-projections shared across blocks          none
milora         rankwise LoRA from the minor singular triplets          none
tucker         rankwise FLoRA Tucker core + factor per mode (N-D)      none
snell          rankwise SNELL kernel merge, top magnitudes kept        none
=============  ====================================================  ===========================================

On a compressed model the targets include the compressed layers (``CompressedLinear``): ``lora``, ``svfit``, ``loldu``,
``block_lora`` and ``tucker`` adapt them (merging keeps them factorised, rank ``k`` -> ``k + r``); the methods that
rewrite or decompose the dense weight, start from its gradient or (snell) make it sparse and high-rank, refuse them
with a one-line error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, PeftConfig, RandLoraConfig
from torch import nn

from rankwise.adapt.block_lora import BlockLoRAConfig
from rankwise.adapt.loldu import LoLDUConfig
from rankwise.adapt.lora_sb import LoRASBConfig, preprocess_lora_sb
from rankwise.adapt.milora import MiLoRAConfig
from rankwise.adapt.snell import SNELLConfig
from rankwise.adapt.svfit import SVFitConfig
from rankwise.adapt.train import causal_lm_loss
from rankwise.adapt.tucker import TuckerConfig
from rankwise.nn import CompressedLinear


@dataclass(frozen=True)
class AdapterMethod:
    """One adapter: how its PEFT config is built and which pre-pass (if any) needs training data."""

    name: str
    build: Callable[[int, float | None, Any, int], PeftConfig]  # (rank, alpha, target_modules, seed) -> config
    prepass: str | None = None  # None, "activations" or "gradients"
    changes_base: bool = False  # PiSSA/OLoRA/CorDA/LoRA-GA rewrite the base weights; saved adapters are converted
    rankwise_tuner: bool = False  # a rankwise tuner: loading its saved adapter needs ``import rankwise.adapt`` first
    compressed: bool = False  # adapts compressed (CompressedLinear) layers too


def _lora(init: Any = True, **extra: Any) -> Callable[[int, float | None, Any, int], PeftConfig]:
    def build(rank: int, alpha: float | None, targets: Any, seed: int) -> PeftConfig:
        return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets,
                          init_lora_weights=init, task_type="CAUSAL_LM", **extra)

    return build


def _corda(rank: int, alpha: float | None, targets: Any, seed: int) -> PeftConfig:
    from peft.tuners.lora.config import CordaConfig

    return _lora("corda", corda_config=CordaConfig(corda_method="ipm"))(rank, alpha, targets, seed)


def _eva(rank: int, alpha: float | None, targets: Any, seed: int) -> PeftConfig:
    from peft import EvaConfig

    return _lora("eva", eva_config=EvaConfig())(rank, alpha, targets, seed)


def _lora_ga(rank: int, alpha: float | None, targets: Any, seed: int) -> PeftConfig:
    from peft.tuners.lora.config import LoraGAConfig

    return _lora("lora_ga", lora_ga_config=LoraGAConfig())(rank, alpha, targets, seed)


def _randlora(rank: int, alpha: float | None, targets: Any, seed: int) -> PeftConfig:
    return RandLoraConfig(r=rank, target_modules=targets, projection_prng_key=seed, task_type="CAUSAL_LM",
                          **({"randlora_alpha": max(1, round(alpha))} if alpha is not None else {}))


def _seed(cls: type) -> Callable[[int, float | None, Any, int], PeftConfig]:
    def build(rank: int, alpha: float | None, targets: Any, seed: int) -> PeftConfig:
        fields = cls.__dataclass_fields__
        scaling = alpha / rank if alpha is not None else None  # LoRA-SB's scale and SNELL's coefficient: alpha / r
        extra = {k: v for k, v in (("seed", seed), ("lora_alpha", alpha), ("scaling", scaling))
                 if k in fields and v is not None}
        return cls(r=rank, target_modules=targets, task_type="CAUSAL_LM", **extra)

    return build


METHODS: dict[str, AdapterMethod] = {m.name: m for m in (
    AdapterMethod("lora", _lora(), compressed=True),
    AdapterMethod("pissa", _lora("pissa"), changes_base=True),
    AdapterMethod("olora", _lora("olora"), changes_base=True),
    AdapterMethod("dora", _lora(use_dora=True)),
    AdapterMethod("randlora", _randlora),
    AdapterMethod("eva", _eva, prepass="activations"),
    AdapterMethod("corda", _corda, prepass="activations", changes_base=True),
    AdapterMethod("lora_ga", _lora_ga, prepass="gradients", changes_base=True),
    AdapterMethod("lora_sb", _seed(LoRASBConfig), prepass="gradients", rankwise_tuner=True),
    AdapterMethod("svfit", _seed(SVFitConfig), rankwise_tuner=True, compressed=True),
    AdapterMethod("loldu", _seed(LoLDUConfig), rankwise_tuner=True, compressed=True),
    AdapterMethod("block_lora", _seed(BlockLoRAConfig), rankwise_tuner=True, compressed=True),
    AdapterMethod("milora", _seed(MiLoRAConfig), rankwise_tuner=True),
    AdapterMethod("tucker", _seed(TuckerConfig), rankwise_tuner=True, compressed=True),
    AdapterMethod("snell", _seed(SNELLConfig), rankwise_tuner=True),
)}
DEFAULT_TARGETS = "all-linear"  # every linear layer but the output head


def method(name: str) -> AdapterMethod:
    if name not in METHODS:
        raise ValueError(f"unknown adapter method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def target_layers(model: nn.Module, targets: Any) -> dict[str, nn.Linear | CompressedLinear]:
    """The linear layers, dense or compressed, ``targets`` selects (PEFT's matching rules; ``all-linear`` skips the
    output head)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    probe = LoraConfig(target_modules=targets if targets != DEFAULT_TARGETS else None)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, module in model.named_modules():
        chosen = targets == DEFAULT_TARGETS or bool(check_target_module_exists(probe, name))
        if chosen and module is output and targets != DEFAULT_TARGETS:
            raise ValueError(f"--targets selects the output layer {name}, which rankwise adapters do not adapt (it is "
                             "often tied to the input embeddings, and merging would change both); target the "
                             "blocks' linear layers")
        if chosen and isinstance(module, (nn.Linear, CompressedLinear)) and module is not output:
            found[name] = module
    if not found:
        raise ValueError(f"target modules {targets!r} match no linear layer of {type(model).__name__}")
    return found


def check_rank(model: nn.Module, targets: Any, rank: int) -> None:
    """A rank every targeted layer allows: ``1 <= rank < min(out, in)`` (at the minimum the adapter is the layer)."""
    layers = target_layers(model, targets)
    smallest = min(min(m.in_features, m.out_features) for m in layers.values())
    if not 1 <= rank < smallest:
        name = next(n for n, m in layers.items() if min(m.in_features, m.out_features) == smallest)
        raise ValueError(f"--rank {rank} is not below the smallest targeted dimension ({smallest}, {name}); use "
                         f"1 <= rank < {smallest}")


def _batches(ids: torch.Tensor, batch_size: int, count: int) -> Iterator[torch.Tensor]:
    for start in range(0, min(ids.shape[0], batch_size * count), batch_size):
        yield ids[start:start + batch_size]


def add_adapter(model: nn.Module, name: str, rank: int, *, alpha: float | None = None, targets: Any = None,
                seed: int = 0, data: torch.Tensor | None = None, prepass_batches: int = 8, batch_size: int = 4
                ) -> nn.Module:
    """Wrap ``model`` in a PEFT model with adapter ``name`` at ``rank``, running its pre-pass on ``data``.

    Args:
        model: a causal LM (modified in place by the methods that rewrite base weights: pissa, olora, corda).
        name: a key of :data:`METHODS`.
        rank: adapter rank, below every targeted layer's smaller dimension.
        alpha: LoRA-style scale numerator (default: the method's own default).
        targets: PEFT ``target_modules`` (default ``all-linear``).
        seed: seeds the random parts (PEFT's LoRA A, RandLoRA's bases, block_lora's shared down-projections).
        data: token windows ``(n, seq_len)`` for the pre-passes of eva, corda, lora_ga and lora_sb.
        prepass_batches: how many batches of ``data`` the pre-pass reads.

    Returns:
        The ``PeftModel``, its adapter trainable and everything else frozen.
    """
    spec = method(name)
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"--alpha must be a positive number, got {alpha}")
    targets = targets or DEFAULT_TARGETS
    check_rank(model, targets, rank)
    compressed = [layer for layer, m in target_layers(model, targets).items() if isinstance(m, CompressedLinear)]
    if compressed and not spec.compressed:
        able = ", ".join(m.name for m in METHODS.values() if m.compressed)
        raise ValueError(f"{name} cannot adapt compressed layers ({compressed[0]} is one); use {able}, or --targets "
                         "naming dense layers only")
    if targets == DEFAULT_TARGETS:  # explicit names: the pre-passes match target_modules themselves
        targets = sorted({layer.rsplit(".", 1)[-1] for layer in target_layers(model, targets)})
    if spec.prepass and (data is None or data.shape[0] == 0):
        raise ValueError(f"{name} initialises from the training data ({spec.prepass}) but got none; pass the data "
                         "(--text FILE)")
    device = next(model.parameters()).device
    # PEFT draws LoRA's A (and LoRA-GA its sketch) from torch's global generator: seed it inside a fork, so the
    # adapter is reproducible and the caller's random state is left as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return _build(model, spec, rank, alpha, targets, seed, data, prepass_batches, batch_size, device)


def _build(model: nn.Module, spec: AdapterMethod, rank: int, alpha: float | None, targets: Any, seed: int,
           data: torch.Tensor | None, prepass_batches: int, batch_size: int, device: torch.device) -> nn.Module:
    from peft import get_peft_model

    name = spec.name
    config = spec.build(rank, alpha, targets, seed)
    if spec.prepass == "gradients":
        def train_step() -> None:
            for batch in _batches(data, batch_size, prepass_batches):
                causal_lm_loss(model, batch.to(device)).backward()

        (preprocess_lora_sb if name == "lora_sb" else _preprocess_loraga)(model, config, train_step)
    elif name == "corda":
        from peft.tuners.lora.corda import preprocess_corda

        @torch.no_grad()
        def run_model() -> None:
            for window in _batches(data, 1, batch_size * prepass_batches):  # CorDA's hooks take one sequence
                model(input_ids=window.to(device))

        preprocess_corda(model, config, run_model=run_model)
    peft_model = get_peft_model(model, config)
    if name == "eva":
        from peft.tuners.lora.eva import initialize_lora_eva_weights

        loader = [{"input_ids": b.to(device), "attention_mask": torch.ones_like(b).to(device)}
                  for b in _batches(data, batch_size, prepass_batches)]
        initialize_lora_eva_weights(peft_model, loader, show_progress_bar=False)
    return peft_model


def _preprocess_loraga(model: nn.Module, config: PeftConfig, train_step: Callable[[], None]) -> None:
    from peft.tuners.lora.loraga import preprocess_loraga

    preprocess_loraga(model, config, train_step)
