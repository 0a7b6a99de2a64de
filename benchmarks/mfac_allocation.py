"""M-FAC (https://arxiv.org/abs/2107.03356) in rankwise, measured: the ``loss_mfac`` allocation against ``loss`` on
the default model, and the M-FAC optimizer against SGD and AdamW on a small problem (issue 24).

Usage:
    flock /tmp/rankwise-heavy.lock python benchmarks/mfac_allocation.py [--ratios 0.2,0.4] [--calib 16] [--eval 16]
        [--allocations loss,loss_mfac] [--skip-compress] [--opt-steps 300] [--skip-optim]

Compression: SmolLM2-135M, ``svd_llm`` at each ratio (fraction of the targeted parameters removed) with
``allocation="loss"`` (today's scalar output sensitivity ``E||dL/dy||^2`` times the whitened spectrum) and
``allocation="loss_mfac"`` (the M-FAC empirical Fisher of each layer's per-window weight gradients,
:mod:`rankwise.allocate.fisher`), calibrated on ``--calib`` windows of 256 tokens drawn (seed 0) from the pydoc
topics before the held-out part, evaluated on the last ``--eval`` windows of 256 tokens. Each compression runs in its
own child process (this script with ``--one``), so its peak RSS and time are its own.

Optimizer: multinomial logistic regression on synthetic, ill-conditioned Gaussian features (seeded), minibatches
of 64, ``--opt-steps`` steps; each optimizer at the best learning rate of its grid (lowest final training loss),
side by side: final training loss, held-out accuracy, milliseconds per step.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import torch

SEQ_LEN = 256


def one(allocation: str, ratio: float, calib_count: int, eval_count: int, dense: bool) -> dict:
    """Compress a fresh copy of the default model; its perplexity, time and this process's peak RSS."""
    from rankwise.calibrate import load_text
    from rankwise.compression import compress_
    from rankwise.eval import peak_rss_mb
    from rankwise.eval.measure import perplexity
    from rankwise.io.models import load_model
    from rankwise.methods.svd_llm import SVDLLMConfig

    loaded = load_model("smollm2")
    ids = loaded.tokenizer(load_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    held_out = ids[-eval_count * SEQ_LEN:].reshape(eval_count, SEQ_LEN)
    pool = ids[:ids.numel() - eval_count * SEQ_LEN]
    available = pool.numel() // SEQ_LEN
    chosen = torch.randperm(available, generator=torch.Generator().manual_seed(0))[:calib_count].sort().values
    calib = torch.stack([pool[int(k) * SEQ_LEN:(int(k) + 1) * SEQ_LEN] for k in chosen])
    row = {"allocation": allocation, "ratio": ratio}
    if dense:
        row["dense_ppl"] = perplexity(loaded.model, held_out)
    start = time.perf_counter()
    report = compress_(loaded.model, SVDLLMConfig(ratio=ratio, allocation=allocation), calib, progress=False)
    row["seconds"] = time.perf_counter() - start
    row["kept"] = report.params_targeted_after
    row["removed"] = report.params_targeted_before - report.params_targeted_after
    row["ppl"] = perplexity(loaded.model, held_out)
    row["peak_rss_mb"] = peak_rss_mb()
    row["ranks"] = {layer.name: layer.rank for layer in report.layers}
    return row


def compress_table(args: argparse.Namespace) -> None:
    rows = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        for allocation in args.allocations.split(","):
            cmd = [sys.executable, __file__, "--one", allocation, "--ratio", str(ratio), "--calib", str(args.calib),
                   "--eval", str(args.eval)] + (["--dense"] if not rows else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  {allocation} @ {ratio}: ppl {r['ppl']:.2f}, {r['seconds']:.0f} s, {r['peak_rss_mb']:,.0f} MB",
                  file=sys.stderr, flush=True)
    dense = rows[0]["dense_ppl"]
    print(f"\nSmolLM2-135M, svd_llm, {args.calib} x {SEQ_LEN} calibration tokens (seed 0), held-out perplexity on the "
          f"last {args.eval} x {SEQ_LEN} pydoc tokens (dense {dense:.2f}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| ratio (removed) | allocation | held-out ppl | / dense | / loss | targeted kept | compress s | / loss | "
          "peak RSS MB | / loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        anchor = next(a for a in rows if a["ratio"] == r["ratio"] and a["allocation"] == rows[0]["allocation"])
        total = r["kept"] + r["removed"]
        print(f"| {r['ratio']:g} | {r['allocation']} | {r['ppl']:.2f} | {r['ppl'] / dense:.3f}x | "
              f"{r['ppl'] / anchor['ppl']:.3f}x | {r['kept']:,} ({r['kept'] / total:.1%}) | {r['seconds']:.0f} | "
              f"{r['seconds'] / anchor['seconds']:.2f}x | {r['peak_rss_mb']:,.0f} | "
              f"{r['peak_rss_mb'] / anchor['peak_rss_mb']:.2f}x |")
    by_ratio: dict[float, list[dict]] = {}
    for r in rows:
        by_ratio.setdefault(r["ratio"], []).append(r)
    for ratio, rs in by_ratio.items():
        if len(rs) == 2:
            a, b = (r["ranks"] for r in rs)
            moved = sum(abs(a[n] - b[n]) for n in a)
            print(f"\nratio {ratio:g}: the allocations differ by {moved:,} ranks in total over {len(a)} matrices "
                  f"({sum(a[n] != b[n] for n in a)} matrices differ)")


def _logistic_problem(seed: int = 0, n: int = 4096, d: int = 64, classes: int = 10):
    """Features ``X = Z diag(scales) B^T`` (scales from 1 to 0.01, ``B`` a random rotation), labels
    ``argmax(Z A + noise)``: every latent direction matters equally, so the weights along the small-scale directions
    must grow large (an ill-conditioned problem). 3/4 training, 1/4 held out."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, d)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    Z = torch.randn(n, d, generator=g)
    X = (Z * scales) @ basis.T
    y = (Z @ torch.randn(d, classes, generator=g) + 2.0 * torch.randn(n, classes, generator=g)).argmax(-1)
    return X[: n * 3 // 4], y[: n * 3 // 4], X[n * 3 // 4:], y[n * 3 // 4:]


def _train(make, steps: int, data, seed: int = 0) -> tuple[float, float, float]:
    X, y, Xt, yt = data
    lin = torch.nn.Linear(X.shape[1], int(y.max()) + 1)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = make(lin.parameters())
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(lin(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        try:
            opt.step()
        except ValueError:  # M-FAC refuses a diverged (overflowing) step
            return math.inf, 0.0, 0.0
    ms = 1000 * (time.perf_counter() - start) / steps
    with torch.no_grad():
        final = float(torch.nn.functional.cross_entropy(lin(X), y))
        acc = float((lin(Xt).argmax(-1) == yt).float().mean())
    return (final if math.isfinite(final) else math.inf), acc, ms


def _optimum(data) -> float:
    """The training loss's minimum (full-batch L-BFGS), for reference."""
    X, y, _, _ = data
    lin = torch.nn.Linear(X.shape[1], int(y.max()) + 1)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(X), y)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(lin(X), y))


