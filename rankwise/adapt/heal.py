"""Healing: a short fine-tune of a compressed model's factors, optionally distilling the dense model's logits.

The compressed model keeps its architecture and parameter count: only the values of the chosen weights change
(``LowRankLinear`` factors by default), so the result saves and loads like any compressed model.

The loss is ``(1 - distill) * CE(student, next token) + distill * T² * KL(teacher_T || student_T)`` with ``T`` the
temperature, as in Hinton et al. (2015) https://arxiv.org/abs/1503.02531. Fine-tuning the factors after truncation
is SVD-LLM's parameter update (Wang et al. 2024, https://arxiv.org/abs/2403.07378, Sec. 3.3); distilling the
uncompressed model into the factorised one is PELA's (Guo et al. 2023, https://arxiv.org/abs/2311.10847).

:func:`heal_` heals a model in memory; :func:`heal_model` is the whole job of ``rankwise heal`` (text, models,
held-out perplexities, provenance, atomic save) as one library call.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.adapt.train import LossFn, TrainConfig, TrainResult, budget_steps, causal_lm_loss, train
from rankwise.nn import LowRankLinear, NarrowLinear

TRAINABLE = ("factors", "linear")


@dataclass(frozen=True)
class HealConfig:
    """What healing trains and what it matches."""

    distill: float = 1.0  # weight of the KL term to the teacher in [0, 1]; 0 trains on next-token loss only
    temperature: float = 1.0  # softmax temperature of the distillation
    trainable: str = "factors"  # factors: LowRankLinear up/down and narrow matrices; linear: every linear layer
    balance: bool = True  # rescale each factor pair to equal scales before training (balance_factors_)

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
        if isinstance(module, LowRankLinear | NarrowLinear) or (trainable == "linear" and isinstance(module, nn.Linear)
                                                  and module is not output):
            module.requires_grad_(True)
            names.append(name)
    if not names:
        raise ValueError("the model has no LowRankLinear or narrow layer to heal; pass a compressed model "
                         "(rankwise compress ... --export factored)")
    return names


def balance_factors_(model: nn.Module) -> int:
    """Rescale every ``LowRankLinear``'s factors so that column ``j`` of ``up`` and row ``j`` of ``down`` have the same
    root-mean-square entry; ``up @ down`` is unchanged (up to rounding). Returns how many layers were rescaled.

    AdamW moves every weight by about its learning rate per step whatever the weight's size, so it changes a
    factor's product by about ``lr / RMS(factor)`` relatively. Compressed factors come out of the fit unbalanced
    (SVD-LLM's ``up`` carries the singular values and ``down`` the inverse whitening: on the default model at 0.4 the
    entries of ``up`` were 1/7 to 2x the size of ``down``'s), so one factor of each pair trained several times faster,
    relatively, than the other. Balanced, both change the product alike: ten minutes of healing at 0.4 reached
    20.394 instead of 20.511 on validation windows (benchmarks/RESULTS.md, twelfth session). A pair where either side
    is zero is left as it is (rescaling it would zero the other side and freeze both).
    """
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, LowRankLinear):  # its rank is at least 1
                continue
            up_rms = module.up.float().pow(2).mean(0).sqrt()  # per column of up (out, r)
            down_rms = module.down.float().pow(2).mean(1).sqrt()  # per row of down (r, in)
            usable = (up_rms > 0) & (down_rms > 0) & torch.isfinite(up_rms) & torch.isfinite(down_rms)
            scale = torch.where(usable, (down_rms / up_rms.where(usable, 1.0)).sqrt(), 1.0)
            module.up.mul_(scale.to(module.up.dtype))
            module.down.div_(scale.to(module.down.dtype)[:, None])
            count += 1
    return count


NO_BUDGET_ON_RESUME = ("a time budget (--minutes) cannot resume a run: resume with --resume alone (it trains to the "
                       "count the first run saved) or with --steps set to that count")


FUSED_ROWS = 8  # logit rows per chunk on a CPU: a chunk's temporaries (about 6 x 8 x 49,152 floats) are reused
FUSED_ROWS_GPU = 1024  # ... on an accelerator, where each chunk's ~15 kernel launches would dominate small chunks


class _FusedDistillation(torch.autograd.Function):
    """``Σ_i w_i [d T² KL(p_i || q_i) + (1 - d) CE_i]`` over the rows of ``(N, V)`` logits, with its gradient.

    ``p_i = softmax(t_i / T)`` (teacher), ``q_i = softmax(z_i / T)`` (student), ``CE_i = -log softmax(z_i)[y_i]``.
    The gradient with respect to ``z_i`` is ``w_i [d T (q_i - p_i) + (1 - d)(softmax(z_i) - onehot(y_i))]``. It is
    written into one ``(N, V)`` buffer in the logits' dtype, :data:`FUSED_ROWS` rows at a time (:data:`FUSED_ROWS_GPU`
    on an accelerator): the temporaries are a chunk's size and reused, not vocabulary-sized tensors allocated (and,
    with glibc's default, mapped and zero-filled) afresh each step, and autograd keeps that buffer instead of its
    probability tensors. Rows of weight 0 add nothing and get a zero gradient, even where their logits are not
    finite.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                distill: float, temperature: float, need_grad: bool) -> torch.Tensor:
        rows = logits.shape[0]
        chunk = FUSED_ROWS if logits.device.type == "cpu" else FUSED_ROWS_GPU
        grad = torch.empty_like(logits) if need_grad else None
        active = (weights != 0).tolist()
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        with torch.autocast(logits.device.type, enabled=False):
            for start in range(0, rows, chunk):
                stop = min(start + chunk, rows)
                out = None if grad is None else grad[start:stop]
                if not any(active[start:stop]):  # rows nothing scores: no loss, zero gradient
                    if out is not None:
                        out.zero_()
                    continue
                total += _fused_rows(logits[start:stop], teacher[start:stop], targets[start:stop],
                                     weights[start:stop], distill, temperature, out,
                                     partial=not all(active[start:stop]))
        ctx.save_for_backward(grad)
        return total.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        if grad is None:
            raise RuntimeError("the distillation loss was computed without its gradient: call it with grad enabled")
        scaled = grad if bool(grad_out == 1) else grad * float(grad_out)  # the scale unrounded in bfloat16
        return scaled, None, None, None, None, None, None


