"""Healing: a short fine-tune of a compressed model's factors, optionally distilling the dense model's logits.

The compressed model keeps its architecture and parameter count: only the values of the chosen weights change
(``LowRankLinear`` factors by default), so the result saves and loads like any compressed model.

The loss is ``(1 - distill) * CE(student, next token) + distill * T² * KL(teacher_T || student_T)`` with ``T`` the
temperature, as in Hinton et al. (2015) https://arxiv.org/abs/1503.02531. Fine-tuning the factors after truncation
is SVD-LLM's parameter update (Wang et al. 2024, https://arxiv.org/abs/2403.07378, Sec. 3.3); distilling the
uncompressed model into the factorised one is PELA's (Guo et al. 2023, https://arxiv.org/abs/2311.10847).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rankwise.adapt.train import LossFn, TrainConfig, TrainResult, causal_lm_loss, train
from rankwise.nn import LowRankLinear

TRAINABLE = ("factors", "linear")


@dataclass(frozen=True)
class HealConfig:
    """What healing trains and what it matches."""

    distill: float = 1.0  # weight of the KL term to the teacher in [0, 1]; 0 trains on next-token loss only
    temperature: float = 1.0  # softmax temperature of the distillation
    trainable: str = "factors"  # factors: LowRankLinear up/down only; linear: every linear layer in the blocks

    def __post_init__(self) -> None:
        if not 0 <= self.distill <= 1:
            raise ValueError(f"distill is a weight in [0, 1], got {self.distill!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}")


def mark_trainable(model: nn.Module, trainable: str) -> list[str]:
    """Freeze everything, then unfreeze the weights healing trains; returns their module names."""
    model.requires_grad_(False)
    names = []
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear) or (trainable == "linear" and isinstance(module, nn.Linear)
                                                  and module is not output):
            module.requires_grad_(True)
            names.append(name)
    if not names:
        raise ValueError("the model has no LowRankLinear layer to heal; pass a compressed model (rankwise compress "
                         "... --export factored)")
    return names


def distillation_loss(teacher: nn.Module, distill: float, temperature: float) -> LossFn:
    """``(1 - distill) * CE + distill * T² * KL(teacher || student)`` per token, the teacher run without grad.

    The KL is computed as the soft cross-entropy ``-Σ p_teacher log p_student`` minus the teacher's entropy (a
    constant for the student): the same value and gradient as ``kl_div``, in a third of its time on a CPU.
    """

    def loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        logits = model(input_ids=ids).logits[:, :-1]  # (b, L-1, vocab)
        vocab = logits.shape[-1]
        keep = None if mask is None else mask[:, 1:].reshape(-1).bool()  # the scored next-token positions
        logits = logits.reshape(-1, vocab).float()
        next_tokens = ids[:, 1:].reshape(-1)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids).logits[:, :-1].reshape(-1, vocab).float() / temperature
        if keep is not None:
            logits, teacher_logits, next_tokens = logits[keep], teacher_logits[keep], next_tokens[keep]
        with torch.no_grad():
            log_p = nn.functional.log_softmax(teacher_logits, dim=-1)
            p = log_p.exp()
            entropy = -(p * log_p).sum(-1)  # (tokens,)
        log_q = nn.functional.log_softmax(logits / temperature, dim=-1)
        kl = ((-(p * log_q).sum(-1) - entropy).mean()) * temperature**2
        if distill >= 1:
            return kl
        ce = nn.functional.cross_entropy(logits, next_tokens)
        return (1 - distill) * ce + distill * kl

    return loss


def heal_(model: nn.Module, ids: torch.Tensor, config: TrainConfig, heal: HealConfig | None = None, *,
          teacher: nn.Module | None = None, eval_ids: torch.Tensor | None = None,
          checkpoint_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
          eval_first: bool = True, identity: dict | None = None) -> TrainResult:
    """Fine-tune the compressed ``model`` in place on the token windows ``ids`` ``(n, seq_len)``.

    Args:
        model: a model with ``LowRankLinear`` layers (``rankwise.load`` of a compressed directory); trained in
            float32 and returned in its own dtype.
        ids: training windows; never the windows it is evaluated on.
        config: steps, learning rate, batch and schedule.
        heal: what is trained and the distillation weight; ``distill > 0`` needs ``teacher``.
        teacher: the dense model whose logits are distilled (same tokenizer), frozen.
        eval_ids: held-out windows; their next-token loss is reported before (if ``eval_first``), during and after.
        identity: what a resumed run must share with the first (see :func:`~rankwise.adapt.train.train`).

    Returns:
        The :class:`~rankwise.adapt.train.TrainResult` (losses, evaluation losses, timing).
    """
    heal = heal or HealConfig()
    if heal.distill > 0 and teacher is None:
        raise ValueError("distillation (distill > 0) needs the dense teacher model; pass teacher= (--base) or use "
                         "distill=0")
    mark_trainable(model, heal.trainable)
    dtype = next(model.parameters()).dtype
    model.float()  # AdamW on float32 weights: updates of ~1e-4 x a weight round away in bfloat16
    loss_fn = causal_lm_loss
    if heal.distill > 0 and teacher is not None:
        teacher.requires_grad_(False).eval()
        loss_fn = distillation_loss(teacher, heal.distill, heal.temperature)
    try:
        return train(model, ids, config, eval_ids=eval_ids, loss_fn=loss_fn, checkpoint_dir=checkpoint_dir,
                     resume=resume, progress=progress, eval_first=eval_first, identity=identity)
    finally:
        model.requires_grad_(False)
        model.to(dtype)
