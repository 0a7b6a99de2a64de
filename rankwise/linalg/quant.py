"""NormalFloat (NF-``b``) block quantisation with double-quantised block scales, and bit packing.

A matrix is flattened row-major and cut into blocks of ``block_size`` consecutive entries. Each block is divided by
its absolute maximum and every entry is replaced by the nearest of ``2^b`` NormalFloat levels in ``[-1, 1]``
(QLoRA's construction: equal-probability quantiles of a normal distribution, with an exact zero; Dettmers et al.,
"QLoRA", 2023, https://arxiv.org/abs/2305.14314). The block scales are quantised again, as in LQ-LoRA's storage format
(Guo et al. 2024, https://arxiv.org/abs/2311.12023): their global minimum is subtracted (one float ``offset``), and
each group of ``scale_block`` consecutive scales is stored as 8-bit unsigned codes times one float ``step`` (the last
group may be shorter). Stored per matrix of ``N`` entries:

* the codes, ``bits`` bits each, packed into ``uint8`` (:func:`pack_codes`; 3-bit codes as a 2-bit and a 1-bit
  plane);
* ``N / block_size`` one-byte scale codes;
* ``ceil(N / block_size / scale_block) + 1`` floating-point values (the steps and the offset).

Why this is rankwise's own code: no maintained library ships NF2, NF3 or NF8. torchao's ``NF4Tensor`` runs on CPU
but covers 4 bits only, needs the number of blocks to be a multiple of its scaler block (256 by default: false for the
576 x 576 and 192 x 576 projections of SmolLM2-135M), chooses codes against the scales before their second
quantisation, and holds its result in a tensor subclass rather than plain codes and scales; using it for ``b = 4``
alone would give one model two storage layouts. The 4-bit codebook built here equals torchao's and bitsandbytes' NF4
table (tested).

Codes are chosen against the scales as they will be decoded (after the second quantisation and after rounding the
floating-point parts to their storage dtype). Decoding computes in float32 (float64 for float64 scales) and returns
the scales' dtype, so in float32 it reproduces exactly what the quantiser measured.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass

import torch

from rankwise.linalg._checks import compute_dtype

NF_BITS = (2, 3, 4, 8)
NF_OFFSET = 0.9677083
"""The outermost quantile of QLoRA's NormalFloat construction: ``Phi^-1(NF_OFFSET)`` is mapped to 1."""
SCALE_CODE_MAX = 255  # block scales are stored as uint8 codes


def check_bits(bits: object) -> int:
    """``bits`` if it is one of :data:`NF_BITS`, else a ``ValueError`` naming the allowed values."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or int(bits) not in NF_BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, NF_BITS))}, got {bits!r}")
    return int(bits)


def _check_size(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


@functools.lru_cache(maxsize=len(NF_BITS))
def _codebook64(bits: int) -> torch.Tensor:
    half = 2 ** (bits - 1)
    # 2^(b-1) positive levels and 2^(b-1) - 1 negative ones around an exact zero (QLoRA's asymmetric NF map).
    positive = torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive])
    return (levels / levels.max()).sort().values


def nf_codebook(bits: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
                ) -> torch.Tensor:
    """The ``2^bits`` NormalFloat levels, ascending, from exactly ``-1`` to exactly ``1`` with an exact ``0``."""
    return _codebook64(check_bits(bits)).to(device=device, dtype=dtype, copy=True)


MAX_CODE_BITS = 31  # codes fit an int32 while they are split


def check_code_bits(bits: object) -> int:
    """``bits`` if it is an integer in ``[1, 31]`` (a width :func:`pack_codes` packs), else a ``ValueError``."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 1 <= int(bits) <= MAX_CODE_BITS:
        raise ValueError(f"bits must be an integer in [1, {MAX_CODE_BITS}], got {bits!r}")
    return int(bits)


