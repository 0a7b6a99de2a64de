"""Calibration and evaluation text: the default corpus, user files, ``datasets`` names, disjoint token windows."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from rankwise._errors import RankwiseWarning

DEFAULT_TEXT_NAME = "pydoc-topics"


def default_text() -> str:
    """The standard library's ``pydoc_data.topics`` (about 170k tokens of English), in a fixed key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def load_text(path: str | Path | None = None, *, dataset: str | None = None, dataset_config: str | None = None,
              split: str = "train", field: str = "text") -> str:
    """Text from a file, a Hugging Face ``datasets`` name (needs the network or a local cache), or the default.

    Raises:
        ValueError: both a path and a dataset were given, the file does not exist, or the text is empty.
    """
    if path is not None and dataset is not None:
        raise ValueError("give either a text file or a dataset name, not both")
    if dataset is not None:
        try:
            import datasets
        except ImportError as err:
            raise ValueError("--dataset needs the 'datasets' package: pip install 'rankwise[datasets]'") from err
        ds = datasets.load_dataset(dataset, dataset_config, split=split)
        if field not in ds.column_names:
            raise ValueError(f"dataset {dataset!r} has no field {field!r}; fields: {', '.join(ds.column_names)}")
        text = "\n\n".join(t for t in ds[field] if t)
    elif path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"text file {str(p)!r} does not exist")
        text = p.read_text(encoding="utf-8", errors="replace")
        _warn_if_garbled(text, p)
    else:
        text = default_text()
    if not text.strip():
        raise ValueError("the text is empty")
    return text


def _warn_if_garbled(text: str, path: Path) -> None:
    """Warn when more than 1 % of the characters could not be decoded as UTF-8 (another encoding, or binary)."""
    bad = text.count("\ufffd")
    if text and bad > 0.01 * len(text):
        warnings.warn(f"text file {str(path)!r} is not valid UTF-8: {bad:,} of {len(text):,} characters "
                      f"({100 * bad / len(text):.1f} %) could not be decoded and were replaced; convert it to UTF-8 "
                      "(it may be Latin-1/UTF-16 or not text at all)", RankwiseWarning, stacklevel=3)


def split_windows(token_ids: torch.Tensor, seq_len: int, calib_samples: int, eval_samples: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a 1-D token stream into disjoint calibration and evaluation windows.

    Calibration windows come from the start of the text and evaluation windows from the end, so the two never
    overlap: the model is never evaluated on text it was calibrated on.

    Returns:
        ``(calib, eval)`` of shapes ``(calib_samples, seq_len)`` and ``(eval_samples, seq_len)``.

    Raises:
        ValueError: the text is too short, with the number of tokens needed.
    """
    for name, value, minimum in (("seq_len", seq_len, 2), ("calib_samples", calib_samples, 0),
                                 ("eval_samples", eval_samples, 0)):
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    ids = token_ids.reshape(-1)
    need = (calib_samples + eval_samples) * seq_len
    if ids.numel() < need:
        raise ValueError(
            f"text too short: it has {ids.numel()} tokens but {calib_samples} calibration + {eval_samples} "
            f"evaluation windows of {seq_len} tokens need {need}"
        )
    calib = ids[: calib_samples * seq_len].reshape(calib_samples, seq_len)
    start = ids.numel() - eval_samples * seq_len
    evaluation = ids[start:].reshape(eval_samples, seq_len)
    return calib.clone(), evaluation.clone()
