"""rankwise: low-rank and structured matrix approximation that makes neural networks cheaper.

The top-level names are imported lazily so that ``import rankwise.linalg`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from rankwise._errors import RankwiseWarning
from rankwise._hf_hook import install as _install_hf_format

_install_hf_format()  # transformers loads compressed directories once rankwise is imported

__version__ = "0.1.0"

_LAZY = {
    "compress": "rankwise.api",
    "Compressed": "rankwise.api",
    "compress_": "rankwise.compression",
    "CompressionReport": "rankwise.report",
    "load": "rankwise.io.models",  # = load_model: model, tokenizer and source, for any model rankwise reads
    "save": "rankwise.io",
    "load_model": "rankwise.io",
    "collect_stats": "rankwise.calibrate",
    "evaluate": "rankwise.eval",
    "config_class": "rankwise.methods",
    "method_names": "rankwise.methods",
    "SVDConfig": "rankwise.methods.svd",
    "FWSVDConfig": "rankwise.methods.fwsvd",
    "ASVDConfig": "rankwise.methods.asvd",
    "SVDLLMConfig": "rankwise.methods.svd_llm",
}

__all__ = ["RankwiseWarning", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rankwise' has no attribute {name!r}")
