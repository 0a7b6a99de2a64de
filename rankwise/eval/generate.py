"""Greedy text completion, to see what a dense, compressed or healed model writes (deterministic: no sampling)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def complete(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 48,
             chat: bool = False) -> list[str]:
    """Complete each prompt greedily; returns only the new text of each.

    Args:
        model: a causal LM (dense, or with rankwise's factorised layers).
        tokenizer: its tokenizer.
        prompts: one or more non-empty texts.
        max_new_tokens: tokens generated per prompt (>= 1).
        chat: wrap each prompt as a user message with the tokenizer's chat template (instruct models).

    Raises:
        ValueError: an empty prompt, ``max_new_tokens < 1``, or ``chat`` with a tokenizer that has no chat template.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("every prompt must be a non-empty text")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat needs a tokenizer with a chat template; this model's tokenizer has none")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for prompt in prompts:  # one at a time: no padding, so each completion is what the prompt alone gives
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
        ids = ids.to(device)
        with torch.no_grad():
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=max_new_tokens, pad_token_id=pad)
        out.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
    return out
