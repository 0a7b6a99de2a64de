"""Calibration and evaluation text: the default corpus, user files, ``datasets`` names, disjoint token windows."""

from __future__ import annotations

import ast
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from rankwise._errors import RankwiseWarning, first_line

DEFAULT_TEXT_NAME = "pydoc-topics"


def default_text() -> str:
    """The standard library's ``pydoc_data.topics`` (about 170k tokens of English), in a fixed key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@dataclass(frozen=True)
class DatasetSpec:
    """Which Hugging Face ``datasets`` text to read: ``datasets.load_dataset(name, config, split=split)``."""

    name: str  # a hub name (``wikitext``) or a local directory of data files
    config: str | None = None  # the dataset's configuration (``wikitext-2-raw-v1``); None: its only one
    split: str = "train"  # the split to read (``train``, ``validation``, ``test`` ...)


DATASET_FORMS = "NAME, NAME:CONFIG or NAME:CONFIG:SPLIT (e.g. wikitext:wikitext-2-raw-v1:test)"


def parse_dataset_spec(spec: str, *, config: str | None = None, split: str | None = None) -> DatasetSpec:
    """``NAME[:CONFIG[:SPLIT]]`` as a :class:`DatasetSpec` (no config and the ``train`` split when not named).

    ``config`` and ``split`` name them separately instead; naming one both ways is allowed when the two agree. A
    name cannot contain ``:`` (no hub name does; a local directory's path must not). Everything after the second
    ``:`` is the split.

    Raises:
        ValueError: an empty part (``name::``), or a config or split named twice, differently.
    """
    parts = spec.split(":", 2)
    if any(not part.strip() for part in parts):
        raise ValueError(f"dataset {spec!r} has an empty part; give {DATASET_FORMS}")
    name, named_config, named_split = [*parts, None, None][:3]
    for what, in_spec, given in (("config", named_config, config), ("split", named_split, split)):
        if in_spec is not None and given is not None and in_spec != given:
            raise ValueError(f"dataset {spec!r} names the {what} {in_spec!r}, and the {what} argument {given!r} "
                             "disagrees; name it once")
    return DatasetSpec(name, named_config or config, named_split or split or "train")


def load_text(path: str | Path | None = None, *, dataset: str | None = None, dataset_config: str | None = None,
              split: str | None = None, field: str = "text") -> str:
    """Text from a file, a Hugging Face ``datasets`` text (needs the network or a local cache), or the default.

    Args:
        path: a UTF-8 text file.
        dataset: ``NAME[:CONFIG[:SPLIT]]`` (see :func:`parse_dataset_spec`): a hub name or a local directory.
        dataset_config: the dataset's config, instead of naming it in ``dataset``.
        split: the split, instead of naming it in ``dataset`` (default ``train``).
        field: the dataset's column holding the text; its rows are joined by blank lines.

    Raises:
        ValueError: both a path and a dataset were given, the file does not exist, the text is empty, the
            ``datasets`` package is missing, or the dataset has no such config, split or field (the message lists
            those it has).
    """
    if path is not None and dataset is not None:
        raise ValueError("give either a text file or a dataset name, not both")
    if dataset is not None:
        text = _dataset_text(parse_dataset_spec(dataset, config=dataset_config, split=split), field)
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


# datasets' own messages for a config or split it does not have (datasets/builder.py, datasets/arrow_reader.py)
_NO_CONFIG = re.compile(r"BuilderConfig '(?P<asked>.*)' not found\. Available: (?P<known>\[.*\])")
_NO_SPLIT = re.compile(r'Unknown split "(?P<asked>.*)"\. Should be one of (?P<known>\[.*\])')
_CONFIG_MISSING = re.compile(r"Config name is missing.*available configs: (?P<known>\[.*?\])", re.DOTALL)


def _dataset_text(spec: DatasetSpec, field: str) -> str:
    """The rows of ``field`` in ``spec``'s dataset, joined by blank lines; datasets' errors for a config or split
    it does not have reworded as one line listing those it has."""
    try:
        import datasets
    except ImportError as err:
        raise ValueError("--dataset needs the 'datasets' package: pip install 'rankwise[datasets]'") from err
    try:
        ds = datasets.load_dataset(spec.name, spec.config, split=spec.split)
    except ValueError as err:
        message = str(err)
        if match := _NO_CONFIG.search(message):
            raise ValueError(f"dataset {spec.name!r} has no config {match['asked']!r}; configs: "
                             f"{_listed(match['known'])}") from err
        if match := _CONFIG_MISSING.search(message):
            raise ValueError(f"dataset {spec.name!r} has several configs, name one as NAME:CONFIG; configs: "
                             f"{_listed(match['known'])}") from err
        if match := _NO_SPLIT.search(message):
            raise ValueError(f"dataset {spec.name!r} has no split {match['asked']!r}; splits: "
                             f"{_listed(match['known'])}") from err
        raise ValueError(f"dataset {spec.name!r}: {first_line(err)}") from err
    if field not in ds.column_names:
        raise ValueError(f"dataset {spec.name!r} has no field {field!r}; fields: {', '.join(ds.column_names)}")
    return "\n\n".join(t for t in ds[field] if t)


def _listed(known: str) -> str:
    """``"['a', 'b']"`` (a list as datasets prints it) as ``"a, b"``."""
    try:
        names = ast.literal_eval(known)
    except (ValueError, SyntaxError):
        return known
    return ", ".join(map(str, names))


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
