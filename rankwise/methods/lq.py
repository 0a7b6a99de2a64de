"""LQ-LoRA: each weight as an NF-quantised matrix plus a low-rank one, ``W ~= Q + L1 L2``. Guo et al., "LQ-LoRA:
Low-rank plus Quantized Matrix Decomposition for Efficient Language Model Finetuning", ICLR 2024,
https://arxiv.org/abs/2311.12023.

The quantiser is the paper's NormalFloat (``quantiser="nf"``, rankwise's own: no maintained library ships NF2/3/8) or
HQQ (``quantiser="hqq"``: Badri and Shaji 2023, https://mobiusml.github.io/hqq_blog/, fitted by the ``hqq`` package).
The knob is the rank ``r`` of the low-rank part; the quantised part's bits are a config field, so a budget in bits per
weight (``bits=3.5`` with ``quant_bits=3``) buys each matrix the largest rank that fits on top of its NF-3 codes and
scales. At rank 0 this is plain NF quantisation. Only a budget in bits makes sense here: every matrix keeps its
``m n`` quantised values, so a budget in parameters (``ratio``) cannot be met.
"""

from __future__ import annotations

import importlib.util
import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from rankwise.calibrate import LayerStats
from rankwise.linalg import SOLVERS
from rankwise.linalg.affine import INSTALL, affine_storage
from rankwise.linalg.lq import QUANTISERS, lq_decompose
from rankwise.linalg.quant import NF_BITS, check_layout, nf_storage
from rankwise.methods.base import CompressConfig, Cost, register_method
from rankwise.nn.affine import AffineLowRankLinear
from rankwise.nn.lq import MAX_BLOCK, QuantLowRankLinear


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class LQConfig(CompressConfig):
    """LQ-LoRA.

    Attributes:
        quant_bits: bits of the quantised part's codes: 2, 3, 4 or 8 (the paper mixes 2, 3 and 4).
        quantiser: ``"nf"``: NormalFloat levels with double-quantised absmax block scales, as in the paper (layer
            kind ``"lq"``); ``"hqq"``: HQQ's optimised scale and zero point per group (layer kind ``"affine"``;
            needs ``pip install 'rankwise[quant]'``).
        block_size: weights per scale (row-major blocks of the ``(out, in)`` matrix, which may span rows; it must
            divide ``out * in``); 64 as in QLoRA, the paper and HQQ's default. HQQ needs a multiple of 8.
        scale_block: block scales per second-level group: the scales are stored as 8-bit codes with one
            floating-point step per group (and one offset per matrix); 256 as in the paper. ``"nf"`` only: HQQ
            stores each scale and zero point in floating point.
        iterations: the most alternations of ``L = SVD_r(W - Q)`` and ``Q = quant(W - L)``; the loop also stops when
            the error stops falling, and the best pair is kept.
        data_aware: fit the low-rank part by the whitened SVD of ``W - Q`` (minimising ``||(W - W') X||`` on the
            calibration inputs, SVD-LLM's whitening) and stop on that error; needs the input covariance.
        fisher: fit it by the paper's Fisher-weighted SVD instead (row and column weights from the summed empirical
            Fisher); needs a gradient pass. Not together with ``data_aware``.
        damp: relative ridge on the covariance diagonal before whitening (``data_aware`` only).
        solver: SVD solver of the low-rank step; randomized as in the paper (its noise also lets the alternation
            reach lower errors than an exact SVD does in the same number of rounds).
        seed: seed of the randomized solver: the same seed gives the same bytes.

    Cost of an ``m x n`` matrix at rank ``r`` (``N = m n``): ``num_params = N + r (m + n)`` (the quantised weights are
    values; scales are not), and bytes ``= ceil(N / 8) * quant_bits`` (codes) ``+ N / block_size`` (8-bit scale codes)
    ``+ (ceil(N / block_size / scale_block) + 1) * value_bytes`` (steps and offset) ``+ r (m + n) * value_bytes``;
    with HQQ, ``ceil(N / 8) * quant_bits + 2 N / block_size * value_bytes`` (codes, scales and zeros) ``+ r (m + n) *
    value_bytes``.
    """

    name: ClassVar[str] = "lq"
    units: ClassVar[tuple[str, ...]] = ("bytes",)  # every weight stays (quantised): only a budget in bits means much
    quant_bits: int = 3
    quantiser: str = "nf"
    block_size: int = 64
    scale_block: int = 256
    iterations: int = 10
    data_aware: bool = False
    fisher: bool = False
    damp: float = 0.0
    solver: str = "randomized"
    seed: int = 0

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        """Calibration statistics: the input covariance when ``data_aware``, the Fisher when ``fisher``."""
        return frozenset({"xxt"} if self.data_aware else {"fisher"} if self.fisher else set())

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_int(self.quant_bits) or self.quant_bits not in NF_BITS:
            raise ValueError(f"quant_bits must be one of {', '.join(map(str, NF_BITS))}, got {self.quant_bits!r}")
        if self.quantiser not in QUANTISERS:
            raise ValueError(f"quantiser must be one of {', '.join(QUANTISERS)}, got {self.quantiser!r}")
        for field, value in (("block_size", self.block_size), ("scale_block", self.scale_block)):
            if not _is_int(value) or not 1 <= value <= MAX_BLOCK:
                raise ValueError(f"{field} must be an integer in [1, {MAX_BLOCK}], got {value!r}")
        if self.quantiser == "hqq":
            if self.block_size % 8:
                raise ValueError(f"block_size must be a multiple of 8 with quantiser='hqq' (HQQ's rule), got "
                                 f"{self.block_size}")
            if importlib.util.find_spec("hqq") is None:
                raise ValueError(f"quantiser='hqq' needs the hqq package: {INSTALL}")
        if not _is_int(self.iterations) or self.iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {self.iterations!r}")
        for field, value in (("data_aware", self.data_aware), ("fisher", self.fisher)):
            if not isinstance(value, bool):
                raise ValueError(f"{field} must be True or False, got {value!r}")
        if self.data_aware and self.fisher:
            raise ValueError("data_aware and fisher are two weightings of the low-rank part; choose one")
        if isinstance(self.damp, bool) or not isinstance(self.damp, numbers.Real) or not self.damp >= 0.0:
            raise ValueError(f"damp must be a number >= 0, got {self.damp!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def knob_range(self, m: int, n: int) -> tuple[int, int]:
        """Ranks ``0`` (plain NF quantisation) to ``min(m, n)``; a ``ValueError`` when ``block_size`` does not divide
        ``m * n``."""
        check_layout(m * n, self.block_size, self.scale_block)
        return 0, min(m, n)

    def cost(self, m: int, n: int, knob: int, value_bytes: int) -> Cost:
        """Values ``m n + r (m + n)``; bytes: codes and scales (:func:`~rankwise.linalg.quant.nf_storage`, or
        :func:`~rankwise.linalg.affine.affine_storage` with HQQ) plus the low-rank factors at ``value_bytes`` each."""
        check_layout(m * n, self.block_size, self.scale_block)
        if self.quantiser == "hqq":
            quantised = affine_storage(m * n, self.quant_bits, self.block_size, value_bytes)
        else:
            quantised = nf_storage(m * n, self.quant_bits, self.block_size, self.scale_block, value_bytes)
        return Cost(m * n + knob * (m + n), quantised + knob * (m + n) * value_bytes)


@register_method(LQConfig)
def lq(weight: torch.Tensor, stats: LayerStats | None, knob: int, config: LQConfig,
       name: str) -> QuantLowRankLinear | AffineLowRankLinear:
    whitening = row_weights = col_weights = None
    if config.data_aware:
        if stats is None or stats.xxt is None:
            raise ValueError(f"lq with data_aware needs the input covariance for {name}")
        whitening = stats.whitening(config.damp)
    if config.fisher:
        if stats is None or name not in stats.fisher_out:
            raise ValueError(f"lq with fisher needs Fisher statistics for {name}; calibrate with kinds=('fisher',)")
        row_weights, col_weights = stats.fisher_out[name].sqrt(), stats.fisher_in[name].sqrt()  # (out,), (in,)
    result = lq_decompose(weight, knob, bits=config.quant_bits, block_size=config.block_size,
                          scale_block=config.scale_block, iterations=config.iterations, whitening=whitening,
                          row_weights=row_weights, col_weights=col_weights, solver=config.solver,
                          generator=config.seed, scale_dtype=weight.dtype, quantiser=config.quantiser)
    kind = AffineLowRankLinear if config.quantiser == "hqq" else QuantLowRankLinear
    return kind.from_lq(result, dtype=weight.dtype).to(weight.device)
