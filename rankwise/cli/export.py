"""``rankwise export``: write a dense or compressed model as ONNX (with a KV cache) or as a plain dense checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import typer

from rankwise.cli.common import (
    SEQ_LEN,
    DatasetOpt,
    ModelArg,
    NoVerifyOpt,
    OutOpt,
    OverwriteOpt,
    SeqLenOpt,
    TextOpt,
    ThreadsOpt,
    TrustOpt,
    one_line_errors,
    say,
    setup,
    windows,
)


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


@one_line_errors
def export(
    model: ModelArg = "smollm2",
    out: OutOpt = ...,
    fmt: Annotated[Literal["onnx", "dense"], typer.Option(
        "--format", help="onnx (decoder with KV cache, for onnxruntime; needs pip install 'rankwise\\[onnx]') or "
        "dense (plain Hugging Face checkpoint, factors multiplied out)")] = "onnx",
    check: Annotated[bool, typer.Option("--check", help="reload the export and print its largest logit difference "
                                        "from the torch model on held-out windows")] = False,
    check_samples: Annotated[int, typer.Option("--check-samples", min=1, help="windows for --check (from the end "
                                               "of the text)")] = 4,
    seq_len: SeqLenOpt = SEQ_LEN,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    overwrite: OverwriteOpt = False,
    threads: ThreadsOpt = None,
    trust_remote_code: TrustOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Export MODEL (a rankwise directory, a dense model, the default model) to OUT.

    ONNX keeps factorised layers as two matmuls, so the file is smaller by the compression; the model runs in
    float32. Only decoder-only architectures whose cache onnxruntime can be fed are supported (the error lists
    them); nothing is written for the others.
    """
    from rankwise.calibrate import load_text
    from rankwise.io.atomic import claimed_out
    from rankwise.io.models import load_model, load_tokenizer, resolve

    if fmt == "onnx":
        _require_onnx()
    setup("cpu", threads)
    with claimed_out(out, overwrite, model):
        path, _ = resolve(model)
        if fmt == "onnx" and (Path(path) / "config.json").is_file():  # refuse an unsupported model before loading it
            from rankwise.export.onnx import check_model_type

            check_model_type(json.loads((Path(path) / "config.json").read_text()).get("model_type"))
        held_out = None
        if check:  # the text and tokenizer are checked before the model loads
            raw = load_text(text, dataset=dataset)
            _, held_out, _ = windows(load_tokenizer(path, trust_remote_code), raw, text, dataset, seq_len, 0,
                                     check_samples)
        loaded = load_model(model, trust_remote_code=trust_remote_code, verify=not no_verify)
        params = sum(p.numel() for p in {id(p): p for p in loaded.model.parameters()}.values())
        if fmt == "onnx":
            from rankwise.export import check_exportable, export_onnx

            check_exportable(loaded.model)
            if next(loaded.model.parameters()).dtype != torch.float32:
                say(f"note: exporting in float32 (the model is {next(loaded.model.parameters()).dtype}); "
                    "onnxruntime's CPU kernels are float32")
                loaded.model.float()
            result = export_onnx(loaded.model, out, tokenizer=loaded.tokenizer, overwrite=overwrite)
            files = ", ".join(result.layout.files)
            say(f"wrote {out}: {files} {_mb(result.nbytes)} (weights {_mb(result.weight_bytes)}, {params:,} "
                f"parameters in float32; {result.layout.num_layers} layers with a KV cache)")
            if result.dense_weight_bytes != result.weight_bytes:
                share = result.weight_bytes / result.dense_weight_bytes
                say(f"factorised layers kept factorised: the weights are {share:.3f} of a dense export's "
                    f"{_mb(result.dense_weight_bytes)}")
        else:
            from rankwise.io import save
            from rankwise.io.shards import weights_bytes

            save(loaded.model, out, tokenizer=loaded.tokenizer, overwrite=overwrite, export="dense")
            nbytes = weights_bytes(out)
            say(f"wrote {out}: dense safetensors {_mb(nbytes)} (source had {params:,} parameters)")
    if held_out is not None:
        diff = _check(loaded.model, out, fmt, held_out, threads, trust_remote_code)
        say(f"check: max |logit difference| from torch on {len(held_out)} held-out windows of {seq_len} tokens: "
            f"{diff:.3g}")


def _require_onnx() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"--format onnx needs {', '.join(missing)}: pip install 'rankwise[onnx]'")


def _check(model: Any, out: str, fmt: str, held_out: torch.Tensor, threads: int | None, trust_remote_code: bool
           ) -> float:
    """Largest logit difference between ``model`` and what was written to ``out``."""
    from rankwise.export import OnnxCausalLM, max_logit_diff

    if fmt == "onnx":
        return max_logit_diff(model, OnnxCausalLM(out, threads=threads), held_out)
    from rankwise.io.models import load_model

    reloaded = load_model(out, trust_remote_code=trust_remote_code, verify=False).model  # written just now
    with torch.no_grad():
        return max(float((reloaded(w[None]).logits - model(w[None]).logits).abs().max()) for w in held_out)
