"""The sentence-transformers layout around a Hugging Face encoder: where the model is, its pooling, its length.

A sentence-transformers directory holds ``modules.json`` (the pipeline: a ``Transformer`` module whose ``path`` is
the Hugging Face model, ``""`` for the directory itself, then ``Pooling`` in ``1_Pooling`` and often ``Normalize``),
``sentence_bert_config.json`` (``max_seq_length``) and each module's folder. rankwise compresses the Hugging Face
model and keeps the rest: :func:`copy_sentence_files` puts it beside a compressed model, so the output is a
sentence-transformers model again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

__all__ = ["copy_sentence_files", "max_seq_length", "read_pooling", "sentence_root", "transformer_dir"]

_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
_FLAGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
          "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not readable JSON ({type(err).__name__}: {err})") from None


def _modules(root: Path) -> list[dict[str, Any]]:
    modules = _read_json(root / "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ValueError(f"{root / 'modules.json'} must be a list of modules")
    return modules


def sentence_root(path: str | Path) -> Path | None:
    """The sentence-transformers directory ``path`` is, or whose Transformer module's folder ``path`` is; ``None``
    for any other directory."""
    path = Path(path)
    if (path / "modules.json").is_file():
        return path
    parent = path.parent
    if (parent / "modules.json").is_file() and transformer_dir(parent).resolve() == path.resolve():
        return parent
    return None


def transformer_dir(path: str | Path) -> Path:
    """The Hugging Face model inside a sentence-transformers directory (its ``Transformer`` module's folder), or
    ``path`` itself for any other directory."""
    path = Path(path)
    if not (path / "modules.json").is_file() or (path / "config.json").is_file():
        return path
    for module in _modules(path):
        if str(module.get("type", "")).endswith(".Transformer"):
            return path / str(module.get("path", ""))
    return path


def read_pooling(path: str | Path) -> str | None:
    """The pooling mode (``mean``, ``cls``, ``max``, ``mean_sqrt_len``) of the sentence-transformers model at or
    around ``path``, or ``None`` without a pooling configuration.

    Raises:
        ValueError: the configuration is unreadable, or combines several modes (sentence-transformers would
            concatenate them; rankwise evaluates one).
    """
    root = sentence_root(path)
    if root is None:
        return None
    folders = [str(m.get("path", "")) for m in _modules(root) if str(m.get("type", "")).endswith(".Pooling")]
    file = root / (folders[0] if folders else "1_Pooling") / "config.json"
    if not file.is_file():
        return None
    config = _read_json(file)
    modes = [mode for flag, mode in _FLAGS.items() if isinstance(config, dict) and config.get(flag)]
    if len(modes) != 1:
        raise ValueError(f"{file}: rankwise needs exactly one pooling mode among {', '.join(_FLAGS)}, got "
                         f"{', '.join(modes) or 'none'}")
    return modes[0]


def max_seq_length(path: str | Path) -> int | None:
    """``max_seq_length`` from ``sentence_bert_config.json`` at or around ``path`` (``None`` when absent)."""
    root = sentence_root(path)
    if root is None or not (root / "sentence_bert_config.json").is_file():
        return None
    value = _read_json(root / "sentence_bert_config.json")
    length = value.get("max_seq_length") if isinstance(value, dict) else None
    return length if isinstance(length, int) and length > 0 else None


def copy_sentence_files(source: str | Path, out: str | Path) -> list[str]:
    """Copy the sentence-transformers files around the model at ``source`` (``modules.json``, its configs and every
    module folder but the Transformer's) into ``out``; returns what was copied (empty for a plain model). The
    Transformer module is pointed at ``out`` itself, where the compressed Hugging Face model is."""
    root = sentence_root(source)
    if root is None:
        return []
    out = Path(out)
    copied = []
    for name in _FILES:
        if (root / name).is_file() and name != "modules.json":
            shutil.copy2(root / name, out / name)
            copied.append(name)
    modules = _modules(root)
    for module in modules:
        folder = str(module.get("path", ""))
        if str(module.get("type", "")).endswith(".Transformer"):
            module["path"] = ""
        elif folder and (root / folder).is_dir():
            shutil.copytree(root / folder, out / folder, dirs_exist_ok=True)
            copied.append(folder)
    (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    return ["modules.json", *copied]
