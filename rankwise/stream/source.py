"""Where blocks come from: a model already in memory, or a checkpoint opened lazily block by block.

Both expose the same skeleton ``model`` (a Hugging Face module tree) with :meth:`load` / :meth:`release` per block.
For a checkpoint the skeleton is built on the ``meta`` device (no memory), buffers such as rotary frequencies are
computed for real, and each block's parameters are read from the safetensors shards only while it is worked on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from rankwise.io.save import install_lowrank, is_compressed_dir, read_manifest
from rankwise.stream.blocks import block_of, decoder_blocks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INDEX = "model.safetensors.index.json"


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"float32"``, ``"bfloat16"``, ``"float16"`` (or a torch dtype, or ``None``) as a torch dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


class ModelSource:
    """Blocks of an in-memory model; with ``device`` set, each block visits that device while it is worked on."""

    def __init__(self, model: nn.Module, device: str | torch.device | None = None) -> None:
        self.model = model
        self.blocks_name, self.blocks = decoder_blocks(model)
        self.home = next(model.parameters()).device
        self.device = torch.device(device) if device is not None else self.home
        self.dtype = next(model.parameters()).dtype

    @property
    def input_device(self) -> torch.device:
        return self.home

    def load(self, i: int) -> nn.Module:
        return self.blocks[i].to(self.device)

    def release(self, i: int) -> None:
        if self.device != self.home:
            self.blocks[i].to(self.home)

    def load_rest(self) -> None:
        """Everything outside the blocks is already in memory."""

    def release_rest(self) -> None:
        """Nothing to free: the model stays the caller's."""


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


class CheckpointSource:
    """Blocks of a Hugging Face checkpoint directory (``model.safetensors`` or sharded with an index), read lazily.

    Args:
        path: the checkpoint directory.
        device: where blocks are materialised and run.
        dtype: parameter dtype (default: the checkpoint's own).

    Raises:
        ValueError: one line naming the file, for a missing config, a missing, truncated or unreadable shard, an index
            naming a missing file or tensor, or a checkpoint lacking tensors the architecture needs.
    """

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ValueError(f"{self.path}/config.json is missing: not a Hugging Face checkpoint directory")
        self.weight_map = _weight_map(self.path)
        self.config = AutoConfig.from_pretrained(self.path, trust_remote_code=False)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(self.config, trust_remote_code=False)
            if is_compressed_dir(self.path):  # a rankwise directory: its factorised layers, on meta too
                with torch.device("meta"):
                    install_lowrank(self.model, read_manifest(self.path))
        self.model.tie_weights()
        self.model.eval()
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype) or _checkpoint_dtype(self.path, self.weight_map)
        self.blocks_name, self.blocks = decoder_blocks(self.model)
        self.keys = self._match_keys()

    @property
    def input_device(self) -> torch.device:
        return self.device

    def _match_keys(self) -> dict[str, str]:
        """Model parameter name -> checkpoint tensor name; tied parameters may be absent."""
        prefix = f"{getattr(self.model, 'base_model_prefix', '')}."
        tied = _tied_names(self.model)
        keys, missing = {}, []
        for name, _ in self.model.named_parameters(remove_duplicate=False):
            if name in self.weight_map:
                keys[name] = name
            elif name.startswith(prefix) and name[len(prefix):] in self.weight_map:
                keys[name] = name[len(prefix):]
            elif name not in tied:
                missing.append(name)
        if missing:
            raise ValueError(f"{self.path} lacks {len(missing)} tensors the {type(self.model).__name__} architecture "
                             f"needs, e.g. {missing[0]!r}")
        return keys

    def _names(self, i: int | None) -> list[str]:
        """Parameter names of block ``i`` (``None``: everything outside the blocks)."""
        return [n for n in self.keys if block_of(n, self.blocks_name) == i]

    def _read(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[self.keys[name]], []).append(name)
        for file, group in by_file.items():
            with _SafeOpen(self.path / file, self.device) as f:
                for name in group:
                    yield name, f.get_tensor(self.keys[name]).to(self.dtype)

    def load(self, i: int) -> nn.Module:
        for name, tensor in self._read(self._names(i)):
            _set_tensor(self.model, name, tensor)
        return self.blocks[i]

    def release(self, i: int) -> None:
        _to_meta(self.blocks[i])

    def load_rest(self) -> None:
        for name, tensor in self._read(self._names(None)):
            _set_tensor(self.model, name, tensor)
        self.model.tie_weights()

    def release_rest(self) -> None:
        memo: dict[int, nn.Parameter] = {}
        for name, module in self.model.named_modules():
            if block_of(name, self.blocks_name) is None:
                _to_meta(module, recurse=False, memo=memo)

    def rest_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors outside the blocks as stored in the checkpoint, one at a time (for writing the output)."""
        for name in self._names(None):
            yield from self._read([name])


def _to_meta(module: nn.Module, recurse: bool = True, memo: dict[int, nn.Parameter] | None = None) -> None:
    """Free ``module``'s parameters (shapes kept on ``meta``); parameters shared between modules stay shared."""
    memo = {} if memo is None else memo
    for mod in module.modules() if recurse else [module]:
        for leaf, p in list(mod._parameters.items()):
            if p is not None and p.device.type != "meta":
                if id(p) not in memo:
                    memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
                mod._parameters[leaf] = memo[id(p)]