def _fused_rows(z: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: torch.Tensor, distill: float,
                temperature: float, grad: torch.Tensor | None, *, partial: bool = True) -> torch.Tensor:
    """One chunk of :class:`_FusedDistillation`: its weighted loss (float64); its gradient written into ``grad``.
    ``partial=False`` says every row has a nonzero weight (nothing to mask)."""
    dtype = torch.promote_types(z.dtype, torch.float32)  # float32, or float64 for float64 logits
    z, t, w = z.to(dtype), t.to(dtype), w.to(dtype)
    z_t = z / temperature if temperature != 1.0 else z
    log_q = torch.log_softmax(z_t, -1)
    log_p = torch.log_softmax(t / temperature if temperature != 1.0 else t, -1)
    p = log_p.exp()
    loss = (distill * temperature**2) * torch.linalg.vecdot(p, log_p.sub_(log_q))  # Σ p (log p - log q) per row
    log_s = None  # log softmax(z) for the next-token term
    if distill < 1:
        log_s = log_q if temperature == 1.0 else torch.log_softmax(z, -1)
        loss = loss - (1 - distill) * log_s.gather(-1, y[:, None]).squeeze(-1)
    if grad is not None:
        q = log_q.exp_()
        if temperature == 1.0:  # d (q - p) + (1 - d) q
            g = q.sub_(p, alpha=distill)
        else:
            g = q.sub_(p).mul_(distill * temperature)
            if log_s is not None:
                g.add_(log_s.exp_(), alpha=1 - distill)
        if distill < 1:
            g.scatter_add_(-1, y[:, None], g.new_full((len(y), 1), distill - 1))
        g.mul_(w[:, None])
        grad.copy_(g.masked_fill_((w == 0)[:, None], 0) if partial else g)
    loss = loss.double() * w.double()
    return (torch.where(w == 0, 0.0, loss) if partial else loss).sum()


