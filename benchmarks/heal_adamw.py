"""Seconds per AdamW step over the weights ``rankwise heal`` trains: torch's per-tensor loop, ``foreach`` and ``fused``.

The shapes are those of every ``LowRankLinear`` factor in a compressed directory (read from its safetensors
header, no model built), each given a random gradient; each implementation steps them ``--steps`` times after two
warm-up steps, in ``--rounds`` rounds with the implementations in rotating order, in one process. The table gives
the median step of all rounds. ``rankwise.adapt.train`` uses the fused kernel on a CPU or CUDA.

    python benchmarks/heal_adamw.py --compressed best-0.4
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import struct
import time
from pathlib import Path

import torch

IMPLEMENTATIONS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def factor_shapes(directory: str) -> list[tuple[int, ...]]:
    """Shapes of the ``.up`` / ``.down`` factors in ``directory/model.safetensors`` (header only)."""
    with open(Path(directory) / "model.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return [tuple(v["shape"]) for k, v in header.items() if k.endswith((".up", ".down")) and 0 not in v["shape"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compressed", required=True, help="a directory rankwise compress wrote")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = factor_shapes(args.compressed)
    start = [(torch.randn(s) * 0.1, torch.randn(s) * 1e-3) for s in shapes]  # the same weights and gradients
    params = {name: [torch.nn.Parameter(w.clone()) for w, _ in start] for name in IMPLEMENTATIONS}
    for group in params.values():
        for p, (_, g) in zip(group, start, strict=True):
            p.grad = g.clone()
    optimizers = {name: torch.optim.AdamW(params[name], lr=2e-4, **kw) for name, kw in IMPLEMENTATIONS.items()}
    for opt in optimizers.values():  # state allocation and first-touch paging
        opt.step()
        opt.step()
    times: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    names = list(IMPLEMENTATIONS)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for _ in range(args.steps):
                began = time.perf_counter()
                optimizers[name].step()
                times[name].append(time.perf_counter() - began)
    diff = max((a - b).abs().max().item() for a, b in zip(params["loop"], params["fused"], strict=True))
    count = sum(p.numel() for p in params["loop"])
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; {len(shapes)} factors, {count:,} weights "
          f"from {args.compressed}; median of {args.rounds} x {args.steps} steps")
    base = statistics.median(times["loop"])
    print("| AdamW | median step (s) | / loop | min (s) | max (s) |")
    print("|---|---|---|---|---|")
    for name in IMPLEMENTATIONS:
        med = statistics.median(times[name])
        print(f"| {name} | {med:.3f} | {med / base:.2f}x | {min(times[name]):.3f} | {max(times[name]):.3f} |")
    print(f"largest weight difference, fused against loop, after {2 + args.rounds * args.steps} steps: {diff:.2e}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
