"""``adapt_model``: the whole job of ``rankwise adapt`` as one library call (text, model, adapter and its pre-pass,
training with a resumable state, atomic save of the adapter or the merged model, and its ``rankwise_adapt.json``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rankwise.adapt.train import TrainConfig, TrainResult

SUMMARY = "rankwise_adapt.json"  # what adapt_model records beside the adapter or merged model


@dataclass(frozen=True)
class AdaptResult:
    """What :func:`adapt_model` did."""

    out: Path  # the adapter, or with merge the merged model
    training: TrainResult  # losses, evaluation losses, timing, trainable parameters
    merged: bool  # whether the adapter was folded into the weights
    summary: dict[str, Any]  # the settings, training record and loading hint saved in out/rankwise_adapt.json


def adapt_model(model: str, method: str, out: str | Path, *, config: TrainConfig, rank: int = 16,
                alpha: float | None = None, targets: list[str] | None = None, text: str | None = None,
                dataset: str | None = None, seq_len: int = 256, eval_samples: int = 16, merge: bool = False,
                device: str = "cpu", resume: bool = False, overwrite: bool = False, trust_remote_code: bool = False,
                progress: bool = True, say: Callable[[str], None] | None = None, verify: bool = True) -> AdaptResult:
    """Train a ``method`` adapter of rank ``rank`` on ``model`` with the windows of ``seq_len`` tokens of ``text``
    (a text file; default: the standard library's pydoc topics) or ``dataset`` (a Hugging Face datasets
    ``NAME[:CONFIG[:SPLIT]]``) and save it, or with ``merge`` the model with the
    adapter folded in, to ``out``.

    The last ``eval_samples`` windows are held out (never trained on) and evaluated before and after; pre-passes
    (eva, corda, lora_ga, lora_sb) read the first training windows. The resumable training state lives in
    ``OUT.checkpoint`` while the run lasts and is removed when ``out`` is written.

    Args:
        model: ``"smollm2"`` (the default model), a directory, a ``.gguf`` file, a hub id, or a compressed rankwise
            directory (its factorised layers are adapted too by lora, svfit, loldu and block_lora).
        method: an adapter name of :data:`~rankwise.adapt.methods.METHODS`.
        out: the output directory, written atomically (refused if it exists unless ``overwrite``): a PEFT adapter;
            with ``merge`` a plain Hugging Face checkpoint, or for a compressed ``model`` a compressed directory
            (each rank ``k`` becomes ``k + rank``).
        config: steps, learning rate, batch, schedule, evaluation and checkpoint cadence; its ``seed`` also seeds
            the adapter's initialisation, its ``batch_size`` the pre-pass.
        alpha: the adapter's scale numerator (default: the method's).
        targets: layers to adapt: groups (``attn``, ``mlp``) and/or layer names such as ``q_proj``, as for
            compression (default: every linear layer but the output head).
        resume: continue from ``OUT.checkpoint``: the model (by a hash of its weights' bytes), data and settings
            must be the first run's, checked before the adapter is initialised.
        progress: draw the training progress bar.
        say: called with the line worth printing once training ends (trainable parameters, time, held-out loss).
        verify: check the model's files against their checksums (see :func:`rankwise.io.models.load_model`).
        Others: as for :func:`~rankwise.compression.job.compress_model`.

    Returns:
        The :class:`AdaptResult`; its ``summary`` is also stored in ``out/rankwise_adapt.json``.

    Raises:
        ValueError: an unknown method, a rank or targets the model refuses, a merge that cannot stay factorised,
            a text too short for one batch, or a refused output or training state.
    """
    import tempfile

    from rankwise._errors import os_errors
    from rankwise.adapt.compressed import check_mergeable
    from rankwise.adapt.methods import add_adapter
    from rankwise.adapt.methods import method as adapter_method
    from rankwise.adapt.train import (
        check_job,
        check_resume,
        digest,
        model_digest,
        remove_training_checkpoint,
        train,
        training_checkpoint,
        training_windows,
    )
    from rankwise.calibrate import DEFAULT_TEXT_NAME, load_text
    from rankwise.io.atomic import atomic_dir, claimed_out
    from rankwise.io.models import load_model, load_tokenizer, resolve
    from rankwise.io.save import is_compressed_dir, save
    from rankwise.targets import check_targets

    model, out, text = str(model), str(out), None if text is None else str(text)
    if targets is not None:
        targets = list(check_targets(targets))
    check_job(out, seq_len, eval_samples)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    spec = adapter_method(method)
    tell = say or (lambda _: None)
    compressed = is_compressed_dir(model)
    checkpoint = training_checkpoint(out, resume, overwrite, model, text or dataset or "")
    raw = load_text(text, dataset=dataset)  # the text's errors come before any model is read
    path, _ = resolve(model)
    tokenizer = load_tokenizer(path, trust_remote_code)
    train_ids, evaluation = training_windows(tokenizer, raw, seq_len, eval_samples, config.batch_size, "the text")
    with claimed_out(out, overwrite, model):
        base = load_model(model, device=device, trust_remote_code=trust_remote_code, verify=verify).model
        if targets is not None:
            targets = _peft_targets(base, targets)
        # what a resumed run must share with the first, checked before any data-driven initialisation runs
        identity = {"weights": model_digest(base), "method": method, "rank": rank, "alpha": alpha,
                    "targets": targets, "data": digest(train_ids)}
        if resume:
            check_resume(checkpoint, config, identity)
        peft_model = add_adapter(base, method, rank, alpha=alpha, targets=targets, seed=config.seed, data=train_ids,
                                 batch_size=config.batch_size)
        if merge:
            check_mergeable(peft_model)  # refuse before training, not after
        with tempfile.TemporaryDirectory() as initial:
            if spec.changes_base and not merge:  # PEFT converts the trained adapter back to plain LoRA at save
                adapter_config = peft_model.peft_config["default"]
                init = adapter_config.init_lora_weights
                adapter_config.init_lora_weights = True
                try:
                    peft_model.save_pretrained(initial)
                finally:
                    adapter_config.init_lora_weights = init
            checkpoint.mkdir(exist_ok=True)
            training = train(peft_model, train_ids, config, eval_ids=evaluation, checkpoint_dir=checkpoint,
                             resume=resume, progress=progress, identity=identity)
            first, last = training.evals[0][1], training.evals[-1][1]
            tell(f"{method} rank {rank}: {training.trainable:,} trainable parameters, {config.steps} steps in "
                 f"{training.seconds:.0f} s ({training.seconds_per_step:.2f} s/step); held-out loss {first:.4f} -> "
                 f"{last:.4f} (perplexity {math.exp(first):.3f} -> {math.exp(last):.3f})")
            with atomic_dir(out, overwrite) as tmp, os_errors(out):  # a full disk: one OSError line
                if merge and compressed:  # still factorised: a compressed directory
                    inner = save(peft_model.merge_and_unload(), tmp / "merged")
                    for item in inner.iterdir():
                        item.rename(tmp / item.name)
                    inner.rmdir()
                elif merge:
                    merged = peft_model.merge_and_unload()
                    merged.save_pretrained(tmp, safe_serialization=True)
                elif spec.changes_base:
                    peft_model.save_pretrained(tmp, path_initial_model_for_weight_conversion=initial)
                else:
                    peft_model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                summary = {"method": method, "rank": rank, "alpha": alpha, "targets": targets,
                           "steps": config.steps, "lr": config.lr, "seed": config.seed, "bf16": config.bf16,
                           "text": text or (f"dataset {dataset}" if dataset else DEFAULT_TEXT_NAME),
                           "trainable": training.trainable,
                           "losses": training.losses, "evals": training.evals, "seconds": training.seconds,
                           "merged": merge, "load_with": load_with(merge, compressed, spec.rankwise_tuner)}
                (tmp / SUMMARY).write_text(json.dumps(summary, indent=1))
        remove_training_checkpoint(checkpoint)
    return AdaptResult(Path(out), training, merge, summary)


def load_with(merge: bool, compressed: bool, rankwise_tuner: bool) -> str | None:
    """How to load what :func:`adapt_model` wrote, when plain ``transformers`` / ``peft`` calls are not enough."""
    if merge:
        return "rankwise.load (a compressed directory)" if compressed else None
    if compressed:
        return ("rankwise.load the compressed model and import rankwise.adapt before peft.PeftModel.from_pretrained "
                "(compressed layers)")
    return "import rankwise.adapt before peft.PeftModel.from_pretrained (a rankwise tuner)" if rankwise_tuner else None


def _peft_targets(model: Any, targets: list[str]) -> list[str] | None:
    """``targets`` (groups and layer names, as for compression) as PEFT's ``target_modules``: the selected layers'
    paths, or ``None`` (PEFT's every linear layer but the head, compressed layers included) when they select
    every one."""
    from rankwise.nn import CompressedLinear
    from rankwise.targets import find_targets, refuse_unmatched, selects

    names = [*find_targets(model), *(n for n, m in model.named_modules() if isinstance(m, CompressedLinear))]
    refuse_unmatched(names, targets)
    chosen = [n for n in names if selects(n, targets)]
    return None if len(chosen) == len(names) else chosen  # full paths: a leaf name such as BERT's dense is in both