def _planes(bits: int) -> tuple[int, ...]:
    """Bit widths of the planes a ``bits``-bit code is split into, low bits first: its binary decomposition into
    8s, then a 4, a 2 and a 1 (3-bit codes: a 2-bit plane and a 1-bit plane; 9-bit: 8 and 1), so every plane
    packs whole codes into whole bytes."""
    eights, rest = divmod(bits, 8)
    return (8,) * eights + tuple(width for width in (4, 2, 1) if rest & width)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes :func:`pack_codes` uses for ``numel`` codes of ``bits`` bits (padded to a multiple of 8 codes)."""
    return -(-numel // 8) * check_code_bits(bits)


@functools.lru_cache(maxsize=8)
def _byte_fields(width: int) -> torch.Tensor:
    """``(256, 8 // width)`` ``uint8``: the ``width``-bit fields of every byte value, lowest first."""
    shifts = torch.arange(8 // width, dtype=torch.uint8) * width
    return (torch.arange(256, dtype=torch.uint8)[:, None] >> shifts) & (2**width - 1)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat tensor of codes in ``[0, 2^bits)`` (``1 <= bits <= 31``) into ``uint8``: exactly ``bits`` bits
    per code.

    Codes are zero-padded to a multiple of 8, split into bit planes (:func:`_planes`: one plane for 1, 2, 4 and 8
    bits; a 2-bit then a 1-bit plane for 3 bits; 8-bit planes then the rest for wider codes) and each plane is
    packed little-endian (first code in the lowest bits).
    """
    bits = check_code_bits(bits)
    if codes.ndim != 1:
        raise ValueError(f"codes must be a flat tensor, got shape {tuple(codes.shape)}")
    c = codes.to(torch.uint8 if bits <= 8 else torch.int32)  # no wider than the codes need: packing is transient
    c = torch.cat([c, c.new_zeros(-c.numel() % 8)])
    out, low = [], 0
    for width in _planes(bits):
        field = ((c >> low) & (2**width - 1)).to(torch.uint8).view(-1, 8 // width)  # (bytes, codes per byte)
        shifts = torch.arange(8 // width, dtype=torch.uint8, device=c.device) * width
        out.append((field << shifts).sum(1, dtype=torch.uint8))  # disjoint bit fields: the sum is an OR
        low += width
    return torch.cat(out)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes, as ``uint8`` for ``bits <= 8`` and ``int64``
    beyond (a table look-up per byte)."""
    bits = check_code_bits(bits)
    if packed.dtype != torch.uint8 or packed.ndim != 1 or packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"packed must be a flat uint8 tensor of {packed_nbytes(numel, bits)} bytes for {numel} "
                         f"{bits}-bit codes, got {packed.dtype} {tuple(packed.shape)}")
    padded = packed.numel() * 8 // bits
    wide = bits > 8
    codes, start, low = None, 0, 0
    for width in _planes(bits):
        nbytes = padded * width // 8
        table = _byte_fields(width).to(packed.device)
        field = table[packed[start:start + nbytes].long()].flatten()  # (padded,)
        field = field.long() if wide else field
        codes = field if codes is None else codes | (field << low)
        start, low = start + nbytes, low + width
    assert codes is not None
    return codes[:numel]


def scale_storage(numel: int, block_size: int, scale_block: int) -> tuple[int, int]:
    """``(scale codes, floating-point values)`` stored for the block scales of ``numel`` entries."""
    blocks = numel // block_size
    return blocks, -(-blocks // scale_block) + 1


def nf_storage(numel: int, bits: int, block_size: int, scale_block: int, value_bytes: int) -> int:
    """Bytes an NF-``bits`` matrix of ``numel`` entries stores: packed codes, scale codes, and the scales'
    floating-point steps and offset at ``value_bytes`` each."""
    codes, floats = scale_storage(numel, block_size, scale_block)
    return packed_nbytes(numel, bits) + codes + floats * value_bytes


def check_layout(numel: int, block_size: object, scale_block: object) -> tuple[int, int]:
    """Validate the block sizes for a matrix of ``numel`` entries; a one-line ``ValueError`` naming the field."""
    block_size = _check_size(block_size, "block_size")
    scale_block = _check_size(scale_block, "scale_block")
    if numel % block_size:
        raise ValueError(f"block_size must divide the matrix's {numel} entries, got {block_size}")
    return block_size, scale_block


def dequantize_scales(codes: torch.Tensor, steps: torch.Tensor, offset: torch.Tensor, scale_block: int
                      ) -> torch.Tensor:
    """Block scales ``offset + code * step[group]`` in the dtype of ``steps``: ``(blocks,)``."""
    group = torch.arange(codes.numel(), device=codes.device) // scale_block  # (blocks,)
    return offset + codes.to(steps.dtype) * steps[group]


class PackedCodes:
    """What every quantised-matrix result shares: ``(m, n)`` unpacked ``codes`` of ``bits`` bits each."""

    codes: torch.Tensor
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1]

    def packed(self) -> torch.Tensor:
        """The codes as stored: ``bits`` bits each in a flat ``uint8`` tensor (:func:`pack_codes`)."""
        return pack_codes(self.codes.flatten(), self.bits)


@dataclass(frozen=True)
class NFQuant(PackedCodes):
    """An NF-``bits`` quantised ``(m, n)`` matrix.

    Attributes:
        codes: ``(m, n)`` ``uint8`` level indices, unpacked (:meth:`packed` gives the stored form).
        scale_codes: ``(blocks,)`` ``uint8`` codes of the block scales.
        scale_steps: ``(groups,)`` floating-point step of each group of ``scale_block`` scale codes.
        scale_offset: ``(1,)`` the smallest block scale, added back to every scale.
        bits, block_size, scale_block: the layout.
    """

    codes: torch.Tensor
    scale_codes: torch.Tensor
    scale_steps: torch.Tensor
    scale_offset: torch.Tensor
    bits: int
    block_size: int
    scale_block: int

    def dequantize(self) -> torch.Tensor:
        """The ``(m, n)`` matrix the codes stand for, in the dtype of the scales (as :func:`nf_dequantize`)."""
        return _decode(self.codes.flatten(), self.scale_codes, self.scale_steps, self.scale_offset, self.bits,
                       self.block_size, self.scale_block, self.shape)

    def nbytes(self) -> int:
        """Bytes stored: packed codes, scale codes, and the scales' floating-point parts at their dtype."""
        return (packed_nbytes(self.codes.numel(), self.bits) + self.scale_codes.numel()
                + (self.scale_steps.numel() + self.scale_offset.numel()) * self.scale_steps.element_size())


def _decode(codes: torch.Tensor, scale_codes: torch.Tensor, scale_steps: torch.Tensor, scale_offset: torch.Tensor,
            bits: int, block_size: int, scale_block: int, shape: tuple[int, int]) -> torch.Tensor:
    dtype = compute_dtype(scale_steps.dtype)
    levels = nf_codebook(bits, dtype=dtype, device=codes.device)
    values = levels[codes.long()].view(-1, block_size)  # (blocks, block_size)
    scales = dequantize_scales(scale_codes, scale_steps.to(dtype), scale_offset.to(dtype), scale_block)  # (blocks,)
    return (values * scales[:, None]).view(shape).to(scale_steps.dtype)


def nf_dequantize(codes: torch.Tensor, scale_codes: torch.Tensor, scale_steps: torch.Tensor,
                  scale_offset: torch.Tensor, bits: int, block_size: int, scale_block: int,
                  shape: tuple[int, int]) -> torch.Tensor:
    """Decode packed NF codes and double-quantised scales into an ``(m, n)`` matrix in ``scale_steps``' dtype
    (computed in float32, or float64 for float64 scales)."""
    return _decode(unpack_codes(codes, bits, shape[0] * shape[1]), scale_codes, scale_steps, scale_offset, bits,
                   block_size, scale_block, shape)


def nf_quantize(W: torch.Tensor, bits: int, *, block_size: int = 64, scale_block: int = 256,
                scale_dtype: torch.dtype | None = None) -> NFQuant:
    """Quantise ``W`` to NF-``bits`` with block absmax scales, double-quantised.

    Args:
        W: ``(m, n)`` floating-point matrix; ``m * n`` must be a multiple of ``block_size``.
        bits: 2, 3, 4 or 8.
        block_size: entries per absmax block (row-major, may span rows).
        scale_block: block scales per second-level group (8-bit codes, one float step per group).
        scale_dtype: dtype of the stored steps and offset (default ``W``'s); codes are chosen against the scales
            as rounded to it.

    Returns:
        :class:`NFQuant`; its :meth:`~NFQuant.dequantize` is the quantised matrix.
    """
    bits = check_bits(bits)
    if W.ndim != 2 or not W.is_floating_point():
        raise ValueError(f"W must be a 2-D floating-point matrix, got {W.dtype} of shape {tuple(W.shape)}")
    block_size, scale_block = check_layout(W.numel(), block_size, scale_block)
    scale_dtype = scale_dtype or W.dtype
    A = W.to(compute_dtype(W.dtype)).reshape(-1, block_size)  # (blocks, block_size)
    absmax = A.abs().amax(1)  # (blocks,)
    offset = absmax.min().reshape(1).to(scale_dtype)
    excess = (absmax - offset.to(A.dtype)).clamp_min(0)
    blocks = absmax.numel()
    grouped = torch.cat([excess, excess.new_zeros(-blocks % scale_block)]).view(-1, scale_block)  # (groups, sb)
    steps = (grouped.amax(1) / SCALE_CODE_MAX).to(scale_dtype)  # (groups,)
    step_of_block = steps.to(A.dtype).repeat_interleave(scale_block)[:blocks]
    ratio = excess / torch.where(step_of_block > 0, step_of_block, 1)
    scale_codes = torch.where(step_of_block > 0, ratio.round(), 0).clamp(0, SCALE_CODE_MAX).to(torch.uint8)
    scales = dequantize_scales(scale_codes, steps.to(A.dtype), offset.to(A.dtype), scale_block)  # as decoded
    normalised = torch.where(scales[:, None] != 0, A / torch.where(scales != 0, scales, 1)[:, None], 0)
    levels = nf_codebook(bits, dtype=A.dtype, device=A.device)
    codes = torch.bucketize(normalised, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)  # nearest level
    return NFQuant(codes.view(W.shape), scale_codes, steps, offset, bits, block_size, scale_block)


INT8_MAX = 127


def int8_rows(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 quantisation, one scale per row: ``X ~= codes * scale[:, None]``.

    Args:
        X: ``(rows, cols)`` floating-point matrix.

    Returns:
        ``(codes, scale)``: ``(rows, cols)`` ``int8`` codes in ``[-127, 127]`` and ``(rows,)`` scales in ``X``'s dtype
        (an all-zero row has scale 0). The codes are chosen against the scales as rounded to that dtype.
    """
    if X.ndim != 2 or not X.is_floating_point():
        raise ValueError(f"X must be a 2-D floating-point matrix, got {X.dtype} of shape {tuple(X.shape)}")
    A = X.to(compute_dtype(X.dtype))
    scale = (A.abs().amax(1) / INT8_MAX).to(X.dtype)  # (rows,), as stored
    s = scale.to(A.dtype)[:, None]
    codes = torch.where(s > 0, A / torch.where(s > 0, s, 1), 0).round().clamp(-INT8_MAX, INT8_MAX)
    return codes.to(torch.int8), scale


def int8_rows_decode(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The matrix :func:`int8_rows` codes stand for, in ``scale``'s dtype."""
    return codes.to(scale.dtype) * scale[:, None]
