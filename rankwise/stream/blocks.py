"""Transformer blocks of a Hugging Face model (a causal LM's decoder blocks, an encoder's layers), run one at a time.

Every block's call (its positional and keyword arguments besides the hidden states: rotary embeddings, masks,
positions) is captured by one forward pass of the model in which the blocks are replaced by pass-through modules,
so the embeddings run but no block does; the same trick computes the LM loss and its gradient from the last block's
output without running any block. Works for any model whose blocks sit in one ``nn.ModuleList`` and take the hidden
states as their first argument (Llama, GPT-2, OPT and most Hugging Face decoders; BERT-family encoders, whose
blocks are ``encoder.layer``), including models whose blocks get different masks (sliding-window layers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, blocks)``: the longest ``nn.ModuleList`` in the model, its transformer blocks (``model.layers``,
    ``transformer.h``, ``encoder.layer`` ...; the first one found among equally long lists)."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError("the model has no nn.ModuleList of blocks; rankwise compresses transformers (decoders and "
                         "encoders) whose blocks sit in one ModuleList")
    return max(lists, key=lambda item: len(item[1]))


def block_of(name: str, blocks_name: str) -> int | None:
    """Index of the block that holds the module ``name``, or ``None`` outside the blocks."""
    prefix = f"{blocks_name}."
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


@dataclass
class BlockCall:
    """Arguments a block receives besides its hidden states (shared by reference between blocks when equal)."""

    args: tuple
    kwargs: dict

    def to(self, device: torch.device) -> BlockCall:
        return BlockCall(_move(self.args, device), _move(self.kwargs, device))


def _move(obj: object, device: torch.device) -> object:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def first(out: object) -> torch.Tensor:
    """The hidden states of a block's output (a tensor, or the first element of a tuple)."""
    return out[0] if isinstance(out, tuple | list) else out


def run_block(block: nn.Module, call: BlockCall, hidden: torch.Tensor) -> torch.Tensor:
    return first(block(hidden, *call.args, **call.kwargs))


class _StopForwardError(Exception):
    """Raised by the last pass-through block to end a capture early."""


class _PassThrough(nn.Module):
    """Stands in for a block: records its call, returns the hidden states it got (or ``inject``)."""

    def __init__(self, index: int, sink: dict[int, tuple[torch.Tensor, BlockCall]], stop: bool,
                 inject: torch.Tensor | None = None) -> None:
        super().__init__()
        self.index, self.sink, self.stop, self.inject = index, sink, stop, inject
        self.as_tuple = False  # whether the real blocks return a tuple (older transformers) or a tensor

    def forward(self, *args: object, **kwargs: object) -> object:
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self.sink[self.index] = (hidden, BlockCall(rest, dict(kwargs)))
        if self.stop:
            raise _StopForwardError
        out = self.inject if self.inject is not None else hidden
        return (out,) if self.as_tuple else out


@contextlib.contextmanager
def _blocks_replaced(blocks: nn.ModuleList, stand_ins: Sequence[nn.Module]) -> Iterator[None]:
    originals = list(blocks)
    try:
        for i, module in enumerate(stand_ins):
            blocks[i] = module
        yield
    finally:
        for i, module in enumerate(originals):
            blocks[i] = module


@torch.no_grad()
def capture_calls(model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor
                  ) -> tuple[torch.Tensor, list[BlockCall]]:
    """The first block's input hidden states and every block's call for one batch of token ids.

    Only the embeddings (and whatever the model computes before its blocks) run.
    """
    sink: dict[int, tuple[torch.Tensor, BlockCall]] = {}
    n = len(blocks)
    stand_ins = [_PassThrough(i, sink, stop=i == n - 1) for i in range(n)]
    with _blocks_replaced(blocks, stand_ins), contextlib.suppress(_StopForwardError):
        model(input_ids=batch, use_cache=False)
    return sink[0][0], [sink[i][1] for i in range(n)]


def head_loss(model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor, hidden: torch.Tensor,
              as_tuple: bool) -> torch.Tensor:
    """The model's own loss given the last block's output ``hidden``: a causal LM's LM loss (mean over ``batch``'s
    predicted tokens), an encoder's contrastive embedding loss over the batch's windows
    (:mod:`rankwise.calibrate.objective`).

    The blocks are replaced by pass-throughs and the first one injects ``hidden``, so the model's final norm, head
    and loss run exactly as in a full forward pass (and nothing else of weight). Differentiable in ``hidden``.
    """
    from rankwise.arch import is_encoder
    from rankwise.calibrate.objective import embedding_loss, pooling_of

    sink: dict[int, tuple[torch.Tensor, BlockCall]] = {}
    stand_ins = [_PassThrough(i, sink, stop=False, inject=hidden if i == 0 else None) for i in range(len(blocks))]
    for module in stand_ins:
        module.as_tuple = as_tuple
    with _blocks_replaced(blocks, stand_ins):
        if is_encoder(model):
            body = getattr(model, "base_model", model)
            return embedding_loss(body(input_ids=batch, use_cache=False).last_hidden_state, pooling_of(model))
        return model(input_ids=batch, labels=batch, use_cache=False).loss


def loss_and_grad(model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor, hidden: torch.Tensor,
                  as_tuple: bool) -> tuple[float, torch.Tensor]:
    """:func:`head_loss` and its gradient ``dloss/dhidden``."""
    leaf = hidden.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = head_loss(model, blocks, batch, leaf, as_tuple)
        (grad,) = torch.autograd.grad(loss, leaf)
    return float(loss.detach()), grad
