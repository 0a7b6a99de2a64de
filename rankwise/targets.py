"""Which layers of a Hugging Face causal LM or encoder are compression targets."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from rankwise.nn import is_linear_like

FilterFn = Callable[[str, nn.Module], bool]


SHARED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj",  # Llama / Mistral / Qwen
                      "query", "key", "value", "fc1", "c_attn", "c_fc")  # BERT, OPT, GPT-2
"""Leaf names of the projections cross-block methods share by default (Basis Sharing found output and down
projections share badly; BERT's intermediate.dense is not named)."""


def target_group(name: str) -> str:
    """``"attn"`` for attention projections (a path component mentions attn/attention), else ``"mlp"``."""
    parts = name.lower().split(".")
    return "attn" if any("attn" in p or "attention" in p for p in parts) else "mlp"


def find_targets(model: nn.Module, groups: Iterable[str] = ("attn", "mlp"), filter_fn: FilterFn | None = None
                 ) -> dict[str, nn.Module]:
    """Linear-like layers in the transformer blocks, by name, in model order.

    The input and output embeddings (LM head) and an encoder's pooler (BERT's ``pooler.dense``, which
    sentence-transformers models do not use) are never included. ``filter_fn(name, module)`` narrows the choice.
    """
    groups = set(groups)
    excluded = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None:
            excluded.add(id(module))
    found = {}
    for name, module in model.named_modules():
        if not is_linear_like(module) or id(module) in excluded or "lm_head" in name or _in_pooler(name):
            continue
        if target_group(name) not in groups:
            continue
        if filter_fn is not None and not filter_fn(name, module):
            continue
        found[name] = module
    return found


def _in_pooler(name: str) -> bool:
    return "pooler" in name.split(".")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
