"""The calibration cache's size cap at work: ten ``rankwise compress`` runs, each a new calibration, under a cap
that holds about three entries.

    python benchmarks/cache_cap.py [--work /tmp/rankwise-cache-cap]

A tiny Llama is saved to disk (the default model takes minutes a run; the cap's logic does not depend on size). A
first run measures one entry (both targets); ``RANKWISE_CACHE_MAX_GB`` is set to three times that. Then ten runs at
ratios 0.10 ... 0.55, ``--targets`` cycling through ``attn,mlp``, ``attn`` and ``mlp``, and ``--calib-samples``
4 ... 13 (the cache key holds the calibration tokens but not the ratio, so the windows make each run a new entry),
each in a child process. After each run: the entries, the cache's size (every file under it) against the cap, and
the run's time. The table is markdown; ``rankwise cache list`` follows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tiny_models import tiny_model, tiny_tokenizer  # noqa: E402

TARGETS = ["attn,mlp", "attn", "mlp"]


def cli(*args: object, env: dict[str, str]) -> tuple[str, float]:
    code = "import sys; from rankwise.cli import main; sys.argv[0] = 'rankwise'; main()"
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    if run.returncode != 0:
        raise SystemExit(f"rankwise {' '.join(map(str, args))} failed:\n{run.stderr[-2000:]}")
    return run.stdout, time.perf_counter() - start


def disk(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def entries(root: Path) -> int:
    return sum(1 for p in root.iterdir() if (p / "manifest.json").is_file()) if root.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/rankwise-cache-cap"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    model = args.work / "llama"
    tiny_model("llama").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    small = ["--seq-len", "16", "--method", "svd_llm"]

    probe = args.work / "probe-cache"
    cli("compress", model, *small, "--calib-samples", "4", "--out", args.work / "probe",
        env={"RANKWISE_CALIBRATION_CACHE": str(probe)})
    entry = disk(probe)
    cap_gb = 3 * entry / 1e9
    cache = args.work / "cache"
    env = {"RANKWISE_CALIBRATION_CACHE": str(cache), "RANKWISE_CACHE_MAX_GB": f"{cap_gb:.9f}"}
    print(f"one entry (attn,mlp, 4 windows of 16 tokens): {entry / 1e3:.1f} kB; "
          f"RANKWISE_CACHE_MAX_GB={env['RANKWISE_CACHE_MAX_GB']} ({cap_gb * 1e6:.1f} kB)\n")
    print("| run | ratio | targets | windows | entries | evicted | cache kB | cap kB | within cap | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i in range(10):
        ratio = 0.10 + 0.05 * i
        before = entries(cache)
        _, seconds = cli("compress", model, *small, "--ratio", f"{ratio:.2f}", "--targets", TARGETS[i % 3],
                           "--calib-samples", 4 + i, "--out", args.work / f"out-{i}", env=env)
        size = disk(cache)
        after = entries(cache)
        print(f"| {i + 1} | {ratio:.2f} | {TARGETS[i % 3]} | {4 + i} | {after} | {before + 1 - after} | "
              f"{size / 1e3:.1f} | {cap_gb * 1e6:.1f} | {'yes' if size <= cap_gb * 1e9 else 'NO'} | {seconds:.1f} |")
    listing, _ = cli("cache", "list", env=env)
    print("\n" + listing.rstrip())


if __name__ == "__main__":
    main()
