"""``NarrowLinear``: a smaller dense matrix standing in for an ``nn.Linear`` whose inner width was reduced (layer
kind ``"narrow"``), and the attention patch that lets a Llama-style attention run with a smaller head dimension.

Structured compression (MoDeGPT, https://arxiv.org/abs/2408.09632) removes whole intermediate neurons of an MLP and
whole dimensions of every attention head, so the layers that remain are ordinary dense matrices of smaller shape: a
gate/up projection keeps ``rows < out`` of its outputs, a down projection reads ``cols < in`` inputs. Each layer still
states the shape of the dense slot it fills (``in_features x out_features``, what the manifest checks against the
architecture), and where its rows or columns sit in that slot (``out_index`` / ``in_index``), so
:meth:`NarrowLinear.dense_weight` is the zero-padded matrix that computes the same function in the original
architecture: removed neurons and head dimensions contribute exactly zero.

The attention patch (:func:`narrow_attention_`) sets the module's ``head_dim`` to the kept width and slices the rotary
embedding's ``cos``/``sin`` to the kept positions, so transformers' own attention code (eager, SDPA, the dynamic KV
cache, and the static one, which takes each layer's width from its first keys) runs unchanged. One set of kept
positions per layer, shared by every head: RoPE rotates position ``i`` with ``i + d/2``, so positions are kept in
those pairs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.nn.kinds import CompressedLinear, register_kind

_SPEC = frozenset({"rows", "cols"})


@register_kind("narrow")
class NarrowLinear(CompressedLinear):
    """``y = M x + bias`` with ``M`` a dense ``(rows, cols)`` matrix, standing in for an ``(out, in)`` linear layer
    whose outputs (``rows < out``) or inputs (``cols < in``) were reduced.

    ``out_index`` (``(rows,)`` int32, present when ``rows < out``) and ``in_index`` (``(cols,)``, when
    ``cols < in``) are the positions of the kept rows and columns in the dense slot. The layer's forward pass maps
    ``cols`` inputs to ``rows`` outputs: the surrounding module must be narrowed to match (MoDeGPT narrows a gated
    MLP's three projections and an attention's four together). Layer kind ``"narrow"``, spec
    ``{"rows": rows, "cols": cols}``; the index tensors are stored bytes but not counted as parameters.
    """

    streamable: ClassVar[bool] = False  # its positions are integer buffers, which the streamed reader does not load

    def __init__(self, in_features: int, out_features: int, rows: int, cols: int, bias: bool = False, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, device=device, dtype=dtype)
        problem = _shape_error(in_features, out_features, rows, cols)
        if problem is not None:
            raise ValueError(problem)
        self.rows, self.cols = rows, cols
        self.matrix = nn.Parameter(torch.zeros(rows, cols, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(rows, device=device, dtype=dtype)) if bias else None
        if rows < out_features:
            self.register_buffer("out_index", torch.arange(rows, device=device, dtype=torch.int32))
        if cols < in_features:
            self.register_buffer("in_index", torch.arange(cols, device=device, dtype=torch.int32))

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor, in_features: int, out_features: int, *,
                    out_index: torch.Tensor | None = None, in_index: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> NarrowLinear:
        """A layer applying ``matrix`` (``(rows, cols)``), whose rows sit at ``out_index`` and columns at
        ``in_index`` of an ``(out_features, in_features)`` slot (``None``: all of them, in order)."""
        rows, cols = matrix.shape
        layer = cls(in_features, out_features, rows, cols, bias is not None, device=matrix.device,
                    dtype=matrix.dtype)
        with torch.no_grad():
            layer.matrix.copy_(matrix)
            if bias is not None:
                layer.bias.copy_(bias.to(matrix.dtype))
            for name, index, size in (("out_index", out_index, out_features), ("in_index", in_index, in_features)):
                if index is None:
                    continue
                index = torch.as_tensor(index).to(matrix.device, torch.int32)
                if not hasattr(layer, name):
                    raise ValueError(f"{name} is given but that side is not narrowed ({size} of {size} kept)")
                if index.shape != getattr(layer, name).shape or bool((index < 0).any() | (index >= size).any()) \
                        or index.unique().numel() != index.numel():
                    raise ValueError(f"{name} must hold {getattr(layer, name).numel()} distinct positions in "
                                     f"[0, {size}), got shape {tuple(index.shape)}")
                getattr(layer, name).copy_(index)
        return layer

    @classmethod
    def check_spec(cls, in_features: int, out_features: int, spec: dict[str, Any]) -> str | None:
        if set(spec) != _SPEC:
            return f"{sorted(set(spec) ^ _SPEC)[0]}: a narrow layer's spec is exactly {{rows, cols}}"
        if not all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in _SPEC):
            return "rows: rows and cols must be integers"
        return _shape_error(in_features, out_features, spec["rows"], spec["cols"])

    @classmethod
    def from_spec(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any], *,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> NarrowLinear:
        return cls(in_features, out_features, spec["rows"], spec["cols"], bias, device=device, dtype=dtype)

    def spec(self) -> dict[str, Any]:
        return {"rows": self.rows, "cols": self.cols}

    def set_bias(self, bias: torch.Tensor | None) -> None:
        """Give the layer a bias of the dense slot (``(out,)``, its kept rows are taken) or of its own ``(rows,)``."""
        if bias is not None and bias.shape[0] == self.out_features and self.rows < self.out_features:
            bias = bias[self.out_index.long()]
        super().set_bias(bias)

    @property
    def num_params(self) -> int:
        """The matrix and the bias; the int32 position indices are bytes (:attr:`fixed_nbytes`), not values."""
        return self.float_numel

    @property
    def io_shape(self) -> tuple[int, int]:
        return self.cols, self.rows

    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in)`` matrix of the dense slot: this layer's matrix at its positions, zeros elsewhere."""
        rows = self.out_index.long() if self.rows < self.out_features else slice(None)
        cols = self.in_index.long() if self.cols < self.in_features else slice(None)
        W = self.matrix.new_zeros(self.out_features, self.in_features)
        if isinstance(rows, slice):
            W[:, cols] = self.matrix
        elif isinstance(cols, slice):
            W[rows] = self.matrix
        else:
            W[rows[:, None], cols[None, :]] = self.matrix
        return W

    def dense_bias(self) -> torch.Tensor | None:
        """The ``(out,)`` bias of the dense slot (zeros at removed rows), or ``None``."""
        if self.bias is None or self.rows == self.out_features:
            return self.bias
        return self.bias.new_zeros(self.out_features).index_copy(0, self.out_index.long(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.matrix, self.bias)

    def resolve(self, model: nn.Module) -> None:
        """As an attention's query projection: narrow that attention to the kept head dimensions."""
        for module in model.modules():
            if getattr(module, "q_proj", None) is self:
                narrow_attention_from_layers_(module)
                return

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rows={self.rows}, " \
               f"cols={self.cols}, bias={self.bias is not None}"


def _shape_error(in_features: int, out_features: int, rows: int, cols: int) -> str | None:
    if not 1 <= rows <= out_features:
        return f"rows: must be in [1, {out_features}] (the slot's outputs), got {rows}"
    if not 1 <= cols <= in_features:
        return f"cols: must be in [1, {in_features}] (the slot's inputs), got {cols}"
    if rows == out_features and cols == in_features:
        return "rows: a narrow layer keeps fewer rows or fewer columns than its slot"
    return None


# -- attention with a smaller head dimension ---------------------------------------------------------------------------

def _slice_rope(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Forward pre-hook: the rotary ``cos``/``sin`` at the kept head positions (``module.rope_index``)."""
    embeddings = kwargs.get("position_embeddings")
    if embeddings is None:
        raise RuntimeError("a narrowed attention needs its rotary embeddings passed as position_embeddings=(cos, sin)")
    index = module.rope_index
    cos, sin = embeddings
    kwargs["position_embeddings"] = (cos.index_select(-1, index), sin.index_select(-1, index))
    return args, kwargs


def is_narrowed(attention: nn.Module) -> bool:
    """Whether :func:`narrow_attention_` patched ``attention``."""
    return any(hook is _slice_rope for hook in attention._forward_pre_hooks.values())


def narrow_attention_(attention: nn.Module, index: torch.Tensor) -> None:
    """Let a Llama-style ``attention`` (``q/k/v/o_proj``, ``head_dim``, rotary ``position_embeddings``) run with
    ``len(index)`` dimensions per head, ``index`` being their positions in the original head (in rotary pairs
    ``i, i + head_dim/2``, first halves first). Its projections must already be narrowed to match."""
    index = torch.as_tensor(index).long().to(next(attention.q_proj.parameters()).device)
    if "rope_index" in attention._buffers:
        attention.rope_index = index
    else:
        attention.register_buffer("rope_index", index, persistent=False)
    if not hasattr(attention, "original_head_dim"):
        attention.original_head_dim = attention.head_dim
    attention.head_dim = index.numel()
    if not is_narrowed(attention):
        attention.register_forward_pre_hook(_slice_rope, with_kwargs=True)


def restore_attention_(attention: nn.Module) -> None:
    """Undo :func:`narrow_attention_` (for projections densified back to the original head dimension)."""
    for key, hook in list(attention._forward_pre_hooks.items()):
        if hook is _slice_rope:
            del attention._forward_pre_hooks[key]
            attention._forward_pre_hooks_with_kwargs.pop(key, None)
    if hasattr(attention, "original_head_dim"):
        attention.head_dim = attention.original_head_dim
        del attention.original_head_dim
    attention._buffers.pop("rope_index", None)


def restore_attentions_(model: nn.Module) -> None:
    """:func:`restore_attention_` on every narrowed attention of ``model``."""
    for module in model.modules():
        if is_narrowed(module):
            restore_attention_(module)


def narrow_attention_from_layers_(attention: nn.Module) -> None:
    """Narrow ``attention`` to the head width its narrowed projections imply (after loading a checkpoint): the kept
    positions are the query projection's first head's rows. Checks that q, k, v and o agree.

    Raises:
        ValueError: the four projections are not narrowed consistently.
    """
    q, k, v, o = (getattr(attention, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    heads = q.out_features // getattr(attention, "original_head_dim", attention.head_dim)
    kv_heads = k.out_features * heads // q.out_features
    if not all(isinstance(p, NarrowLinear) for p in (q, k, v, o)) or q.rows % heads:
        raise ValueError("a narrowed attention needs its q, k, v and o projections all narrowed, q by a whole "
                         "number of dimensions per head")
    width = q.rows // heads
    if (k.rows, v.rows, o.cols) != (kv_heads * width, kv_heads * width, heads * width):
        raise ValueError(f"narrowed attention: q keeps {width} dimensions per head but k keeps {k.rows}, v {v.rows} "
                         f"and o reads {o.cols} (expected {kv_heads * width}, {kv_heads * width}, {heads * width})")
    narrow_attention_(attention, q.out_index[:width].long())
