"""``rankwise compensate``: EoRA adapters for a compressed model, as a PEFT adapter or merged."""

from __future__ import annotations

from typing import Annotated

import typer

from rankwise.cli.common import (
    BatchOpt,
    CalibOpt,
    DatasetOpt,
    DeviceOpt,
    NoVerifyOpt,
    OverwriteOpt,
    SeqLenOpt,
    TextOpt,
    ThreadsOpt,
    TrustOpt,
    one_line_errors,
    prepare,
    say,
)


@one_line_errors
def compensate(
    compressed: Annotated[str, typer.Argument(help="directory of a compressed (or quantised) model")],
    base: Annotated[str, typer.Option("--base", help="the original model it was made from")] = "smollm2",
    rank: Annotated[int, typer.Option("--rank", min=1, help="adapter rank per layer")] = 16,
    out: Annotated[str, typer.Option("--out", help="output directory")] = "",
    merge: Annotated[bool, typer.Option("--merge", help="fold the adapters in and save a model, not an adapter")
                     ] = False,
    overwrite: OverwriteOpt = False,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    seq_len: SeqLenOpt = 256,
    calib_samples: CalibOpt = 32,
    batch_size: BatchOpt = 4,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    trust_remote_code: TrustOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Compute EoRA compensation for COMPRESSED against --base; write a PEFT LoRA adapter (or a merged model)."""
    from rankwise.compensate import check_compatible, export_peft, merge_with_report
    from rankwise.compensate import compensate as run
    from rankwise.io import save
    from rankwise.io.atomic import claimed_out
    from rankwise.io.models import load_model

    if not out:
        raise ValueError("--out is required: the directory to write the adapter (or merged model) to")
    with claimed_out(out, overwrite, compressed, base):
        work = prepare(compressed, text, dataset, seq_len, calib_samples, 0, device, threads, trust_remote_code,
                       verify=not no_verify)
        original = load_model(base, device=device, trust_remote_code=trust_remote_code, verify=not no_verify).model
        check_compatible(original, work.model)
        result = run(original, work.model, work.calibration, rank, batch_size=batch_size)
        say(result.summary())
        if merge:
            report = merge_with_report(work.model, result, compressed)
            save(work.model, out, tokenizer=work.tokenizer, overwrite=overwrite, report=report)
            say(f"saved merged model to {out}")
        else:
            export_peft(result, out, base_model_name=compressed, overwrite=overwrite)
            say(f"saved PEFT LoRA adapter to {out} (peft.PeftModel.from_pretrained(model, {out!r}))")
