"""Group-wise affine quantisation (``W ~= (codes - zero) * scale`` per group of weights), with the codes, scales and
zero points chosen by HQQ.

Badri and Shaji, "Half-Quadratic Quantization of Large Machine Learning Models", 2023,
https://mobiusml.github.io/hqq_blog/. HQQ fits each group's scale and zero point by a half-quadratic solver of a
sparsity-promoting error, without calibration data. The solver is HQQ's own (the ``hqq`` package, ``pip install
'rankwise[quant]'``), called here and never re-implemented; this module only holds its result in rankwise's storage
layout so a quantised matrix saves, reloads and merges like every other layer kind:

* the codes, ``bits`` bits each, packed with :func:`~rankwise.linalg.quant.pack_codes` (3-bit codes take exactly 3
  bits, where HQQ's own format packs ten to an int32, 3.2 bits);
* one scale and one zero point per group of ``group_size`` consecutive weights (row-major, as HQQ's ``axis=1``), as
  floating-point values.

Decoding is ``(code - zero) * scale`` in float32 (float64 for float64 scales), returned in the scales' dtype.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from rankwise.linalg._checks import compute_dtype
from rankwise.linalg.quant import PackedCodes, packed_nbytes, unpack_codes

AFFINE_BITS = (2, 3, 4, 8)
INSTALL = "pip install 'rankwise[quant]'"


def check_group(numel: int, group_size: object) -> int:
    """``group_size`` when it is a positive integer dividing ``numel``; else a one-line ``ValueError``."""
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or int(group_size) < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if numel % int(group_size):
        raise ValueError(f"group_size must divide the matrix's {numel} entries, got {group_size}")
    return int(group_size)


def affine_storage(numel: int, bits: int, group_size: int, value_bytes: int) -> int:
    """Bytes an affine ``bits``-bit matrix of ``numel`` entries stores: packed codes, then one scale and one zero per
    group at ``value_bytes`` each."""
    return packed_nbytes(numel, bits) + 2 * (numel // group_size) * value_bytes


def affine_decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                  shape: tuple[int, int]) -> torch.Tensor:
    """``(codes - zero) * scale`` per group: unpacked ``uint8`` codes (flat) to an ``(m, n)`` matrix in ``scale``'s
    dtype (computed in float32, or float64 for float64 scales)."""
    dtype = compute_dtype(scale.dtype)
    values = codes.to(dtype).view(-1, group_size)  # (groups, group_size)
    return ((values - zero.to(dtype)[:, None]) * scale.to(dtype)[:, None]).view(shape).to(scale.dtype)


def affine_dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                      shape: tuple[int, int]) -> torch.Tensor:
    """Decode packed codes (:func:`~rankwise.linalg.quant.pack_codes`) with their groups' scales and zeros."""
    return affine_decode(unpack_codes(packed, bits, shape[0] * shape[1]), scale, zero, group_size, shape)


@dataclass(frozen=True)
class AffineQuant(PackedCodes):
    """An affine-quantised ``(m, n)`` matrix.

    Attributes:
        codes: ``(m, n)`` ``uint8`` codes in ``[0, 2^bits)``, unpacked (:meth:`packed` gives the stored form).
        scale: ``(groups,)`` step of each group of ``group_size`` consecutive weights.
        zero: ``(groups,)`` zero point of each group, in code units (not rounded: HQQ optimises it as a float).
        bits, group_size: the layout.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """The ``(m, n)`` matrix the codes stand for, in the scales' dtype."""
        return affine_decode(self.codes.flatten(), self.scale, self.zero, self.group_size, self.shape)

    def nbytes(self) -> int:
        """Bytes stored: packed codes, and the scales and zeros at their dtype."""
        return packed_nbytes(self.codes.numel(), self.bits) + (self.scale.numel() + self.zero.numel()) * \
            self.scale.element_size()


def hqq_quantize(W: torch.Tensor, bits: int, *, group_size: int = 64, scale_dtype: torch.dtype | None = None
                 ) -> AffineQuant:
    """Quantise ``W`` with HQQ (its optimised scales and zero points, one pair per group), with HQQ's own settings for
    ``bits`` (those of its ``BaseQuantizeConfig``: at 4 bits it rounds the zero points).

    Args:
        W: ``(m, n)`` floating-point matrix; ``m * n`` must be a multiple of ``group_size``.
        bits: 2, 3, 4 or 8.
        group_size: consecutive weights (row-major) sharing a scale and a zero point; a multiple of 8 (HQQ's rule).
        scale_dtype: dtype the scales and zeros are stored in (default ``W``'s); HQQ fits them in float32 and they
            are rounded to it, as HQQ's own layers round them to their compute dtype.

    Returns:
        :class:`AffineQuant`.

    Raises:
        ValueError: a bad argument, or the ``hqq`` package is missing (one line naming the extra to install).
    """
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or bits not in AFFINE_BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, AFFINE_BITS))}, got {bits!r}")
    if W.ndim != 2 or not W.is_floating_point():
        raise ValueError(f"W must be a 2-D floating-point matrix, got {W.dtype} of shape {tuple(W.shape)}")
    group_size = check_group(W.numel(), group_size)
    if group_size % 8:
        raise ValueError(f"group_size must be a multiple of 8 (HQQ's rule), got {group_size}")
    try:
        from hqq.core.quantize import BaseQuantizeConfig, Quantizer
    except ImportError:
        raise ValueError(f"HQQ quantisation needs the hqq package: {INSTALL}") from None
    params = {**BaseQuantizeConfig(nbits=bits, group_size=group_size)["weight_quant_params"], "axis": 1}
    params.pop("view_as_float", None)  # HQQ's defaults for these bits (e.g. a rounded zero at 4 bits), unpacked
    codes, meta = Quantizer.quantize(W.detach().float(), **params, bitpack=False, compute_dtype=torch.float32,
                                     device=str(W.device))
    dtype = scale_dtype or W.dtype
    return AffineQuant(codes.round().to(torch.uint8).view(W.shape), meta["scale"].flatten().to(dtype),
                       meta["zero"].flatten().to(dtype), bits, group_size)
