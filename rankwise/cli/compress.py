"""``rankwise compress``: calibrate, factorise, save."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from rankwise.allocate import ALLOCATIONS
from rankwise.cli.common import (
    BATCH_SIZE,
    CALIB_SAMPLES,
    CALIB_SELECT,
    DEVICE,
    DTYPE,
    SEQ_LEN,
    TARGETS,
    ActivationOpt,
    BatchOpt,
    CalibOpt,
    CalibPoolOpt,
    CalibSelectOpt,
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    JsonReportOpt,
    ModelArg,
    NoCacheOpt,
    NoVerifyOpt,
    OffloadOpt,
    OutOpt,
    OverwriteOpt,
    RayOpt,
    SeqLenOpt,
    TargetsOpt,
    TextOpt,
    ThreadsOpt,
    TrustOpt,
    choices,
    comma_list,
    one_line_errors,
    say,
    setup,
    stats_cache,
)
from rankwise.methods import method_names
from rankwise.methods.recipes import NAMED_RECIPES


@one_line_errors
def compress(
    model: ModelArg = "smollm2",
    method: Annotated[choices(method_names()), typer.Option("--method", help="compression method (the README's "
                                                           "table says what each does)")] = "svd_llm",
    recipe: Annotated[str | None, typer.Option(
        "--recipe", help=f"a named recipe ({', '.join(f'{k} = {v}' for k, v in NAMED_RECIPES.items())}) or one "
        "written like a compare row label (svd_llm+loss+seq); replaces --method, --allocation, --sequential, "
        "--update-u, --anchored")] = None,
    ratio: Annotated[float, typer.Option("--ratio", help="fraction of targeted parameters removed, in (0, 1)")] = 0.2,
    bits: Annotated[float | None, typer.Option("--bits", help="budget in average stored bits per targeted weight "
                                               "(indices and scales counted) instead of --ratio")] = None,
    settings: Annotated[list[str] | None, typer.Option(
        "--set", metavar="NAME=VALUE", help="a method's own config field, e.g. --set nblocks=4 (repeatable; "
        "a wrong name lists the method's fields)")] = None,
    out: OutOpt = ...,
    targets: TargetsOpt = TARGETS,
    export: Annotated[Literal["factored", "dense"], typer.Option(
        "--export", help="factored (transformers loads it after import rankwise; smallest) or dense (a plain "
        "Hugging Face checkpoint, factors multiplied out)")] = "factored",
    allocation: Annotated[choices(ALLOCATIONS), typer.Option("--allocation", help="how the budget is spread "
                                                             "over the layers")] = "uniform",
    sequential: Annotated[bool, typer.Option("--sequential", help="calibrate each block on compressed activations")
                          ] = False,
    update_u: Annotated[bool, typer.Option("--update-u", help="refit the left factor by least squares")] = False,
    anchored: Annotated[bool, typer.Option("--anchored", help="svd_llm with --sequential: fit each layer to the "
                                           "original model's outputs from the compressed model's inputs (AA-SVD)")
                        ] = False,
    overwrite: OverwriteOpt = False,
    show_layers: Annotated[bool, typer.Option("--show-layers", help="print the per-layer table")] = False,
    objective: Annotated[Literal["size", "speed"] | None, typer.Option(
        "--objective", help="low-rank methods: size (factorise wherever it stores less) or speed (only where the "
        "factor pair is also faster at decode on this machine; timed once per shape and cached)")] = None,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    seq_len: SeqLenOpt = SEQ_LEN,
    calib_samples: CalibOpt = CALIB_SAMPLES,
    calib_select: CalibSelectOpt = CALIB_SELECT,
    calib_pool: CalibPoolOpt = None,
    batch_size: BatchOpt = BATCH_SIZE,
    device: DeviceOpt = DEVICE,
    threads: ThreadsOpt = None,
    dtype: DtypeOpt = DTYPE,
    offload_dir: OffloadOpt = None,
    activation_mb: ActivationOpt = 1024,
    json_report: JsonReportOpt = None,
    trust_remote_code: TrustOpt = False,
    no_verify: NoVerifyOpt = False,
    ray: RayOpt = None,
    no_cache: NoCacheOpt = False,
) -> None:
    """Compress MODEL with METHOD at RATIO and save it to OUT.

    A safetensors checkpoint (the default model, a local directory, a hub id) is streamed block by block, so models
    larger than memory compress; other models are loaded whole.
    """
    import json
    import math
    from pathlib import Path

    from rankwise.api import build_config
    from rankwise.compression.job import compress_model
    from rankwise.io.atomic import refuse_overlap
    from rankwise.io.models import checkpoint_dir, resolve

    config = build_config(method, ratio, recipe=recipe, bits=bits, targets=comma_list(targets, "--targets"),
                          allocation=allocation, sequential=sequential, update_u=update_u, anchored=anchored,
                          objective=objective, settings=settings)
    if not math.isfinite(activation_mb):
        raise ValueError(f"--activation-mb must be a finite number of MB, got {activation_mb}")
    setup(device, threads)
    if json_report:
        path, _ = checkpoint_dir(model)
        for where in {str(p) for p in (path or resolve(model)[0], model) if isinstance(p, Path) or Path(p).exists()}:
            refuse_overlap(json_report, where, option="--json-report")
    report = compress_model(model, config, out, text=text, dataset=dataset, seq_len=seq_len,
                            calib_samples=calib_samples, batch_size=batch_size, device=device, dtype=dtype,
                            export=export, overwrite=overwrite, activation_mb=activation_mb, offload_dir=offload_dir,
                            trust_remote_code=trust_remote_code, ray=ray, cache=stats_cache(no_cache),
                            verify=not no_verify, calib_select=calib_select, calib_pool=calib_pool)
    if json_report:
        from rankwise.io.atomic import write_text_atomic

        write_text_atomic(Path(json_report), json.dumps(report.to_dict(), indent=1))
    if show_layers:
        say(report.to_markdown())
        say(report.storage_line())
    else:
        say(report.storage_line())
        say(report.summary())
        for note in report.notes:
            say(f"note: {note}")
        fallbacks = sum(1 for layer in report.layers if layer.covariance_fallback)
        if fallbacks:
            say(f"note: {fallbacks} layers had a covariance that was not positive definite (ridge or eigen "
                "fallback used)")
    say(f"saved {export} model to {out}")

