"""Options and helpers shared by the commands: model and text loading, comma lists, one-line errors."""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import torch
import typer
from typer.core import TyperCommand

from rankwise._errors import first_line
from rankwise.calibrate import DEFAULT_TEXT_NAME, load_text, split_windows
from rankwise.calibrate.select import SELECTIONS

F = TypeVar("F", bound=Callable[..., Any])

ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help="'smollm2' (default model), a directory, a .gguf "
                                        "file or a hub id")]

# One vocabulary: every command that has one of these options gives it this meaning and this default
# (tests/test_cli_vocabulary.py walks every command and fails on a second meaning or default).
SEQ_LEN = 256
CALIB_SAMPLES = 32
CALIB_SELECT = "first"
EVAL_SAMPLES = 16
BATCH_SIZE = 4
TARGETS = "attn,mlp"
DTYPE = "auto"
DEVICE = "cpu"
MAX_NEW_TOKENS = 48
RANK = 16
STEPS = 100

TextOpt = Annotated[str | None, typer.Option("--text", metavar="FILE", help="a UTF-8 text file to calibrate, train "
                                             "and evaluate on (default: the standard library's pydoc topics)")]
DatasetOpt = Annotated[str | None, typer.Option(
    "--dataset", metavar="NAME[:CONFIG[:SPLIT]]", help="a Hugging Face datasets text instead of --text, e.g. "
    "wikitext:wikitext-2-raw-v1:test (default split train; NAME may be a local directory; needs pip install "
    "'rankwise\\[datasets]' and the network or a local cache)")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", min=2, help="tokens per window")]
CalibOpt = Annotated[int, typer.Option("--calib-samples", min=1, help="calibration windows from the start of "
                                       "the text (evaluation windows never overlap them)")]
CalibSelectOpt = Annotated[Literal[SELECTIONS], typer.Option(  # type: ignore[valid-type]
    "--calib-select", help="which calibration windows: first (the first --calib-samples), or chosen from the first "
    "--calib-pool by what they add to the targeted layers' input covariances: leverage (by their tokens' ridge "
    "leverage), sensitivity (l1 Lewis weights), volume (a determinantal draw of diverse windows); costs one no-grad "
    "pass over the pool")]
CalibPoolOpt = Annotated[int | None, typer.Option("--calib-pool", min=1, help="windows from the start of the text "
                                                  "that --calib-select chooses from (default 4 x --calib-samples; "
                                                  "evaluation windows never overlap them)")]
EvalOpt = Annotated[int, typer.Option("--eval-samples", min=1, help="evaluation windows (from the end of the text, "
                                      "never calibrated or trained on)")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="windows per forward pass")]
TargetsOpt = Annotated[str, typer.Option("--targets", metavar="LIST", help="comma list of layers: groups (attn, "
                                         "mlp) and/or layer names (q_proj, down_proj, ...)")]
DeviceOpt = Annotated[str, typer.Option("--device", metavar="cpu|cuda|cuda:N", help="where the model runs")]
OutOpt = Annotated[str, typer.Option("--out", metavar="DIR", help="output directory (written atomically)")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace an existing output directory")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads for torch")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="allow a model that ships its own Python code "
                                        "(auto_map in config.json) to run it; read that code first")]
Dtype = Literal["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="the precision the model computes in. auto: the "
                                         "checkpoint's, but float32 on a CPU for bfloat16/float16 weights (30-90x "
                                         "faster on CPUs without bfloat16 instructions); outputs keep the "
                                         "checkpoint's dtype unless one is named. Training (heal, adapt): float32 "
                                         "weights, bfloat16 as autocast, which auto uses on a GPU with bfloat16 or a "
                                         "CPU with AVX512-BF16 or AMX")]
OffloadOpt = Annotated[str | None, typer.Option("--offload-dir", help="where block-boundary activations spill above "
                                                "--activation-mb, and where compress keeps its scoring pass's "
                                                "per-block input covariances (default: beside the output)")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="neither read nor write cached calibration statistics "
                                          "(kept in $RANKWISE_CALIBRATION_CACHE, default "
                                          "~/.cache/rankwise/calibration, at most $RANKWISE_CACHE_MAX_GB GB, "
                                          "default 4; see rankwise cache)")]
NoVerifyOpt = Annotated[bool, typer.Option("--no-verify", help="skip checking the input's files against their "
                                           "checksums (SHA256SUMS, or a Hugging Face cache's blob names)")]
PromptOpt = Annotated[list[str] | None, typer.Option("--prompt", metavar="TEXT", help="text to complete (repeat "
                                                     "for several)")]
MaxNewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, help="tokens generated per prompt")]
BaseOpt = Annotated[str, typer.Option("--base", metavar="MODEL", help="the dense model it was compressed from: "
                                      "'smollm2', a directory, a .gguf file or a hub id")]
