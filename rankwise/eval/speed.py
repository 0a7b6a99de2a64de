"""Generation speed the way a user serving a model sees it: decode tokens/s with the KV cache, prefill tokens/s.

Decode is timed through ``model.generate`` (greedy, a fixed number of new tokens, no early stop): the time of
``new_tokens + 1`` new tokens minus the time of one new token, each the fastest of ``repeats`` runs, so prompt
processing and the first token are not counted. Prefill is one forward pass over ``seq_len`` tokens with no cache,
computing the last position's logits only (what ``generate`` does), the fastest of ``repeats``. Token ids are drawn
from a seeded generator: every model of a comparison sees the same prompts.

With ``compile`` the decoding forward runs under ``torch.compile`` with a static KV cache (fixed shapes, so one
compilation serves every step; ``mode="reduce-overhead"`` adds CUDA graphs on a GPU); prefill stays eager.
"""

from __future__ import annotations

import contextlib
import inspect
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from rankwise.arch import context_length

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


@dataclass
class SpeedResult:
    """Decode and prefill throughput of one model. Keys are the batch sizes (decode) and prompt lengths (prefill)."""

    decode_tokens_per_s: dict[int, float]  # batch size -> tokens/s
    prefill_tokens_per_s: dict[str, float]  # "BxL" (batch x prompt length) -> tokens/s
    new_tokens: int
    prompt_tokens: int
    repeats: int
    threads: int
    device: str
    compile: str | None
    weights_mb: float  # parameters and buffers as held in memory, MB (1e6 bytes)
    memory_mb: float  # see memory_is: peak allocated while timed (CUDA), or resident after timing (CPU), MB
    memory_is: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        decode = ", ".join(f"batch {b}: {v:,.1f}" for b, v in self.decode_tokens_per_s.items())
        prefill = ", ".join(f"{n}: {v:,.0f}" for n, v in self.prefill_tokens_per_s.items())
        how = f"{self.device}, {self.threads} threads" + (f", compiled ({self.compile})" if self.compile else "")
        return (f"decode tokens/s ({self.new_tokens} new, KV cache, greedy) {decode}; prefill tokens/s {prefill}; "
                f"{how}; weights in memory {self.weights_mb:,.1f} MB, memory {self.memory_mb:,.0f} MB "
                f"({self.memory_is})"
                + "".join(f"; {n}" for n in self.notes))


def check_compile(mode: str | None, device: torch.device) -> None:
    """Refuse a compile ``mode`` that is not one of :data:`COMPILE_MODES` or that this machine cannot run (one line)."""
    if mode is None:
        return
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise ValueError("--compile on CPU needs a C++ compiler (g++ or clang++) for torch.compile's inductor "
                         "backend; none is on PATH")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(run: Callable[[], Any], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _ids(model: nn.Module, shape: tuple[int, int], seed: int, device: torch.device) -> torch.Tensor:
    vocab = int(getattr(model.config, "vocab_size", 1000))
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 32000), shape, generator=gen).to(device)


@torch.no_grad()
def decode_tokens_per_s(model: nn.Module, batch_size: int = 1, *, new_tokens: int = 64, prompt_tokens: int = 32,
                        repeats: int = 3, static_cache: bool = False, seed: int = 0) -> float:
    """Tokens per second generated after the first, greedy with the KV cache, ``batch_size`` sequences at once."""
    if new_tokens < 1 or prompt_tokens < 1 or repeats < 1 or batch_size < 1:
        raise ValueError("new_tokens, prompt_tokens, repeats and batch_size must be >= 1, got "
                         f"{new_tokens}, {prompt_tokens}, {repeats}, {batch_size}")
    device = next(model.parameters()).device
    ids = _ids(model, (batch_size, prompt_tokens), seed, device)
    pad = model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id
    pad = pad[0] if isinstance(pad, list) else pad

    cache = None
    if static_cache:  # one cache, reset before each run: fixed shapes and addresses for the compiled graph
        from transformers import StaticCache

        cache = StaticCache(config=model.config, max_cache_len=prompt_tokens + new_tokens + 1)

    def generate(n: int) -> None:
        extra = {}
        if cache is not None:
            cache.reset()
            extra["cache"] = cache
        # disable_compile: transformers compiles decoding by itself on a GPU with a static cache; what runs here is
        # the model as given (compiled by measure_speed when asked), never a graph cached on another model
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                       min_new_tokens=n, pad_token_id=pad if pad is not None else 0, disable_compile=True, **extra)

    generate(new_tokens + 1)  # warm-up (and, compiled, the compilation)
    long = _best(lambda: generate(new_tokens + 1), repeats, device)
    short = _best(lambda: generate(1), repeats, device)
    if long <= short:
        raise ValueError(f"decode timing is noise: {new_tokens + 1} new tokens took no longer than 1 "
                         f"({long:.4f} s vs {short:.4f} s); time more tokens")
    return batch_size * new_tokens / (long - short)


