"""Which layers of a Hugging Face causal LM or encoder are compression targets."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from torch import nn

from rankwise.nn import is_linear_like

FilterFn = Callable[[str, nn.Module], bool]

TARGET_GROUPS = ("attn", "mlp")
"""The layer groups ``targets`` may name; any other item is a layer's own name (the last part of its path)."""
_LAYER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


SHARED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj",  # Llama / Mistral / Qwen
                      "query", "key", "value", "fc1", "c_attn", "c_fc")  # BERT, OPT, GPT-2
"""Leaf names of the projections cross-block methods share by default (Basis Sharing found output and down
projections share badly; BERT's intermediate.dense is not named)."""


def target_group(name: str) -> str:
    """``"attn"`` for attention projections (a path component mentions attn/attention), else ``"mlp"``."""
    parts = name.lower().split(".")
    return "attn" if any("attn" in p or "attention" in p for p in parts) else "mlp"


def check_targets(targets: Iterable[str]) -> tuple[str, ...]:
    """``targets`` as a tuple, each a group (``attn``, ``mlp``) or a layer name such as ``q_proj``.

    Raises:
        ValueError: empty, or an item that is neither a group nor a name (a path, a pattern, a blank).
    """
    items = (targets,) if isinstance(targets, str) else tuple(targets)
    bad = [t for t in items if not isinstance(t, str) or not _LAYER_NAME.fullmatch(t)]
    if not items or bad:
        raise ValueError(f"targets must be groups ({', '.join(TARGET_GROUPS)}) and/or layer names such as q_proj, "
                         f"got {items!r}")
    return items


def selects(name: str, targets: Iterable[str]) -> bool:
    """Whether the layer at path ``name`` is one of ``targets`` (its group, or its own last path component)."""
    targets = set(targets)
    return target_group(name) in targets or name.rsplit(".", 1)[-1] in targets


def unmatched_targets(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """The items of ``targets`` that select no linear layer of ``model``'s blocks (a misspelt layer name)."""
    names = list(find_targets(model))
    return [t for t in targets if not any(selects(n, (t,)) for n in names)]


def refuse_unmatched(names: Iterable[str], targets: Iterable[str]) -> None:
    """Raise when a layer name in ``targets`` selects none of the layer paths ``names`` (groups are never refused:
    a model may have no layer of one group).

    Raises:
        ValueError: one line naming the misspelt items and the allowed groups and layer names.
    """
    names = list(names)
    unmatched = [t for t in targets if t not in TARGET_GROUPS and not any(selects(n, (t,)) for n in names)]
    if unmatched:
        leaves = dict.fromkeys(n.rsplit(".", 1)[-1] for n in names)
        raise ValueError(f"targets {', '.join(unmatched)} match no linear layer of the model's blocks; allowed: "
                         f"{', '.join(TARGET_GROUPS)} or the layer names {', '.join(leaves)}")


def find_targets(model: nn.Module, groups: Iterable[str] = TARGET_GROUPS, filter_fn: FilterFn | None = None
                 ) -> dict[str, nn.Module]:
    """Linear-like layers in the transformer blocks, by name, in model order; ``groups`` selects them by group
    (``attn``, ``mlp``) or by layer name (:func:`selects`).

    The input and output embeddings (LM head) and an encoder's pooler (BERT's ``pooler.dense``, which
    sentence-transformers models do not use) are never included. ``filter_fn(name, module)`` narrows the choice.
    """
    groups = tuple(groups)
    excluded = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None:
            excluded.add(id(module))
    found = {}
    for name, module in model.named_modules():
        if not is_linear_like(module) or id(module) in excluded or "lm_head" in name or _in_pooler(name):
            continue
        if not selects(name, groups):
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
