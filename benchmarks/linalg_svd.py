"""Truncated SVD: rankwise solvers against torch and scikit-learn, same process, same matrices.

Usage:
    python benchmarks/linalg_svd.py            # the four issue shapes
    python benchmarks/linalg_svd.py --quick    # the two small shapes only

Each test matrix is ``U diag(s) V^T`` in float32 with random orthogonal ``U, V`` and ``s_i = (i + 1) ** -decay``, so
the optimal rank-r Frobenius error is ``||s[r:]||``. Prints a Markdown table: wall time (median of ``--repeats``
runs after a warm-up; one run for ``torch.linalg.svd``), speed-up over ``torch.linalg.svd``, time relative to
``torch.svd_lowrank`` at the same oversampling and iterations, and error relative to optimal.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from sklearn.utils.extmath import randomized_svd

from rankwise.linalg import truncated_svd
from rankwise.linalg.svd import DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS

CASES = [((4096, 4096), 256), ((576, 1536), 128), ((1536, 576), 128), ((4096, 11008), 512)]
QUICK = [((576, 1536), 128), ((1536, 576), 128)]


def test_matrix(m: int, n: int, decay: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    s = torch.arange(1, k + 1, dtype=torch.float64).pow(-decay)
    return (U * s.float()) @ V.T, s


def timed(fn: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]], repeats: int
          ) -> tuple[float, tuple[torch.Tensor, ...]]:
    if repeats > 1:
        fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def candidates(W: torch.Tensor, rank: int, o: int, p: int, repeats: int) -> dict[str, tuple[Callable, int]]:
    """name -> (call returning (U, S, Vh), repeats) for every method compared."""
    Wn = W.numpy()

    def lowrank():
        u, s, v = torch.svd_lowrank(W, q=rank + o, niter=p)
        return u, s, v.T

    def sklearn():
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in randomized_svd(Wn, rank, random_state=0))

    def ours(solver: str):
        def run():
            lr = truncated_svd(W, rank, solver=solver)
            return lr.U, lr.S, lr.Vh
        return run

    return {
        "torch.linalg.svd": (lambda: torch.linalg.svd(W, full_matrices=False), 1),
        f"torch.svd_lowrank (q=r+{o}, niter={p})": (lowrank, repeats),
        "sklearn randomized_svd (defaults)": (sklearn, repeats),
        "rankwise exact": (ours("exact"), 1),
        "rankwise randomized (default)": (ours("randomized"), repeats),
        "rankwise block_krylov": (ours("block_krylov"), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the small shapes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decay", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    p, o = DEFAULT_POWER_ITERS, DEFAULT_OVERSAMPLE
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"float32, s_i = (i+1)^-{args.decay}; rankwise defaults: oversample={o}, power_iters={p}\n")
    print("| shape | rank | method | time (s) | speed-up vs torch.linalg.svd | time / torch.svd_lowrank "
          "| error / optimal |")
    print("|---|---|---|---|---|---|---|")
    for (m, n), rank in QUICK if args.quick else CASES:
        W, s = test_matrix(m, n, args.decay, seed=0)
        optimal = float(s[rank:].norm())
        methods = candidates(W, rank, o, p, args.repeats)
        results = {}
        for name, (fn, repeats) in methods.items():
            seconds, (U, S, Vh) = timed(fn, repeats)
            U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
            error = float(torch.linalg.norm(W - (U * S) @ Vh)) / optimal
            results[name] = (seconds, error)
        base = results["torch.linalg.svd"][0]
        lowrank = results[f"torch.svd_lowrank (q=r+{o}, niter={p})"][0]
        for name, (seconds, error) in results.items():
            print(f"| {m}x{n} | {rank} | {name} | {seconds:.3f} | {base / seconds:.1f}x | {seconds / lowrank:.2f} "
                  f"| {error:.4f} |", flush=True)


if __name__ == "__main__":
    main()
