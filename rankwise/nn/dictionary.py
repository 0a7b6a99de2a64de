"""``DictionaryLinear``: ``y = S (D x) + bias`` with a dense dictionary ``D`` and ``s`` codes per output (layer kind
``"dictionary"``). CoSpaDi, Shopkhoev et al. (2025), https://arxiv.org/abs/2509.22075; the fit is in
:mod:`rankwise.linalg.dictionary`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.linalg.dictionary import SparseDictionary, scatter_codes
from rankwise.nn.kinds import CompressedLinear, register_kind

_SPEC = frozenset({"atoms", "nonzeros"})
INT16_ATOMS = 32767
"""Up to this many atoms the indices are stored as int16, beyond it as int32."""
MAX_ATOMS = 2**31 - 1
GATHER_LIMIT = 1 << 22
"""The forward pass gathers ``(tokens, out, s)`` code products up to this many elements (decoding); beyond it, it
multiplies by the dense ``(out, k)`` code matrix, which is faster and needs no such temporary."""


def sparse_codes_forward(x: torch.Tensor, dictionary: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """``codes @ (dictionary @ x) + bias`` for a ``(k, in)`` dictionary and ``(out, s)`` values at ``indices``: a
    gather of the code products while they are small (decoding), else one product with the dense ``(out, k)``
    code matrix."""
    atoms = dictionary.shape[0]
    z = F.linear(x, dictionary)  # (..., k)
    if z.numel() // atoms * values.numel() <= GATHER_LIMIT:
        y = (z[..., indices.long()] * values).sum(-1)  # (..., out, s) -> (..., out)
        return y if bias is None else y + bias
    return F.linear(z, scatter_codes(values, indices, atoms), bias)


def index_dtype(atoms: int) -> torch.dtype:
    """The integer type of the stored atom indices for a dictionary of ``atoms`` atoms."""
    return torch.int16 if atoms <= INT16_ATOMS else torch.int32


def index_error(indices: torch.Tensor, atoms: int) -> str | None:
    """``None`` if ``indices`` is an integer tensor with every entry in ``[0, atoms)``, else what is wrong."""
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        return f"indices: must be integers, got {indices.dtype}"
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= atoms):
        return f"indices: must lie in [0, atoms = {atoms}), got values in [{int(indices.min())}, " \
               f"{int(indices.max())}]"
    return None


class CheckedIndices:
    """Mixin of the dictionary kinds: atom indices outside ``[0, atoms)`` are refused with a ``ValueError`` naming
    the layer, when a state dict is loaded (before anything is copied) and by :meth:`resolve` after transformers'
    loading (which assigns tensors without ``load_state_dict``). A kind that stores its indices in another form
    overrides :meth:`decoded_indices`."""

    atoms: int
    kind: str

    def decoded_indices(self, stored: torch.Tensor) -> torch.Tensor | None:
        """The atom indices a stored ``indices`` tensor holds (``None``: it has the wrong size, which the loader
        itself refuses; a ``ValueError`` saying what is wrong with it otherwise)."""
        return stored

    def _refuse(self, stored: torch.Tensor, name: str) -> None:
        try:
            indices = self.decoded_indices(stored)
        except ValueError as err:
            raise ValueError(f"{self.kind} layer {name or '(root)'}: indices: {err}") from None
        error = index_error(indices, self.atoms) if indices is not None else None
        if error is not None:
            raise ValueError(f"{self.kind} layer {name or '(root)'}: {error}")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        if prefix + "indices" in state_dict:
            self._refuse(state_dict[prefix + "indices"], prefix[:-1])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]

    def resolve(self, model: nn.Module) -> None:
        super().resolve(model)  # type: ignore[misc]
        self._refuse(self.indices, next((n for n, m in model.named_modules() if m is self), ""))  # type: ignore


@register_kind("dictionary")
class DictionaryLinear(CheckedIndices, CompressedLinear):
    """A linear map ``x -> codes @ (dictionary @ x) + bias`` with exactly ``s`` codes per output.

    ``dictionary`` is ``(k, in)``, ``values`` ``(out, s)`` and the buffer ``indices`` ``(out, s)`` (int16 for
    ``k <= 32767``, else int32) says which atoms each output combines. :attr:`num_params` counts the values,
    ``k * in + out * s``, as the paper does; :attr:`nbytes` adds the indices. Layer kind ``"dictionary"``, spec
    ``{"atoms": k, "nonzeros": s}``. Indices outside ``[0, k)`` are refused with a ``ValueError`` naming the layer
    when a state dict is loaded, and by :meth:`resolve` after transformers' loading.
    """

    def __init__(self, in_features: int, out_features: int, atoms: int, nonzeros: int, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, device=device, dtype=dtype)
        error = self.check_spec(in_features, out_features, {"atoms": atoms, "nonzeros": nonzeros})
        if error is not None:
            raise ValueError(error)
        self.atoms, self.nonzeros = atoms, nonzeros
        kw = {"device": device, "dtype": dtype}
        self.dictionary = nn.Parameter(torch.empty(atoms, in_features, **kw))
        self.values = nn.Parameter(torch.zeros(out_features, nonzeros, **kw))
        first = torch.arange(nonzeros, device=device, dtype=index_dtype(atoms))
        self.register_buffer("indices", first.expand(out_features, nonzeros).clone())
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        nn.init.kaiming_uniform_(self.dictionary, a=5**0.5)

    @classmethod
    def from_dictionary(cls, result: SparseDictionary, bias: torch.Tensor | None = None) -> DictionaryLinear:
        """Build from a :class:`~rankwise.linalg.dictionary.SparseDictionary` (in its dtype and device)."""
        out_features, in_features = result.shape
        D = result.dictionary
        layer = cls(in_features, out_features, result.atoms, result.nonzeros, bias is not None, device=D.device,
                    dtype=D.dtype)
        with torch.no_grad():
            layer.dictionary.copy_(D)
            layer.values.copy_(result.values)
            layer.indices.copy_(result.indices)
            if bias is not None:
                layer.bias.copy_(bias.to(D.dtype))
        return layer

    @classmethod
    def check_spec(cls, in_features: int, out_features: int, spec: dict[str, Any]) -> str | None:
        if set(spec) != _SPEC:
            return f"{sorted(set(spec) ^ _SPEC)[0]}: a dictionary layer's spec is exactly {{atoms, nonzeros}}"
        atoms, nonzeros = spec["atoms"], spec["nonzeros"]
        if not isinstance(atoms, int) or isinstance(atoms, bool) or not 1 <= atoms <= MAX_ATOMS:
            return f"atoms: must be an integer in [1, {MAX_ATOMS}] (int32 indices), got {atoms!r}"
        if not isinstance(nonzeros, int) or isinstance(nonzeros, bool) or not 1 <= nonzeros <= atoms:
            return f"nonzeros: must be an integer in [1, atoms = {atoms}], got {nonzeros!r}"
        return None

    @classmethod
    def from_spec(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any], *,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DictionaryLinear:
        return cls(in_features, out_features, spec["atoms"], spec["nonzeros"], bias, device=device, dtype=dtype)

    def spec(self) -> dict[str, Any]:
        return {"atoms": self.atoms, "nonzeros": self.nonzeros}

    @property
    def num_params(self) -> int:
        """Stored values, ``k * in + out * s`` (+ bias): the indices are not counted, as in the paper."""
        return self.float_numel

    def codes(self) -> torch.Tensor:
        """The dense ``(out, k)`` code matrix."""
        return scatter_codes(self.values, self.indices, self.atoms)

    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in)`` matrix ``codes @ dictionary``."""
        return self.codes() @ self.dictionary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_codes_forward(x, self.dictionary, self.values, self.indices, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, atoms={self.atoms}, " \
               f"nonzeros={self.nonzeros}, bias={self.bias is not None}"
