"""Seconds per optimizer step of rankwise's low-rank optimizers beside torch AdamW, galore-torch and apollo-torch.

The matrices of a Llama-style model's decoder layers (the ones GaLore projects), each given a fixed sequence of
gradients with a decaying spectrum, stepped by every optimizer at the same rank and update gap, in one process.
Timed: steps 1 .. 2 * gap (so each optimizer pays two projection refreshes, as it does in training; step 0's
set-up is left out), in ``--rounds`` rounds with the methods in rotating order; the table gives the median round.
No model runs forward or backward: this isolates the optimizer's own cost, which the training benchmark
(train_tiny_llama.py) measures inside whole steps.

    python benchmarks/optim_step.py                          # tiny shapes (hidden 384), rank 80, gap 50
    python benchmarks/optim_step.py --size llama60m --rank 128 --gap 200 --rounds 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from train_tiny_llama import optimizer, state_bytes  # the same optimizer settings and state counting

SHAPES = {"tiny": (384, 1024, 6), "llama60m": (512, 1376, 8)}
METHODS = ("adamw", "galore_torch", "rw_galore", "rw_galore_dct", "apollo_torch", "rw_apollo")
LABELS = {"adamw": "AdamW (torch)", "galore_torch": "GaLore (galore-torch 1.0)",
          "rw_galore": "rankwise GaLoreAdamW (svd)", "rw_galore_dct": "rankwise GaLoreAdamW (dct)",
          "apollo_torch": "APOLLO (apollo-torch)", "rw_apollo": "rankwise APOLLOAdamW (channel)"}
ANCHOR = {"rw_galore": "galore_torch", "rw_galore_dct": "galore_torch", "rw_apollo": "apollo_torch"}


def matrices(size: str) -> list[tuple[int, int]]:
    hidden, inter, layers = SHAPES[size]
    return [(hidden, hidden)] * 4 * layers + [(inter, hidden)] * 2 * layers + [(hidden, inter)] * layers


def gradients(shapes: list[tuple[int, int]], count: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """``count`` gradients per shape: a slowly drifting low-rank signal plus noise (a decaying spectrum)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for m, n in shapes:
        U, V = torch.randn(m, 32, generator=g), torch.randn(32, n, generator=g)
        s = torch.logspace(0, -2, 32)
        seq = []
        for _ in range(count):
            U = U + 0.05 * torch.randn(m, 32, generator=g)
            seq.append((U * s) @ V * 1e-3 + 1e-5 * torch.randn(m, n, generator=g))
        out.append(seq)
    return out


def time_method(method: str, shapes, grads, rank: int, gap: int) -> tuple[float, int]:
    """(mean seconds per step over steps 1 .. 2 * gap, state bytes)."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    opt = optimizer(method, params, [], 1e-3, rank, gap)
    spent = 0.0
    for step in range(2 * gap + 1):
        for p, seq in zip(params, grads, strict=True):
            p.grad = seq[step % len(seq)].clone()
        start = time.perf_counter()
        opt.step()
        if step:
            spent += time.perf_counter() - start
    return spent / (2 * gap), state_bytes(opt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--rank", type=int, default=80)
    parser.add_argument("--gap", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    args = parser.parse_args()
    shapes = matrices(args.size)
    grads = gradients(shapes, 8)
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    sizes: dict[str, int] = {}
    for r in range(args.rounds):
        order = args.methods[r % len(args.methods):] + args.methods[:r % len(args.methods)]
        for method in order:
            seconds, sizes[method] = time_method(method, shapes, grads, args.rank, args.gap)
            times[method].append(seconds)
            print(f"round {r}: {method:14s} {seconds * 1e3:8.2f} ms/step", flush=True)
    median = {m: statistics.median(t) for m, t in times.items()}
    params = sum(m * n for m, n in shapes)
    print(f"\n{args.size}: {len(shapes)} matrices, {params:,} weights, rank {args.rank}, gap {args.gap}, "
          f"{args.rounds} rounds, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| optimizer | ms / step (median round) | vs its anchor | vs AdamW | state bytes | vs AdamW |")
    print("|---|---|---|---|---|---|")
    for m in args.methods:
        anchor = ANCHOR.get(m)
        vs = f"{median[m] / median[anchor]:.2f}x {anchor}" if anchor in median else ""
        va = f"{median[m] / median['adamw']:.2f}x" if "adamw" in median else ""
        sa = f"{sizes[m] / sizes['adamw']:.3f}x" if "adamw" in sizes else ""
        print(f"| {LABELS[m]} | {median[m] * 1e3:.2f} | {vs} | {va} | {sizes[m]:,} | {sa} |")


if __name__ == "__main__":
    main()
