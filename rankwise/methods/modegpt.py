"""MoDeGPT: structured compression into smaller dense matrices. Lin et al., "MoDeGPT: Modular Decomposition for
Large Language Model Compression", ICLR 2025, https://arxiv.org/abs/2408.09632.

Each decoder block keeps a fraction ``keep`` of every module's inner width (the closed forms are in
:mod:`rankwise.linalg.structured`):

* gated MLP: ``keep * intermediate`` neurons by ridge leverage scores of their activation correlation (the down
  projection's input second moment), down projection refitted by the Nyström correction;
* query/key: ``keep * head_dim`` dimensions per head (rounded to rotary pairs) by the CR scores of query and key
  energies, **one selection per layer shared by all heads** (the paper selects per head; sharing lets the attention
  run through transformers' own code with a smaller ``head_dim`` and the rotary tables sliced once);
* value/output: the same width per head by one SVD of the whitened value-output products of each key/value group.

Per-block budgets (``layer_budgets="influence"``, the paper's global allocation): block ``i`` removes
``phi_i = L * ratio * softmax(-s / temperature)_i`` of its targeted parameters, ``s_i = 1 - cos(x_in, x_out)`` its
block influence on calibration data (ShortGPT's score: blocks that change their input the least lose the most),
capped at ``max_removed`` with the excess handed to the other blocks.

The output is smaller dense matrices (layer kind ``"narrow"``), faster at every batch size, with no factor pairs.
Llama-style decoders only (rotary attention with ``q/k/v/o_proj``, gated MLP, no projection biases).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from rankwise.calibrate import LayerStats
from rankwise.calibrate.stats import relative_output_error
from rankwise.linalg.structured import (
    nystrom_columns,
    ridge_leverage_scores,
    rope_pair_selection,
    whitened_value_output,
)
from rankwise.methods.base import CompressConfig, register_block_method
from rankwise.nn import NarrowLinear, linear_weight, narrow_attention_
from rankwise.report import LayerReport

LAYER_BUDGETS = ("influence", "uniform")
MODEL_TYPES = frozenset({"llama", "mistral"})
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModeGPTConfig(CompressConfig):
    """MoDeGPT; the knob is each module's kept width (neurons of an MLP, dimensions per attention head).

    Attributes:
        layer_budgets: ``"influence"``: per-block fractions from the block influence scores (the paper's global
            allocation, one extra forward pass over the calibration data); ``"uniform"``: ``ratio`` in every block.
        temperature: the softmax temperature ``epsilon`` of the influence allocation: smaller moves more of the
            budget to the least influential blocks. The default 0.15 is the public reimplementation's
            (cbacary/MoDeGPT); on SmolLM2-135M at ratio 0.2 it gave perplexity 21.82, 0.05 gave 22.15, 0.02 gave
            22.85 and uniform budgets 21.59 (``benchmarks/RESULTS.md``).
        max_removed: the most any block may lose, in ``(ratio, 1)``.
        ridge: relative ridge of the MLP's leverage scores (times the mean activation energy).
    """

    name: ClassVar[str] = "modegpt"
    needs: ClassVar[frozenset[str]] = frozenset({"xxt"})
    knob: ClassVar[str] = "width"
    units: ClassVar[tuple[str, ...]] = ("params",)
    structured: ClassVar[bool] = True
    layer_budgets: str = "influence"
    temperature: float = 0.15
    max_removed: float = 0.8
    ridge: float = 1e-2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_budgets not in LAYER_BUDGETS:
            raise ValueError(f"layer_budgets must be one of {', '.join(LAYER_BUDGETS)}, got {self.layer_budgets!r}")
        if self.allocation != "uniform":
            raise ValueError(f"modegpt spreads its budget per block (layer_budgets={', '.join(LAYER_BUDGETS)}), not "
                             f"per matrix: allocation must stay 'uniform', got {self.allocation!r}")
        if self.update_u:
            raise ValueError("modegpt refits its own projections (Nyström, value-output SVD): update_u is not "
                             "supported with it")
        for field, low, high in (("temperature", 0.0, math.inf), ("max_removed", self.ratio, 1.0),
                                 ("ridge", 0.0, math.inf)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low < value < high:
                raise ValueError(f"{field} must be a number in ({low:g}, {high:g}), got {value!r}")

    @property
    def needs_influence(self) -> bool:
        """Whether the plan runs the block-influence pass before compressing."""
        return self.layer_budgets == "influence"

    def check_model(self, model: nn.Module) -> None:
        """A one-line ``ValueError`` unless ``model`` is a decoder this method can narrow."""
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in MODEL_TYPES:
            raise ValueError(f"modegpt narrows Llama-style decoders (model types {', '.join(sorted(MODEL_TYPES))}: "
                             f"rotary attention with q/k/v/o_proj and a gated MLP), got model type {model_type!r}")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise ValueError("modegpt: projections with biases are not supported (attention_bias / mlp_bias set)")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if head_dim % 2:
            raise ValueError(f"modegpt keeps rotary pairs of head dimensions: head_dim must be even, got {head_dim}")

    def block_keeps(self, influence: Sequence[float] | None, n_blocks: int) -> list[float]:
        """The fraction of its targeted parameters each block keeps (see the module docstring)."""
        if influence is None:
            return [1.0 - self.ratio] * n_blocks
        s = torch.tensor(list(influence), dtype=torch.float64)
        weights = torch.softmax(-s / self.temperature, dim=0)
        removed = weights * n_blocks * self.ratio
        for _ in range(n_blocks):  # cap, handing the excess to the uncapped blocks in proportion
            over = removed > self.max_removed
            if not bool(over.any()):
                break
            excess = float((removed[over] - self.max_removed).sum())
            removed[over] = self.max_removed
            free = removed < self.max_removed
            share = weights[free] / weights[free].sum() if float(weights[free].sum()) > 0 else \
                torch.full_like(weights[free], 1.0 / int(free.sum()))  # softmax underflow: spread it evenly
            removed[free] += excess * share
        return (1.0 - removed).tolist()


def _groups(modules: Mapping[str, nn.Module]) -> dict[str, dict[str, str]]:
    """Parent module name -> {leaf: full name} of the targeted projections."""
    out: dict[str, dict[str, str]] = {}
    for name in modules:
        parent, _, leaf = name.rpartition(".")
        out.setdefault(parent, {})[leaf] = name
    return out


def _row(name: str, weight: torch.Tensor, new: NarrowLinear, width: int, stats: LayerStats,
         error: float | None = None, notes: str = "") -> LayerReport:
    """The report row; ``error`` defaults to the layer's own relative output error on the calibration inputs."""
    if error is None:
        error = relative_output_error(weight, new.dense_weight().detach(), stats)
    return LayerReport(name, tuple(weight.shape), width, weight.numel(), new.num_params, error, notes, False,
                       kind=new.kind, knob="width", floats_after=new.float_numel, fixed_bytes_after=new.fixed_nbytes)


