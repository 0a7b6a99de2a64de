"""A small, deterministic fine-tuning loop shared by ``rankwise adapt`` and ``rankwise heal``.

Why not ``transformers.Trainer``: the data here are fixed windows of token ids, one healing loss needs the dense
teacher's logits at every step, and the guarantees asked of this loop (the same seed gives the same loss curve
byte for byte, a NaN loss stops training and keeps the last good checkpoint, a checkpoint from another model is
refused when resuming) would each need a callback or a subclass around Trainer's own data loader and seeding. The
loop is AdamW, linear warm-up then cosine decay (transformers' schedule), gradient clipping and accumulation, a
progress bar with loss and tokens/s, and evaluation every ``eval_every`` steps.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise._errors import first_line
from rankwise.calibrate.cache import tensor_digest

CHECKPOINT = "trainer_state.pt"
FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where training steps AdamW with its fused kernel
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """How to train; every field is checked in ``__post_init__``."""

    steps: int = 100  # optimizer steps
    lr: float = 2e-4  # peak learning rate of AdamW
    batch_size: int = 4  # windows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup: float = 0.05  # fraction of the steps spent warming the learning rate up linearly from 0
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    max_grad_norm: float = 1.0  # gradients are clipped to this global norm (0 disables clipping)
    eval_every: int = 0  # evaluate every this many steps (0: only before and after training)
    save_every: int = 0  # write a resumable checkpoint every this many steps (0: only at the end)
    seed: int = 0  # order of the training windows
    bf16: bool = False  # mixed precision: matmuls in bfloat16 under autocast, weights and optimizer in float32

    def __post_init__(self) -> None:
        for name, minimum in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("eval_every", 0),
                              ("save_every", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ValueError(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm!r}")

    @property
    def windows_per_step(self) -> int:
        return self.batch_size * self.grad_accum


class TrainingDivergedError(ValueError):
    """The loss became NaN or infinite; training stopped before applying that step."""


@dataclass
class TrainResult:
    """What happened: the loss per optimizer step, evaluations, timing."""

    losses: list[float] = field(default_factory=list)  # mean training loss of each optimizer step
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, mean evaluation loss)
    seconds: float = 0.0  # wall time of this run's training steps (without evaluation)
    tokens: int = 0  # tokens trained on in this run
    trainable: int = 0  # trainable parameters
    resumed_from: int = 0  # the step the run resumed at (0: from scratch)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(1, len(self.losses) - self.resumed_from)

    def to_dict(self) -> dict:
        return asdict(self)


def causal_lm_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens where ``mask`` (same shape as ``ids``) is true (all if None)."""
    logits = model(input_ids=ids).logits[:, :-1].float()  # (b, L-1, vocab)
    targets = ids[:, 1:]
    if mask is not None:
        targets = targets.masked_fill(~mask[:, 1:].bool(), -100)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


@torch.no_grad()
def evaluate_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None, *, batch_size: int = 8,
                  loss_fn: LossFn = causal_lm_loss) -> float:
    """Mean ``loss_fn`` over ``ids`` in batches, weighted by the number of scored tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start:start + batch_size].to(device)
        bmask = None if mask is None else mask[start:start + batch_size].to(device)
        scored = batch[:, 1:].numel() if bmask is None else int(bmask[:, 1:].bool().sum())
        total += float(loss_fn(model, batch, bmask)) * scored
        count += scored
    model.train(was_training)
    return total / max(1, count)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def fingerprint(model: nn.Module) -> str:
    """Names, shapes and dtypes of the trainable parameters: what a checkpoint must match to be resumed."""
    spec = [(name, list(p.shape), str(p.dtype)) for name, p in trainable_parameters(model).items()]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def digest(*tensors: torch.Tensor) -> str:
    """A short hash of tensors' bytes (e.g. the training windows, which a resumed run must share)."""
    return tensor_digest((str(k), t) for k, t in enumerate(tensors))[:16]


def model_digest(model: nn.Module) -> str:
    """A SHA-256 over every tensor of ``model``'s state (names, dtypes, shapes and bytes): the content identity a
    resumed run checks, whatever path the model was loaded from."""
    return tensor_digest(sorted(model.state_dict().items()))


