"""Every compression method at ratios 0.1-0.4 on the default model (SmolLM2-135M-Instruct).

Usage:
    python benchmarks/compress_smollm2.py [--methods svd,fwsvd,asvd,svd_llm] [--ratios 0.1,0.2,0.3,0.4]

Calibration: the first 32 x 256 tokens of the pydoc topics; evaluation: the last 64 x 256 (disjoint). Statistics
are collected once (with Fisher for FWSVD) and shared by every row; "factorise s" is per row, and one row's full
compression time is calibration + factorise. Prints the Markdown table (perplexity, parameters kept/removed,
prefill tokens/s and speed-up over dense, RSS) and the peak RSS of the whole run.
"""

from __future__ import annotations

import argparse
import time

import torch

from rankwise.calibrate import load_text, split_windows
from rankwise.eval import peak_rss_mb
from rankwise.eval.compare import compare, recipes
from rankwise.io.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="svd,fwsvd,asvd,svd_llm")
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", default=None, help="also write comparison.md/.png/.json here")
    args = parser.parse_args()
    start = time.perf_counter()
    loaded = load_model()
    print(f"# model loaded in {time.perf_counter() - start:.1f} s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    ids = loaded.tokenizer(load_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    calib, evaluation = split_windows(ids, args.seq_len, args.calib_samples, args.eval_samples)
    settings = {"model": loaded.source, "text": "pydoc-topics", "seq_len": args.seq_len,
                "calib": args.calib_samples, "eval": args.eval_samples}
    configs = recipes(args.methods.split(","), [float(r) for r in args.ratios.split(",")])
    result = compare(loaded.model, calib, evaluation, configs, settings=settings)
    print(result.to_markdown())
    print(f"\npeak RSS of the whole run: {peak_rss_mb():,.0f} MB; total {time.perf_counter() - start:.0f} s")
    if args.out:
        result.save(args.out, overwrite=True)


if __name__ == "__main__":
    main()
