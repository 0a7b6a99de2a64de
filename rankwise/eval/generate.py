"""Greedy text completion, to see what a dense, compressed or healed model writes (deterministic: no sampling)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.arch import context_length, is_encoder_config


def check_prompts(prompts: Sequence[str], name: str = "prompt") -> None:
    """Refuse an empty list, an empty prompt, or one that is not valid UTF-8 text (on Linux, command-line bytes that
    are not UTF-8 arrive as lone surrogates, which no tokenizer encodes); ``name`` is what the errors call a prompt.

    Raises:
        ValueError: one line naming the prompt (``--prompt 2``) and, for bad text, its first bad byte.
    """
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError(f"every {name} must be a non-empty text")
    for number, prompt in enumerate(prompts, 1):
        bad = next((i for i, ch in enumerate(prompt) if 0xD800 <= ord(ch) <= 0xDFFF), None)
        if bad is None:
            continue
        code = ord(prompt[bad])
        if 0xDC80 <= code <= 0xDCFF:  # a byte that did not decode, kept by Python's surrogateescape
            where = f"byte 0x{code - 0xDC00:02x} at byte {len(prompt[:bad].encode('utf-8', 'surrogateescape'))}"
        else:
            where = f"lone surrogate U+{code:04X} at character {bad}"
        raise ValueError(f"{name} {number} of {len(prompts)} is not valid UTF-8 ({where}); give UTF-8 text")


def encode_prompts(tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int, chat: bool = False,
                   context: int | None = None) -> list[torch.Tensor]:
    """The token ids (``1 x length``) of each prompt, checked before anything is generated: non-empty UTF-8 texts
    (:func:`check_prompts`), a chat template where ``chat`` asks for one, and room for ``max_new_tokens`` within
    ``context`` positions (the model's, :func:`rankwise.arch.context_length`; ``None``: no limit known).

    Raises:
        ValueError: one line; for a prompt too long, the limit and how many new tokens fit.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_prompts(prompts)
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat needs a tokenizer with a chat template; this model's tokenizer has none")
    encoded = []
    for prompt in prompts:
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
        encoded.append(ids)
    longest = max(ids.shape[1] for ids in encoded)
    if context is not None and longest + max_new_tokens > context:
        fit = context - longest
        raise ValueError(f"a prompt of {longest} token{'s' * (longest != 1)} and max_new_tokens {max_new_tokens} "
                         f"exceed the model's context of {context} positions; "
                         + (f"at most {fit} new tokens fit" if fit > 0 else "shorten the prompt"))
    return encoded


def check_generation(spec: str | Path, prompts: Sequence[str], *, max_new_tokens: int, chat: bool = False,
                     trust_remote_code: bool = False) -> None:
    """What :func:`complete` would refuse for the model ``spec`` (as :func:`rankwise.io.models.load_model` takes
    it), checked from its config and tokenizer alone, before its weights are read. A hub id, or a directory whose
    config does not load, is left to :func:`complete` (after loading, still before anything is generated); an
    encoder to the caller.

    Raises:
        ValueError: as :func:`encode_prompts`, or for a tokenizer that does not load.
    """
    from rankwise.io.checkpoint import load_config
    from rankwise.io.models import load_tokenizer, resolve

    check_prompts(prompts)
    path, _ = resolve(spec)
    if not isinstance(path, Path) or not (path / "config.json").is_file():
        return
    try:
        config = load_config(path, trust_remote_code)
    except ValueError:
        return  # loading the model reports it, with its own message
    if not is_encoder_config(config):
        encode_prompts(load_tokenizer(path, trust_remote_code), prompts, max_new_tokens=max_new_tokens, chat=chat,
                       context=context_length(config))


def complete(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 48,
             chat: bool = False) -> list[str]:
    """Complete each prompt greedily; returns only the new text of each.

    Args:
        model: a causal LM (dense, or with rankwise's factorised layers).
        tokenizer: its tokenizer.
        prompts: one or more non-empty UTF-8 texts.
        max_new_tokens: tokens generated per prompt (>= 1); with the longest prompt, at most the model's context
            length (``config.max_position_embeddings``, where the config has one).
        chat: wrap each prompt as a user message with the tokenizer's chat template (instruct models).

    Raises:
        ValueError: before anything is generated (see :func:`encode_prompts`): an empty prompt or one that is not
            UTF-8, ``max_new_tokens < 1`` or beyond the context, or ``chat`` with a tokenizer that has no chat
            template.
    """
    encoded = encode_prompts(tokenizer, prompts, max_new_tokens=max_new_tokens, chat=chat,
                             context=context_length(getattr(model, "config", None)))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for ids in encoded:  # one at a time: no padding, so each completion is what the prompt alone gives
        ids = ids.to(device)
        with torch.no_grad():
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=max_new_tokens, pad_token_id=pad)
        out.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
    return out