# How a resume refusal names each identity field (fields not listed are named as they are).
_IDENTITY_WORDS = {"weights": "the model's weights", "teacher": "the --base model's weights",
                   "data": "the training windows", "config": "the training settings",
                   "balance": "--balance (a state saved before heal balanced the factors resumes with --no-balance)"}


def _read_state(path: Path, *, mmap: bool = False) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # whatever made it unreadable, the answer is the same
        raise ValueError(f"--resume: {path} is not a readable rankwise training checkpoint ({type(err).__name__})"
                         ) from None
    if not isinstance(state, dict) or state.get("format") != 1:
        raise ValueError(f"--resume: {path} is not a rankwise training checkpoint")
    return state


BF16_HINT = (" (bf16 is bfloat16 autocast, which --dtype auto turns on where bfloat16 products are fast: pass "
             "--dtype bf16 or --dtype fp32 as the first run had it)")


def _compare(path: Path, state: dict, config: TrainConfig, identity: dict) -> None:
    if state.get("config") != _identity(config):
        saved = state.get("config") if isinstance(state.get("config"), dict) else {}
        changed = sorted(k for k, v in _identity(config).items() if saved.get(k) != v)
        said = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {_identity(config)[k]!r}" for k in changed)
        hint = BF16_HINT if "bf16" in changed else ""
        raise ValueError(f"--resume: the checkpoint was trained with different settings ({said}); resume with the "
                         f"same ones{hint}")
    saved = state.get("identity", {})
    current = json.loads(json.dumps(identity))
    if not isinstance(saved, dict):
        raise ValueError(f"--resume: {path} is not a rankwise training checkpoint (its identity is damaged)")
    if "weights" not in saved and ("model" in saved or "compressed" in saved):
        raise ValueError(f"--resume: {path} was written by an older rankwise, which recorded the model by its path "
                         "rather than its content; start a new run")
    if saved != current:
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        raise ValueError(f"--resume: {path} comes from another run (what differs: "
                         f"{', '.join(_IDENTITY_WORDS.get(k, k) for k in changed)}); resume with the same model, "
                         "method, data and options, or start a new run")


def check_resume(checkpoint_dir: str | Path, config: TrainConfig, identity: dict) -> None:
    """Refuse, before any work that depends on it (an adapter's data-driven initialisation, an evaluation), a
    resume whose saved settings or identity (the model's content hash, the data's ...) differ from this run's."""
    path = Path(checkpoint_dir) / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"--resume: no checkpoint at {path}")
    _compare(path, _read_state(path, mmap=True), config, identity)


def saved_steps(checkpoint_dir: str | Path) -> int:
    """The step count of the run whose resumable state is in ``checkpoint_dir`` (what a resumed run trains to: a
    time-budgeted run saved the count its budget gave).

    Raises:
        ValueError: there is no readable training state there.
    """
    path = Path(checkpoint_dir) / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"--resume: no training state at {path}; run without --resume first")
    steps = _read_state(path, mmap=True).get("config", {}).get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--resume: {path} is not a rankwise training checkpoint (no step count)")
    return steps


def _order(n: int, steps: int, per_step: int, seed: int) -> torch.Tensor:
    """Window indices for all steps: seeded permutations of ``range(n)``, one after another (epochs)."""
    gen = torch.Generator().manual_seed(seed)
    need = steps * per_step
    epochs = -(-need // n)
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(epochs)])[:need]


TRIAL_STEPS = 3
"""Trial steps :func:`budget_steps` runs; the last is timed."""


