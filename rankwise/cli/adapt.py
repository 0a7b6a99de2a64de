"""``rankwise adapt``: fine-tune an adapter (PEFT's or rankwise's) on a text file and save it."""

from __future__ import annotations

from typing import Annotated

import typer

from rankwise.cli.common import (
    BATCH_SIZE,
    DEVICE,
    DTYPE,
    EVAL_SAMPLES,
    RANK,
    SEQ_LEN,
    STEPS,
    TARGETS,
    BatchOpt,
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    EvalEveryOpt,
    EvalOpt,
    GradAccumOpt,
    LrOpt,
    MergeOpt,
    ModelArg,
    NoVerifyOpt,
    OutOpt,
    OverwriteOpt,
    RankOpt,
    ResumeOpt,
    SeedOpt,
    SeqLenOpt,
    StepsOpt,
    TargetsOpt,
    TextOpt,
    ThreadsOpt,
    TrustOpt,
    choices,
    comma_list,
    one_line_errors,
    say,
    setup,
    train_config,
)

ADAPTER_LR = 2e-4
ADAPTERS = (
    "lora", "pissa", "olora", "dora", "randlora", "eva", "corda", "lora_ga",  # PEFT's
    "lora_sb", "svfit", "loldu", "block_lora", "milora", "tucker", "snell",  # rankwise's
)
"""The names of :data:`rankwise.adapt.methods.METHODS`, listed here so ``--help`` does not import PEFT (a test
checks they agree)."""


@one_line_errors
def adapt(
    model: ModelArg = "smollm2",
    out: OutOpt = ...,
    method: Annotated[choices(ADAPTERS), typer.Option("--method", help="adapter method: PEFT's (lora, pissa, olora, "
                                                     "dora, randlora, eva, corda, lora_ga) or rankwise's (lora_sb, "
                                                     "svfit, loldu, block_lora, milora, tucker, snell)")] = "lora",
    rank: RankOpt = RANK,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    steps: StepsOpt = STEPS,
    alpha: Annotated[float | None, typer.Option("--alpha", help="scale numerator (default: the method's)")] = None,
    targets: TargetsOpt = TARGETS,
    lr: LrOpt = None,
    seq_len: SeqLenOpt = SEQ_LEN,
    batch_size: BatchOpt = BATCH_SIZE,
    grad_accum: GradAccumOpt = 1,
    eval_samples: EvalOpt = EVAL_SAMPLES,
    eval_every: EvalEveryOpt = 0,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = DTYPE,
    merge: MergeOpt = False,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = DEVICE,
    threads: ThreadsOpt = None,
    trust_remote_code: TrustOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Train a METHOD adapter of RANK on MODEL for STEPS steps on the text and save it to OUT.

    Training windows come from the start of the text, evaluation windows from its end. Pre-passes (eva, corda,
    lora_ga, lora_sb) read the first training windows. A resumable state is kept in OUT.checkpoint while it runs.
    MODEL may be a compressed rankwise directory: its factorised layers are adapted too (lora, svfit, loldu,
    block_lora, tucker), and --merge keeps them factorised.
    """
    from rankwise.adapt.job import adapt_model

    config = train_config(steps=steps, lr=lr, default_lr=ADAPTER_LR, batch_size=batch_size, grad_accum=grad_accum,
                          eval_every=eval_every, seed=seed, dtype=dtype, device=device)
    target_list = comma_list(targets, "--targets")
    setup(device, threads)
    adapt_model(model, method, out, config=config, rank=rank, alpha=alpha, targets=target_list, text=text,
                dataset=dataset,
                seq_len=seq_len, eval_samples=eval_samples, merge=merge, device=device, resume=resume,
                overwrite=overwrite, trust_remote_code=trust_remote_code, say=say, verify=not no_verify)
    say(f"saved {'merged model' if merge else 'adapter'} to {out}")
