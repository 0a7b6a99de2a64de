"""The two fallbacks for a singular covariance, side by side on the default model: the clamped eigendecomposition
(used up to ``EIGH_MAX_N`` inputs) against Cholesky after a small ridge (used above it, to spare memory and time).

SmolLM2-135M's covariances are at most 1536-dimensional, so they always take the eigen fallback when singular; here
``EIGH_MAX_N`` is lowered to 0 for the second run so the same singular covariances take the ridge instead. Both runs
compress the same model in memory with ``svd_llm`` at ratio 0.2 on 32 x 256 calibration tokens and are evaluated on
the same 64 held-out windows (the end of the pydoc topics).

    .venv/bin/python benchmarks/ridge_vs_eigh.py
"""

from __future__ import annotations

import importlib
import time

import torch

import rankwise
from rankwise.calibrate import load_text, split_windows
from rankwise.compression import compress_
from rankwise.eval import perplexity
from rankwise.methods.svd_llm import SVDLLMConfig


def run(eigh_max_n: int, calib: torch.Tensor, held_out: torch.Tensor) -> tuple[float, int, float, float]:
    """``(perplexity, layers that fell back, worst relative output error, compress seconds)``."""
    whiten = importlib.import_module("rankwise.linalg.whiten")
    saved = whiten.EIGH_MAX_N
    whiten.EIGH_MAX_N = eigh_max_n
    try:
        model = rankwise.load_model().model
        start = time.perf_counter()
        report = compress_(model, SVDLLMConfig(ratio=0.2), calib, progress=False)
        seconds = time.perf_counter() - start
    finally:
        whiten.EIGH_MAX_N = saved
    fallbacks = sum(1 for layer in report.layers if layer.covariance_fallback)
    worst = max(layer.rel_error or 0.0 for layer in report.layers)
    return perplexity(model, held_out, batch_size=8), fallbacks, worst, seconds


def main() -> None:
    tokenizer = rankwise.load_model().tokenizer
    ids = tokenizer(load_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    calib, held_out = split_windows(ids, 256, 32, 64)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M, svd_llm 0.2, "
          "32 x 256 calibration, 64 x 256 held out")
    rows = {"eigen fallback (default)": run(4096, calib, held_out), "ridge fallback": run(0, calib, held_out)}
    base = rows["eigen fallback (default)"][0]
    print("| fallback | perplexity | ppl ratio | layers that fell back | worst layer rel. error | compress s |")
    print("|---|---|---|---|---|---|")
    for name, (ppl, fallbacks, worst, seconds) in rows.items():
        print(f"| {name} | {ppl:.4f} | {ppl / base:.5f} | {fallbacks} | {worst:.4f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