def budget_steps(model: nn.Module, ids: torch.Tensor, config: TrainConfig, minutes: float, *,
                 mask: torch.Tensor | None = None, loss_fn: LossFn = causal_lm_loss) -> tuple[TrainConfig, float]:
    """``config`` with as many steps as fit in ``minutes`` of training (at most ``config.steps``), and the seconds
    one step took.

    :data:`TRIAL_STEPS` trial steps run first, each the forward and backward of one step's windows (the first ones of
    ``ids``, taken again from the start if there are fewer) from cleared gradients, as a training step runs them,
    with nothing applied; the last is timed (the first ones pay for allocation: on a CPU the second step of a
    process still ran about 10 % slower than the steps after it, so timing it gave about 10 % fewer steps than the
    budget holds). The budget is for the training steps: the trial steps, evaluations and checkpoints come on top. The
    count is fixed before training starts, so the run is the one ``steps=N`` gives: same seed, same bytes, whatever
    the machine's speed (a machine that slows down later overruns the budget).

    Raises:
        ValueError: ``minutes`` is not a positive finite number, or the model has no trainable parameter.
    """
    if not (isinstance(minutes, int | float) and math.isfinite(minutes) and minutes > 0):
        raise ValueError(f"the time budget must be a positive number of minutes, got {minutes!r}")
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameter: nothing to train")
    device = next(model.parameters()).device
    picked = torch.arange(config.windows_per_step) % ids.shape[0]  # a whole step's windows, as training cycles
    was_training = model.training
    model.train()
    seconds = 0.0

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the GPU's queued work belongs to the step that queued it
        return time.perf_counter()

    try:
        for _ in range(TRIAL_STEPS):
            for p in params.values():
                p.grad = None
            began = now()
            for micro in picked.split(config.batch_size):
                batch = ids[micro].to(device)
                bmask = None if mask is None else mask[micro].to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    loss = loss_fn(model, batch, bmask)
                (loss / config.grad_accum).backward()
            seconds = now() - began
    finally:
        for p in params.values():
            p.grad = None
        model.train(was_training)
    steps = max(1, min(config.steps, int(minutes * 60 / max(seconds, 1e-9))))
    return replace(config, steps=steps), seconds


