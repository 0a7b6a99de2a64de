"""The loss an encoder is calibrated on: pooled sentence embeddings and a contrastive loss between adjacent windows.

A causal LM has its own loss (next-token NLL), and FWSVD's Fisher and the loss-aware allocation's output sensitivity
are taken from it. A sentence encoder without a language-modelling head has none, so rankwise uses the loss such
models are trained with: the in-batch contrastive loss of sentence-transformers' ``MultipleNegativesRankingLoss``
(all-MiniLM-L6-v2 was fine-tuned with it), made symmetric. In a batch of calibration windows, windows ``2k`` and
``2k + 1`` are adjacent spans of the text and form a positive pair (neighbouring text, as in the independent
cropping of Contriever, Izacard et al. 2022, https://arxiv.org/abs/2112.09118); every other window of the batch is a
negative. With ``e_i`` the L2-normalised pooled embedding of window ``i``::

    loss = mean_i  -log softmax_{j != i}( scale * e_i . e_j )[partner(i)],    partner(i) = i xor 1, scale = 20

Why not the squared distance of the embedding to a detached copy of itself: at the dense model that loss and its
gradient are exactly zero, so its empirical Fisher would be zero too. The contrastive loss has a non-zero gradient at
the dense model and weighs exactly what the embeddings are used for (which texts are close), which is what Hsu et al.
(2022, https://arxiv.org/abs/2207.00112) ask of FWSVD: the Fisher of the task loss. It needs batches of an even
number (at least 4) of windows.

Pooling follows the model's sentence-transformers configuration (``1_Pooling/config.json``, read by
:func:`rankwise.io.sentence.read_pooling`), carried in memory as ``model.config.rankwise_pooling``; mean pooling when
unset (the sentence-transformers default, and all-MiniLM-L6-v2's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["POOLING_ATTR", "POOLING_MODES", "SCALE", "check_pair_batch", "contrastive_loss", "embedding_loss",
           "encoder_loss", "pool", "pooling_of"]

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")
POOLING_ATTR = "rankwise_pooling"  # the config attribute that carries an encoder's pooling mode in memory
SCALE = 20.0  # inverse temperature of MultipleNegativesRankingLoss (sentence-transformers' default)


def pooling_of(model: nn.Module) -> str:
    """The pooling mode of an encoder (``model.config.rankwise_pooling``; ``"mean"`` when unset)."""
    mode = getattr(getattr(model, "config", None), POOLING_ATTR, None) or "mean"
    if mode not in POOLING_MODES:
        raise ValueError(f"config.{POOLING_ATTR} must be one of {', '.join(POOLING_MODES)}, got {mode!r}")
    return mode


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, mode: str = "mean") -> torch.Tensor:
    """Sentence embeddings ``(batch, dim)`` from token states ``(batch, seq, dim)`` and a 0/1 ``mask``
    ``(batch, seq)`` (``None``: every token counts), as sentence-transformers' ``Pooling`` computes them."""
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {', '.join(POOLING_MODES)}, got {mode!r}")
    if mode == "cls":
        return hidden[:, 0]
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (batch, seq, 1)
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(1)
    summed = (hidden * m).sum(1)  # (batch, dim)
    count = m.sum(1).clamp_min(1e-9)  # (batch, 1)
    return summed / (count if mode == "mean" else count.sqrt())


def check_pair_batch(size: int) -> None:
    """Refuse a batch the contrastive loss cannot use (an odd number of windows, or fewer than 4)."""
    if size < 4 or size % 2:
        raise ValueError(f"the encoder's contrastive calibration loss pairs adjacent windows and needs batches of an "
                         f"even number >= 4 of windows, got a batch of {size}; use a batch size of 4, 6, 8 ... that "
                         "divides the number of calibration windows")


def contrastive_loss(embeddings: torch.Tensor, scale: float = SCALE) -> torch.Tensor:
    """Symmetric in-batch contrastive loss of ``embeddings`` ``(batch, dim)``: row ``i``'s positive is row
    ``i xor 1``, every other row but itself a negative (see the module docstring)."""
    check_pair_batch(embeddings.shape[0])
    e = F.normalize(embeddings.float(), dim=-1)
    logits = scale * e @ e.T  # (batch, batch)
    logits = logits.masked_fill(torch.eye(len(e), dtype=torch.bool, device=e.device), float("-inf"))
    partner = torch.arange(len(e), device=e.device) ^ 1
    return F.cross_entropy(logits, partner)


def embedding_loss(hidden: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """The contrastive loss of a batch of full windows from the encoder's last hidden states ``(batch, seq, dim)``."""
    return contrastive_loss(pool(hidden, None, mode))


def encoder_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The calibration loss of an in-memory encoder on token windows ``batch`` ``(batch, seq)`` (full windows, so
    no attention mask: every token attends to every other, as in the block-streamed passes)."""
    body = getattr(model, "base_model", model)
    hidden = body(input_ids=batch).last_hidden_state  # (batch, seq, dim)
    return embedding_loss(hidden, pooling_of(model))