def _dense_row(name: str, weight: torch.Tensor, why: str) -> LayerReport:
    m, n = weight.shape
    return LayerReport(name, (m, n), min(m, n), m * n, m * n, 0.0, why)


def _attention(model: nn.Module, parent: str, names: Mapping[str, str], stats: Mapping[str, LayerStats],
               keep: float, config: ModeGPTConfig) -> list[tuple[str, nn.Module | None, LayerReport]]:
    attn = model.get_submodule(parent)
    W = {leaf: linear_weight(attn.get_submodule(leaf)).detach() for leaf in ATTENTION}
    d = attn.head_dim
    heads, kv_heads = W["q_proj"].shape[0] // d, W["k_proj"].shape[0] // d
    width = min(d, max(2, 2 * round(keep * d / 2)))
    if width == d:
        return [(names[leaf], None, _dense_row(names[leaf], W[leaf], "kept dense (block budget keeps all)"))
                for leaf in ATTENTION]
    layer_stats = stats[names["v_proj"]]
    C = layer_stats.covariance  # (n, n), shared by q, k and v
    energy = {}
    for leaf in ("q_proj", "k_proj"):
        Wd = W[leaf].to(C.device, torch.float64)
        energy[leaf] = ((Wd @ C) * Wd).sum(1)  # (heads * d,): ||X^T w_j||^2 per output
    index = rope_pair_selection(energy["q_proj"].view(heads, d), energy["k_proj"].view(kv_heads, d), width)
    index = index.to(W["q_proj"].device)
    out = []
    for leaf, count in (("q_proj", heads), ("k_proj", kv_heads)):
        rows = (torch.arange(count, device=index.device)[:, None] * d + index).flatten()  # head-major positions
        new = NarrowLinear.from_matrix(W[leaf][rows], W[leaf].shape[1], W[leaf].shape[0], out_index=rows)
        out.append((names[leaf], new, _row(names[leaf], W[leaf], new, width, layer_stats)))
    new_vw, new_ow = whitened_value_output(W["v_proj"], W["o_proj"], layer_stats.whitening(), heads, kv_heads, width)
    first = torch.arange(width, device=index.device)
    v_rows = (torch.arange(kv_heads, device=index.device)[:, None] * d + first).flatten()
    o_cols = (torch.arange(heads, device=index.device)[:, None] * d + first).flatten()
    new_v = NarrowLinear.from_matrix(new_vw, W["v_proj"].shape[1], W["v_proj"].shape[0], out_index=v_rows)
    new_o = NarrowLinear.from_matrix(new_ow, W["o_proj"].shape[1], W["o_proj"].shape[0], in_index=o_cols)
    group = heads // kv_heads  # the value-output map without the attention weights, every query head's summed
    dense_vo = W["o_proj"] @ W["v_proj"].view(kv_heads, d, -1).repeat_interleave(group, 0).flatten(0, 1)
    new_vo = new_ow @ new_vw.view(kv_heads, width, -1).repeat_interleave(group, 0).flatten(0, 1)
    error = relative_output_error(dense_vo, new_vo, layer_stats)
    for leaf, new in (("v_proj", new_v), ("o_proj", new_o)):
        out.append((names[leaf], new, _row(names[leaf], W[leaf], new, width, layer_stats, error,
                                           "error of the value-output map")))
    narrow_attention_(attn, index)
    return out