def train(model: nn.Module, ids: torch.Tensor, config: TrainConfig, *, mask: torch.Tensor | None = None,
          eval_ids: torch.Tensor | None = None, eval_mask: torch.Tensor | None = None,
          loss_fn: LossFn = causal_lm_loss, eval_loss_fn: LossFn = causal_lm_loss,
          checkpoint_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
          on_eval: Callable[[int, float], None] | None = None, eval_first: bool = True,
          identity: dict | None = None) -> TrainResult:
    """Train the parameters of ``model`` that require grad on the windows ``ids`` ``(n, seq_len)``.

    Args:
        model: the model; only parameters with ``requires_grad`` are trained.
        ids: training windows of token ids; ``mask`` (same shape) marks the tokens that are scored, if not all.
        config: steps, learning rate, batch, schedule, clipping, evaluation and checkpoint cadence, seed.
        eval_ids, eval_mask: held-out windows evaluated before training (if ``eval_first``), every ``eval_every``
            steps and at the end.
        loss_fn: ``(model, ids, mask) -> scalar`` to minimise (default: next-token cross-entropy).
        eval_loss_fn: the loss reported on ``eval_ids`` (default: next-token cross-entropy).
        checkpoint_dir: where the resumable state is written (atomically) every ``save_every`` steps and at the end.
        resume: continue from ``checkpoint_dir``'s state; it must come from a model with the same trainable
            parameters (names, shapes, dtypes), the same config and the same ``identity``.
        identity: JSON-able facts a resumed run must share with the first one beyond the config (the method, the
            base model, a hash of the data ...); stored in the checkpoint and compared on resume.

    Raises:
        ValueError: no trainable parameter, too few windows for one micro-batch, or a checkpoint that does not
            match this model or config.
        TrainingDivergedError: the loss became NaN/inf; the last good checkpoint (if any) is kept.
    """
    from transformers import get_cosine_schedule_with_warmup

    from rankwise.progress import step_bar

    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameter: nothing to train")
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise ValueError(f"training windows must be token ids of shape (n, seq_len >= 2), got {tuple(ids.shape)}")
    if ids.shape[0] < config.batch_size:
        raise ValueError(f"the training data has {ids.shape[0]} windows of {ids.shape[1]} tokens, fewer than one batch "
                         f"of {config.batch_size}; give more text or a smaller --batch-size")
    device = next(model.parameters()).device
    if config.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"bf16 autocast was asked for but {torch.cuda.get_device_name(device)} has no bfloat16; "
                         "use --dtype float32")
    # torch's fused AdamW: one kernel over every tensor; on 2 CPU cores its step over heal's 57M weights at 0.4 took
    # 0.044 s against 0.109 s for the per-tensor loop torch defaults to on a CPU (benchmarks/heal_adamw.py)
    fused = all(p.device.type in FUSED_ADAMW_DEVICES for p in params.values()) or None
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    schedule = get_cosine_schedule_with_warmup(optimizer, round(config.warmup * config.steps), config.steps)
    result = TrainResult(trainable=sum(p.numel() for p in params.values()))
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    step = 0
    if resume:
        if ckpt is None or not ckpt.is_file():
            raise ValueError(f"--resume: no checkpoint at {ckpt}")
        step = _restore(ckpt, model, optimizer, schedule, config, result, identity or {})
    order = _order(ids.shape[0], config.steps, config.windows_per_step, config.seed)
    model.train()
    if eval_ids is not None and step == 0 and eval_first:
        _evaluate(model, eval_ids, eval_mask, eval_loss_fn, config, 0, result, on_eval)
    last_good = step

    def where_good() -> str:
        if ckpt is not None and ckpt.is_file() and last_good > 0:
            return f"; the last good checkpoint (step {last_good}) is in {ckpt.parent}"
        return ""

    with step_bar("train", config.steps, start=step, enabled=progress) as bar:
        while step < config.steps:
            began = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            picked = order[step * config.windows_per_step:(step + 1) * config.windows_per_step]
            total, tokens = 0.0, 0
            for micro in picked.split(config.batch_size):
                batch = ids[micro].to(device)
                bmask = None if mask is None else mask[micro].to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    loss = loss_fn(model, batch, bmask)
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(f"the training loss became {float(loss.detach())} at step "
                                                f"{step + 1}; training stopped without applying it (rerun with a "
                                                f"lower --lr){where_good()}")
                (loss / config.grad_accum).backward()
                total += float(loss.detach()) / config.grad_accum
                tokens += batch.numel()
            # measured even without clipping (max_norm inf), so a non-finite gradient is never applied
            norm = torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm or math.inf)
            if not torch.isfinite(norm):
                raise TrainingDivergedError(f"the gradient norm became {float(norm)} at step {step + 1}; training "
                                            f"stopped without applying it (rerun with a lower --lr){where_good()}")
            optimizer.step()
            schedule.step()
            step += 1
            elapsed = time.perf_counter() - began
            result.losses.append(total)
            result.seconds += elapsed
            result.tokens += tokens
            bar.update(step, loss=total, tokens_per_s=tokens / elapsed)
            if eval_ids is not None and config.eval_every and step % config.eval_every == 0 and step < config.steps:
                _evaluate(model, eval_ids, eval_mask, eval_loss_fn, config, step, result, on_eval)
            if ckpt is not None and (step == config.steps or (config.save_every and step % config.save_every == 0)):
                _save(ckpt, model, optimizer, schedule, config, step, result, identity or {})
                last_good = step
    if eval_ids is not None:
        _evaluate(model, eval_ids, eval_mask, eval_loss_fn, config, step, result, on_eval)
    model.eval()
    return result


def _evaluate(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, loss_fn: LossFn, config: TrainConfig,
              step: int, result: TrainResult, on_eval: Callable[[int, float], None] | None) -> None:
    if result.evals and result.evals[-1][0] == step:
        return
    value = evaluate_loss(model, ids, mask, batch_size=max(config.batch_size, 8), loss_fn=loss_fn)
    result.evals.append((step, value))
    if on_eval is not None:
        on_eval(step, value)


def _identity(config: TrainConfig) -> dict:
    """The config fields that must match to resume (eval and save cadence may change)."""
    return {k: v for k, v in asdict(config).items() if k not in ("eval_every", "save_every")}


