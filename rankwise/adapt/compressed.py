"""LoRA on compressed models: rankwise's compressed layers (``CompressedLinear``) as first-class PEFT LoRA targets.

A LoRA adapter ``ΔW = s B A`` (``B (out, r)``, ``A (r, in)``, ``s = lora_alpha / r``) on a compressed layer trains
like LoRA on a dense layer: the layer's own forward plus the adapter's. On a factorised layer ``W = up @ down`` of
rank ``k`` (``LowRankLinear``) it merges without ever forming the dense matrix: the merged layer is a
``LowRankLinear`` of rank ``k + r`` with ``up' = [up, s B]`` and ``down' = [down; A]``, the same map up to rounding,
and unmerging drops the appended factors again, restoring the base factors bit for bit. Other layer kinds train and
save adapters but refuse to merge (there is no exact merge that keeps their form).

How PEFT finds it. PEFT's documented extension point for layer types it does not know is the custom-module
dispatch, ``LoraConfig._register_custom_module({CompressedLinear: CompressedLoraLinear})``
(https://huggingface.co/docs/peft/developer_guides/custom_models). That mapping lives on one config object and is not
written to ``adapter_config.json``, so a user's plain ``LoraConfig(...)`` and the config ``PeftModel.from_pretrained``
reads back would both lack it. :func:`install` therefore wraps two PEFT functions: ``LoraConfig.__post_init__``,
so every LoRA config starts with the mapping registered, and the ``"all-linear"`` expansion
(``tuners_utils._maybe_include_all_linear_layers``, which lists ``nn.Linear`` and ``Conv1D`` only), so it adds the
compressed layers for the configs that can adapt them (LoRA with the mapping, and rankwise's own tuners); the output
head stays excluded. Both only ever add compressed layers, so dense models are adapted exactly as before, and a saved
adapter is plain LoRA (it also loads on the dense export). ``import rankwise.adapt`` installs them.

Hu et al. (2021), "LoRA: Low-Rank Adaptation of Large Language Models", https://arxiv.org/abs/2106.09685
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners import tuners_utils
from peft.tuners.lora import layer as lora_layer
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.peft_types import PeftType
from torch import nn

from rankwise.nn import CompressedLinear, LowRankLinear

# LoRA initialisations that only need the layer's shape (the others read or rewrite the dense base weight).
SHAPE_ONLY_INITS: tuple[bool | str, ...] = (True, False, "gaussian")
_INSTALLED = "_rankwise_compressed"  # marks PEFT functions already wrapped by install()


# -- merging into factors (shared with rankwise's tuners) ------------------------------------------------------------

def check_merge_size(base: CompressedLinear, extra: int, layer: str) -> None:
    """Raise ``ValueError`` unless a rank-``extra`` update can be merged into ``base`` and stay smaller than dense.

    Args:
        base: the compressed layer the adapter would be merged into (a kind that ``grows_rank``: ``LowRankLinear``,
            the ``lq`` kind).
        extra: the rank the merge appends.
        layer: the layer's name, for the message.
    """
    if not base.grows_rank:
        raise ValueError(f"{layer or 'a compressed layer'} is a {base.kind or type(base).__name__} layer, which an "
                         "adapter cannot be merged into exactly; keep the adapter unmerged (save_pretrained), or "
                         "export the model dense (rankwise.save(..., export='dense')) and merge there")
    m, n, rank = base.out_features, base.in_features, base.rank + extra
    if isinstance(base, LowRankLinear) and rank * (m + n) >= m * n:
        limit = -(-m * n // (m + n))  # the smallest rank with r (m + n) >= m n
        raise ValueError(f"merging the adapter into {layer or 'a compressed layer'} would make it rank {base.rank} + "
                         f"{extra} = {rank}, not smaller than the dense {m} x {n} layer (rank >= {limit}); keep the "
                         "adapter unmerged (save_pretrained), use a smaller adapter rank, or export the model dense "
                         "(rankwise.save(..., export='dense')) and merge there")


def append_factors(base: CompressedLinear, up: torch.Tensor, down: torch.Tensor, *, safe: bool = False,
                   layer: str = "", check_size: bool = True) -> None:
    """Grow ``base`` in place to ``up' = [base.up, up]``, ``down' = [base.down; down]`` (rank ``k + r``).

    Args:
        base: the factorised layer, modified in place (new parameters, same ``requires_grad``).
        up: ``(out, r)`` factor, cast to the layer's dtype and device.
        down: ``(r, in)`` factor.
        safe: refuse non-finite factors before touching the layer.
        layer: the layer's name, for the messages.
        check_size: refuse a merge that leaves a low-rank layer no smaller than dense (an adapter merge); EoRA
            compensation, which asks for the extra rank on purpose, turns it off.

    Raises:
        ValueError: the layer kind cannot grow its rank, the merged layer would not be smaller than the dense one, or
            ``safe`` and a factor is not finite.
    """
    if check_size:
        check_merge_size(base, up.shape[1], layer)
    elif not base.grows_rank:
        raise ValueError(f"{layer or 'a compressed layer'} is a {base.kind} layer, which a low-rank update cannot be "
                         "merged into exactly; export the compensation as a PEFT adapter instead")
    up = up.detach().to(device=base.up.device, dtype=base.up.dtype)
    down = down.detach().to(device=base.down.device, dtype=base.down.dtype)
    if safe and not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise ValueError(f"the adapter of {layer or 'a compressed layer'} has non-finite weights; it is broken")
    base.up = nn.Parameter(torch.cat((base.up.data, up), dim=1), requires_grad=base.up.requires_grad)  # (out, k + r)
    base.down = nn.Parameter(torch.cat((base.down.data, down), dim=0), requires_grad=base.down.requires_grad)
    base.rank += up.shape[1]


def drop_factors(base: LowRankLinear, extra: int) -> None:
    """Undo :func:`append_factors`: drop the last ``extra`` components (exact: the original factors come back)."""
    rank = base.rank - extra
    base.up = nn.Parameter(base.up.data[:, :rank].clone(), requires_grad=base.up.requires_grad)  # (out, k)
    base.down = nn.Parameter(base.down.data[:rank].clone(), requires_grad=base.down.requires_grad)  # (k, in)
    base.rank = rank


def base_device_and_dtype(base: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and dtype of a base layer for PEFT's adapter moves: a compressed layer's first parameter (its
    ``weight`` is an empty load-guard buffer), else the ``weight``."""
    if isinstance(base, CompressedLinear):
        first = next(base.parameters(), None)
        return (first.device, first.dtype) if first is not None else (None, None)
    weight = getattr(base, "weight", None)
    return (weight.device, weight.dtype) if weight is not None else (None, None)