RankOpt = Annotated[int, typer.Option("--rank", min=1, help="adapter rank per layer")]
MergeOpt = Annotated[bool, typer.Option("--merge", help="fold the adapter into the weights and write a model, not an "
                                        "adapter (a compressed model stays compressed, each rank k -> k + r)")]
StepsOpt = Annotated[int, typer.Option("--steps", min=1, help="optimizer steps")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="peak learning rate, AdamW with warm-up then cosine "
                                             "(default: 2e-4, for adapters and heal)")]
GradAccumOpt = Annotated[int, typer.Option("--grad-accum", min=1, help="micro-batches per optimizer step")]
EvalEveryOpt = Annotated[int, typer.Option("--eval-every", min=0, help="also evaluate every K steps (0: at the "
                                           "start and the end only)")]
SeedOpt = Annotated[int, typer.Option("--seed", help="seed of the training-window order and of any random "
                                      "initialisation")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue from OUT.checkpoint (same model, text and "
                                         "settings)")]
RayOpt = Annotated[str | None, typer.Option(
    "--ray", metavar="ADDRESS", help="run on Ray workers: 'local' starts a local Ray, 'auto' or HOST:PORT joins a "
    "running cluster; compress fans each block's factorisations out, compare runs each row as a task (needs pip "
    "install 'rankwise\\[ray]')")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]
JsonReportOpt = Annotated[str | None, typer.Option("--json-report", metavar="FILE",
                                                  help="also write the report as JSON to FILE")]
ActivationOpt = Annotated[float, typer.Option("--activation-mb", min=0,
                                              help="activations kept in memory before spilling (and, apart, a "
                                                   "sequential fit's paused forwards)")]


def choices(names: Iterable[str]) -> Any:
    """A ``Literal`` of ``names``, so typer checks the value and ``--help`` lists it (registries known at import)."""
    return Literal[tuple(names)]


class Command(TyperCommand):
    """A command whose flags show no ``<bool>`` type in ``--help`` (a flag takes no value)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


def train_config(*, steps: int, lr: float | None, default_lr: float, batch_size: int, grad_accum: int,
                 eval_every: int, seed: int, dtype: str, device: str) -> Any:
    """The :class:`~rankwise.adapt.train.TrainConfig` of heal and adapt: ``lr`` or the command's ``default_lr``; a
    resumable state every quarter of the run; bfloat16 autocast as :func:`training_autocast` decides."""
    from rankwise.adapt.train import TrainConfig

    return TrainConfig(steps=steps, lr=default_lr if lr is None else lr, batch_size=batch_size, grad_accum=grad_accum,
                       eval_every=eval_every, seed=seed, bf16=training_autocast(dtype, device),
                       save_every=max(1, steps // 4))


def training_autocast(dtype: str, device: str) -> bool:
    """Whether training (heal, adapt) autocasts to bfloat16 for ``--dtype``: ``auto`` does where bfloat16 matrix
    products are fast (:func:`rankwise.stream.source.fast_bf16`: a CUDA device with bfloat16, a CPU with AVX512-BF16
    or AMX; on other CPUs they run 30-90x slower), float32 never; float16 is refused (it needs loss scaling)."""
    from rankwise.stream import dtype_name
    from rankwise.stream.source import fast_bf16

    name = dtype_name(dtype)
    if name == "float16":
        raise ValueError("--dtype float16 is not supported for training (float16 needs loss scaling); use bfloat16 "
                         "(autocast) or float32")
    if name == "auto":
        return fast_bf16(device)
    return name == "bfloat16"


def stats_cache(no_cache: bool) -> Path | None:
    """Where calibration statistics are cached (``None`` with ``--no-cache``): :func:`rankwise.api.default_cache`,
    the same place as the Python API's."""
    from rankwise.api import default_cache

    return None if no_cache else default_cache()


