"""``rankwise heal``: fine-tune a compressed model's factors, distilling the dense model, and save it compressed."""

from __future__ import annotations

from typing import Annotated

import typer

from rankwise.cli.common import (
    BatchOpt,
    DatasetOpt,
    DeviceOpt,
    NoVerifyOpt,
    OverwriteOpt,
    SeqLenOpt,
    TextOpt,
    ThreadsOpt,
    TrustOpt,
    one_line_errors,
    say,
    setup,
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
    no_verify: NoVerifyOpt = False,
) -> None:
    """Heal COMPRESSED: fine-tune its factors on the text (minus the held-out windows), distilling --base, and
    save a compressed model with the same ranks and parameter count to OUT.

    Training windows come from the start of the text and the evaluation windows from its end, so the perplexity
    printed before and after is on text never trained on. A resumable state is kept in OUT.checkpoint while it runs.
    """
    from rankwise.adapt.heal import HealConfig, heal_model
    from rankwise.adapt.train import TrainConfig

    if not out:
        raise ValueError("--out is required: the directory to write the healed model to")
    config = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, eval_every=eval_every,
                         seed=seed, bf16=bf16, save_every=max(1, steps // 4))
    options = HealConfig(distill=distill, temperature=temperature, trainable=trainable)
    setup(device, threads)
    heal_model(compressed, out, config=config, options=options, base=base, text=text, dataset=dataset,
               seq_len=seq_len, eval_samples=eval_samples, device=device, resume=resume, overwrite=overwrite,
               json_report=json_report, trust_remote_code=trust_remote_code, say=say, verify=not no_verify)
    say(f"saved healed compressed model to {out}")
