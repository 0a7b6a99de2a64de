"""The calibration kernels the best recipe runs thousands of times, against the torch calls they replace.

* ``gram(x)`` (:func:`rankwise.linalg.gram`, the lower block triangle of ``x^T x``, mirrored) against ``x.T @ x``:
  one batch of 1,024 tokens at the default model's input widths (576 for q/k/v, o, gate/up; 1,536 for down);
* ``squared_singular_values(A)`` (:func:`rankwise.linalg.squared_singular_values`, the float64 Gram matrix's
  eigenvalues) against ``torch.linalg.svdvals(A.float()) ** 2``, the loss allocation's spectra, at the default
  model's weight shapes.

Best of ``--repeats`` means of ``--reps`` calls each, in one process, so the ratios compare like with like. Also
checks that each kernel agrees with its anchor.

    .venv/bin/python benchmarks/stats_kernels.py
"""

from __future__ import annotations

import argparse
import time

import torch

from rankwise.linalg import gram, squared_singular_values


def _ms(fn, reps: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| kernel | shape | anchor ms | rankwise ms | rankwise / anchor | max rel. difference |")
    print("|---|---|---|---|---|---|")
    for n in (576, 1536):
        x = torch.randn(args.tokens, n, generator=gen)
        ref = x.T @ x
        diff = float((gram(x) - ref).abs().max() / ref.abs().max())
        a = _ms(lambda x=x: x.T @ x, args.reps, args.repeats)
        b = _ms(lambda x=x: gram(x), args.reps, args.repeats)
        print(f"| gram vs x.T @ x | {args.tokens} x {n} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {diff:.1e} |")
    for m, n in ((576, 576), (192, 576), (1536, 576), (576, 1536)):
        A = torch.randn(m, n, generator=gen, dtype=torch.float64)
        ref = torch.linalg.svdvals(A).pow(2)
        diff = float((squared_singular_values(A) - ref).abs().max() / ref.max())
        a = _ms(lambda A=A: torch.linalg.svdvals(A.float()).double().pow(2), max(1, args.reps // 2), args.repeats)
        b = _ms(lambda A=A: squared_singular_values(A), max(1, args.reps // 2), args.repeats)
        print(f"| squared singular values vs svdvals (float32) | {m} x {n} | {a:.1f} | {b:.1f} | {b / a:.2f}x "
              f"| {diff:.1e} |")


if __name__ == "__main__":
    main()