def distillation_loss(teacher: nn.Module, distill: float, temperature: float) -> LossFn:
    """``(1 - distill) * CE + distill * T² * KL(teacher || student)`` per scored token, the teacher run without grad.

    Fused (:class:`_FusedDistillation`): the loss and its gradient with respect to the student's logits are computed
    together, a few rows at a time, on the models' whole ``(b, L, vocab)`` logits with a weight per position (zero for
    the last position and for positions whose next token ``mask`` does not score): no copy of the logits, and one
    gradient buffer kept for the backward instead of autograd's probability tensors. Same value and gradient as
    ``kl_div`` and ``cross_entropy`` (tested). A batch where ``mask`` scores no token gives 0 and a zero gradient (not
    NaN). On 2 CPU cores, a whole heal step of the default model at ratio 0.4 (AdamW included, each loss in a process
    of its own) took 0.85x the time of the unfused autograd loss with the heap kept, as ``rankwise heal`` runs it, and
    0.80x under glibc's default settings, at 0.65-0.86 GB less peak RSS; the loss alone on 1,020 x 49,152 logits took
    0.48x the time of ``kl_div`` under glibc's default and the same with the heap kept
    (``benchmarks/distill_step.py``, ``benchmarks/heal_allocator.py``, RESULTS.md).
    """

    def loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        logits = model(input_ids=ids).logits  # (b, L, vocab); position i predicts token i + 1
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids).logits
        vocab = logits.shape[-1]
        weights = torch.ones(ids.shape, dtype=torch.float32, device=ids.device)
        weights[:, -1] = 0  # the last position has no next token
        if mask is not None:
            weights[:, :-1] *= mask[:, 1:].to(weights.dtype)
        weights /= weights.sum().clamp_min(1)
        targets = ids.roll(-1, dims=1)  # the next token (the last position's is unused: weight 0)
        need_grad = torch.is_grad_enabled() and logits.requires_grad
        return _FusedDistillation.apply(logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab),
                                        targets.reshape(-1), weights.reshape(-1), float(distill),
                                        float(temperature), need_grad)

    return loss


