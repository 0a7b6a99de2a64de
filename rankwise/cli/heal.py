"""``rankwise heal``: fine-tune a compressed model's factors, distilling the dense model, and save it compressed."""

from __future__ import annotations

from typing import Annotated

import typer

from rankwise.cli.common import (
    BatchOpt,
    DatasetOpt,
    DeviceOpt,
    OverwriteOpt,
    SeqLenOpt,
    TextOpt,
    ThreadsOpt,
    TrustOpt,
    check_report_path,
    claimed_out,
    one_line_errors,
    remove_training_checkpoint,
    say,
    setup,
    training_checkpoint,
    training_windows,
)


@one_line_errors
def heal(
    compressed: Annotated[str, typer.Argument(help="a compressed directory written by rankwise compress")],
    base: Annotated[str, typer.Option("--base", help="the dense model it was compressed from (the teacher): "
                                      "'smollm2', a directory, a .gguf file or a hub id")] = "smollm2",
    out: Annotated[str, typer.Option("--out", help="output directory for the healed compressed model")] = "",
    steps: Annotated[int, typer.Option("--steps", min=1, help="optimizer steps")] = 80,
    lr: Annotated[float, typer.Option("--lr", help="peak learning rate (AdamW, warm-up then cosine)")] = 1e-4,
    distill: Annotated[float, typer.Option("--distill", min=0.0, max=1.0, help="weight of the KL to the dense "
                                           "model's logits; 0 trains on next-token loss alone (no --base needed)")
                       ] = 1.0,
    temperature: Annotated[float, typer.Option("--temperature", help="distillation temperature")] = 1.0,
    trainable: Annotated[str, typer.Option("--trainable", help="factors (low-rank layers only) or linear (every "
                                           "linear layer in the blocks)")] = "factors",
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    seq_len: SeqLenOpt = 256,
    batch_size: BatchOpt = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum", min=1, help="micro-batches per step")] = 1,
    eval_samples: Annotated[int, typer.Option("--eval-samples", min=1, help="held-out windows from the end of the "
                                              "text, never trained on; perplexity before and after")] = 32,
    eval_every: Annotated[int, typer.Option("--eval-every", min=0, help="also evaluate every K steps")] = 0,
    seed: Annotated[int, typer.Option("--seed", help="order of the training windows")] = 0,
    bf16: Annotated[bool, typer.Option("--bf16/--fp32", help="bfloat16 autocast (float32 weights and optimizer)")
                    ] = True,
    resume: Annotated[bool, typer.Option("--resume", help="continue from OUT.checkpoint (same model and settings)")
                      ] = False,
    json_report: Annotated[str | None, typer.Option("--json-report", help="also write the losses, evaluations and "
                                                    "perplexities as JSON here")] = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Heal COMPRESSED: fine-tune its factors on the text (minus the held-out windows), distilling --base, and
    save a compressed model with the same ranks and parameter count to OUT.

    Training windows come from the start of the text and the evaluation windows from its end, so the perplexity
    printed before and after is on text never trained on. A resumable state is kept in OUT.checkpoint while it runs.
    """
    import json
    import math
    from pathlib import Path

    from rankwise.adapt.heal import HealConfig, heal_
    from rankwise.adapt.train import TrainConfig, digest
    from rankwise.calibrate import DEFAULT_TEXT_NAME, load_text
    from rankwise.eval.measure import perplexity
    from rankwise.io import save
    from rankwise.io.atomic import write_text_atomic
    from rankwise.io.manifest import read_manifest
    from rankwise.io.models import load_model, load_tokenizer
    from rankwise.io.save import is_compressed_dir

    if not out:
        raise ValueError("--out is required: the directory to write the healed model to")
    if not is_compressed_dir(compressed):
        raise ValueError(f"{compressed!r} is not a compressed rankwise directory (no rankwise.json); heal what "
                         "rankwise compress wrote")
    config = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, eval_every=eval_every,
                         seed=seed, bf16=bf16, save_every=max(1, steps // 4))
    options = HealConfig(distill=distill, temperature=temperature, trainable=trainable)
    checkpoint = training_checkpoint(out, resume, overwrite, compressed, base, text or "")
    check_report_path(json_report, compressed, base, text, str(checkpoint))
    setup(device, threads)
    raw = load_text(text, dataset=dataset)
    tokenizer = load_tokenizer(compressed, trust_remote_code)
    train_ids, evaluation = training_windows(tokenizer, raw, seq_len, eval_samples, batch_size, "the text")
    text_name = text or (f"dataset {dataset}" if dataset else DEFAULT_TEXT_NAME)
    manifest = read_manifest(compressed)
    with claimed_out(out, overwrite, compressed, base):
        student = load_model(compressed, device=device, trust_remote_code=trust_remote_code).model
        teacher = load_model(base, device=device, trust_remote_code=trust_remote_code).model if distill > 0 else None
        if teacher is not None and teacher.get_output_embeddings().weight.shape != \
                student.get_output_embeddings().weight.shape:
            raise ValueError(f"--base {base!r} does not match {compressed!r}: their vocabularies differ; pass the "
                             "model it was compressed from")
        before = perplexity(student, evaluation, batch_size=8)
        dense = perplexity(teacher, evaluation, batch_size=8) if teacher is not None else None
        say(f"held-out perplexity ({eval_samples} x {seq_len} tokens of {text_name}): compressed {before:.3f}"
            + (f", dense {dense:.3f} ({before / dense:.2f}x)" if dense else ""))
        checkpoint.mkdir(exist_ok=True)
        identity = {"compressed": str(Path(compressed).resolve()), "base": base, "distill": distill,
                    "temperature": temperature, "weights": trainable, "data": digest(train_ids)}
        result = heal_(student, train_ids, config, options, teacher=teacher, eval_ids=evaluation,
                       checkpoint_dir=checkpoint, resume=resume, eval_first=False, identity=identity)
        after = math.exp(result.evals[-1][1])
        say(f"healed {steps} steps x {config.windows_per_step} windows in {result.seconds:.0f} s "
            f"({result.seconds_per_step:.1f} s/step), {result.trainable:,} weights trained: held-out perplexity "
            f"{before:.3f} -> {after:.3f}" + (f" ({after / dense:.2f}x dense)" if dense else ""))
        origin = dict(manifest.provenance or {})
        origin["heal"] = {"base": base, "steps": steps, "lr": lr, "distill": distill, "temperature": temperature,
                          "weights": trainable, "text": text_name, "training_windows": list(train_ids.shape),
                          "windows_per_step": config.windows_per_step,
                          "seed": seed, "perplexity_before": before, "perplexity_after": after,
                          "perplexity_dense": dense, "eval_windows": list(evaluation.shape)}
        save(student, out, tokenizer=tokenizer, report=manifest.report, overwrite=overwrite, provenance=origin)
        remove_training_checkpoint(checkpoint)
        if json_report:
            write_text_atomic(Path(json_report), json.dumps({**origin["heal"], **result.to_dict()}, indent=1))
    say(f"saved healed compressed model to {out}")

