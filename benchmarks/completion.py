"""Matrix completion: exact and approximate alternating minimisation against a soft-impute baseline.

Usage:
    python benchmarks/completion.py                                   # 500x400, 1000x800, 2000x1500; 0.1-0.4
    python benchmarks/completion.py --sizes 500x400 --fractions 0.3   # one quick case

Each test matrix is ``U diag(s) V^T`` with random orthonormal (hence incoherent) ``U, V`` of rank ``--rank`` and
``s`` evenly spaced in ``[1, 2]`` (times ``sqrt(m n / r)``); entries are observed independently with probability
``fraction``. Every method gets the true rank and the same mask, in the same process. The anchor is soft-impute
(Mazumder, Hastie and Tibshirani 2010, https://jmlr.org/papers/v11/mazumder10a.html): fill the unobserved entries
with the current estimate, soft-threshold the singular values (``torch.svd_lowrank`` with ``q = r + 5``, rank capped
at ``r``), with the threshold shrinking geometrically to zero (so it ends as hard-impute / SVT with a rank cap).
scikit-learn's IterativeImputer is not used: it fits one regressor per column per round (1,500 columns here) and is
not a low-rank method. Prints a Markdown table: iterations, seconds, relative error ``||X - M||_F / ||M||_F`` on the
whole matrix, and time and error relative to soft-impute on the same case.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from rankwise.linalg.completion import complete


def problem(m: int, n: int, rank: int, fraction: float, seed: int, dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64)).Q
    s = torch.linspace(2.0, 1.0, rank, dtype=torch.float64) * (m * n / rank) ** 0.5
    return ((U * s) @ V.T).to(dtype), torch.rand(m, n, generator=g) < fraction


def soft_impute(M: torch.Tensor, mask: torch.Tensor, rank: int, iters: int, tol: float, seed: int
                ) -> tuple[torch.Tensor, int]:
    """Soft-impute with a rank cap and a geometric threshold path ending at zero; returns ``(X, iterations)``."""
    torch.manual_seed(seed)  # torch.svd_lowrank takes no generator; this benchmark process owns the global RNG
    observed = torch.where(mask, M, 0)
    Z = torch.zeros_like(M)
    lam = 0.5 * float(torch.linalg.matrix_norm(observed, ord=2))
    for it in range(1, iters + 1):
        U, S, V = torch.svd_lowrank(torch.where(mask, M, Z), q=min(rank + 5, *M.shape), niter=2)
        S = (S[:rank] - lam).clamp_min(0.0)
        Z_new = (U[:, :rank] * S) @ V[:, :rank].T
        change = float(torch.linalg.norm(Z_new - Z)) / max(float(torch.linalg.norm(Z_new)), 1e-30)
        Z = Z_new
        lam = lam * 0.7 if lam > 1e-6 * float(S[0]) else 0.0
        if lam == 0.0 and change < tol:
            return Z, it
    return Z, iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500x400,1000x800,2000x1500")
    parser.add_argument("--fractions", default="0.1,0.2,0.3,0.4")
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--iters", type=int, default=60, help="most ALS iterations")
    parser.add_argument("--baseline-iters", type=int, default=200, help="most soft-impute iterations")
    parser.add_argument("--cg-steps", type=int, default=2, help="CG steps per solve of the approximate ALS")
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"{args.dtype}, rank {args.rank}, tol {args.tol}, approx: {args.cg_steps} CG steps, sketch 4r\n")
    print("| size | observed | method | iters | time (s) | rel. error | time / soft-impute | error / soft-impute |")
    print("|---|---|---|---|---|---|---|---|")
    for (m, n), fraction in ((s, f) for s in sizes for f in fractions):
        M, mask = problem(m, n, args.rank, fraction, args.seed, dtype)
        norm = float(torch.linalg.norm(M.double()))
        rows = {}
        start = time.perf_counter()
        X, it = soft_impute(M, mask, args.rank, args.baseline_iters, args.tol, args.seed)
        rows["soft-impute (anchor)"] = (it, time.perf_counter() - start, float(torch.linalg.norm((X - M).double())))
        for solver in ("exact", "approx"):
            start = time.perf_counter()
            try:
                result = complete(M, mask, args.rank, solver=solver, iters=args.iters, tol=args.tol,
                                  generator=args.seed, cg_steps=args.cg_steps)
            except ValueError as err:  # e.g. a row with fewer than rank observed entries at low fractions
                print(f"| {m}x{n} | {fraction:.0%} | ALS {solver} | - | - | refused: {err} | - | - |")
                continue
            seconds = time.perf_counter() - start
            rows[f"ALS {solver} (rankwise)"] = (result.iterations, seconds,
                                                float(torch.linalg.norm((result.to_dense() - M).double())))
        _, base_time, base_err = rows["soft-impute (anchor)"]
        for name, (it, seconds, err) in rows.items():
            print(f"| {m}x{n} | {fraction:.0%} | {name} | {it} | {seconds:.2f} | {err / norm:.2e} | "
                  f"{seconds / base_time:.2f} | {err / max(base_err, 1e-300):.2e} |", flush=True)


if __name__ == "__main__":
    main()
