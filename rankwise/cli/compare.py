"""``rankwise compare``: every method at every ratio, side by side, as a table and a plot."""

from __future__ import annotations

from typing import Annotated

import typer

from rankwise.cli.common import (
    BatchOpt,
    CalibOpt,
    DatasetOpt,
    DeviceOpt,
    EvalOpt,
    ModelArg,
    OverwriteOpt,
    SeqLenOpt,
    TextOpt,
    ThreadsOpt,
    comma_list,
    one_line_errors,
    prepare,
    say,
)


@one_line_errors
def compare(
    model: ModelArg = "smollm2",
    methods: Annotated[str, typer.Option("--methods", help="comma list of methods")] = "svd,fwsvd,asvd,svd_llm",
    ratios: Annotated[str, typer.Option("--ratios", help="comma list of fractions removed")] = "0.1,0.2,0.3,0.4",
    out: Annotated[str, typer.Option("--out", help="directory for comparison.md/.png/.json")] = "compare-out",
    overwrite: OverwriteOpt = False,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    seq_len: SeqLenOpt = 256,
    calib_samples: CalibOpt = 32,
    eval_samples: EvalOpt = 64,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
) -> None:
    """Compare compression methods across ratios on MODEL; writes a Markdown table and a PNG plot."""
    from rankwise.eval.compare import compare as run
    from rankwise.io.atomic import check_output_dir
    from rankwise.methods import CompressConfig, config_class

    method_list = comma_list(methods, "--methods")
    ratio_list = comma_list(ratios, "--ratios", float)
    for name in method_list:
        config_class(name)
    for r in ratio_list:
        CompressConfig(ratio=r)
    check_output_dir(out, overwrite)
    work = prepare(model, text, dataset, seq_len, calib_samples, eval_samples, device, threads)
    settings = {"model": work.source, "text": work.text_name, "seq_len": seq_len, "calib": calib_samples,
                "eval": eval_samples}
    result = run(work.model, work.calibration, work.evaluation, method_list, ratio_list, batch_size=batch_size,
                 settings=settings)
    result.save(out, overwrite=overwrite)
    say(result.to_markdown())
    say(f"\nwrote {out}/comparison.md, comparison.png, comparison.json")
