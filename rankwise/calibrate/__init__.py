"""Run a model on text and collect per-layer statistics for calibration-aware compression."""

from rankwise.calibrate.select import SELECTIONS, SelectConfig, Selection, select_windows
from rankwise.calibrate.stats import LayerStats, collect_stats
from rankwise.calibrate.text import DEFAULT_TEXT_NAME, default_text, load_text, split_windows

__all__ = [
    "DEFAULT_TEXT_NAME",
    "SELECTIONS",
    "LayerStats",
    "SelectConfig",
    "Selection",
    "collect_stats",
    "default_text",
    "load_text",
    "select_windows",
    "split_windows",
]
