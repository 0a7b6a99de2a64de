"""``SharedDictionaryLinear``: ``y = S (D x) + bias`` where the dictionary ``D`` is shared by the same projection of
several blocks and stored once (layer kind ``"shared_dictionary"``).

CoSpaDi's sparse codes (Shopkhoev et al. 2025, https://arxiv.org/abs/2509.22075) over one dictionary of row atoms
shared across blocks, the cross-layer sharing of "Share Your Attention" (Zhussip et al. 2025,
https://arxiv.org/abs/2508.04581, whose MASA shares whole-matrix atoms instead: not implemented). Every layer keeps
its own ``s`` codes per output; the first layer of the group stores the ``(k, in)`` dictionary, which the others read
(:class:`~rankwise.nn.shared.SharedTensor`). Spec ``{"atoms": k, "nonzeros": s, "dictionary": owner}`` (``null``
for the owner).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.linalg.dictionary import scatter_codes
from rankwise.nn.dictionary import CheckedIndices, DictionaryLinear, index_dtype, sparse_codes_forward
from rankwise.nn.kinds import CompressedLinear, register_kind
from rankwise.nn.shared import SharedTensor

_SPEC = frozenset({"atoms", "nonzeros", "dictionary"})


@register_kind("shared_dictionary")
class SharedDictionaryLinear(CheckedIndices, SharedTensor, CompressedLinear):
    """A sparse-dictionary layer whose ``(k, in)`` dictionary may be another layer's.

    Args:
        in_features, out_features: the shape of the ``nn.Linear`` it replaces.
        atoms: ``k``, atoms of the shared dictionary.
        nonzeros: ``s``, codes per output.
        bias: whether the layer has a bias.
        owner: ``None`` for the layer that stores the dictionary (as its parameter ``dictionary``), else the dotted
            name of that layer.

    Stored per layer: ``values`` ``(out, s)`` and the buffer ``indices`` ``(out, s)`` (int16, int32 beyond 32767
    atoms), as in ``"dictionary"``. :attr:`num_params` counts the values (the dictionary on its owner only).
    """

    owner_key, shared_param, what, same = "dictionary", "dictionary", "shared dictionary", ("atoms",)

    def __init__(self, in_features: int, out_features: int, atoms: int, nonzeros: int, bias: bool = True, *,
                 owner: str | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, device=device, dtype=dtype)
        error = self.check_spec(in_features, out_features, {"atoms": atoms, "nonzeros": nonzeros,
                                                            "dictionary": owner})
        if error is not None:
            raise ValueError(error)
        self.atoms, self.nonzeros = atoms, nonzeros
        self._link(owner)
        kw = {"device": device, "dtype": dtype}
        self.dictionary = nn.Parameter(torch.zeros(atoms, in_features, **kw)) if owner is None else None
        self.values = nn.Parameter(torch.zeros(out_features, nonzeros, **kw))
        first = torch.arange(nonzeros, device=device, dtype=index_dtype(atoms))
        self.register_buffer("indices", first.expand(out_features, nonzeros).clone())
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def check_spec(cls, in_features: int, out_features: int, spec: dict[str, Any]) -> str | None:
        if set(spec) != _SPEC:
            return (f"{sorted(set(spec) ^ _SPEC)[0]}: a shared_dictionary layer's spec is exactly "
                    "{atoms, nonzeros, dictionary}")
        owner = spec["dictionary"]
        if owner is not None and (not isinstance(owner, str) or not owner):
            return (f"dictionary: must be null (this layer stores the dictionary) or the name of the layer that does, "
                    f"got {owner!r}")
        return DictionaryLinear.check_spec(in_features, out_features,
                                           {"atoms": spec["atoms"], "nonzeros": spec["nonzeros"]})

    @classmethod
    def from_spec(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any], *,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None
                  ) -> SharedDictionaryLinear:
        return cls(in_features, out_features, spec["atoms"], spec["nonzeros"], bias, owner=spec["dictionary"],
                   device=device, dtype=dtype)

    def spec(self) -> dict[str, Any]:
        return {"atoms": self.atoms, "nonzeros": self.nonzeros, "dictionary": self.owner_name}

    @property
    def num_params(self) -> int:
        """Stored values: the code values (+ bias), and the ``k * in`` dictionary on its owner; not the indices."""
        return self.float_numel

    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in)`` matrix ``codes @ dictionary``."""
        return scatter_codes(self.values, self.indices, self.atoms) @ self.shared()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_codes_forward(x, self.shared(), self.values, self.indices, self.bias)

    def extra_repr(self) -> str:
        where = "stores the dictionary" if self.owner_name is None else f"dictionary of {self.owner_name}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, atoms={self.atoms}, "
                f"nonzeros={self.nonzeros}, {where}")
