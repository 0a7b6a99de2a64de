"""Healing the default model compressed with the best recipe, within a 10-minute budget on this CPU.

Usage:
    python benchmarks/heal_smollm2.py [--ratios 0.2,0.4] [--recipe best] [--work-dir /tmp/rankwise-heal] [--steps N]
        [--extra ARGS]

For each ratio: ``rankwise compress smollm2 --recipe RECIPE --ratio R`` (skipped if the work dir already holds it),
then ``rankwise heal`` with its defaults (distilling the dense model), each a child
process whose wall time and peak RSS (``ru_maxrss`` from ``os.wait4``) are measured. Perplexity is on the last
``--eval-samples`` x 256 tokens of the pydoc topics, which neither calibration (the first 32 windows) nor healing
(every window before the held-out ones) reads. Prints a Markdown table and writes ``heal_smollm2.png`` (held-out
perplexity against healing step, one curve per ratio, the dense model as a line).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_child(cmd: list[str], log: Path) -> tuple[int, int, float]:
    """Run ``cmd`` with output to ``log``; return (exit code, the child's peak RSS in bytes, wall seconds)."""
    start = time.perf_counter()
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.2,0.4")
    parser.add_argument("--recipe", default="best", help="what to compress with (rankwise compress --recipe)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/rankwise-heal"))
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="exactly N steps (default: heal's 10-minute budget)")
    parser.add_argument("--extra", default="", help="more arguments for rankwise heal")
    parser.add_argument("--plot", type=Path, default=HERE / "heal_smollm2.png")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rankwise = str(Path(sys.executable).with_name("rankwise"))
    rows = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        compressed = args.work_dir / f"{args.recipe}-{ratio}"
        if not compressed.is_dir():
            code, _, _ = run_child([rankwise, "compress", "smollm2", "--recipe", args.recipe, "--ratio", str(ratio),
                                    "--out", str(compressed)], args.work_dir / f"compress-{ratio}.log")
            if code:
                sys.exit(f"compress at {ratio} failed; see {args.work_dir}/compress-{ratio}.log")
        report = args.work_dir / f"heal-{ratio}.json"
        cmd = [rankwise, "heal", str(compressed), "--base", "smollm2", "--out", str(args.work_dir / f"healed-{ratio}"),
               "--overwrite", "--eval-samples", str(args.eval_samples), "--json-report", str(report),
               *(["--steps", str(args.steps)] if args.steps else []), *shlex.split(args.extra)]
        code, rss, wall = run_child(cmd, args.work_dir / f"heal-{ratio}.log")
        if code:
            sys.exit(f"heal at {ratio} failed; see {args.work_dir}/heal-{ratio}.log")
        rows.append((ratio, json.loads(report.read_text()), rss, wall))
    print(f"Healing `--recipe {args.recipe}` on SmolLM2-135M; held-out perplexity on the last "
          f"{args.eval_samples} x 256 tokens of the pydoc topics; wall time and peak RSS of the whole `rankwise heal` "
          "process (loading both models, evaluating before and after, training, saving).\n")
    print("| ratio | steps x windows | trained weights | dense ppl | before | after | before / dense | "
          "after / dense | s/step | heal wall (s) | peak RSS (GB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for ratio, r, rss, wall in rows:
        dense, before, after = r["perplexity_dense"], r["perplexity_before"], r["perplexity_after"]
        print(f"| {ratio} | {r['steps']} x {r['windows_per_step']} | {r['trainable']:,} | {dense:.3f} | {before:.3f} | "
              f"{after:.3f} | "
              f"{before / dense:.2f}x | {after / dense:.2f}x | {r['seconds'] / len(r['losses']):.1f} | {wall:.0f} | "
              f"{rss / 1e9:.2f} |")
    plot(rows, args.plot)
    print(f"\nplot: {args.plot}")


def plot(rows: list, path: Path) -> None:
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for ratio, r, _, _ in rows:
        steps = [0] + [s for s, _ in r["evals"]]
        ppl = [r["perplexity_before"]] + [math.exp(v) for _, v in r["evals"]]
        ax.plot(steps, ppl, "o-", label=f"ratio {ratio} (healed)")
    ax.axhline(rows[0][1]["perplexity_dense"], color="k", linestyle="--", label="dense")
    ax.set_xlabel("healing step")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("SmolLM2-135M, svd_llm + loss allocation + sequential")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