@torch.no_grad()
def prefill_tokens_per_s(model: nn.Module, seq_len: int, batch_size: int = 1, *, repeats: int = 3,
                         seed: int = 0) -> float:
    """Tokens per second of one forward pass over ``batch_size x seq_len`` prompt tokens (no cache; the last
    position's logits only when the model supports ``logits_to_keep``)."""
    device = next(model.parameters()).device
    ids = _ids(model, (batch_size, seq_len), seed, device)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def run() -> None:
        model(input_ids=ids, use_cache=False, **extra)

    run()
    return ids.numel() / _best(run, repeats, device)


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's positions allow, when its config says."""
    return context_length(getattr(model, "config", None))


def measure_speed(model: nn.Module, *, decode_batches: Sequence[int] = (1, 8),
                  prefill_shapes: Sequence[tuple[int, int]] = ((1, 512), (1, 2048)), new_tokens: int = 64,
                  prompt_tokens: int = 32, repeats: int = 3, compile: str | None = None, seed: int = 0
                  ) -> SpeedResult:
    """Decode tokens/s at each batch size and prefill tokens/s at each ``(batch, length)`` of ``model``.

    ``model`` is a causal LM with ``generate`` (dense or compressed). With ``compile`` (one of
    :data:`COMPILE_MODES`) decoding runs compiled (see the module docstring); the model's ``forward`` is restored
    afterwards. A prefill length beyond the model's positions is skipped with a note.

    Raises:
        ValueError: a model without ``generate``, a bad compile mode or a machine that cannot compile, an empty
            list of batches, or a length below 1.
    """
    import psutil

    if not callable(getattr(model, "generate", None)):
        raise ValueError("speed is measured on causal language models (with generate); this model has none")
    if not decode_batches or any(b < 1 for b in decode_batches) or any(min(s) < 1 for s in prefill_shapes):
        raise ValueError("decode batch sizes must be a non-empty list of integers >= 1 and prefill shapes "
                         f"(batch, length) >= 1, got {list(decode_batches)} and {list(prefill_shapes)}")
    device = next(model.parameters()).device
    check_compile(compile, device)
    notes = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    longest = max_positions(model)
    shapes = [(b, n) for b, n in prefill_shapes if longest is None or n <= longest]
    if len(shapes) < len(prefill_shapes):
        notes.append(f"prefill lengths above the model's {longest} positions skipped")
    prefill = {f"{b}x{n}": prefill_tokens_per_s(model, n, b, repeats=repeats, seed=seed) for b, n in shapes}
    own_forward = model.__dict__.get("forward")  # normally none: forward is the class's method
    dynamo_settings = contextlib.nullcontext()
    if compile is not None:
        # a fresh compilation per model, and an error rather than a silent eager fallback at dynamo's limit
        torch._dynamo.reset()
        dynamo_settings = torch._dynamo.config.patch(recompile_limit=32, fail_on_recompile_limit_hit=True)
        model.forward = torch.compile(model.forward, mode=compile)
        if device.type == "cpu" and compile == "reduce-overhead":
            notes.append("reduce-overhead adds CUDA graphs on a GPU only; on CPU it compiles like default")
    try:
        with dynamo_settings:
            decode = {b: decode_tokens_per_s(model, b, new_tokens=new_tokens, prompt_tokens=prompt_tokens,
                                             repeats=repeats, static_cache=compile is not None, seed=seed)
                      for b in decode_batches}
    except torch._dynamo.exc.BackendCompilerFailed as err:  # e.g. a compiler that cannot build inductor's kernels
        raise ValueError(f"torch.compile failed on this machine ({type(err.inner_exception).__name__}); run "
                         "without --compile") from None
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        raise ValueError("torch.compile recompiled this model more than 32 times; its decode cannot be timed "
                         "compiled (run without --compile)") from None
    finally:
        if compile is not None and own_forward is None:
            del model.forward
        elif compile is not None:
            model.forward = own_forward
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 1e6
    if device.type == "cuda":
        memory, what = torch.cuda.max_memory_allocated(device) / 1e6, "peak allocated on the GPU while timed"
    else:
        memory, what = psutil.Process().memory_info().rss / 1e6, "resident after timing (the process's)"
    return SpeedResult(decode, prefill, new_tokens, prompt_tokens, repeats, torch.get_num_threads(), str(device),
                       compile, weights, memory, what, notes)
