"""Run a model on text and collect per-layer statistics for calibration-aware compression."""

from rankwise.calibrate.stats import LayerStats, collect_stats
from rankwise.calibrate.text import DEFAULT_TEXT_NAME, default_text, load_text, split_windows

__all__ = ["DEFAULT_TEXT_NAME", "LayerStats", "collect_stats", "default_text", "load_text", "split_windows"]
