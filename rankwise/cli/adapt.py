"""``rankwise adapt``: fine-tune an adapter (PEFT's or rankwise's) on a text file and save it."""

from __future__ import annotations

from typing import Annotated

import typer

from rankwise.cli.common import (
    BatchOpt,
    DeviceOpt,
    ModelArg,
    OverwriteOpt,
    SeqLenOpt,
    ThreadsOpt,
    TrustOpt,
    claimed_out,
    one_line_errors,
    remove_training_checkpoint,
    say,
    setup,
    training_checkpoint,
    training_windows,
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
) -> None:
    """Train a METHOD adapter of RANK on MODEL for STEPS steps on --data and save it to OUT.

    Training windows come from the start of the text, evaluation windows from its end. Pre-passes (eva, corda,
    lora_ga, lora_sb) read the first training windows. A resumable state is kept in OUT.checkpoint while it runs.
    MODEL may be a compressed rankwise directory: its factorised layers are adapted too (lora, svfit, loldu,
    block_lora), and --merge keeps them factorised.
    """
    import json
    import math
    import tempfile

    from rankwise.adapt.compressed import check_mergeable
    from rankwise.adapt.methods import add_adapter
    from rankwise.adapt.methods import method as adapter_method
    from rankwise.adapt.train import TrainConfig, digest, train
    from rankwise.calibrate import DEFAULT_TEXT_NAME, load_text
    from rankwise.cli.common import comma_list
    from rankwise.io.atomic import atomic_dir
    from rankwise.io.models import load_model, load_tokenizer, resolve
    from rankwise.io.save import is_compressed_dir, save

    if not out:
        raise ValueError("--out is required: the directory to write the adapter to")
    spec = adapter_method(method)
    config = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, eval_every=eval_every,
                         seed=seed, bf16=bf16, save_every=max(1, steps // 4))
    target_list = comma_list(targets, "--targets") if targets else None
    compressed = is_compressed_dir(model)
    checkpoint = training_checkpoint(out, resume, overwrite, model, data or "")
    setup(device, threads)
    raw = load_text(data)
    path, _ = resolve(model)
    tokenizer = load_tokenizer(path, trust_remote_code)
    train_ids, evaluation = training_windows(tokenizer, raw, seq_len, eval_samples, batch_size, "--data")
    with claimed_out(out, overwrite, model):
        base = load_model(model, device=device, trust_remote_code=trust_remote_code).model
        peft_model = add_adapter(base, method, rank, alpha=alpha, targets=target_list, seed=seed, data=train_ids,
                                 batch_size=batch_size)
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
            identity = {"model": model, "method": method, "rank": rank, "alpha": alpha, "targets": target_list,
                        "data": digest(train_ids)}
            result = train(peft_model, train_ids, config, eval_ids=evaluation, checkpoint_dir=checkpoint,
                           resume=resume, identity=identity)
            first, last = result.evals[0][1], result.evals[-1][1]
            say(f"{method} rank {rank}: {result.trainable:,} trainable parameters, {steps} steps in "
                f"{result.seconds:.0f} s ({result.seconds_per_step:.2f} s/step); held-out loss {first:.4f} -> "
                f"{last:.4f} (perplexity {math.exp(first):.3f} -> {math.exp(last):.3f})")
            with atomic_dir(out, overwrite) as tmp:
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
                summary = {"method": method, "rank": rank, "alpha": alpha, "targets": target_list, "steps": steps,
                           "lr": lr, "seed": seed, "text": data or DEFAULT_TEXT_NAME, "trainable": result.trainable,
                           "losses": result.losses, "evals": result.evals, "seconds": result.seconds,
                           "merged": merge, "load_with": _load_with(merge, compressed, spec.rankwise_tuner)}
                (tmp / "rankwise_adapt.json").write_text(json.dumps(summary, indent=1))
        remove_training_checkpoint(checkpoint)
    say(f"saved {'merged model' if merge else 'adapter'} to {out}")


def _load_with(merge: bool, compressed: bool, rankwise_tuner: bool) -> str | None:
    """How to load what ``adapt`` wrote, when plain ``transformers`` / ``peft`` calls are not enough."""
    if merge:
        return "rankwise.load (a compressed directory)" if compressed else None
    if compressed:
        return ("rankwise.load the compressed model and import rankwise.adapt before peft.PeftModel.from_pretrained "
                "(compressed layers)")
    return "import rankwise.adapt before peft.PeftModel.from_pretrained (a rankwise tuner)" if rankwise_tuner else None
