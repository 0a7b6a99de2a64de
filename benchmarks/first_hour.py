"""The first hour, measured (issue 23): ``rankwise eval`` of a compressed default model with default options, and why
``--dtype auto`` computes half-precision weights in float32 on a CPU.

Run alone on an idle machine::

    python benchmarks/first_hour.py --model DIR   # DIR: e.g. the output of `rankwise compress --out DIR`

Prints two tables: matmul and training-step speed of float32 against bfloat16/float16 (and bfloat16 autocast) on
this CPU, in the same process as ratios; and the wall time and peak RSS of ``rankwise eval DIR`` in child processes
with the default options (peak RSS from ``/usr/bin/time``), with ``--dtype bfloat16`` (the stored dtype) as the
anchor it replaces.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch


def matmul_gflops(dtype: torch.dtype, m: int = 2048, k: int = 576, n: int = 1536, repeats: int = 10) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9


def train_step_seconds(autocast: bool, repeats: int = 3) -> float:
    layer = torch.nn.Linear(576, 1536)
    x = torch.randn(1024, 576, requires_grad=True)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        y.float().sum().backward()

    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def timed_child(args: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in MB (the child's own, from ``/usr/bin/time -f %M``), and the last output line."""
    start = time.perf_counter()
    run = subprocess.run(["/usr/bin/time", "-f", "%M", *args], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    peak_kb = int(run.stderr.strip().splitlines()[-1])
    return wall, peak_kb / 1024, run.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a compressed default model (rankwise compress --out DIR)")
    parser.add_argument("--skip-bf16-eval", action="store_true", help="skip the slow eval in the stored bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    fp32 = matmul_gflops(torch.float32)
    print("| compute on this CPU | GFLOPS or s/step | ratio to float32 |\n|---|---|---|")
    print(f"| matmul float32 | {fp32:.1f} GFLOPS | 1.00x |")
    for dtype in (torch.bfloat16, torch.float16):
        g = matmul_gflops(dtype, repeats=2)
        print(f"| matmul {str(dtype).removeprefix('torch.')} | {g:.1f} GFLOPS | {g / fp32:.3f}x |")
    plain, auto = train_step_seconds(False), train_step_seconds(True)
    print(f"| training step float32 | {plain:.3f} s | 1.00x |")
    print(f"| training step bfloat16 autocast | {auto:.3f} s | {plain / auto:.3f}x speed |")

    cli = str(Path(sys.executable).parent / "rankwise")
    rows = [("default options", [cli, "eval", args.model])]
    if not args.skip_bf16_eval:
        rows.append(("--dtype bfloat16 (stored)", [cli, "eval", args.model, "--dtype", "bfloat16"]))
    print("\n| rankwise eval | wall s | peak RSS MB | result |\n|---|---|---|---|")
    for name, command in rows:
        wall, peak, line = timed_child(command)
        ppl = line.split("perplexity ")[1].split(";")[0] if "perplexity " in line else line
        print(f"| {name} | {wall:.1f} | {peak:,.0f} | perplexity {ppl} |", flush=True)


if __name__ == "__main__":
    main()
