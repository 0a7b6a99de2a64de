"""Measure models: perplexity on held-out text, parameters, prefill throughput, memory; compare methods."""

from rankwise.eval.generate import complete
from rankwise.eval.measure import (
    EvalResult,
    count_params,
    evaluate,
    peak_rss_mb,
    perplexity,
    prefill_throughput,
)

__all__ = ["EvalResult", "complete", "count_params", "evaluate", "peak_rss_mb", "perplexity", "prefill_throughput"]
