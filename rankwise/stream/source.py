"""Where blocks come from: a model already in memory, or a checkpoint opened lazily block by block.

Both expose the same skeleton ``model`` (a Hugging Face module tree) with :meth:`load` / :meth:`release` per block.
For a checkpoint the skeleton is built on the ``meta`` device (no memory), buffers such as rotary frequencies are
computed for real, and each block's parameters are read from the safetensors shards only while it is worked on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from rankwise._errors import first_line
from rankwise.arch import auto_class, is_encoder_config, model_kind
from rankwise.calibrate.objective import POOLING_ATTR
from rankwise.io.checkpoint import (
    SAFETENSORS_DTYPES,
    SafeOpen,
    check_model_dir,
    checkpoint_dtype,
    load_config,
    parameter_groups,
    refuse_factored_without_manifest,
    weight_map,
)
from rankwise.io.integrity import Verification, checksums_available, content_identity
from rankwise.io.manifest import DTYPE_ALIASES, read_manifest
from rankwise.io.save import install_kinds, is_compressed_dir
from rankwise.io.sentence import read_pooling
from rankwise.nn.kinds import kind_class
from rankwise.stream.blocks import block_of, decoder_blocks

__all__ = ["DTYPES", "DTYPE_ALIASES", "CheckpointSource", "ModelSource", "compute_dtype", "dtype_name", "fast_bf16",
           "parse_dtype"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"
HALF = (torch.bfloat16, torch.float16)


def dtype_name(name: str | None) -> str | None:
    """The canonical name of ``name`` (``"bf16"`` -> ``"bfloat16"``); ``None`` and ``"auto"`` pass through."""
    if name is None or name == AUTO:
        return name
    canonical = DTYPE_ALIASES.get(name, name)
    if canonical not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join([AUTO, *DTYPES, *DTYPE_ALIASES])}, got {name!r}")
    return canonical


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"float32"``, ``"bfloat16"``, ``"float16"`` or an alias (``fp32``, ``bf16``, ``fp16``, ``half``), a torch
    dtype, or ``None``, as a torch dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    canonical = dtype_name(name)
    if canonical == AUTO:
        raise ValueError("dtype 'auto' depends on the device and the stored weights: resolve it with compute_dtype")
    return DTYPES[canonical]


def compute_dtype(name: str | torch.dtype | None, stored: torch.dtype, device: str | torch.device) -> torch.dtype:
    """The dtype a model stored in ``stored`` computes in on ``device``.

    ``None`` keeps ``stored``. ``"auto"`` keeps it too, except that half-precision weights compute in float32 on a
    CPU: most CPUs have no bfloat16/float16 matrix units, and there such matmuls run 30-90x slower than float32
    (measured on the development machine, benchmarks/RESULTS.md); the upcast is exact for the weights.
    """
    if name == AUTO:
        return torch.float32 if torch.device(device).type == "cpu" and stored in HALF else stored
    return parse_dtype(name) or stored


# torch's probes for the x86 instructions that multiply bfloat16 natively (AVX512-BF16 dot products, AMX tiles)
BF16_CPU_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def fast_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices faster than float32: a CUDA device with bfloat16, or a CPU with
    AVX512-BF16 or AMX (asked of torch's own CPU probes).

    Without them a CPU has no bfloat16 arithmetic: such products ran 30-90x slower than float32 on an earlier
    development machine. On a 2-core AMD EPYC with AVX512-BF16, a 1,024 x 576 x 1,536 bfloat16 product ran at
    790 GFLOP/s against 166 in float32 (``benchmarks/heal_bf16.py``, RESULTS.md, thirteenth session).
    """
    where = torch.device(device)
    if where.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if where.type != "cpu":
        return False
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in BF16_CPU_PROBES)


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

    A causal LM is built with ``AutoModelForCausalLM``, an encoder (:func:`rankwise.arch.is_encoder_config`, e.g. a
    sentence-transformers BERT) with ``AutoModel``; a sentence-transformers directory's pooling mode is kept on the
    config (``rankwise_pooling``) for the encoder's calibration loss.

    Args:
        path: the checkpoint directory.
        device: where blocks are materialised and run.
        dtype: parameter dtype (default: the checkpoint's own; ``"auto"``: see :func:`compute_dtype`).

        trust_remote_code: allow a checkpoint that ships its own model code (``auto_map``); refused otherwise.
        verify: check the files against the directory's ``SHA256SUMS`` (or its Hugging Face cache blob names) when
            it has them, before any block is read (:mod:`rankwise.io.integrity`).

    Every tensor is checked for NaN and Inf as it is read.

    Raises:
        ValueError: one line naming the file, for a missing or invalid config or manifest, a missing, truncated or
            unreadable shard, an index naming a missing file or tensor, or a checkpoint whose tensors do not match
            the architecture (missing, unexpected, or of another shape), a file that does not match its checksum,
            or a tensor holding NaN or Inf.
    """

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None, trust_remote_code: bool = False,
                 verify: bool = True) -> None:
        from accelerate import init_empty_weights

        self.path = Path(path)
        check_model_dir(self.path)
        self.verify = verify
        self.verification: Verification | None = None
        self._identity: str | None = None
        if verify and checksums_available(self.path):  # one read: the check, and the identity a cache may ask for
            self._identity, self.verification = content_identity(self.path)
        if not (self.path / "config.json").is_file():
            raise ValueError(f"{self.path}/config.json is missing: not a Hugging Face checkpoint directory")
        self.config = load_config(self.path, trust_remote_code)
        pooling = read_pooling(self.path) if is_encoder_config(self.config) else None
        if pooling is not None:  # a sentence-transformers encoder's pooling, for its calibration loss
            setattr(self.config, POOLING_ATTR, pooling)
        auto = auto_class(self.config)  # AutoModel for an encoder, AutoModelForCausalLM otherwise
        manifest = read_manifest(self.path) if is_compressed_dir(self.path) else None
        self.weight_map = weight_map(self.path)
        if manifest is None:
            refuse_factored_without_manifest(self.path, self.weight_map)
        with init_empty_weights(include_buffers=False):
            try:
                self.model = auto.from_config(self.config, trust_remote_code=trust_remote_code)
            except (ValueError, TypeError, RuntimeError, KeyError, AttributeError) as err:
                raise ValueError(f"{self.path / 'config.json'} does not describe a buildable "
                                 f"{model_kind(self.config)} ({type(err).__name__}: {first_line(err)})") from None
            if manifest is not None and type(self.model).__name__ != manifest.model_class:
                raise ValueError(f"{manifest.file}: model_class is {manifest.model_class!r} but config.json "
                                 f"describes a {type(self.model).__name__}")
            if manifest is not None:  # a rankwise directory: its factorised layers, on meta too
                shared = [n for n, spec in manifest.modules.items() if kind_class(spec.kind).shares_tensors]
                if shared:
                    raise ValueError(f"{manifest.modules_file}: {shared[0]} and {len(shared) - 1} other layers share "
                                     f"tensors across blocks (layer kind {manifest.modules[shared[0]].kind}), and "
                                     "streaming holds one block at a time; load the model whole instead (without "
                                     "--stream)")
                narrow = [n for n, spec in manifest.modules.items() if not kind_class(spec.kind).streamable]
                if narrow:
                    raise ValueError(f"{manifest.modules_file}: {narrow[0]} and {len(narrow) - 1} other layers are "
                                     f"{manifest.modules[narrow[0]].kind} layers, which the streamed reader cannot "
                                     "load (their positions are integer buffers); load the model whole instead "
                                     "(without --stream)")
                with torch.device("meta"):
                    install_kinds(self.model, manifest)
        self.model.tie_weights()
        self.model.eval()
        self.device = torch.device(device)
        self.weights_dtype = manifest.dtype if manifest is not None else checkpoint_dtype(self.path, self.weight_map)
        self.dtype = compute_dtype(dtype, self.weights_dtype, self.device)  # what the blocks compute in
        # A rankwise directory's tensors must be stored in its manifest's dtype (a retyped tensor is damage, not a
        # conversion request); plain checkpoints are converted to ``dtype`` as asked.
        self.stored_dtype = manifest.dtype if manifest is not None else None
        self.blocks_name, self.blocks = decoder_blocks(self.model)
        self.keys = self._match_keys()

    @property
    def input_device(self) -> torch.device:
        return self.device

    def content_identity(self) -> str:
        """SHA-256 over the full bytes of the checkpoint's config, manifest and weights (read once per source)."""
        if self._identity is None:
            self._identity, verification = content_identity(self.path, verify=self.verify)
            self.verification = self.verification or verification
        return self._identity

    def _stored_name(self, name: str, prefix: str) -> str | None:
        if name in self.weight_map:
            return name
        if name.startswith(prefix) and name[len(prefix):] in self.weight_map:
            return name[len(prefix):]
        return None

    def _match_keys(self) -> dict[str, str]:
        """Model parameter name -> checkpoint tensor name. Parameters that share one tensor (tied embeddings) need
        only one of their names stored; every other parameter must be there."""
        prefix = f"{getattr(self.model, 'base_model_prefix', '')}."
        keys, missing = {}, []
        for names in parameter_groups(self.model):
            stored = [self._stored_name(n, prefix) for n in names]
            found = next((k for k in stored if k is not None), None)
            if found is None:
                missing.append(names[0])
                continue
            for name, key in zip(names, stored, strict=True):
                keys[name] = key if key is not None else found
        if missing:
            raise ValueError(f"{self.path} lacks {len(missing)} tensors the {type(self.model).__name__} architecture "
                             f"needs, e.g. {missing[0]!r}")
        unexpected = [n for n in sorted(set(self.weight_map) - set(keys.values())) if not _ignorable(self.model, n)]
        if unexpected:
            raise ValueError(f"{self.path} holds {len(unexpected)} tensors the {type(self.model).__name__} "
                             f"architecture does not have, e.g. {unexpected[0]!r} in {self.weight_map[unexpected[0]]}")
        return keys

    def _names(self, i: int | None) -> list[str]:
        """Parameter names of block ``i`` (``None``: everything outside the blocks)."""
        return [n for n in self.keys if block_of(n, self.blocks_name) == i]

    def _read(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[self.keys[name]], []).append(name)
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for file, group in by_file.items():
            with SafeOpen(self.path / file, self.device) as f:
                for name in group:
                    info = f.get_slice(self.keys[name])
                    shape = tuple(info.get_shape())
                    if shape != tuple(params[name].shape):
                        raise ValueError(f"tensor {self.keys[name]!r} in {self.path / file} has shape {shape}, the "
                                         f"architecture needs {tuple(params[name].shape)}")
                    stored = SAFETENSORS_DTYPES.get(info.get_dtype())
                    if stored is None or (params[name].is_floating_point() and not stored.is_floating_point):
                        raise ValueError(f"tensor {self.keys[name]!r} in {self.path / file} is stored as "
                                         f"{info.get_dtype()}, not a floating-point type")
                    if self.stored_dtype is not None and stored != self.stored_dtype:
                        raise ValueError(f"tensor {self.keys[name]!r} in {self.path / file} is {info.get_dtype()}, "
                                         f"its rankwise.json says {self.stored_dtype}")
                    tensor = f.get_tensor(self.keys[name])
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        bad = int((~torch.isfinite(tensor)).sum())
                        raise ValueError(f"tensor {self.keys[name]!r} in {self.path / file} holds {bad:,} NaN or Inf "
                                         f"values (of {tensor.numel():,}); the checkpoint is damaged")
                    yield name, tensor.to(self.dtype)

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
        first = {names[0] for names in parameter_groups(self.model)}  # a tied tensor is written once
        for name in self._names(None):
            if name in first:
                yield from self._read([name])

    @property
    def declared_dtype(self) -> torch.dtype | None:
        """The dtype ``config.json`` declares (the published weights' dtype), if it names one."""
        declared = getattr(self.config, "dtype", None)
        if isinstance(declared, str):
            declared = DTYPES.get(declared)
        return declared if isinstance(declared, torch.dtype) else None


def _to_meta(module: nn.Module, recurse: bool = True, memo: dict[int, nn.Parameter] | None = None) -> None:
    """Free ``module``'s parameters (shapes kept on ``meta``); parameters shared between modules stay shared."""
    memo = {} if memo is None else memo
    for mod in module.modules() if recurse else [module]:
        for leaf, p in list(mod._parameters.items()):
            if p is not None and p.device.type != "meta":
                if id(p) not in memo:
                    memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
                mod._parameters[leaf] = memo[id(p)]


def _ignorable(model: nn.Module, name: str) -> bool:
    """A checkpoint tensor the model has no parameter for, but may carry: a buffer, or a name the architecture
    declares ignorable (``_keys_to_ignore_on_load_unexpected``, e.g. stale rotary frequencies)."""
    import re

    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    buffers = {n for n, _ in model.named_buffers()}
    if name in buffers or prefix + name in buffers:
        return True
    return any(re.search(p, name) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
