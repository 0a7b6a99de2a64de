"""Reading checkpoint directories safely: configs without remote code, safetensors files and indexes whose
failures are one-line errors naming the file, and refusal of unfinished outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from rankwise._errors import first_line
from rankwise.io.atomic import is_unfinished

INDEX = "model.safetensors.index.json"
FACTOR_LEAVES = ("up", "down")
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}  # the parameters of a LowRankLinear (rankwise.nn)


def read_json(file: Path, what: str) -> Any:
    """Parse a JSON file; a one-line ``ValueError`` naming it otherwise."""
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{file} is missing") from None
    except OSError as err:
        raise ValueError(f"{file} cannot be read ({err.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        detail = f"{err.msg}, line {err.lineno}" if isinstance(err, json.JSONDecodeError) else "not UTF-8"
        raise ValueError(f"{file} is not a valid {what} ({detail})") from None


def check_model_dir(path: Path) -> None:
    """Refuse a directory that is not there, or the temporary or superseded output of a rankwise run."""
    if not path.is_dir():
        raise ValueError(f"model directory {str(path)!r} does not exist")
    if is_unfinished(path):
        raise ValueError(f"{path} is the unfinished output of an interrupted rankwise run, not a model; "
                         "delete it or run again")


def refuse_remote_code(path: Path, trust_remote_code: bool) -> dict[str, Any]:
    """The parsed ``config.json``; a model whose config maps its classes to Python files of its own
    (``auto_map``) is refused unless ``trust_remote_code``: rankwise never runs a checkpoint's code by default."""
    config = read_json(path / "config.json", "config.json")
    if not isinstance(config, dict):
        raise ValueError(f"{path / 'config.json'} must hold a JSON object")
    if "auto_map" in config and not trust_remote_code:
        raise ValueError(f"{path} ships its own model code (auto_map in config.json); rankwise does not run it "
                         "unless you pass --trust-remote-code (trust_remote_code=True) after reading that code")
    return config


def load_config(path: Path, trust_remote_code: bool = False) -> Any:
    """``AutoConfig`` of a local directory, never running its code unless ``trust_remote_code``."""
    from transformers import AutoConfig

    refuse_remote_code(path, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers and huggingface_hub raise many types for a bad config
        raise ValueError(f"{path / 'config.json'} is not a usable model config ({first_line(err)})") from None


class SafeOpen:
    """``safe_open`` whose failures become one-line errors naming the file."""

    def __init__(self, path: Path, device: torch.device | str = "cpu") -> None:
        self.path, self.device = path, torch.device(device)

    def __enter__(self):
        if not self.path.is_file():
            raise ValueError(f"checkpoint file {self.path} is missing")
        try:
            self._f = safe_open(str(self.path), framework="pt", device=str(self.device))
            return self._f.__enter__()
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise ValueError(f"checkpoint file {self.path} is truncated or not a safetensors file "
                             f"({first_line(err)})") from None

    def __exit__(self, *exc: object) -> None:
        self._f.__exit__(*exc)


def check_length(path: Path) -> None:
    """A safetensors file must be exactly as long as its header says (catches truncated downloads and copies)."""
    try:
        with path.open("rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise ValueError(f"checkpoint file {path} is truncated or not a safetensors file (unreadable header)"
                         ) from None
    if path.stat().st_size != 8 + header_len + end:
        raise ValueError(f"checkpoint file {path} is truncated or padded: {path.stat().st_size:,} bytes, its header "
                         f"says {8 + header_len + end:,}")


def weight_map(path: Path) -> dict[str, str]:
    """Tensor name -> shard file, checking that every named file exists, is whole, and holds what the index says."""
    index = path / INDEX
    if index.is_file():
        raw = read_json(index, "safetensors index")
        wmap = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(wmap, dict) or not wmap or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
            raise ValueError(f"{index} is not a valid safetensors index (needs a weight_map of tensor -> file)")
        bad = [v for v in wmap.values() if Path(v).name != v or not v.endswith(".safetensors")]
        if bad:
            raise ValueError(f"{index} names {bad[0]!r}: shard files must be plain *.safetensors names in {path}")
    elif (path / "model.safetensors").is_file():
        wmap = None
    else:
        raise ValueError(f"{path} has no model.safetensors or {INDEX}; rankwise reads safetensors checkpoints")
    files = sorted(set(wmap.values())) if wmap else ["model.safetensors"]
    found: dict[str, str] = {}
    for file in files:
        fpath = path / file
        if not fpath.is_file():
            raise ValueError(f"checkpoint file {fpath} is missing" + (f" (named in {INDEX})" if wmap else ""))
        with SafeOpen(fpath) as f:
            names = list(f.keys())
        check_length(fpath)
        twice = [n for n in names if n in found]
        if twice:
            raise ValueError(f"tensor {twice[0]!r} is stored in both {found[twice[0]]} and {file} in {path}")
        found.update(dict.fromkeys(names, file))
    if wmap:
        absent = [k for k, file in wmap.items() if found.get(k) != file]
        if absent:
            raise ValueError(f"{index} names tensor {absent[0]!r} in {wmap[absent[0]]}, which does not hold it")
        unlisted = sorted(set(found) - set(wmap))
        if unlisted:
            raise ValueError(f"{found[unlisted[0]]} holds tensor {unlisted[0]!r}, which {index} does not list")
        return wmap
    return found


def parameter_groups(model: Any) -> list[list[str]]:
    """The model's parameter names grouped by tensor: tied parameters (e.g. embeddings shared with the output head)
    form one group, of which a checkpoint stores one name."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return list(groups.values())


def refuse_factored_without_manifest(path: Path, names: list[str] | dict[str, str]) -> None:
    """Factorised tensors (``*.up`` / ``*.down``) need ``rankwise.json`` to be loaded; refuse them without it."""
    factored = sorted(n for n in names if n.rpartition(".")[2] in FACTOR_LEAVES)
    if factored:
        raise ValueError(f"{path} holds factorised tensors (e.g. {factored[0]!r}) but no rankwise.json (nor a "
                         "rankwise quantization_config in config.json); "
                         "restore the manifest written with them, or re-export the model")


def checkpoint_dtype(path: Path, wmap: dict[str, str]) -> torch.dtype:
    """The floating dtype most of the checkpoint's tensors are stored in."""
    name, file = next(iter(wmap.items()))
    with SafeOpen(path / file) as f:
        dtype = f.get_slice(name).get_dtype()
    found = SAFETENSORS_DTYPES.get(dtype)
    return found if found is not None and found.is_floating_point else torch.float32
