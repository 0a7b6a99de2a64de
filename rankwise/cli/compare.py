"""``rankwise compare``: every method at every ratio, side by side, as a table and a plot."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from enum import StrEnum
from typing import Annotated

import typer

from rankwise.allocate import ALLOCATIONS
from rankwise.cli.common import (
    BATCH_SIZE,
    CALIB_SAMPLES,
    DEVICE,
    DTYPE,
    EVAL_SAMPLES,
    MAX_NEW_TOKENS,
    SEQ_LEN,
    TARGETS,
    BatchOpt,
    CalibOpt,
    CompileOpt,
    DatasetOpt,
    DecodeBatchOpt,
    DeviceOpt,
    DtypeOpt,
    EvalOpt,
    FuseOpt,
    MaxNewTokensOpt,
    ModelArg,
    NewTokensOpt,
    NoCacheOpt,
    NoVerifyOpt,
    OutOpt,
    OverwriteOpt,
    PrefillOpt,
    PromptOpt,
    RayOpt,
    SeqLenOpt,
    SpeedOpt,
    TargetsOpt,
    TextOpt,
    ThreadsOpt,
    TrustOpt,
    comma_list,
    one_line_errors,
    prepare,
    say,
    speed_settings,
    stats_cache,
)
from rankwise.cli.metric import MetricOpt, metric_names
from rankwise.methods.recipes import NAMED_RECIPES, recipe_options


class Toggle(StrEnum):
    """Whether compare adds rows without an option, with it, or both."""

    off = "off"
    on = "on"
    both = "both"

    @property
    def values(self) -> tuple[bool, ...]:
        return {"off": (False,), "on": (True,), "both": (False, True)}[self.value]


@one_line_errors
def compare(
    model: ModelArg = "smollm2",
    methods: Annotated[str, typer.Option("--methods", help="comma list of methods")] = "svd,fwsvd,asvd,svd_llm",
    ratios: Annotated[str | None, typer.Option("--ratios", help="comma list of fractions removed (default "
                                               "0.1,0.2,0.3,0.4, none when --bits is given)")] = None,
    bits: Annotated[str | None, typer.Option("--bits", help="comma list of budgets in stored bits per targeted "
                                             "weight, each a row per recipe beside the ratios (e.g. 3.5,4.5)")
                    ] = None,
    out: OutOpt = ...,
    targets: TargetsOpt = TARGETS,
    allocations: Annotated[str, typer.Option("--allocations", metavar="LIST",
                                             help=f"comma list of {', '.join(ALLOCATIONS)}")] = "uniform",
    sequential: Annotated[Toggle, typer.Option("--sequential", help="rows without, with, or both")] = Toggle.off,
    update_u: Annotated[Toggle, typer.Option("--update-u", help="rows without, with, or both")] = Toggle.off,
    anchored: Annotated[Toggle, typer.Option("--anchored", help="svd_llm rows without, with, or both the anchored "
                                             "fit to the original outputs (sequential rows only)")] = Toggle.off,
    eora_rank: Annotated[int, typer.Option("--eora-rank", help="also add rows with EoRA of this rank (0: none)")
                         ] = 0,
    overwrite: OverwriteOpt = False,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    seq_len: SeqLenOpt = SEQ_LEN,
    calib_samples: CalibOpt = CALIB_SAMPLES,
    eval_samples: EvalOpt = EVAL_SAMPLES,
    batch_size: BatchOpt = BATCH_SIZE,
    device: DeviceOpt = DEVICE,
    dtype: DtypeOpt = DTYPE,
    threads: ThreadsOpt = None,
    ray: RayOpt = None,
    trust_remote_code: TrustOpt = False,
    recipe_list: Annotated[str | None, typer.Option(
        "--recipes", help="comma list of recipes written like row labels, e.g. svd_llm,svd_llm+loss+seq,"
        f"monarch+whiten=false (options: {recipe_options()}), or a named recipe ({', '.join(NAMED_RECIPES)}); "
        "replaces --methods, --allocations, --sequential, --update-u, --anchored")] = None,
    prompt: PromptOpt = None,
    max_new_tokens: MaxNewTokensOpt = MAX_NEW_TOKENS,
    no_cache: NoCacheOpt = False,
    no_verify: NoVerifyOpt = False,
    speed_repeats: Annotated[int, typer.Option("--speed-repeats", min=1, help="timed runs of each timing per row "
                                               "(prefill, and with --speed decode too; the fastest counts)")] = 5,
    hqq_bits: Annotated[str | None, typer.Option(
        "--hqq-bits", help="also rows of HQQ quantisation at these bits (comma list of 2, 3, 4, 8), at the bits per "
        "weight its format stores (needs pip install 'rankwise\\[quant]')")] = None,
    hqq_group: Annotated[int, typer.Option("--hqq-group", min=8, help="weights per HQQ scale and zero (a multiple "
                                           "of 8)")] = 64,
    speed: SpeedOpt = False,
    fuse: FuseOpt = False,
    compile: CompileOpt = None,
    new_tokens: NewTokensOpt = 64,
    decode_batches: DecodeBatchOpt = "1,8",
    prefill: PrefillOpt = "1x512,1x2048",
    metric: MetricOpt = None,
) -> None:
    """Compare compression methods across ratios on MODEL; writes a Markdown table and a PNG plot to OUT (with
    --prompt, each model's completions side by side). An encoder is compared by embedding cosine to the dense model
    and retrieval on --eval-samples held-out pydoc topics."""
    from pathlib import Path

    from rankwise.calibrate import load_text
    from rankwise.distributed import ray_session
    from rankwise.eval.compare import compare as run
    from rankwise.eval.compare import recipes
    from rankwise.eval.embedding import held_out_pairs, is_encoder_dir
    from rankwise.eval.encoder_compare import compare_encoder
    from rankwise.eval.generate import check_generation, check_prompts
    from rankwise.io.atomic import claimed_out
    from rankwise.io.models import resolve
    from rankwise.io.sentence import max_seq_length
    from rankwise.methods import CompressConfig, config_class
    from rankwise.methods.recipes import parse_recipe
    from rankwise.stream import dtype_name
    from rankwise.targets import check_targets

    timing = speed_settings(speed, decode_batches, prefill, new_tokens, compile, device, fuse)
    metrics = metric_names(metric)
    if timing is not None and ray is not None:
        raise ValueError("--speed and --ray do not combine: rows timed side by side on Ray workers would slow each "
                         "other down; time them in one process")
    method_list = comma_list(methods, "--methods")
    default_ratios = [] if bits else [0.1, 0.2, 0.3, 0.4]  # with --bits, only the ratios asked for
    ratio_list = default_ratios if ratios is None else comma_list(ratios, "--ratios", float)
    hqq_list = comma_list(hqq_bits, "--hqq-bits", int) if hqq_bits is not None else []
    if hqq_list:
        from rankwise.eval.anchors import HQQ, hqq_api

        for b in hqq_list:
            HQQ(b, hqq_group)
        hqq_api()
    for name in method_list:
        config_class(name)
    allocation_list = tuple(comma_list(allocations, "--allocations"))
    for r in ratio_list:
        for a in allocation_list:
            CompressConfig(ratio=r, allocation=a)
    if eora_rank < 0:
        raise ValueError(f"--eora-rank must be >= 0, got {eora_rank}")
    bits_list = comma_list(bits, "--bits", float) if bits else []
    if recipe_list is not None:
        configs = [parse_recipe(r, ratio) for r in comma_list(recipe_list, "--recipes") for ratio in ratio_list]
        configs += [parse_recipe(r, bits=b) for r in comma_list(recipe_list, "--recipes") for b in bits_list]
    else:
        configs = recipes(method_list, ratio_list, allocations=allocation_list, sequential=sequential.values,
                          update_u=update_u.values, anchored=anchored.values)
        configs += [dataclasses.replace(c, bits=b) for c in recipes(
            method_list, [0.2], allocations=allocation_list, sequential=sequential.values,
            update_u=update_u.values, anchored=anchored.values) for b in bits_list]
    target_list = check_targets(comma_list(targets, "--targets"))
    configs = [dataclasses.replace(c, targets=target_list) for c in configs]
    dtype = dtype_name(dtype)
    prompts = list(prompt or [])
    if any(not p.strip() for p in prompts):
        raise ValueError("--prompt must not be empty")
    if prompts:
        check_prompts(prompts, "--prompt")
    try:
        encoder = is_encoder_dir(resolve(model)[0])
    except ValueError:
        encoder = False  # a missing model is reported where a causal LM's is, after the --ray check
    if encoder:
        if prompts or eora_rank or ray is not None or hqq_list or timing is not None or fuse or metric:
            raise ValueError(f"{model} is an encoder: --prompt, --eora-rank, --ray, --hqq-bits, --speed, --fuse and "
                             "--metric are for causal LMs")
        with claimed_out(out, overwrite, model):
            raw = load_text(text, dataset=dataset)
            work = prepare(model, text, dataset, seq_len, calib_samples, 0, device, threads, trust_remote_code, raw,
                           verify=not no_verify, dtype=dtype)
            pairs = held_out_pairs(work.tokenizer, raw, calib_samples * seq_len, eval_samples)
            settings = {"model": work.source, "text": work.text_name, "seq_len": seq_len, "calib": calib_samples,
                        "pairs": len(pairs)}
            where = resolve(model)[0]
            result = compare_encoder(work.model, work.tokenizer, work.calibration, pairs, configs,
                                     batch_size=batch_size, settings=settings, cache=stats_cache(no_cache),
                                     max_length=(max_seq_length(where) if isinstance(where, Path) else None) or 256)
            result.save(out, overwrite=overwrite)
        say(result.to_markdown())
        say(f"\nwrote {out}/comparison.md, comparison.png, comparison.json")
        return
    if prompts:  # room for the completions in the model's context, before anything is compressed
        check_generation(model, prompts, max_new_tokens=max_new_tokens, trust_remote_code=trust_remote_code)
    with claimed_out(out, overwrite, model):
        with nullcontext() if ray is None else ray_session(ray):  # a bad address fails before the model loads
            work = prepare(model, text, dataset, seq_len, calib_samples, eval_samples, device, threads,
                           trust_remote_code, verify=not no_verify, dtype=dtype)
            settings = {"model": work.source, "text": work.text_name, "seq_len": seq_len, "calib": calib_samples,
                        "eval": eval_samples, "prompts": prompts}
            result = run(work.model, work.calibration, work.evaluation, configs, eora_rank=eora_rank,
                         batch_size=batch_size, settings=settings, ray_address=ray, prompts=prompts,
                         tokenizer=work.tokenizer, max_new_tokens=max_new_tokens, cache=stats_cache(no_cache),
                         speed_repeats=speed_repeats, hqq_bits=hqq_list, hqq_group=hqq_group,
                         speed=timing.kwargs() if timing is not None else None, fuse=fuse, metrics=metrics)
        result.save(out, overwrite=overwrite)
    for note in result.notes:
        say(f"note: {note}")
    say(result.to_markdown())
    say(f"\nwrote {out}/comparison.md, comparison.png, comparison.json")
