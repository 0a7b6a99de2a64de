"""``Int8DictionaryLinear``: a sparse dictionary layer (CoSpaDi, https://arxiv.org/abs/2509.22075) stored in bytes:
dictionary and code values as int8 with one scale per row, atom indices packed at ``ceil(log2 k)`` bits (layer kind
``"dictionary_int8"``).

The floating-point ``"dictionary"`` kind stores each code as a value and an int16 index, 32 bits per non-zero at
bfloat16; here a non-zero takes ``8 + ceil(log2 k)`` bits (17 for 512 atoms), and the dictionary half as much.
Per-row absmax int8 as LLM.int8 quantises weights (Dettmers et al. 2022, https://arxiv.org/abs/2208.07339).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankwise.linalg.dictionary import SparseDictionary, scatter_codes
from rankwise.linalg.quant import int8_rows, int8_rows_decode, pack_codes, packed_nbytes, unpack_codes
from rankwise.nn.dictionary import CheckedIndices, DictionaryLinear, sparse_codes_forward
from rankwise.nn.kinds import CompressedLinear, register_kind

_SPEC = frozenset({"atoms", "nonzeros"})


def index_bits(atoms: int) -> int:
    """Bits of one packed atom index for a dictionary of ``atoms`` atoms: ``ceil(log2 atoms)``, at least 1."""
    return max(1, math.ceil(math.log2(atoms)))


def int8_dictionary_bytes(m: int, n: int, atoms: int, nonzeros: int, value_bytes: int) -> tuple[int, int]:
    """``(values, bytes)`` an ``m x n`` layer of this kind stores (no bias): ``k n + m s`` int8 values, ``k + m``
    row scales at ``value_bytes``, and ``m s`` packed indices."""
    values = atoms * n + m * nonzeros
    return values, values + (atoms + m) * value_bytes + packed_nbytes(m * nonzeros, index_bits(atoms))


@register_kind("dictionary_int8")
class Int8DictionaryLinear(CheckedIndices, CompressedLinear):
    """``x -> codes @ (dictionary @ x) + bias`` with ``s`` codes per output, stored at 8 bits.

    Stored: ``dictionary_codes`` ``(k, in)`` and ``value_codes`` ``(out, s)`` ``int8`` buffers with
    ``dictionary_scale`` ``(k,)`` and ``value_scale`` ``(out,)`` (floating-point parameters), ``indices`` (a flat
    ``uint8`` buffer, :func:`~rankwise.linalg.quant.pack_codes` of the ``(out, s)`` atom indices at
    :func:`index_bits`), and the bias. :attr:`num_params` counts the ``k in + out s`` values (and the bias), as the
    paper does. Spec ``{"atoms": k, "nonzeros": s}``; indices outside ``[0, k)`` are refused on loading.
    """

    def __init__(self, in_features: int, out_features: int, atoms: int, nonzeros: int, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, device=device, dtype=dtype)
        error = self.check_spec(in_features, out_features, {"atoms": atoms, "nonzeros": nonzeros})
        if error is not None:
            raise ValueError(error)
        self.atoms, self.nonzeros = atoms, nonzeros
        kw = {"device": device, "dtype": dtype}
        self.register_buffer("dictionary_codes", torch.zeros(atoms, in_features, dtype=torch.int8, device=device))
        self.register_buffer("value_codes", torch.zeros(out_features, nonzeros, dtype=torch.int8, device=device))
        self.dictionary_scale = nn.Parameter(torch.zeros(atoms, **kw))
        self.value_scale = nn.Parameter(torch.zeros(out_features, **kw))
        first = torch.arange(nonzeros, device=device).expand(out_features, nonzeros).flatten()
        self.register_buffer("indices", pack_codes(first, index_bits(atoms)))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_dictionary(cls, result: SparseDictionary, bias: torch.Tensor | None = None) -> Int8DictionaryLinear:
        """Quantise a :class:`~rankwise.linalg.dictionary.SparseDictionary` (floats kept in its dtype)."""
        out_features, in_features = result.shape
        D = result.dictionary
        layer = cls(in_features, out_features, result.atoms, result.nonzeros, bias is not None, device=D.device,
                    dtype=D.dtype)
        (d_codes, d_scale), (v_codes, v_scale) = int8_rows(D), int8_rows(result.values)
        with torch.no_grad():
            layer.dictionary_codes.copy_(d_codes)
            layer.dictionary_scale.copy_(d_scale)
            layer.value_codes.copy_(v_codes)
            layer.value_scale.copy_(v_scale)
            layer.indices.copy_(pack_codes(result.indices.flatten(), index_bits(result.atoms)))
            if bias is not None:
                layer.bias.copy_(bias.to(D.dtype))
        return layer

    @classmethod
    def check_spec(cls, in_features: int, out_features: int, spec: dict[str, Any]) -> str | None:
        if set(spec) != _SPEC:
            return f"{sorted(set(spec) ^ _SPEC)[0]}: a dictionary_int8 layer's spec is exactly {{atoms, nonzeros}}"
        return DictionaryLinear.check_spec(in_features, out_features, spec)

    @classmethod
    def from_spec(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any], *,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None
                  ) -> Int8DictionaryLinear:
        return cls(in_features, out_features, spec["atoms"], spec["nonzeros"], bias, device=device, dtype=dtype)

    def spec(self) -> dict[str, Any]:
        return {"atoms": self.atoms, "nonzeros": self.nonzeros}

    @property
    def num_params(self) -> int:
        """Stored values, ``k * in + out * s`` (+ bias): neither scales nor indices, as in the paper."""
        bias = self.bias.numel() if self.bias is not None else 0
        return self.dictionary_codes.numel() + self.value_codes.numel() + bias

    def atom_indices(self) -> torch.Tensor:
        """The ``(out, s)`` atom indices, unpacked (``int64``)."""
        codes = unpack_codes(self.indices, index_bits(self.atoms), self.out_features * self.nonzeros)
        return codes.long().view(self.out_features, self.nonzeros)

    def decoded_indices(self, stored: torch.Tensor) -> torch.Tensor | None:
        """The ``(out, s)`` atom indices a packed ``indices`` buffer holds (``None`` for a wrong size)."""
        if stored.dtype != torch.uint8:
            raise ValueError(f"must be packed uint8 codes, got {stored.dtype}")
        if stored.numel() != self.indices.numel():
            return None
        return unpack_codes(stored, index_bits(self.atoms), self.out_features * self.nonzeros).long()

    def dictionary(self) -> torch.Tensor:
        """The decoded ``(k, in)`` dictionary."""
        return int8_rows_decode(self.dictionary_codes, self.dictionary_scale)

    def values(self) -> torch.Tensor:
        """The decoded ``(out, s)`` code values."""
        return int8_rows_decode(self.value_codes, self.value_scale)

    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in)`` matrix ``codes @ dictionary``."""
        return scatter_codes(self.values(), self.atom_indices(), self.atoms) @ self.dictionary()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_codes_forward(x, self.dictionary(), self.values(), self.atom_indices(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, atoms={self.atoms}, "
                f"nonzeros={self.nonzeros}, bias={self.bias is not None}")

