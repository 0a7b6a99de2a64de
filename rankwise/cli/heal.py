"""``rankwise heal``: fine-tune a compressed model's factors, distilling the dense model, and save it compressed."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from rankwise.cli.common import (
    BATCH_SIZE,
    DEVICE,
    DTYPE,
    EVAL_SAMPLES,
    SEQ_LEN,
    BaseOpt,
    BatchOpt,
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    EvalEveryOpt,
    EvalOpt,
    GradAccumOpt,
    JsonReportOpt,
    LrOpt,
    NoVerifyOpt,
    OutOpt,
    OverwriteOpt,
    ResumeOpt,
    SeedOpt,
    SeqLenOpt,
    TextOpt,
    ThreadsOpt,
    TrustOpt,
    one_line_errors,
    say,
    setup,
    train_config,
)

HEAL_LR = 2e-4  # chosen on validation windows at ratios 0.2 and 0.4 over 1e-4, 3e-4, 4e-4 (benchmarks/RESULTS.md)
HEAL_MINUTES = 10.0  # the default time budget, when neither --steps nor --minutes is given
HEAL_MAX_STEPS = 1000  # the most steps a time budget takes when --steps does not say


@one_line_errors
def heal(
    compressed: Annotated[str, typer.Argument(help="a compressed directory written by rankwise compress")],
    out: OutOpt = ...,
    base: BaseOpt = "smollm2",
    steps: Annotated[int | None, typer.Option(
        "--steps", min=1, help=f"optimizer steps: exactly this many, or at most this many with --minutes (default: "
        f"a {HEAL_MINUTES:g}-minute budget, at most {HEAL_MAX_STEPS} steps; with --resume, the first run's count)")
                        ] = None,
    minutes: Annotated[float | None, typer.Option(
        "--minutes", min=0.01, help=f"a time budget: as many steps as fit in this many minutes of training (trial "
        "steps, evaluations and saving come on top), counted from a timed trial step before training; it prints the "
        f"count, which --steps reproduces (default: {HEAL_MINUTES:g} unless --steps is given)")
                       ] = None,
    lr: LrOpt = None,
    distill: Annotated[float, typer.Option("--distill", min=0.0, max=1.0, help="weight of the KL to the dense "
                                           "model's logits; 0 trains on next-token loss alone (no --base needed)")
                       ] = 1.0,
    temperature: Annotated[float, typer.Option("--temperature", help="distillation temperature")] = 1.0,
    trainable: Annotated[Literal["factors", "linear"], typer.Option(
        "--trainable", help="factors (low-rank layers only) or linear (every linear layer in the blocks)")
                        ] = "factors",
    balance: Annotated[bool, typer.Option(
        "--balance/--no-balance", help="rescale each low-rank layer's two factors to equal scales before training "
        "(same product), so AdamW changes both alike")] = True,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    seq_len: SeqLenOpt = SEQ_LEN,
    batch_size: BatchOpt = BATCH_SIZE,
    grad_accum: GradAccumOpt = 1,
    eval_samples: EvalOpt = EVAL_SAMPLES,
    eval_every: EvalEveryOpt = 0,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = DTYPE,
    resume: ResumeOpt = False,
    json_report: JsonReportOpt = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = DEVICE,
    threads: ThreadsOpt = None,
    trust_remote_code: TrustOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Heal COMPRESSED: fine-tune its factors on the text (minus the held-out windows), distilling --base, and
    save a compressed model with the same ranks and parameter count to OUT.

    Training windows come from the start of the text and the evaluation windows from its end, so the perplexity
    printed before and after is on text never trained on. A resumable state is kept in OUT.checkpoint while it runs.
    """
    from rankwise.adapt.heal import HealConfig, heal_model

    if steps is None and minutes is None:
        if resume:  # a budgeted run saved the count its budget gave: resume to it
            from rankwise.adapt.train import saved_steps, training_checkpoint

            steps = saved_steps(training_checkpoint(out, True, overwrite))
        else:
            minutes = HEAL_MINUTES
    config = train_config(steps=HEAL_MAX_STEPS if steps is None else steps, lr=lr, default_lr=HEAL_LR,
                          batch_size=batch_size, grad_accum=grad_accum, eval_every=eval_every, seed=seed, dtype=dtype,
                          device=device)
    options = HealConfig(distill=distill, temperature=temperature, trainable=trainable, balance=balance)
    setup(device, threads)
    heal_model(compressed, out, config=config, options=options, base=base, text=text, dataset=dataset,
               seq_len=seq_len, eval_samples=eval_samples, device=device, resume=resume, overwrite=overwrite,
               json_report=json_report, trust_remote_code=trust_remote_code, say=say, verify=not no_verify,
               minutes=minutes)
    say(f"saved healed compressed model to {out}")
