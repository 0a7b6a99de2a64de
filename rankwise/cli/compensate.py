"""``rankwise compensate``: EoRA adapters for a compressed model, as a PEFT adapter or merged."""

from __future__ import annotations

from typing import Annotated

import typer

from rankwise.cli.common import (
    BATCH_SIZE,
    CALIB_SAMPLES,
    DEVICE,
    DTYPE,
    RANK,
    SEQ_LEN,
    BaseOpt,
    BatchOpt,
    CalibOpt,
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    MergeOpt,
    NoVerifyOpt,
    OutOpt,
    OverwriteOpt,
    RankOpt,
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
    out: OutOpt = ...,
    base: BaseOpt = "smollm2",
    rank: RankOpt = RANK,
    merge: MergeOpt = False,
    overwrite: OverwriteOpt = False,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    seq_len: SeqLenOpt = SEQ_LEN,
    calib_samples: CalibOpt = CALIB_SAMPLES,
    batch_size: BatchOpt = BATCH_SIZE,
    device: DeviceOpt = DEVICE,
    dtype: DtypeOpt = DTYPE,
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
    from rankwise.stream import dtype_name

    dtype = dtype_name(dtype)
    with claimed_out(out, overwrite, compressed, base):
        work = prepare(compressed, text, dataset, seq_len, calib_samples, 0, device, threads, trust_remote_code,
                       verify=not no_verify, dtype=dtype)
        original = load_model(base, device=device, trust_remote_code=trust_remote_code, verify=not no_verify).model
        original.to(next(work.model.parameters()).dtype)  # the teacher computes as the compressed model does
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
