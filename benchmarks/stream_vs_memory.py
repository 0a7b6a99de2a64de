"""Streamed (block-by-block from the checkpoint) against in-memory compression of the default model.

Each compression runs in its own child process; its peak resident memory comes from ``os.wait4``. Both outputs are
then evaluated here on the same held-out windows (the end of the pydoc topics, disjoint from calibration).

    .venv/bin/python benchmarks/stream_vs_memory.py --out /tmp/svm
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

IN_MEMORY = """
import sys, torch, rankwise
from rankwise.calibrate import load_text, split_windows
from rankwise.compression import compress_
from rankwise.methods.svd_llm import SVDLLMConfig
allocation, sequential, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
loaded = rankwise.load_model()
ids = loaded.tokenizer(load_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
calib, _ = split_windows(ids, 256, 32, 0)
report = compress_(loaded.model, SVDLLMConfig(ratio=0.2, allocation=allocation, sequential=sequential), calib,
                   progress=False)
rankwise.save(loaded.model, out, tokenizer=loaded.tokenizer, report=report, overwrite=True)
"""

RECIPES = [("uniform", False), ("loss", True)]


def measured(cmd: list[str]) -> tuple[float, float]:
    """``(seconds, peak RSS in MB)`` of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/stream-vs-memory")
    args = parser.parse_args()
    out = Path(args.out)
    exe = Path(sys.executable).parent / "rankwise"
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; svd_llm at ratio 0.2, 32 x 256 calibration")
    rows = []
    for allocation, sequential in RECIPES:
        label = f"svd_llm {allocation}" + (" +seq" if sequential else "")
        streamed, memory = out / f"stream-{allocation}", out / f"memory-{allocation}"
        cmd = [str(exe), "compress", "--method", "svd_llm", "--ratio", "0.2", "--allocation", allocation,
               "--out", str(streamed), "--overwrite", *(["--sequential"] if sequential else [])]
        s_time, s_rss = measured(cmd)
        m_time, m_rss = measured([sys.executable, "-c", IN_MEMORY, allocation, "1" if sequential else "0",
                                  str(memory)])
        rows.append((label, streamed, memory, s_time, s_rss, m_time, m_rss))
    from rankwise.calibrate import load_text, split_windows
    from rankwise.eval import perplexity
    from rankwise.io.models import load_model

    print("\n| recipe | path | seconds | peak RSS MB | perplexity | RSS streamed / in-memory | ppl rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for label, streamed, memory, s_time, s_rss, m_time, m_rss in rows:
        a, b = load_model(streamed), load_model(memory)
        ids = a.tokenizer(load_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
        _, evaluation = split_windows(ids, 256, 0, 64)
        pa, pb = perplexity(a.model, evaluation), perplexity(b.model, evaluation)
        print(f"| {label} | in-memory | {m_time:.1f} | {m_rss:,.0f} | {pb:.4f} | | |")
        print(f"| {label} | streamed | {s_time:.1f} | {s_rss:,.0f} | {pa:.4f} | {s_rss / m_rss:.2f} | "
              f"{abs(pa - pb) / pb:.1e} |")


if __name__ == "__main__":
    main()
