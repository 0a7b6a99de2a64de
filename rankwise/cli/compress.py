"""``rankwise compress``: calibrate, factorise, save."""

from __future__ import annotations

from typing import Annotated

import typer

from rankwise.cli.common import (
    ActivationOpt,
    BatchOpt,
    CalibOpt,
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    ModelArg,
    NoCacheOpt,
    OffloadOpt,
    OverwriteOpt,
    SeqLenOpt,
    TextOpt,
    ThreadsOpt,
    TrustOpt,
    comma_list,
    one_line_errors,
    prepare,
    say,
    setup,
    stats_cache,
    windows,
)


@one_line_errors
def compress(
    model: ModelArg = "smollm2",
    method: Annotated[str, typer.Option("--method", help="compression method (see --help of compare)")] = "svd_llm",
    ratio: Annotated[float, typer.Option("--ratio", help="fraction of targeted parameters removed, in (0, 1)")] = 0.2,
    out: Annotated[str, typer.Option("--out", help="output directory")] = "",
    targets: Annotated[str, typer.Option("--targets", help="comma list of attn, mlp")] = "attn,mlp",
    export: Annotated[str, typer.Option("--export", help="factored (rankwise format) or dense (plain HF)")
                      ] = "factored",
    allocation: Annotated[str, typer.Option("--allocation", help="uniform, welore or loss")] = "uniform",
    sequential: Annotated[bool, typer.Option("--sequential", help="calibrate each block on compressed activations")
                          ] = False,
    update_u: Annotated[bool, typer.Option("--update-u", help="refit the left factor by least squares")] = False,
    overwrite: OverwriteOpt = False,
    show_layers: Annotated[bool, typer.Option("--show-layers", help="print the per-layer table")] = False,
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

    from rankwise.calibrate import load_text
    from rankwise.compress import compress_, compress_checkpoint
    from rankwise.io import save
    from rankwise.io.atomic import check_output_dir, claim, refuse_overlap
    from rankwise.io.models import checkpoint_dir, load_tokenizer, resolve
    from rankwise.io.provenance import provenance
    from rankwise.io.sentence import copy_sentence_files
    from rankwise.methods import config_class
    from rankwise.stream import parse_dtype

    if not out:
        raise ValueError("--out is required: the directory to write the compressed model to")
    if export not in ("factored", "dense"):
        raise ValueError(f"--export must be 'factored' or 'dense', got {export!r}")
    config = config_class(method)(ratio=ratio, targets=tuple(comma_list(targets, "--targets")),
                                  allocation=allocation, sequential=sequential, update_u=update_u)
    parse_dtype(dtype)
    if not math.isfinite(activation_mb):
        raise ValueError(f"--activation-mb must be a finite number of MB, got {activation_mb}")
    check_output_dir(out, overwrite)  # fail before the slow part
    setup(device, threads)
    raw = load_text(text, dataset=dataset)  # the text's errors come before any model is read
    path, _ = checkpoint_dir(model)
    source = path if path is not None else resolve(model)[0]
    for where in {str(p) for p in (source, model) if isinstance(p, Path) or Path(p).exists()}:
        refuse_overlap(out, where)  # the cached conversion and, for a .gguf input, the file itself
        if json_report:
            refuse_overlap(json_report, where, option="--json-report")

    def sentence_files(tmp: Path) -> None:  # an encoder's sentence-transformers pooling and configs, kept as-is
        if isinstance(source, Path):
            copy_sentence_files(source, tmp)

    with claim(out):  # no other run writes OUT until this one is done
        if path is not None:
            tokenizer = load_tokenizer(path, trust_remote_code)
            calibration, _, text_name = windows(tokenizer, raw, text, dataset, seq_len, calib_samples, 0)
            origin = provenance(model, source, config, text_name, tuple(calibration.shape))
            report = compress_checkpoint(path, config, calibration, out, tokenizer=tokenizer, dtype=dtype,
                                         device=device, export=export, overwrite=overwrite, batch_size=batch_size,
                                         activation_mb=activation_mb, offload_dir=offload_dir,
                                         trust_remote_code=trust_remote_code, ray=ray, provenance=origin,
                                         cache=stats_cache(no_cache), extras=sentence_files)
        else:
            work = prepare(model, text, dataset, seq_len, calib_samples, 0, device, threads, trust_remote_code, raw)
            if dtype is not None:
                work.model.to(parse_dtype(dtype))
            report = compress_(work.model, config, work.calibration, batch_size=batch_size,
                               activation_mb=activation_mb, offload_dir=offload_dir, ray=ray,
                               cache=stats_cache(no_cache))
            origin = provenance(model, source, config, work.text_name, tuple(work.calibration.shape))
            save(work.model, out, tokenizer=work.tokenizer, report=report, overwrite=overwrite, export=export,
                 provenance=origin, dtype=dtype, extras=sentence_files)
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