def _mlp(model: nn.Module, parent: str, names: Mapping[str, str], stats: Mapping[str, LayerStats], keep: float,
         config: ModeGPTConfig) -> list[tuple[str, nn.Module | None, LayerReport]]:
    mlp = model.get_submodule(parent)
    W = {leaf: linear_weight(mlp.get_submodule(leaf)).detach() for leaf in MLP}
    width_full = W["down_proj"].shape[1]
    width = min(width_full, max(1, round(keep * width_full)))
    if width == width_full:
        return [(names[leaf], None, _dense_row(names[leaf], W[leaf], "kept dense (block budget keeps all)"))
                for leaf in MLP]
    down_stats = stats[names["down_proj"]]
    C = down_stats.covariance  # (inter, inter): correlation of the activations act(gate x) * up x
    scores = ridge_leverage_scores(C, config.ridge)
    kept = torch.topk(scores, width, sorted=False).indices.sort().values.to(W["down_proj"].device)
    out = []
    for leaf in ("gate_proj", "up_proj"):
        new = NarrowLinear.from_matrix(W[leaf][kept], W[leaf].shape[1], W[leaf].shape[0], out_index=kept)
        out.append((names[leaf], new, _row(names[leaf], W[leaf], new, width, stats[names[leaf]])))
    down = nystrom_columns(W["down_proj"], C, kept)
    new = NarrowLinear.from_matrix(down, width_full, W["down_proj"].shape[0], in_index=kept)
    out.append((names["down_proj"], new, _row(names["down_proj"], W["down_proj"], new, width, down_stats)))
    return out


@register_block_method(ModeGPTConfig)
def modegpt_block(model: nn.Module, modules: Mapping[str, nn.Module], stats: Mapping[str, LayerStats] | None,
                  keep: float, config: ModeGPTConfig) -> list[tuple[str, nn.Module | None, LayerReport]]:
    """Narrow one block's attention and MLP to ``keep`` of their widths: ``(name, new layer or None if kept dense,
    report row)`` per targeted projection (the attention module is patched in place)."""
    if stats is None or any(name not in stats for name in modules):
        raise ValueError("modegpt needs calibration data (the input correlations of every targeted projection)")
    parts: dict[str, tuple[str, dict[str, str]]] = {}
    for parent, names in _groups(modules).items():
        leaves = set(names)
        part = "attention" if leaves & set(ATTENTION) else "mlp" if leaves & set(MLP) else None
        expected = ATTENTION if part == "attention" else MLP
        if part is None:
            raise ValueError(f"modegpt narrows attention (q/k/v/o_proj) and gated MLP (gate/up/down_proj) modules; "
                             f"{parent} holds {', '.join(sorted(leaves))}")
        if leaves != set(expected):
            raise ValueError(f"modegpt narrows whole modules: {parent} needs all of {', '.join(expected)} targeted, "
                             f"got {', '.join(sorted(leaves))}")
        if any(modules[n].bias is not None for n in names.values()):
            raise ValueError(f"modegpt: {parent} has projection biases, which are not supported")
        parts[part] = (parent, names)
    out = []
    total = sum(linear_weight(m).numel() for m in modules.values())
    if "attention" in parts:
        out += _attention(model, *parts["attention"], stats, keep, config)
    if "mlp" in parts:
        if "attention" in parts:  # the MLP absorbs the attention's rounding (rotary pairs): the block meets its budget
            spent = sum(row.params_after for _, _, row in out)
            mlp = sum(linear_weight(modules[n]).numel() for n in parts["mlp"][1].values())
            keep = min(1.0, max(0.0, (keep * total - spent) / mlp))
        out += _mlp(model, *parts["mlp"], stats, keep, config)
    return out
