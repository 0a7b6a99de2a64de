"""The cost of content identity and checksum verification, against the compress and load times they guard.

    python benchmarks/integrity.py --work /tmp/rankwise-integrity [--synthetic /tmp/rankwise-scale/llama-3b]

For the default model (its cached conversion, float32, 517 MB) it runs, each in a child process timed with
``/usr/bin/time -f %M`` for peak RSS:

* ``rankwise compress smollm2 --ratio 0.2`` (svd_llm, 32 x 256 calibration tokens) with the calibration cache on,
  which hashes the source in full (content identity) and verifies it against its ``SHA256SUMS``; the same with
  ``--no-cache --no-verify`` (neither), for the difference;
* in this process: the content identity of the source alone, ``verify_dir`` of the output, and
  :func:`rankwise.load` of the output with and without verification (best of 3 each).

With ``--synthetic DIR`` (``benchmarks/make_synthetic_llama.py --preset 3b``) it times the content identity of that
checkpoint and a ``load_model`` in bfloat16 with and without verification, each in a child process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RANKWISE = str(Path(sys.executable).parent / "rankwise")


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of a child process."""
    start = time.perf_counter()
    run = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}")
    return seconds, int(run.stderr.strip().splitlines()[-1]) / 1024, run.stdout


def child(code: str) -> tuple[float, float, dict]:
    seconds, rss, out = timed([sys.executable, "-c", code])
    return seconds, rss, json.loads(out.strip().splitlines()[-1])


def best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def default_model(work: Path) -> list[tuple[str, str, str, str]]:
    import rankwise
    from rankwise.io.integrity import content_identity, verify_dir
    from rankwise.io.models import resolve

    source, _ = resolve("smollm2")
    rows = []
    identity = best(lambda: content_identity(source))
    size = sum(f.stat().st_size for f in Path(source).iterdir() if f.is_file()) / 1e6
    env = {**os.environ, "RANKWISE_CALIBRATION_CACHE": str(work / "cache")}
    common = ["compress", "smollm2", "--ratio", "0.2", "--overwrite"]
    shutil.rmtree(work / "cache", ignore_errors=True)
    with_checks, rss_with, _ = timed([RANKWISE, *common, "--out", str(work / "with")], env)
    without, rss_without, _ = timed([RANKWISE, *common, "--out", str(work / "without"), "--no-cache",
                                     "--no-verify"], env)
    rows.append(("source content identity + verify (in-process, best of 3)", f"{size:,.0f} MB",
                 f"{identity:.2f} s", f"{identity / with_checks:.1%} of the compress with checks"))
    rows.append(("compress 0.2, cache on + verify (child)", f"peak RSS {rss_with:,.0f} MB", f"{with_checks:.1f} s",
                 ""))
    rows.append(("compress 0.2, --no-cache --no-verify (child)", f"peak RSS {rss_without:,.0f} MB",
                 f"{without:.1f} s", f"difference {with_checks - without:+.1f} s "
                 f"({(with_checks - without) / without:+.1%})"))
    out = work / "with"
    out_size = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6
    check = best(lambda: verify_dir(out))
    plain = best(lambda: rankwise.load(out, verify=False).model)
    checked = best(lambda: rankwise.load(out).model)
    rows.append(("verify_dir of the output (best of 3)", f"{out_size:,.0f} MB", f"{check:.2f} s",
                 f"{check / plain:.1%} of a load"))
    rows.append(("rankwise.load, verify=False / True (best of 3)", "", f"{plain:.2f} s / {checked:.2f} s",
                 f"{checked / plain:.2f}x"))
    return rows


def synthetic(path: Path) -> list[tuple[str, str, str, str]]:
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6
    ident = ("import json, time; from rankwise.io.integrity import content_identity; t = time.perf_counter(); "
             f"d, v = content_identity({str(path)!r}); "
             "print(json.dumps({'s': time.perf_counter() - t, 'against': v.against}))")
    load = ("import json, time, torch; from rankwise.io.models import load_model; t = time.perf_counter(); "
            f"load_model({str(path)!r}, dtype=torch.bfloat16, verify={{}}); "
            "print(json.dumps({{'s': time.perf_counter() - t}}))")
    _, _, cold = child(ident)  # first read: from disk into the page cache (unless already there)
    _, rss_i, hashed = child(ident)
    _, rss_plain, plain = child(load.format("False"))
    _, rss_checked, checked = child(load.format("True"))
    return [
        ("3B content identity + verify, cold / warm page cache", f"{size:,.0f} MB",
         f"{cold['s']:.1f} s / {hashed['s']:.1f} s", f"against {hashed['against']}; peak RSS {rss_i:,.0f} MB"),
        ("3B load_model bf16, verify=False / True", f"peak RSS {rss_plain:,.0f} / {rss_checked:,.0f} MB",
         f"{plain['s']:.1f} s / {checked['s']:.1f} s", f"{checked['s'] / plain['s']:.2f}x"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch directory for outputs and the cache")
    parser.add_argument("--synthetic", type=Path, help="a synthetic checkpoint (make_synthetic_llama.py) to time")
    parser.add_argument("--skip-default", action="store_true", help="only the --synthetic rows")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [] if args.skip_default else default_model(args.work)
    if args.synthetic is not None:
        rows += synthetic(args.synthetic)
    print("| what | size | time | ratio |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