# -- the LoRA layer ---------------------------------------------------------------------------------------------------

class CompressedLoraLinear(lora_layer.Linear):
    """PEFT's LoRA ``Linear`` around a compressed layer: same forward, dropout, scaling, saving and multi-adapter
    handling; merging into a ``LowRankLinear`` appends the adapter's factors instead of adding to a dense weight.

    Plain LoRA only: variants that read or reshape the dense weight (DoRA, PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ, ...)
    are refused with a one-line ``ValueError`` naming the layer.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, config, r=r, lora_alpha=lora_alpha, **kwargs)
        self._appended: list[int] = []  # ranks appended to the base layer by merge, in order

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.io_shape

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device | None,
                                                                               torch.dtype | None]:
        return base_device_and_dtype(base_layer)

    @property
    def _name(self) -> str:
        return self.kwargs.get("target_name", "") or "a compressed layer"

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        name = kwargs.get("target_name") or self._name
        variant = self.resolve_lora_variant(config=config)  # PEFT's own table of variants (DoRA, aLoRA, ...)
        if variant is not None:
            kind = type(variant).__name__.removesuffix("LinearVariant")
            raise ValueError(f"{name} is a compressed layer: the {kind} variant of LoRA is not supported there, only "
                             "plain LoRA; use plain LoRA or target dense layers")
        if config.init_lora_weights not in SHAPE_ONLY_INITS:
            raise ValueError(f"{name} is a compressed layer: init_lora_weights={config.init_lora_weights!r} needs its "
                             f"dense weight; use one of {', '.join(map(repr, SHAPE_ONLY_INITS))}, or target dense "
                             "layers")
        if config.fan_in_fan_out:
            raise ValueError(f"{name} is a compressed layer, stored as (out, in): set fan_in_fan_out=False")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def merge_rank(self, adapter_name: str) -> int:
        """How much merging ``adapter_name`` grows the layer's rank."""
        return self.r[adapter_name]

    def merge_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter as factors ``(s B (out, r), A (r, in))`` in float32 (their product is ``get_delta_weight``)."""
        B = self.lora_B[adapter_name].weight.float()  # (out, r)
        A = self.lora_A[adapter_name].weight.float()  # (r, in)
        return B * self.scaling[adapter_name], A

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Append each adapter's factors to the base layer's: rank ``k`` becomes ``k + r``.

        Raises:
            ValueError: the layer is not a ``LowRankLinear``, the merged rank would not be below the dense
                break-even, or (``safe_merge``) the adapter is not finite; the layer is left as it was.
        """
        base = self.get_base_layer()
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            lora_bias = self.lora_bias[name]
            if lora_bias and getattr(base, "bias", None) is None:
                raise ValueError(f"{self._name}: cannot merge an adapter with lora_bias=True into a layer without bias")
            up, down = self.merge_factors(name)
            append_factors(base, up, down, safe=safe_merge, layer=self._name)
            if lora_bias:
                base.bias.data += (self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype)
            self._appended.append(up.shape[1])
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Drop the appended factors again (exact), newest first."""
        if not self.merged:
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            drop_factors(base, self._appended.pop())
            if self.lora_bias[name]:
                base.bias.data -= (self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype)

    def __repr__(self) -> str:
        return "lora." + nn.Module.__repr__(self)


# -- hooking into PEFT ------------------------------------------------------------------------------------------------

def adapts_compressed(config: Any) -> bool:
    """Whether ``config`` can adapt compressed layers (so ``"all-linear"`` should include them)."""
    if getattr(config, "adapts_compressed_layers", False):  # rankwise's tuners
        return True
    custom = getattr(config, "_custom_modules", None) or {}
    return getattr(config, "peft_type", None) == PeftType.LORA and CompressedLinear in custom


def compressed_targets(model: nn.Module) -> set[str]:
    """Names of the compressed layers PEFT's ``"all-linear"`` should add: not the output head, not one already
    inside an adapter layer (there the adapter layer itself is the target)."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    tuner_layers = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    return {name for name, m in model.named_modules() if isinstance(m, CompressedLinear) and m is not output
            and not any(name.startswith(prefix + ".") for prefix in tuner_layers)}