def optim_table(args: argparse.Namespace) -> None:
    from rankwise.optim.mfac import MFACOptimizer

    data = _logistic_problem()
    grids = {
        "SGD": (lambda lr: (lambda p: torch.optim.SGD(p, lr=lr)), (1.0, 3.0, 10.0, 30.0)),
        "SGD momentum 0.9": (lambda lr: (lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9)), (0.3, 1.0, 3.0)),
        "AdamW": (lambda lr: (lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0)), (0.01, 0.03, 0.1, 0.3)),
        f"M-FAC m={args.window}": (lambda lr: (lambda p: MFACOptimizer(p, lr=lr, m=args.window, damp=args.damp)),
                                   (0.01, 0.03, 0.1, 0.3)),
        f"M-FAC m={args.window}, momentum 0.9": (
            lambda lr: (lambda p: MFACOptimizer(p, lr=lr, m=args.window, damp=args.damp, momentum=0.9)),
            (0.01, 0.03, 0.1, 0.3)),
    }
    results = {}
    for name, (make, lrs) in grids.items():
        runs = [(*_train(make(lr), args.opt_steps, data), lr) for lr in lrs]
        results[name] = min(runs, key=lambda r: r[0])
        best = results[name]
        edge = " (grid edge)" if best[3] in (lrs[0], lrs[-1]) else ""
        print(f"  {name}: best lr {best[3]:g}{edge}", file=sys.stderr, flush=True)
    anchor = results["SGD"]
    optimum = _optimum(data)
    print(f"\nSoftmax regression, 3,072 x 64 ill-conditioned features, 10 classes, batch 64, {args.opt_steps} steps, "
          f"M-FAC damp {args.damp:g}; each at its best lr\n")
    print("| optimizer | best lr | final train loss | / SGD | held-out accuracy | ms / step | / SGD |")
    print("|---|---|---|---|---|---|---|")
    print(f"| optimum (full-batch L-BFGS) | - | {optimum:.4f} | {optimum / anchor[0]:.3f}x | - | - | - |")
    for name, (loss, acc, ms, lr) in results.items():
        print(f"| {name} | {lr:g} | {loss:.4f} | {loss / anchor[0]:.3f}x | {acc:.3f} | {ms:.2f} | "
              f"{ms / anchor[2]:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.2")
    parser.add_argument("--allocations", default="loss,loss_mfac")
    parser.add_argument("--calib", type=int, default=16)
    parser.add_argument("--eval", type=int, default=16)
    parser.add_argument("--skip-compress", action="store_true")
    parser.add_argument("--skip-optim", action="store_true")
    parser.add_argument("--opt-steps", type=int, default=300)
    parser.add_argument("--window", type=int, default=32, help="M-FAC gradient window m for the optimizer")
    parser.add_argument("--damp", type=float, default=1e-4, help="M-FAC damping for the optimizer")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--ratio", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.ratio, args.calib, args.eval, args.dense)))
        return
    if not args.skip_optim:
        optim_table(args)
    if not args.skip_compress:
        compress_table(args)


if __name__ == "__main__":
    main()