def one_line_errors(fn: F) -> F:
    """Turn expected errors into ``error: ...`` on stderr and exit code 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, NotImplementedError, OSError) as err:
            if isinstance(err, OSError) and err.strerror:  # permission denied, a directory, disk full ...
                message = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
            else:
                message = first_line(err, limit=1000)
            print(f"error: {message}", file=sys.stderr, flush=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM turned into one by the CLI's handler
            print("interrupted; nothing half-written was left", file=sys.stderr, flush=True)
            signum = err.args[0] if err.args and isinstance(err.args[0], int) else signal.SIGINT
            raise typer.Exit(128 + signum) from None

    return wrapper  # type: ignore[return-value]


def comma_list(value: str, name: str, cast: Callable[[str], Any] = str) -> list[Any]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ValueError(f"{name} must be a comma-separated list, got {value!r}")
    try:
        return [cast(v) for v in items]
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list of numbers, got {value!r}") from None


SpeedOpt = Annotated[bool, typer.Option("--speed", help="also time decode (KV cache, greedy) and prefill: tokens/s "
                                        "and peak memory (off by default: timing costs several evaluations)")]
FuseOpt = Annotated[bool, typer.Option("--fuse", help="run low-rank layers that read one input (q/k/v, gate/up) "
                                       "down-projecting in one matmul")]
CompileOpt = Annotated[str | None, typer.Option("--compile", metavar="MODE", help="time decoding under "
                                                "torch.compile: default, reduce-overhead (CUDA graphs on a GPU) or "
                                                "max-autotune")]
NewTokensOpt = Annotated[int, typer.Option("--new-tokens", min=1, help="tokens generated per timed decode")]
DecodeBatchOpt = Annotated[str, typer.Option("--decode-batches", help="comma list of decode batch sizes")]
PrefillOpt = Annotated[str, typer.Option("--prefill", help="comma list of prefill shapes BATCHxTOKENS")]


@dataclass(frozen=True)
class SpeedSettings:
    """What ``--speed`` times, checked before any model is read."""

    decode_batches: tuple[int, ...]
    prefill_shapes: tuple[tuple[int, int], ...]
    new_tokens: int
    compile: str | None

    def kwargs(self) -> dict[str, Any]:
        return {"decode_batches": self.decode_batches, "prefill_shapes": self.prefill_shapes,
                "new_tokens": self.new_tokens, "compile": self.compile}


def speed_settings(speed: bool, decode_batches: str, prefill: str, new_tokens: int, compile: str | None,
                   device: str, fuse: bool = False) -> SpeedSettings | None:
    """The ``--speed`` settings, or ``None`` without ``--speed`` (then ``--compile`` is refused: it only times)."""
    from rankwise.eval.speed import check_compile

    if fuse and compile is not None:
        raise ValueError("--fuse and --compile do not combine: compiled, the low-rank layers run unfused (inductor "
                         "schedules the matmuls itself); time one or the other")
    if not speed:
        if compile is not None:
            raise ValueError("--compile applies to the timings: add --speed")
        return None
    batches = comma_list(decode_batches, "--decode-batches", int)
    shapes = []
    for item in comma_list(prefill, "--prefill"):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--prefill takes BATCHxTOKENS items such as 1x512, got {item!r}")
        shapes.append((int(parts[0]), int(parts[1])))
    if any(b < 1 for b in batches):
        raise ValueError(f"--decode-batches must be integers >= 1, got {decode_batches!r}")
    check_compile(compile, torch.device(device))
    return SpeedSettings(tuple(batches), tuple(shapes), new_tokens, compile)


@dataclass
class Workload:
    model: Any
    tokenizer: Any
    source: str
    calibration: torch.Tensor
    evaluation: torch.Tensor
    text_name: str


def prepare(model: str, text: str | None, dataset: str | None, seq_len: int, calib: int, evaluation: int,
            device: str, threads: int | None, trust_remote_code: bool = False, raw: str | None = None,
            verify: bool = True, dtype: str | None = DTYPE) -> Workload:
    """Cut the text (``raw`` if already read) into disjoint calibration and evaluation windows, then load the
    model in ``dtype`` (:func:`rankwise.stream.compute_dtype`): the text and the tokenizer are checked first, so
    their errors never wait for a model load."""
    from rankwise.io.models import load_model, load_tokenizer, resolve
    from rankwise.stream import compute_dtype

    setup(device, threads)
    raw = load_text(text, dataset=dataset) if raw is None else raw
    path, _ = resolve(model)
    calibration, evaluation_ids, text_name = windows(load_tokenizer(path, trust_remote_code), raw, text, dataset,
                                                     seq_len, calib, evaluation)
    loaded = load_model(model, device=device, trust_remote_code=trust_remote_code, verify=verify)
    loaded.model.to(compute_dtype(dtype, next(loaded.model.parameters()).dtype, device))
    return Workload(loaded.model, loaded.tokenizer, loaded.source, calibration, evaluation_ids, text_name)


def setup(device: str, threads: int | None) -> None:
    """Quiet third-party progress bars, set the thread count, check the device."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # rankwise draws its own bars; keep stdout to results
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        where = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if where.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} requested but CUDA is not available; use --device cpu")
        if where.index is not None and where.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices")
    elif where.type != "cpu":
        raise ValueError(f"--device {device!r} is not supported; use cpu, cuda or cuda:N")


def windows(tokenizer: Any, raw: str, text: str | None, dataset: str | None, seq_len: int, calib: int,
            evaluation: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Disjoint calibration and evaluation windows of the text ``raw``, and the text's display name."""
    ids = tokenizer(raw, return_tensors="pt", add_special_tokens=False).input_ids[0]
    calibration, evaluation_ids = split_windows(ids, seq_len, calib, evaluation)
    return calibration, evaluation_ids, text or (f"dataset {dataset}" if dataset else DEFAULT_TEXT_NAME)


def say(message: str) -> None:
    print(message, file=sys.stdout, flush=True)
