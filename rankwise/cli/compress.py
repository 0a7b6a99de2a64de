"""``rankwise compress``: calibrate, factorise, save."""

from __future__ import annotations

from typing import Annotated

import typer

from rankwise.allocate import ALLOCATIONS
from rankwise.cli.common import (
    ActivationOpt,
    BatchOpt,
    CalibOpt,
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    ModelArg,
    NoCacheOpt,
    NoVerifyOpt,
    OffloadOpt,
    OverwriteOpt,
    SeqLenOpt,
    TextOpt,
    ThreadsOpt,
    TrustOpt,
    comma_list,
    one_line_errors,
    say,
    setup,
    stats_cache,
)
from rankwise.methods.recipes import NAMED_RECIPES

ALLOCATION_NAMES = ", ".join(ALLOCATIONS)


@one_line_errors
def compress(
    model: ModelArg = "smollm2",
    method: Annotated[str, typer.Option("--method", help="compression method (see --help of compare)")] = "svd_llm",
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
    out: Annotated[str, typer.Option("--out", help="output directory")] = "",
    targets: Annotated[str, typer.Option("--targets", help="comma list of attn, mlp")] = "attn,mlp",
    export: Annotated[str, typer.Option("--export", help="factored (rankwise format) or dense (plain HF)")
                      ] = "factored",
    allocation: Annotated[str, typer.Option("--allocation", help=f"how the budget is spread: {ALLOCATION_NAMES}")
                          ] = "uniform",
    sequential: Annotated[bool, typer.Option("--sequential", help="calibrate each block on compressed activations")
                          ] = False,
    update_u: Annotated[bool, typer.Option("--update-u", help="refit the left factor by least squares")] = False,
    anchored: Annotated[bool, typer.Option("--anchored", help="svd_llm with --sequential: fit each layer to the "
                                           "original model's outputs from the compressed model's inputs (AA-SVD)")
                        ] = False,
    overwrite: OverwriteOpt = False,
    show_layers: Annotated[bool, typer.Option("--show-layers", help="print the per-layer table")] = False,
    objective: Annotated[str | None, typer.Option(
        "--objective", help="low-rank methods: size (factorise wherever it stores less) or speed (only where the "
        "factor pair is also faster at decode on this machine; timed once per shape and cached)")] = None,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    seq_len: SeqLenOpt = 256,
    calib_samples: CalibOpt = 32,
    batch_size: BatchOpt = 4,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    dtype: DtypeOpt = None,
    offload_dir: OffloadOpt = None,
    activation_mb: ActivationOpt = 1024,
    json_report: Annotated[str | None, typer.Option("--json-report", help="also write the report as JSON here")
                           ] = None,
    trust_remote_code: TrustOpt = False,
    no_verify: NoVerifyOpt = False,
    ray: Annotated[str | None, typer.Option(
        "--ray", metavar="ADDRESS", help="fan each block's factorisations out to Ray workers: 'local', 'auto' or "
        "HOST:PORT (needs pip install 'rankwise\\[ray]')")] = None,
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

    if not out:
        raise ValueError("--out is required: the directory to write the compressed model to")
    if export not in ("factored", "dense"):
        raise ValueError(f"--export must be 'factored' or 'dense', got {export!r}")
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
                            verify=not no_verify)
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

