"""``rankwise adapt``: fine-tune an adapter (PEFT's or rankwise's) on a text file and save it."""

from __future__ import annotations

from typing import Annotated

import typer

from rankwise.cli.common import (
    BatchOpt,
    DeviceOpt,
    ModelArg,
    NoVerifyOpt,
    OverwriteOpt,
    SeqLenOpt,
    ThreadsOpt,
    TrustOpt,
    comma_list,
    one_line_errors,
    say,
    setup,
)


@one_line_errors
def adapt(
    model: ModelArg = "smollm2",
    method: Annotated[str, typer.Option("--method", help="lora, pissa, olora, dora, randlora, eva, corda, lora_ga "
                                        "(PEFT) or lora_sb, svfit, loldu, block_lora, milora (rankwise)")] = "lora",
    rank: Annotated[int, typer.Option("--rank", min=1, help="adapter rank")] = 8,
    data: Annotated[str | None, typer.Option("--data", help="training text file (default: the built-in text)")
                    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="optimizer steps")] = 100,
    out: Annotated[str, typer.Option("--out", help="output directory (a PEFT adapter, or with --merge a plain "
                                     "Hugging Face checkpoint; a compressed model stays a compressed directory)")
                   ] = "",
    alpha: Annotated[float | None, typer.Option("--alpha", help="scale numerator (default: the method's)")] = None,
    targets: Annotated[str | None, typer.Option("--targets", help="comma list of module names (default: every "
                                                "linear layer but the output head)")] = None,
    lr: Annotated[float, typer.Option("--lr", help="peak learning rate (AdamW, warm-up then cosine)")] = 2e-4,
    seq_len: SeqLenOpt = 256,
    batch_size: BatchOpt = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum", min=1, help="micro-batches per step")] = 1,
    eval_samples: Annotated[int, typer.Option("--eval-samples", min=1, help="held-out windows from the end of the "
                                              "text, never trained on")] = 16,
    eval_every: Annotated[int, typer.Option("--eval-every", min=0, help="evaluate every K steps (0: start and end)")
                          ] = 0,
    seed: Annotated[int, typer.Option("--seed", help="adapter init and window order")] = 0,
    bf16: Annotated[bool, typer.Option("--bf16/--fp32", help="bfloat16 autocast (float32 weights and optimizer)")
                    ] = False,
    merge: Annotated[bool, typer.Option("--merge", help="fold the adapter in and write a plain HF checkpoint (a "
                                        "compressed model: a compressed directory, each rank k -> k + r)")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue from OUT.checkpoint (same model and settings)")
                      ] = False,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    trust_remote_code: TrustOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Train a METHOD adapter of RANK on MODEL for STEPS steps on --data and save it to OUT.

    Training windows come from the start of the text, evaluation windows from its end. Pre-passes (eva, corda,
    lora_ga, lora_sb) read the first training windows. A resumable state is kept in OUT.checkpoint while it runs.
    MODEL may be a compressed rankwise directory: its factorised layers are adapted too (lora, svfit, loldu,
    block_lora), and --merge keeps them factorised.
    """
    from rankwise.adapt.job import adapt_model
    from rankwise.adapt.train import TrainConfig

    if not out:
        raise ValueError("--out is required: the directory to write the adapter to")
    config = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, eval_every=eval_every,
                         seed=seed, bf16=bf16, save_every=max(1, steps // 4))
    target_list = comma_list(targets, "--targets") if targets else None
    setup(device, threads)
    adapt_model(model, method, out, config=config, rank=rank, alpha=alpha, targets=target_list, data=data,
                seq_len=seq_len, eval_samples=eval_samples, merge=merge, device=device, resume=resume,
                overwrite=overwrite, trust_remote_code=trust_remote_code, say=say, verify=not no_verify)
    say(f"saved {'merged model' if merge else 'adapter'} to {out}")
