"""A heal step in float32 against bfloat16 autocast, on the same compressed model, teacher and token windows.

First the linear-layer products a heal step is made of (the default model's shapes, 1,024 tokens), each timed in
float32 and in bfloat16 (inputs and weights already in that dtype: autocast's casts are not in this table). Then
whole heal steps of ``--compressed`` against the dense ``--base``: the fused distillation loss
(``rankwise.adapt.heal.distillation_loss``), backward, gradient clipping and a fused AdamW step over the factors
``rankwise heal`` trains, timed in three parts; each mode runs ``--steps`` steps after two warm-up steps, in
``--rounds`` rounds alternating the modes, all in one process. The casts autocast makes are in the step times; one
student trains through both modes, so its weights move on between them (the steps are timed, not scored).
``rankwise heal`` autocasts to bfloat16 by default where :func:`rankwise.stream.source.fast_bf16` says bfloat16
products are fast.

    python benchmarks/heal_bf16.py --compressed best-0.4
"""

from __future__ import annotations

import argparse
import itertools
import resource
import statistics
import time

import torch

SHAPES = [(1024, 576, 1536), (1024, 1536, 576), (1024, 576, 576), (1024, 576, 49152)]  # tokens, in, out
PARTS = ("forwards and loss", "backward", "clip and AdamW", "step")


def product_seconds(tokens: int, fan_in: int, fan_out: int, dtype: torch.dtype, repeats: int = 10) -> float:
    """Mean seconds of ``linear`` from ``fan_in`` to ``fan_out`` features over ``tokens`` rows in ``dtype``."""
    x, w = torch.randn(tokens, fan_in, dtype=dtype), torch.randn(fan_out, fan_in, dtype=dtype)
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    began = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(x, w)
    return (time.perf_counter() - began) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compressed", required=True, help="a directory rankwise compress wrote")
    parser.add_argument("--base", default="smollm2", help="the dense model it came from (the teacher)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from rankwise._memory import reuse_freed_memory
    from rankwise.adapt.heal import balance_factors_, distillation_loss, mark_trainable
    from rankwise.io.models import load_model
    from rankwise.stream.source import fast_bf16

    reuse_freed_memory()  # as rankwise heal runs
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, fast_bf16(cpu) = {fast_bf16('cpu')}\n")
    print("| product (tokens x in -> out) | float32 ms | GFLOP/s | bfloat16 ms | GFLOP/s | bfloat16 / float32 |")
    print("|---|---|---|---|---|---|")
    for tokens, fan_in, fan_out in SHAPES:
        f32, b16 = (product_seconds(tokens, fan_in, fan_out, d) for d in (torch.float32, torch.bfloat16))
        flop = 2 * tokens * fan_in * fan_out / 1e9
        print(f"| {tokens} x {fan_in} -> {fan_out} | {f32 * 1e3:.2f} | {flop / f32:.0f} | {b16 * 1e3:.2f} | "
              f"{flop / b16:.0f} | {b16 / f32:.2f}x |")

    torch.manual_seed(0)
    student = load_model(args.compressed).model.float()
    teacher = load_model(args.base).model.float().eval().requires_grad_(False)
    mark_trainable(student, "factors")
    balance_factors_(student)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=True)
    loss_fn = distillation_loss(teacher, 1.0, 1.0)
    ids = torch.randint(0, student.config.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))
    times: dict[str, dict[str, list[float]]] = {mode: {part: [] for part in PARTS} for mode in ("float32", "bfloat16")}

    def step(mode: str, keep: bool) -> None:
        clock = [time.perf_counter()]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bfloat16"):
            loss = loss_fn(student, ids, None)  # the teacher's and the student's forwards, the fused loss
        clock.append(time.perf_counter())
        loss.backward()
        clock.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.append(time.perf_counter())
        if keep:
            spans = [b - a for a, b in itertools.pairwise(clock)]
            for part, value in zip(PARTS, [*spans, clock[-1] - clock[0]], strict=True):
                times[mode][part].append(value)

    for _ in range(args.rounds):
        for mode in times:
            for i in range(args.steps + 2):
                step(mode, keep=i >= 2)
    print(f"\nheal steps of {args.compressed} against {args.base}, 4 x 256 tokens, {args.rounds} rounds x "
          f"{args.steps} steps per mode after two warm-up steps each, medians (seconds)\n")
    print("| part | float32 | bfloat16 autocast | bfloat16 / float32 |")
    print("|---|---|---|---|")
    for part in PARTS:
        f32, b16 = (statistics.median(times[mode][part]) for mode in ("float32", "bfloat16"))
        print(f"| {part} | {f32:.3f} | {b16:.3f} | {b16 / max(f32, 1e-9):.2f}x |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this process: {peak:.0f} MB (both modes, models loaded once)")


if __name__ == "__main__":
    main()
