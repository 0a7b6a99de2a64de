"""HQQ weight-only quantisation alone, held in rankwise's format: the baseline LQ-LoRA with HQQ and EoRA compensation
are read against. Badri and Shaji, "Half-Quadratic Quantization of Large Machine Learning Models", 2023,
https://mobiusml.github.io/hqq_blog/.

HQQ's solver (the ``hqq`` package, ``pip install 'rankwise[quant]'``) fits each group's scale and zero point; the
codes are stored in layer kind ``"affine"`` at rank 0. Unlike HQQ's own ``HQQLinear`` (the anchor rows of
``rankwise compare --hqq-bits``, which give the same matrices) the result saves and reloads through rankwise and plain
``from_pretrained``, takes a PEFT adapter, merges EoRA compensation (``rankwise compensate``), and stores 3-bit codes in
3 bits rather than 3.2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rankwise.calibrate import LayerStats
from rankwise.methods.base import register_method
from rankwise.methods.lq import lq
from rankwise.methods.nf import NFConfig
from rankwise.nn.affine import AffineLowRankLinear


@dataclass(frozen=True)
class HQQConfig(NFConfig):
    """HQQ quantisation alone: ``quant_bits`` (2, 3, 4 or 8) and ``block_size`` (weights per scale and zero point, a
    multiple of 8; 64 as HQQ's default) shape it; the other fields of :class:`~rankwise.methods.lq.LQConfig` are
    unused. Bytes: ``ceil(N / 8) * quant_bits + 2 N / block_size * value_bytes`` for ``N`` weights."""

    name: ClassVar[str] = "hqq"
    quantiser: str = "hqq"


@register_method(HQQConfig)
def hqq(weight: torch.Tensor, stats: LayerStats | None, knob: int, config: HQQConfig,
        name: str) -> AffineLowRankLinear:
    return lq(weight, stats, knob, config, name)