def heal_(model: nn.Module, ids: torch.Tensor, config: TrainConfig, heal: HealConfig | None = None, *,
          teacher: nn.Module | None = None, eval_ids: torch.Tensor | None = None,
          checkpoint_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
          eval_first: bool = True, identity: dict | None = None, minutes: float | None = None,
          say: Callable[[str], None] | None = None) -> TrainResult:
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
        minutes: a time budget: as many steps as fit in it (at most ``config.steps``), counted once from a timed
            trial step before training (:func:`~rankwise.adapt.train.budget_steps`); a periodic ``save_every``
            larger than a quarter of that count is lowered to it; not with ``resume`` (resume with ``steps`` set to
            the count, :func:`~rankwise.adapt.train.saved_steps`).
        say: called with the line saying how many steps the budget gives.

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
    if heal.balance and not resume:  # a resumed run restores the balanced factors the first run saved
        balance_factors_(model)
    loss_fn = causal_lm_loss
    if heal.distill > 0 and teacher is not None:
        teacher.requires_grad_(False).eval()
        loss_fn = distillation_loss(teacher, heal.distill, heal.temperature)
    try:
        if minutes is not None:
            if resume:
                raise ValueError(NO_BUDGET_ON_RESUME)
            config, seconds = budget_steps(model, ids, config, minutes, loss_fn=loss_fn)
            if config.save_every > config.steps // 4:  # periodic checkpoints: at least one per quarter of the run
                config = replace(config, save_every=max(1, config.steps // 4))
            if say is not None:
                say(f"time budget {minutes:g} min: {seconds:.3g} s per step, {config.steps} steps (rerun with "
                    f"--steps {config.steps} for the same result)")
        return train(model, ids, config, eval_ids=eval_ids, loss_fn=loss_fn, checkpoint_dir=checkpoint_dir,
                     resume=resume, progress=progress, eval_first=eval_first, identity=identity)
    finally:
        model.requires_grad_(False)
        model.to(dtype)


@dataclass(frozen=True)
class HealResult:
    """What :func:`heal_model` did."""

    out: Path  # the healed compressed directory
    training: TrainResult  # losses, evaluation losses, timing, trainable weights
    perplexity_before: float  # held-out perplexity of the compressed model before healing
    perplexity_after: float  # ... and after
    perplexity_dense: float | None  # of the dense teacher on the same windows (None without distillation)
    provenance: dict[str, Any]  # as saved in out/rankwise.json; this run under "heal"

    def to_dict(self) -> dict[str, Any]:
        """The run's settings and perplexities with the training record: what ``json_report`` holds."""
        return {**self.provenance["heal"], **self.training.to_dict()}


def heal_model(compressed: str | Path, out: str | Path, *, config: TrainConfig, options: HealConfig | None = None,
               base: str = "smollm2", text: str | None = None, dataset: str | None = None, seq_len: int = 256,
               eval_samples: int = 16, device: str = "cpu", resume: bool = False, overwrite: bool = False,
               json_report: str | Path | None = None, trust_remote_code: bool = False, progress: bool = True,
               say: Callable[[str], None] | None = None, verify: bool = True,
               minutes: float | None = None) -> HealResult:
    """Heal the compressed directory ``compressed`` and save a compressed model with the same ranks and parameter
    count to ``out``: fine-tune its factors on ``text`` (a file; default: the standard library's pydoc topics) or
    ``dataset``, distilling the dense model ``base``.

    The last ``eval_samples`` windows of ``seq_len`` tokens are held out, every window before them trains, so the
    perplexities before and after are on text never trained on. The resumable training state lives in
    ``OUT.checkpoint`` while the run lasts and is removed when ``out`` is written.

    Args:
        compressed: a compressed directory written by ``rankwise compress`` (the student).
        out: the output directory, written atomically (refused if it exists unless ``overwrite``).
        config: steps, learning rate, batch, schedule, evaluation and checkpoint cadence, seed.
        options: distillation weight, temperature and which weights train (default: :class:`HealConfig`).
        base: the dense model ``compressed`` came from (the teacher): ``"smollm2"``, a directory, a ``.gguf`` file
            or a hub id; not loaded when ``options.distill == 0``.
        resume: continue from ``OUT.checkpoint``: the compressed and ``base`` models (by hashes of their weights'
            bytes), data and settings must be the first run's, checked before anything is evaluated.
        verify: check the models' files against their checksums (see :func:`rankwise.io.models.load_model`).
        minutes: train as many steps as fit in this many minutes, at most ``config.steps`` (see :func:`heal_`);
            not with ``resume``.
        json_report: also write the settings, perplexities, losses and evaluations as JSON to this file.
        progress: draw the training progress bar.
        say: called with each line worth printing (the perplexities before training, the result after).
        Others: as for :func:`~rankwise.compression.job.compress_model`.

    Returns:
        The :class:`HealResult`; its ``provenance`` is the one saved in ``out/rankwise.json``.

    Raises:
        ValueError: ``compressed`` is not a compressed directory, ``base`` has another vocabulary, the text is too
            short, or the output, training state or report path is refused.
    """
    from rankwise.adapt.train import (
        check_job,
        check_resume,
        digest,
        model_digest,
        remove_training_checkpoint,
        training_checkpoint,
        training_windows,
    )
    from rankwise.calibrate import DEFAULT_TEXT_NAME, load_text
    from rankwise.eval.measure import perplexity
    from rankwise.io import save
    from rankwise.io.atomic import check_report_path, claimed_out, write_text_atomic
    from rankwise.io.manifest import read_manifest
    from rankwise.io.models import load_model, load_tokenizer
    from rankwise.io.save import is_compressed_dir
    from rankwise.stream import AUTO, compute_dtype

    options = options or HealConfig()
    tell = say or (lambda _: None)
    compressed, out, base = str(compressed), str(out), str(base)
    text = None if text is None else str(text)
    check_job(out, seq_len, eval_samples)
    if minutes is not None and resume:
        raise ValueError(NO_BUDGET_ON_RESUME)
    if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
        raise ValueError(f"--minutes must be a positive finite number of minutes, got {minutes}")
    if not is_compressed_dir(compressed):
        raise ValueError(f"{compressed!r} is not a compressed rankwise directory (no rankwise.json); heal what "
                         "rankwise compress wrote")
    checkpoint = training_checkpoint(out, resume, overwrite, compressed, base, text or "")
    check_report_path(json_report, compressed, base, text, str(checkpoint))
    raw = load_text(text, dataset=dataset)  # the text's errors come before any model is read
    tokenizer = load_tokenizer(compressed, trust_remote_code)
    train_ids, evaluation = training_windows(tokenizer, raw, seq_len, eval_samples, config.batch_size, "the text")
    text_name = text or (f"dataset {dataset}" if dataset else DEFAULT_TEXT_NAME)
    manifest = read_manifest(compressed)
    with claimed_out(out, overwrite, compressed, base):
        student = load_model(compressed, device=device, trust_remote_code=trust_remote_code, verify=verify).model
        teacher = (load_model(base, device=device, trust_remote_code=trust_remote_code, verify=verify).model
                   if options.distill > 0 else None)
        if teacher is not None and teacher.get_output_embeddings().weight.shape != \
                student.get_output_embeddings().weight.shape:
            raise ValueError(f"--base {base!r} does not match {compressed!r}: their vocabularies differ; pass the "
                             "model it was compressed from")
        # what a resumed run must share with the first (the models by content, wherever they are), checked first
        identity = {"weights": model_digest(student), "teacher": model_digest(teacher) if teacher is not None
                    else None, "distill": options.distill, "temperature": options.temperature,
                    "trainable": options.trainable, "data": digest(train_ids)}
        if options.balance:  # only when on: a state saved before heal balanced factors resumes with --no-balance
            identity["balance"] = True
        if resume:
            check_resume(checkpoint, config, identity)
        stored = next(student.parameters()).dtype
        compute = compute_dtype(AUTO, stored, device)  # evaluations: half precision in float32 on a CPU
        if teacher is not None:
            teacher.to(compute_dtype(AUTO, next(teacher.parameters()).dtype, device))
        before = perplexity(student.to(compute), evaluation, batch_size=8)
        student.to(stored)  # heal_ trains in float32 and returns the student in the dtype it came in
        dense = perplexity(teacher, evaluation, batch_size=8) if teacher is not None else None
        tell(f"held-out perplexity ({eval_samples} x {seq_len} tokens of {text_name}): compressed {before:.3f}"
             + (f", dense {dense:.3f} ({before / dense:.2f}x)" if dense else ""))
        checkpoint.mkdir(exist_ok=True)
        training = heal_(student, train_ids, config, options, teacher=teacher, eval_ids=evaluation,
                         checkpoint_dir=checkpoint, resume=resume, progress=progress, eval_first=False,
                         identity=identity, minutes=minutes, say=tell)
        steps = len(training.losses)
        after = math.exp(training.evals[-1][1])
        tell(f"healed {steps} steps x {config.windows_per_step} windows in {training.seconds:.0f} s "
             f"({training.seconds_per_step:.1f} s/step), {training.trainable:,} weights trained: held-out perplexity "
             f"{before:.3f} -> {after:.3f}" + (f" ({after / dense:.2f}x dense)" if dense else ""))
        origin = dict(manifest.provenance or {})
        origin["heal"] = {"base": base, "steps": steps, "minutes": minutes, "lr": config.lr, "distill": options.distill,
                          "temperature": options.temperature, "weights": options.trainable, "balance": options.balance,
                          "bf16": config.bf16,
                          "text": text_name,
                          "training_windows": list(train_ids.shape), "windows_per_step": config.windows_per_step,
                          "seed": config.seed, "perplexity_before": before, "perplexity_after": after,
                          "perplexity_dense": dense, "eval_windows": list(evaluation.shape)}
        save(student, out, tokenizer=tokenizer, report=manifest.report, overwrite=overwrite, provenance=origin)
        remove_training_checkpoint(checkpoint)
        result = HealResult(Path(out), training, before, after, dense, origin)
        if json_report:
            write_text_atomic(Path(json_report), json.dumps(result.to_dict(), indent=1))
    return result
