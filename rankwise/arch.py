"""Which kind of model a Hugging Face config or module is: a causal LM (decoder) or a bidirectional encoder.

rankwise compresses both. Causal LMs are built with ``AutoModelForCausalLM`` and calibrated on their LM loss; encoders
(BERT family, sentence-transformers models) are built with ``AutoModel`` (the bare encoder, no task head) and
calibrated on an embedding loss (:mod:`rankwise.calibrate.objective`). The decision reads only the config:

* a config whose ``architectures`` names a causal-LM class of ``transformers``, or with ``is_decoder`` set, is a
  causal LM (e.g. ``BertLMHeadModel``);
* otherwise a ``model_type`` that ``transformers`` registers for masked language modelling (``bert``, ``roberta``,
  ``distilbert``, ``mpnet``, ``modernbert`` ...) is an encoder;
* everything else is a causal LM, as before.

A sentence-transformers model such as all-MiniLM-L6-v2 (``architectures: ["BertModel"]``) is therefore an encoder;
``transformers`` alone would map its ``model_type`` to ``BertLMHeadModel`` and miss the LM head's tensors.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

__all__ = ["auto_class", "context_length", "is_encoder", "is_encoder_config", "model_kind"]


@functools.cache
def _causal_class_names() -> frozenset[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, tuple | list) else (value,))
    return frozenset(names)


@functools.cache
def _masked_lm_types() -> frozenset[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return frozenset(MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def is_encoder_config(config: Any) -> bool:
    """Whether a Hugging Face config describes a bidirectional encoder (see the module docstring)."""
    architectures = getattr(config, "architectures", None) or []
    if any(name in _causal_class_names() for name in architectures) or getattr(config, "is_decoder", False):
        return False
    return getattr(config, "model_type", None) in _masked_lm_types()


def is_encoder(model: nn.Module) -> bool:
    """Whether ``model`` is an encoder: its config says so and it is not itself a causal-LM class."""
    config = getattr(model, "config", None)
    return config is not None and type(model).__name__ not in _causal_class_names() and is_encoder_config(config)


def model_kind(config: Any) -> str:
    """``"encoder"`` or ``"causal-lm"``."""
    return "encoder" if is_encoder_config(config) else "causal-lm"


def auto_class(config: Any) -> Any:
    """The ``transformers`` auto class that builds the model ``config`` describes: ``AutoModel`` for encoders (the
    bare encoder, whose tensors a sentence-transformers checkpoint holds), ``AutoModelForCausalLM`` otherwise."""
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModel if is_encoder_config(config) else AutoModelForCausalLM


def context_length(config: Any) -> int | None:
    """The longest sequence (prompt and generated tokens) a Hugging Face ``config``'s positions allow, when it
    says (``max_position_embeddings``, ``n_positions`` or ``max_sequence_length``); ``None`` otherwise."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
