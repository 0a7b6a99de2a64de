"""NormalFloat quantisation alone: LQ-LoRA's quantiser without the low-rank part, the baseline its rows are read
against. Dettmers et al., "QLoRA: Efficient finetuning of quantized LLMs", 2023, https://arxiv.org/abs/2305.14314
(NF4; NF2/3/8 by the same construction, as LQ-LoRA uses them).

Every matrix is stored at ``quant_bits`` with block absmax scales (double-quantised); there is nothing to trade, so
the budget in bits only has to cover that cost. Layer kind ``"lq"`` at rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rankwise.calibrate import LayerStats
from rankwise.methods.base import register_method
from rankwise.methods.lq import LQConfig, lq
from rankwise.nn.lq import QuantLowRankLinear


@dataclass(frozen=True)
class NFConfig(LQConfig):
    """NF quantisation alone (LQ-LoRA at rank 0); the fields of :class:`~rankwise.methods.lq.LQConfig` that shape
    the quantiser apply (``quant_bits``, ``block_size``, ``scale_block``), the low-rank ones are unused."""

    name: ClassVar[str] = "nf"
    iterations: int = 1

    def __post_init__(self) -> None:
        if self.quantiser != self.name:  # the hqq method is this one with HQQ's quantiser
            raise ValueError(f"quantiser: the {self.name} method quantises with {self.name}, got {self.quantiser!r}; "
                             "each quantiser alone is its own method (nf, hqq)")
        super().__post_init__()

    def knob_range(self, m: int, n: int) -> tuple[int, int]:
        """Rank 0 only."""
        super().knob_range(m, n)
        return 0, 0


@register_method(NFConfig)
def nf(weight: torch.Tensor, stats: LayerStats | None, knob: int, config: NFConfig, name: str) -> QuantLowRankLinear:
    return lq(weight, stats, knob, config, name)