def _wrap_all_linear(original: Any) -> Any:
    @functools.wraps(original)
    def include_all_linear(peft_config: Any, model: nn.Module) -> Any:
        target = getattr(peft_config, "target_modules", None)
        requested = isinstance(target, str) and target.lower() == "all-linear"
        peft_config = original(peft_config, model)
        if requested and adapts_compressed(peft_config):
            peft_config.target_modules = set(peft_config.target_modules) | compressed_targets(model)
        return peft_config

    setattr(include_all_linear, _INSTALLED, True)
    return include_all_linear


def _wrap_post_init(original: Any) -> Any:
    @functools.wraps(original)
    def post_init(self: LoraConfig) -> None:
        original(self)
        # PEFT takes the first matching entry: a user's later mapping for CompressedLinear itself replaces this one
        self._custom_modules = {CompressedLinear: CompressedLoraLinear, **(self._custom_modules or {})}

    setattr(post_init, _INSTALLED, True)
    return post_init


def install() -> None:
    """Make compressed layers PEFT LoRA targets (idempotent; ``import rankwise.adapt`` calls it).

    Afterwards plain ``peft.get_peft_model(model, LoraConfig(target_modules=[...] or "all-linear"))`` and
    ``PeftModel.from_pretrained(model, adapter_dir)`` adapt compressed layers with :class:`CompressedLoraLinear`.
    """
    if not getattr(LoraConfig.__post_init__, _INSTALLED, False):
        LoraConfig.__post_init__ = _wrap_post_init(LoraConfig.__post_init__)
    if not getattr(tuners_utils._maybe_include_all_linear_layers, _INSTALLED, False):
        tuners_utils._maybe_include_all_linear_layers = _wrap_all_linear(
            tuners_utils._maybe_include_all_linear_layers)


def check_mergeable(model: nn.Module) -> None:
    """Raise the merge's ``ValueError`` before merging if any adapted compressed layer cannot take its adapters (not
    a ``LowRankLinear``, or it would outgrow its dense form).

    ``merge_and_unload`` merges layer by layer, so a refusal there comes after the earlier layers were merged; call
    this first (``rankwise adapt --merge`` does, before training) to refuse with nothing changed.
    """
    for name, module in model.named_modules():
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else None
        if isinstance(base, CompressedLinear) and hasattr(module, "merge_rank"):
            extra = sum(module.merge_rank(a) for a in module.active_adapters
                        if a in module.r and a not in module.merged_adapters)
            if extra:
                check_merge_size(base, extra, name)