def _save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: object, config: TrainConfig,
          step: int, result: TrainResult, identity: dict) -> None:
    from rankwise.io.atomic import scratch_name

    state = {
        "format": 1, "step": step, "fingerprint": fingerprint(model), "config": _identity(config),
        "identity": json.loads(json.dumps(identity)),
        "params": {name: p.detach().cpu() for name, p in trainable_parameters(model).items()},
        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),  # type: ignore[attr-defined]
        "losses": list(result.losses), "evals": [list(e) for e in result.evals],
    }
    tmp = path.parent / scratch_name(f".{path.name}", ".tmp-")
    try:
        torch.save(state, tmp)  # straight to disk: the optimizer state is not held twice in memory
        tmp.replace(path)
    except RuntimeError as err:  # torch's writer reports a full disk as "PytorchStreamWriter failed writing ..."
        tmp.unlink(missing_ok=True)
        raise OSError(errno.EIO, f"could not write the training state ({first_line(err)})", str(path)) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: object, config: TrainConfig,
             result: TrainResult, identity: dict) -> int:
    state = _read_state(path)
    if state["fingerprint"] != fingerprint(model):
        raise ValueError(f"--resume: {path} was written for another model or adapter (its trainable parameters "
                         "differ in names, shapes or dtypes); start a new run or pick the matching checkpoint")
    _compare(path, state, config, identity)
    params = trainable_parameters(model)
    with torch.no_grad():
        for name, value in state["params"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])  # type: ignore[attr-defined]
    result.losses = list(state["losses"])
    result.evals = [(int(s), float(v)) for s, v in state["evals"]]
    result.resumed_from = int(state["step"])
    return int(state["step"])


def check_job(out: str, seq_len: int, eval_samples: int) -> None:
    """One-line ``ValueError`` for the settings a training job (``heal_model``, ``adapt_model``) checks before any
    file or model is touched: an output directory, windows of at least 2 tokens, at least one held-out window."""
    if not out:
        raise ValueError("out is required: the directory to write the result to")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (tokens per window), got {seq_len!r}")
    if isinstance(eval_samples, bool) or not isinstance(eval_samples, int) or eval_samples < 1:
        raise ValueError(f"eval_samples must be an integer >= 1 (held-out windows), got {eval_samples!r}")


def training_windows(tokenizer: Any, raw: str, seq_len: int, eval_samples: int, batch_size: int, what: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held_out)`` windows of ``raw`` for ``heal`` and ``adapt``: the last ``eval_samples`` windows are
    held out, every window before them trains; ``what`` names the text in the error when too few are left."""
    from rankwise.calibrate.text import split_windows

    ids = tokenizer(raw, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n_train = ids.numel() // seq_len - eval_samples
    if n_train < batch_size:
        raise ValueError(f"{what} has {ids.numel():,} tokens: after {eval_samples} held-out windows of {seq_len} "
                         f"it leaves {max(0, n_train)} training windows, fewer than one batch of {batch_size}")
    return split_windows(ids, seq_len, n_train, eval_samples)


def training_checkpoint(out: str | Path, resume: bool, overwrite: bool, *inputs: str | Path) -> Path:
    """``OUT.checkpoint``, where ``heal`` and ``adapt`` keep their resumable state, checked before any work.

    It may hold only that state: it must not be, be inside or contain an input; ``resume`` needs the state; a new
    run refuses a previous run's state unless ``overwrite`` (which removes it).
    """
    from rankwise.io.atomic import refuse_overlap

    path = Path(f"{str(out).rstrip('/')}.checkpoint")
    for where in inputs:
        if where and Path(where).exists():
            refuse_overlap(str(path), where, option="the training-state folder")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} (where the resumable training state goes) exists and is not a directory")
    state = path / CHECKPOINT
    if path.is_dir():
        foreign = [p.name for p in path.iterdir() if p.name != CHECKPOINT and not p.name.startswith(f".{CHECKPOINT}")]
        if foreign:
            raise ValueError(f"{path} holds files that are not a rankwise training state ({', '.join(foreign[:3])}); "
                             "choose another --out")
    if resume:
        if not state.is_file():
            raise ValueError(f"--resume: no training state at {state}; run without --resume first")
    elif state.is_file():
        if not overwrite:
            raise ValueError(f"{state} holds a previous run's resumable state: continue it with --resume, or start "
                             "over with --overwrite")
        state.unlink()
    return path


def remove_training_checkpoint(path: Path) -> None:
    """Remove the training state of a finished run, and its directory once empty."""
    (path / CHECKPOINT).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.rmdir()
