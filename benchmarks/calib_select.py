"""Calibration windows chosen from a pool (leverage, sensitivity, volume) against the first N, 2N and 4N windows.

Usage:
    flock /tmp/rankwise-heavy.lock python benchmarks/calib_select.py [--n 8] [--pool-mult 4] [--eval-samples 16]

The default model (SmolLM2-135M) is compressed with ``svd_llm`` (uniform allocation) at ``--ratio`` from each set of
calibration windows: the first N, 2N and 4N windows of the pydoc topics (the anchor is the first N), and N windows
chosen by each selection from the first ``pool-mult x N`` (:mod:`rankwise.calibrate.select`); held-out perplexity on
the last ``--eval-samples`` windows (never in the pool). Each row runs in its own process, so its peak RSS is its
own (``wait4``'s ``ru_maxrss``: model load, selection, compression, evaluation). The pool's window features are
computed once, in a separate process, and shared by the three selections: "select s" is that shared pass plus the
selection's own draw (the CLI's ``--calib-select`` pays the pass once per run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SELECTIONS = ("leverage", "sensitivity", "volume")


def _windows(args: argparse.Namespace):
    from rankwise.calibrate import load_text, split_windows
    from rankwise.io.models import load_model

    loaded = load_model("smollm2")
    ids = loaded.tokenizer(load_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    pool, evaluation = split_windows(ids, args.seq_len, args.pool_mult * args.n, args.eval_samples)
    return loaded.model, pool, evaluation


def _child(args: argparse.Namespace) -> None:
    """One row (or the selection pass), printed as one JSON line."""
    import torch

    from rankwise.calibrate.select import SelectConfig, choose, window_features
    from rankwise.compression import compress_
    from rankwise.eval.measure import perplexity
    from rankwise.methods.svd_llm import SVDLLMConfig

    model, pool, evaluation = _windows(args)
    if args.child == "select":
        start = time.perf_counter()
        F = window_features(model, pool, SelectConfig("leverage"), batch_size=args.batch_size)
        shared = time.perf_counter() - start
        out = {"features_s": shared, "features_shape": list(F.shape)}
        for how in SELECTIONS:
            start = time.perf_counter()
            idx, _ = choose(F, args.n, SelectConfig(how))
            out[how] = {"indices": sorted(idx.tolist()), "choose_s": time.perf_counter() - start}
        print(json.dumps(out), flush=True)
        return
    result: dict[str, object] = {}
    if args.child != "dense":
        if args.child.startswith("first"):
            calibration = pool[: int(args.child.split(":")[1])]
        else:
            calibration = pool[json.loads(args.indices)]
        start = time.perf_counter()
        compress_(model, SVDLLMConfig(ratio=args.ratio), calibration, batch_size=args.batch_size, progress=False)
        result["compress_s"] = time.perf_counter() - start
    with torch.no_grad():
        result["ppl"] = perplexity(model, evaluation, batch_size=args.batch_size)
    print(json.dumps(result), flush=True)


def _run(args: argparse.Namespace, child: str, extra: list[str] | None = None) -> tuple[dict, float, float]:
    """Run one child; its JSON, wall seconds and peak RSS in MB."""
    command = [sys.executable, __file__, "--child", child, "--n", str(args.n), "--pool-mult", str(args.pool_mult),
               "--eval-samples", str(args.eval_samples), "--seq-len", str(args.seq_len), "--ratio", str(args.ratio),
               "--batch-size", str(args.batch_size), *(extra or [])]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(
        Path(__file__).resolve().parents[1])})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"child {child} failed with status {status}")
    return json.loads(out.strip().splitlines()[-1]), time.perf_counter() - start, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="calibration windows N")
    parser.add_argument("--pool-mult", type=int, default=4, help="pool size in multiples of N")
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--indices", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args)
        return
    start = time.perf_counter()
    dense, _, dense_rss = _run(args, "dense")
    chosen, select_wall, select_rss = _run(args, "select")
    rows = []
    n = args.n
    for k in dict.fromkeys((n, 2 * n, args.pool_mult * n)):
        found, wall, rss = _run(args, f"first:{k}")
        rows.append((f"first {k}", k, found, None, wall, rss))
    for how in SELECTIONS:
        found, wall, rss = _run(args, how, ["--indices", json.dumps(chosen[how]["indices"])])
        rows.append((f"{how} {n} of {args.pool_mult * n}", n, found, chosen["features_s"] + chosen[how]["choose_s"],
                     wall, rss))
    anchor = rows[0][2]["ppl"]
    print(f"SmolLM2-135M, svd_llm uniform, ratio {args.ratio}; {args.seq_len}-token windows; evaluation: last "
          f"{args.eval_samples} windows of the pydoc topics; dense perplexity {dense['ppl']:.2f} (RSS "
          f"{dense_rss:,.0f} MB)\n")
    print("| calibration windows | windows | perplexity | vs first N | compress s | select s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for label, k, found, select_s, _, rss in rows:
        print(f"| {label} | {k} | {found['ppl']:.2f} | {found['ppl'] / anchor:.3f}x | {found['compress_s']:.1f} | "
              + (f"{select_s:.1f}" if select_s is not None else "-") + f" | {rss:,.0f} |")
    print(f"\nselection pass (features {chosen['features_shape']} for a pool of {args.pool_mult * n}): "
          f"{chosen['features_s']:.1f} s, peak RSS {select_rss:,.0f} MB (process wall {select_wall:.0f} s); chosen "
          + "; ".join(f"{how} {chosen[how]['indices']}" for how in SELECTIONS))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
