"""``rankwise eval``: perplexity (or other metrics), parameters, throughput and memory of a dense or compressed
model."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Annotated, Literal

import psutil
import typer

from rankwise.cli.common import (
    BATCH_SIZE,
    CALIB_SAMPLES,
    DEVICE,
    DTYPE,
    EVAL_SAMPLES,
    SEQ_LEN,
    ActivationOpt,
    BatchOpt,
    CalibOpt,
    CompileOpt,
    DatasetOpt,
    DecodeBatchOpt,
    DeviceOpt,
    DtypeOpt,
    EvalOpt,
    FuseOpt,
    JsonOpt,
    ModelArg,
    NewTokensOpt,
    NoVerifyOpt,
    OffloadOpt,
    PrefillOpt,
    SeqLenOpt,
    SpeedOpt,
    TextOpt,
    ThreadsOpt,
    TrustOpt,
    comma_list,
    one_line_errors,
    prepare,
    say,
    setup,
    speed_settings,
    windows,
)
from rankwise.cli.metric import MetricOpt, metric_names


@one_line_errors
def evaluate(
    model: ModelArg = "smollm2",
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    as_json: JsonOpt = False,
    seq_len: SeqLenOpt = SEQ_LEN,
    eval_samples: EvalOpt = EVAL_SAMPLES,
    batch_size: BatchOpt = BATCH_SIZE,
    device: DeviceOpt = DEVICE,
    threads: ThreadsOpt = None,
    stream: Annotated[bool | None, typer.Option("--stream/--no-stream", help="run one block at a time (for models "
                                                "larger than memory); default: when the weights exceed half the "
                                                "available memory")] = None,
    dtype: DtypeOpt = DTYPE,
    offload_dir: OffloadOpt = None,
    activation_mb: ActivationOpt = 1024,
    trust_remote_code: TrustOpt = False,
    no_verify: NoVerifyOpt = False,
    tasks: Annotated[str | None, typer.Option(
        "--tasks", help="also run these lm-eval tasks (comma list, e.g. pydoc_cloze, shipped and offline, or "
        "arc_easy,hellaswag,piqa,winogrande; needs "
        "pip install 'rankwise\\[eval]')")] = None,
    task_dir: Annotated[list[str] | None, typer.Option(
        "--task-dir", help="a directory of extra lm-eval task YAML files, relative to the current directory (repeat "
        "for several; the shipped pydoc_cloze needs none)")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="at most this many documents per task")
                     ] = None,
    num_fewshot: Annotated[int | None, typer.Option("--num-fewshot", min=0, help="examples per task prompt "
                                                    "(default: the task's own)")] = None,
    reference: Annotated[str | None, typer.Option(
        "--reference", help="encoders: the dense model whose embeddings the cosine is measured against")] = None,
    calib_samples: CalibOpt = CALIB_SAMPLES,
    speed: SpeedOpt = False,
    fuse: FuseOpt = False,
    compile: CompileOpt = None,
    new_tokens: NewTokensOpt = 64,
    decode_batches: DecodeBatchOpt = "1,8",
    prefill: PrefillOpt = "1x512,1x2048",
    metric: MetricOpt = None,
    attention: Annotated[Literal["exact", "scatterbrain"], typer.Option(
        "--attention", help="attention while evaluating: the model's own (exact), or Scatterbrain: an exact local "
        "window plus Performer random features for the rest (rankwise.nn.scatterbrain; in memory only)")] = "exact",
    window: Annotated[int, typer.Option("--window", min=0, help="--attention scatterbrain: keys each query scores "
                                        "exactly, counting back from itself")] = 128,
    features: Annotated[int, typer.Option("--features", min=2, help="--attention scatterbrain: Performer random "
                                          "features (even) estimating the keys outside the window")] = 128,
    sink: Annotated[int, typer.Option("--sink", min=0, help="--attention scatterbrain: first tokens every query "
                                      "scores exactly (attention sinks; 4 helped SmolLM2 a lot)")] = 0,
    attention_seed: Annotated[int, typer.Option("--attention-seed", help="--attention scatterbrain: seed of the "
                                                "random features (layer l uses seed + l)")] = 0,
) -> None:
    """Evaluate MODEL (dense or a rankwise directory) on held-out windows from the end of the text, and with
    --tasks on lm-eval tasks. An encoder is evaluated by retrieval on held-out pydoc topics (first paragraph as the
    query, the rest as the document; --eval-samples pairs at most) and, with --reference, by the cosine of its
    sentence embeddings to the reference model's."""
    from rankwise.calibrate import load_text
    from rankwise.eval import evaluate as run
    from rankwise.eval.embedding import evaluate_encoder_spec, is_encoder_dir
    from rankwise.eval.measure import result_for, storage
    from rankwise.eval.stream import streamed_perplexity
    from rankwise.io.models import load_tokenizer, resolve
    from rankwise.io.shards import weights_bytes
    from rankwise.stream import dtype_name

    dtype = dtype_name(dtype)
    if not math.isfinite(activation_mb):
        raise ValueError(f"--activation-mb must be a finite number of MB, got {activation_mb}")
    timing = speed_settings(speed, decode_batches, prefill, new_tokens, compile, device, fuse)
    metrics = metric_names(metric)
    if attention == "exact" and (window, features, sink, attention_seed) != (128, 128, 0, 0):
        raise ValueError("--window, --features, --sink and --attention-seed set Scatterbrain attention: add "
                         "--attention scatterbrain")
    if features % 2:
        raise ValueError(f"--features must be even (random features come in pairs), got {features}")
    if attention != "exact" and tasks is not None:
        raise ValueError("--tasks with --attention scatterbrain: lm-eval pads its batches, and Scatterbrain applies "
                         "only causal masking; evaluate tasks with the model's own attention")
    task_names = manager = None
    if tasks is None:
        for option, value in (("--task-dir", task_dir), ("--limit", limit), ("--num-fewshot", num_fewshot)):
            if value is not None and value != []:
                raise ValueError(f"{option} needs --tasks: name the lm-eval tasks to run")
    else:
        from rankwise.eval.tasks import check_tasks, task_manager

        if stream:  # before the task index, which takes seconds to build
            raise ValueError("--tasks needs the model in memory; drop --stream")
        manager = task_manager(task_dir or ())
        task_names = check_tasks(comma_list(tasks, "--tasks"), manager)  # before the model is read
    setup(device, threads)
    raw = load_text(text, dataset=dataset)  # the text's errors come before any model is read
    path, source = resolve(model)
    if is_encoder_dir(path):
        if stream or task_names is not None or timing is not None or fuse or metric or attention != "exact":
            option = ("--stream" if stream else "--tasks" if task_names is not None else "--speed"
                      if timing is not None else "--fuse" if fuse else "--metric" if metric else "--attention")
            raise ValueError(f"{option} needs a causal LM; {model} is an encoder, evaluated in memory by embedding "
                             "cosine and retrieval")
        result = evaluate_encoder_spec(model, raw, calib_samples * seq_len, eval_samples, reference=reference,
                                       batch_size=batch_size, device=device, trust_remote_code=trust_remote_code,
                                       verify=not no_verify)
        if as_json:
            say(json.dumps({**result.to_dict(), "model": source, "reference": reference}))
        else:
            say(f"{source}: {result.describe()}")
        return
    if reference is not None:
        raise ValueError("--reference is for encoders; a causal LM is evaluated by perplexity")
    if stream is None:
        big = isinstance(path, Path) and weights_bytes(path) > 0.5 * psutil.virtual_memory().available
        stream = task_names is None and attention == "exact" and metrics == ("perplexity",) and big
    if stream and attention != "exact":
        raise ValueError("--attention scatterbrain runs the whole model in memory, which a streamed evaluation never "
                         "holds: drop --stream")
    if stream and (timing is not None or fuse):
        raise ValueError(f"{'--speed times' if timing is not None else '--fuse runs'} the whole model in memory, "
                         "which a streamed evaluation never holds: drop --stream (or run on a machine the model fits)")
    if stream and metrics != ("perplexity",):
        raise ValueError(f"--metric {','.join(metrics)}: a streamed evaluation (one block at a time) measures "
                         "perplexity only; drop --stream, or measure --metric perplexity")
    if stream:
        from rankwise._memory import pin_mmap_threshold

        pin_mmap_threshold()  # block by block: freed blocks and activations go back to the system at once
        if not (isinstance(path, Path) and weights_bytes(path) > 0):
            raise ValueError(f"--stream needs a local directory with safetensors weights, got {model!r}")
        _, evaluation, text_name = windows(load_tokenizer(path, trust_remote_code), raw, text, dataset, seq_len, 0,
                                           eval_samples)
        ppl, src = streamed_perplexity(path, evaluation, batch_size=batch_size, device=device, dtype=dtype,
                                       activation_mb=activation_mb, offload_dir=offload_dir, progress=not as_json,
                                       trust_remote_code=trust_remote_code, verify=not no_verify)
        result = result_for(src.model, evaluation, ppl, None)
    else:
        work = prepare(model, text, dataset, seq_len, 0, eval_samples, device, threads, trust_remote_code, raw,
                       verify=not no_verify, dtype=dtype)
        source, text_name = work.source, work.text_name
        if fuse:
            from rankwise.nn.fused import fuse_inputs_

            fuse_inputs_(work.model)
        approx: contextlib.AbstractContextManager = contextlib.nullcontext()
        if attention == "scatterbrain":
            from rankwise.nn.scatterbrain import use_scatterbrain

            approx = use_scatterbrain(work.model, window=window, num_features=features, sink=sink,
                                      seed=attention_seed)
        with approx:  # everything measured below runs with the attention asked for
            result = run(work.model, work.evaluation, batch_size=batch_size, progress=not as_json,
                         throughput=timing is not None, metrics=metrics)  # timings only when --speed asks for them
            if timing is not None:
                from rankwise.eval.speed import measure_speed

                result.speed = measure_speed(work.model, **timing.kwargs()).to_dict()
            if task_names is not None:
                from rankwise.eval.tasks import evaluate_tasks

                scores = evaluate_tasks(work.model, work.tokenizer, task_names, batch_size=batch_size, limit=limit,
                                        num_fewshot=num_fewshot, manager=manager, progress=not as_json)
    result.storage = storage(path)
    attn = ({"attention": {"kind": attention, "window": window, "features": features, "sink": sink,
                           "seed": attention_seed}} if attention != "exact" else {})
    if as_json:
        extra = {"tasks": scores} if task_names is not None else {}
        say(json.dumps({**result.to_dict(), "model": source, "text": text_name, **attn, **extra}))
    else:
        how = (f" with Scatterbrain attention (window {window}, {features} features, {sink} sink tokens, seed "
               f"{attention_seed})" if attn else "")
        say(f"{source} on {text_name}{how}: {result.describe()}")
        if task_names is not None:
            from rankwise.eval.tasks import describe

            say(describe(scores))