def _tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that share storage with an earlier one (only the first is stored)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.setdefault(id(p), name)
    if getattr(model.config, "tie_word_embeddings", False):
        out = model.get_output_embeddings()
        if out is not None:
            tied |= {n for n, p in model.named_parameters(remove_duplicate=False) if p is out.weight}
    return tied


class _SafeOpen:
    """``safe_open`` whose failures become one-line errors naming the file."""

    def __init__(self, path: Path, device: torch.device) -> None:
        self.path, self.device = path, device

    def __enter__(self):
        if not self.path.is_file():
            raise ValueError(f"checkpoint file {self.path} is missing")
        try:
            self._f = safe_open(str(self.path), framework="pt", device=str(self.device))
            return self._f.__enter__()
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise ValueError(f"checkpoint file {self.path} is truncated or not a safetensors file "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None

    def __exit__(self, *exc: object) -> None:
        self._f.__exit__(*exc)


def _weight_map(path: Path) -> dict[str, str]:
    """Tensor name -> shard file, checking that every named file exists and holds what the index says."""
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a valid safetensors index ({err})") from None
    elif (path / "model.safetensors").is_file():
        weight_map = None
    else:
        raise ValueError(f"{path} has no model.safetensors or {INDEX}; rankwise streams safetensors checkpoints")
    files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
    found: dict[str, str] = {}
    for file in files:
        fpath = path / file
        if not fpath.is_file():
            raise ValueError(f"checkpoint file {fpath} is missing" + (f" (named in {INDEX})" if weight_map else ""))
        with _SafeOpen(fpath, torch.device("cpu")) as f:
            names = list(f.keys())
        _check_length(fpath)
        found.update(dict.fromkeys(names, file))
    if weight_map:
        absent = [k for k, file in weight_map.items() if found.get(k) != file]
        if absent:
            raise ValueError(f"{index} names tensor {absent[0]!r} in {weight_map[absent[0]]}, which does not hold it")
        return weight_map
    return found


def _check_length(path: Path) -> None:
    """A safetensors file must be exactly as long as its header says (catches truncated downloads and copies)."""
    with path.open("rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size < 8 + header_len + end:
        raise ValueError(f"checkpoint file {path} is truncated: {path.stat().st_size:,} bytes, its header needs "
                         f"{8 + header_len + end:,}")


def _checkpoint_dtype(path: Path, weight_map: dict[str, str]) -> torch.dtype:
    """The floating dtype most of the checkpoint's tensors are stored in."""
    name, file = next(iter(weight_map.items()))
    with _SafeOpen(path / file, torch.device("cpu")) as f:
        dtype = f.get_slice(name).get_dtype()
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(dtype, torch.float32)
