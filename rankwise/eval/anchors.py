"""Anchors: rows of a comparison made by maintained libraries, never re-implemented here.

HQQ (Badri and Shaji, "Half-Quadratic Quantization of Large Machine Learning Models", 2023,
https://mobiusml.github.io/hqq_blog/) quantises every targeted layer of a copy of the model to ``nbits`` with one
scale and one zero per group of ``group_size`` weights, through the ``hqq`` package (``pip install
'rankwise[quant]'``). Its rows sit beside rankwise's at the bits per weight HQQ's own format stores.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psutil
import torch
from torch import nn

from rankwise.eval.compare import CompareRow, score
from rankwise.eval.measure import count_params
from rankwise.nn import linear_weight
from rankwise.targets import find_targets, set_submodule

HQQ_BITS = (2, 3, 4, 8)
INSTALL = "pip install 'rankwise[quant]'"


def hqq_api() -> tuple[type, Any]:
    """``(HQQLinear, BaseQuantizeConfig)`` from the ``hqq`` package.

    Raises:
        ValueError: one line naming the extra to install, when ``hqq`` is missing.
    """
    try:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    except ImportError:
        raise ValueError(f"HQQ rows need the hqq package: {INSTALL}") from None
    return HQQLinear, BaseQuantizeConfig


@dataclass(frozen=True)
class HQQ:
    """HQQ weight-only quantisation of every targeted layer, as one comparison row.

    Attributes:
        nbits: bits per quantised weight: 2, 3, 4 or 8 (HQQ packs 2 and 4 bits into bytes, 3 bits ten to an int32,
            8 bits one per byte).
        group_size: weights per scale and zero (along the input dimension); HQQ needs a multiple of 8, and it must
            divide every targeted matrix's size.
    """

    nbits: int
    group_size: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.nbits, bool) or self.nbits not in HQQ_BITS:
            raise ValueError(f"nbits must be one of {', '.join(map(str, HQQ_BITS))}, got {self.nbits!r}")
        if (isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 8
                or self.group_size % 8):
            raise ValueError(f"group_size must be a positive multiple of 8 (HQQ's rule), got {self.group_size!r}")

    @property
    def label(self) -> str:
        return f"hqq {self.nbits}-bit g{self.group_size}"

    def rows(self, model: nn.Module, evaluation: torch.Tensor, *, value_bytes: int, batch_size: int = 8,
             speed_repeats: int = 5, prompts: Sequence[str] = (), tokenizer: Any = None, max_new_tokens: int = 32,
             **_: Any) -> list[CompareRow]:
        """One row: quantise a copy of ``model`` and evaluate it (see :func:`hqq_row`); the comparison's other
        shared arguments (calibration, statistics) are not used."""
        return [hqq_row(model, self, evaluation, value_bytes=value_bytes, batch_size=batch_size,
                        speed_repeats=speed_repeats, prompts=prompts, tokenizer=tokenizer,
                        max_new_tokens=max_new_tokens)]


def quantize_hqq(model: nn.Module, spec: HQQ) -> tuple[nn.Module, dict[str, nn.Module]]:
    """A deep copy of ``model`` whose targeted layers are ``HQQLinear`` (``model`` is untouched: HQQ consumes the
    weight it quantises, so it gets the copy's). HQQ computes in each layer's own dtype, on its device.

    Returns:
        ``(the copy, its HQQ layers by name)``.

    Raises:
        ValueError: ``hqq`` is missing, or ``spec.group_size`` does not divide a targeted matrix's size.
    """
    HQQLinear, BaseQuantizeConfig = hqq_api()
    for name, layer in find_targets(model).items():
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"HQQ quantises nn.Linear layers; {name} is a {type(layer).__name__}")
        if layer.weight.numel() % spec.group_size:
            raise ValueError(f"group_size must divide every targeted matrix's size; {name} has "
                             f"{layer.weight.numel()} weights, not a multiple of {spec.group_size}")
    candidate = copy.deepcopy(model)
    layers = {}
    for name, layer in find_targets(candidate).items():
        weight = linear_weight(layer)
        quantized = HQQLinear(layer, BaseQuantizeConfig(nbits=spec.nbits, group_size=spec.group_size),
                              compute_dtype=weight.dtype, device=weight.device.type)
        set_submodule(candidate, name, quantized)
        layers[name] = quantized
    return candidate, layers


def hqq_stored_bytes(layer: nn.Module, value_bytes: int) -> int:
    """Bytes one ``HQQLinear`` stores, read from its tensors.

    Counted: the packed codes ``W_q`` at their own dtype (``uint8`` for 2, 4 and 8 bits; ``int32`` for 3 bits,
    ten codes per word, the groups padded to a multiple of ten), and every tensor in ``meta`` (the per-group
    ``scale`` and ``zero``; integer tensors at their own size, floating-point ones at ``value_bytes``: HQQ stores
    them in its compute dtype, which is the model's storage dtype when the model is saved in it), plus the bias at
    ``value_bytes`` when there is one. Not counted: HQQ's few scalar settings (bits, group size, shape), as no layer
    kind counts its spec.
    """
    codes = layer.W_q.numel() * layer.W_q.element_size()
    meta = sum(t.numel() * (value_bytes if t.is_floating_point() else t.element_size())
               for t in layer.meta.values() if isinstance(t, torch.Tensor))
    bias = layer.bias.numel() * value_bytes if layer.bias is not None else 0
    return codes + meta + bias


def hqq_row(model: nn.Module, spec: HQQ, evaluation: torch.Tensor, *, value_bytes: int, batch_size: int = 8,
            speed_repeats: int = 5, prompts: Sequence[str] = (), tokenizer: Any = None,
            max_new_tokens: int = 32) -> CompareRow:
    """Quantise a copy of ``model`` with HQQ and evaluate it on ``evaluation``.

    The row's ``bits_per_weight`` (and ``bits``) is the true size of HQQ's format, :func:`hqq_stored_bytes` summed
    over the targeted layers, per weight of the dense matrices; ``weights_mb`` adds everything else at
    ``value_bytes`` per value. Every weight is kept (quantised weights are values, as for rankwise's own quantised
    kinds), so nothing counts as removed.
    """
    total, targeted = count_params(model)
    start = time.perf_counter()
    candidate, layers = quantize_hqq(model, spec)
    seconds = time.perf_counter() - start
    rss = psutil.Process().memory_info().rss / 2**20
    stored = sum(hqq_stored_bytes(layer, value_bytes) for layer in layers.values())
    ppl, tps, texts = score(candidate, evaluation, batch_size=batch_size, speed_repeats=speed_repeats,
                            prompts=prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens)
    bits = 8 * stored / targeted
    return CompareRow(spec.label, 0.0, ppl, targeted, 0, total, tps, seconds, rss,
                      weights_mb=(stored + (total - targeted) * value_bytes) / 1e6, bits_per_weight=bits,
                      bits=round(bits, 2), completions=texts)
