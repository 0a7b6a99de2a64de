"""Measure models: perplexity on held-out text, parameters, decode and prefill speed, memory; compare methods."""

from rankwise.eval.generate import complete
from rankwise.eval.measure import (
    EvalResult,
    count_params,
    evaluate,
    peak_rss_mb,
    perplexity,
    prefill_throughput,
)
from rankwise.eval.nuclear import NuclearConfig, nuclear_score, nuclear_scores
from rankwise.eval.speed import SpeedResult, measure_speed

__all__ = [
    "EvalResult",
    "NuclearConfig",
    "SpeedResult",
    "complete",
    "count_params",
    "evaluate",
    "measure_speed",
    "nuclear_score",
    "nuclear_scores",
    "peak_rss_mb",
    "perplexity",
    "prefill_throughput",
]
