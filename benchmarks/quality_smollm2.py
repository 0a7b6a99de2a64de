"""Issue-4 recipes against plain SVD-LLM on the default model, same calibration, evaluation and budget.

Usage:
    python benchmarks/quality_smollm2.py [--ratios 0.2,0.4] [--eora-rank 16]

Calibration: the first 32 x 256 tokens of the pydoc topics; evaluation: the last 64 x 256 (disjoint). Prints the
Markdown table of every row plus each row's perplexity relative to plain ``svd_llm`` at the same ratio (the anchor,
measured in the same run) and to the dense model. The EoRA row adds parameters (shown in the table), so it is not at
the same budget as the others.
"""

from __future__ import annotations

import argparse
import time

import torch

from rankwise.calibrate import load_text, split_windows
from rankwise.eval import peak_rss_mb
from rankwise.eval.compare import compare
from rankwise.io.models import load_model
from rankwise.methods.svd_llm import SVDLLMConfig

RECIPES = [  # (allocation, sequential, update_u); the first is the anchor, EoRA rows use the third
    ("uniform", False, False),
    ("welore", False, False),
    ("loss", False, False),
    ("uniform", True, True),
    ("loss", True, False),
]
EORA_RECIPE = RECIPES[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.2,0.4")
    parser.add_argument("--eora-rank", type=int, default=16, help="EoRA rows on the loss recipe (0: none)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    loaded = load_model()
    ids = loaded.tokenizer(load_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    calib, evaluation = split_windows(ids, 256, args.calib_samples, args.eval_samples)
    ratios = [float(r) for r in args.ratios.split(",")]
    configs = [SVDLLMConfig(ratio=r, allocation=a, sequential=s, update_u=u) for r in ratios for a, s, u in RECIPES]
    settings = {"model": loaded.source, "text": "pydoc-topics", "seq_len": 256, "calib": args.calib_samples,
                "eval": args.eval_samples}
    result = compare(loaded.model, calib, evaluation, configs, settings=settings)
    if args.eora_rank:
        a, s, u = EORA_RECIPE
        extra = compare(loaded.model, calib, evaluation,
                        [SVDLLMConfig(ratio=r, allocation=a, sequential=s, update_u=u) for r in ratios],
                        eora_rank=args.eora_rank, settings=settings)
        result.rows += [row for row in extra.rows if "eora" in row.method]
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(result.to_markdown())
    anchor = {row.ratio: row.perplexity for row in result.rows if row.method == "svd_llm"}
    print("\n| recipe | ratio | perplexity | / svd_llm (same ratio) | / dense |\n|---|---|---|---|---|")
    for row in result.rows:
        print(f"| {row.method} | {row.ratio:g} | {row.perplexity:.2f} | {row.perplexity / anchor[row.ratio]:.3f} | "
              f"{row.perplexity / result.dense.perplexity:.3f} |")
    print(f"\npeak RSS {peak_rss_mb():,.0f} MB; total {time.perf_counter() - start:.0f} s")
    if args.out:
        result.save(args.out, overwrite=True)


if __name__ == "__main__":
    main()
