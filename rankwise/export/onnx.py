"""Export a causal LM (dense or with :class:`~rankwise.nn.LowRankLinear` layers) to ONNX with a KV cache.

The graph is one decoder step, usable for the prompt and for every generated token:

* inputs ``input_ids`` ``(batch, seq)``, ``attention_mask`` ``(batch, past + seq)``, ``position_ids``
  ``(batch, seq)`` and, per layer ``i``, ``past_key_values.{i}.key`` / ``.value`` ``(batch, kv_heads, past, head_dim)``
  (``past`` may be 0 for the prompt);
* outputs ``logits`` ``(batch, seq, vocab)`` and ``present.{i}.key`` / ``.value`` ``(batch, kv_heads, past + seq,
  head_dim)``.

These are the names optimum's ``ORTModelForCausalLM`` uses. The graph is traced by ``torch.onnx.export`` (the
``torch.export`` path), not by optimum: optimum-onnx 0.1 pins ``transformers<4.58``. A factorised layer stays two
matmuls, ``x @ down.T @ up.T``: its initializers are ``<module>.down`` ``(r, in)`` and ``<module>.up`` ``(out, r)``,
never their product, so the file shrinks with the compression (the graph is saved unoptimised so that no pass
multiplies out or renames the factors; onnxruntime folds the transposes when it loads the model).

The output directory holds ``model.onnx`` (plus ``model.onnx.data`` for weights over 1.5 GiB), the Hugging Face
``config.json``, the tokenizer when given, and ``rankwise_onnx.json`` describing the inputs and outputs.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.io.atomic import atomic_dir

ONNX_FILE = "model.onnx"
ONNX_MANIFEST = "rankwise_onnx.json"
FORMAT_VERSION = 1
# Architectures whose cache is one (key, value) pair of (batch, kv_heads, length, head_dim) per layer and whose
# export is checked in tests/test_onnx_export.py (logits and greedy generation against torch).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2", "opt")
EXTERNAL_DATA_BYTES = 1536 * 2**20  # protobuf files stop at 2 GiB: weights above this go to model.onnx.data
_PAST_EXAMPLE = 3  # past length of the example inputs (any length >= 2 works; 0 and 1 are specialised by tracing)


@dataclass(frozen=True)
class OnnxLayout:
    """What a runtime needs to feed the exported graph.

    Attributes:
        model_type: the Hugging Face ``model_type`` of the exported model.
        num_layers: decoder layers, one ``(key, value)`` pair of cache tensors each.
        kv_heads: key/value heads per layer (the cache's dimension 1).
        head_dim: per-head width (the cache's dimension 3) of the first layer.
        dtype: the floating dtype of the weights, logits and cache (``"float32"``...).
        inputs: graph input names, in order.
        outputs: graph output names, in order.
        files: the files holding the graph and its weights.
        head_dims: per-layer head widths where layers differ (a MoDeGPT-narrowed model), else empty.
    """

    model_type: str
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    files: tuple[str, ...]
    head_dims: tuple[int, ...] = ()

    def layer_head_dim(self, layer: int) -> int:
        """The cache width of decoder layer ``layer``."""
        return self.head_dims[layer] if self.head_dims else self.head_dim

    @property
    def past_names(self) -> tuple[str, ...]:
        return self.inputs[3:]

    @classmethod
    def read(cls, directory: str | Path) -> OnnxLayout:
        """Read ``rankwise_onnx.json`` from an export directory.

        Raises:
            ValueError: the directory is not a rankwise ONNX export.
        """
        path = Path(directory) / ONNX_MANIFEST
        if not path.is_file():
            raise ValueError(f"{str(directory)!r} is not a rankwise ONNX export (no {ONNX_MANIFEST}); "
                             "write one with rankwise export --format onnx")
        data = json.loads(path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}")
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data or k != "head_dims"}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


@dataclass(frozen=True)
class OnnxExport:
    """The result of :func:`export_onnx`.

    Attributes:
        directory: the output directory.
        layout: inputs, outputs and cache shape of the graph.
        nbytes: bytes of the ONNX files (graph and weights).
        weight_bytes: bytes of the graph's initializers (the weights as stored).
        dense_weight_bytes: what ``weight_bytes`` would be with every factorised layer multiplied out.
    """

    directory: Path
    layout: OnnxLayout
    nbytes: int
    weight_bytes: int
    dense_weight_bytes: int


def factorised_savings(model: nn.Module) -> int:
    """Parameters saved by factorised layers (those with a ``dense_weight()``): dense ``in * out`` minus stored."""
    saved = 0
    for module in model.modules():
        if callable(getattr(module, "dense_weight", None)):
            stored = sum(p.numel() for name, p in module.named_parameters(recurse=False) if name != "bias")
            saved += module.in_features * module.out_features - stored
    return saved


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Silence a logger below ERROR for the block (the exporter logs a line per optional op library missing)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_exportable(model: nn.Module) -> None:
    """Refuse a model the ONNX export does not support, before anything is written.

    Raises:
        ValueError: one line naming the model and the supported architectures.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    if config is None or getattr(config, "is_encoder_decoder", False) or not hasattr(model, "generate"):
        raise ValueError(f"ONNX export supports decoder-only causal LMs ({supported}), got {type(model).__name__}")
    check_model_type(model_type, type(model).__name__)


def check_model_type(model_type: str | None, what: str = "the model") -> None:
    """Refuse a ``model_type`` outside :data:`SUPPORTED_MODEL_TYPES`, in one line listing them."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"ONNX export supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; {what} has "
                         f"model_type {model_type!r}")


class _DecoderStep(nn.Module):
    """One decoder step with the cache as flat tensors: ``(ids, mask, positions, *past) -> (logits, *present)``."""

    def __init__(self, model: nn.Module, num_layers: int) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.cache_arg = cache_argument(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        cache = DynamicCache(pairs, config=self.model.config) if pairs else None
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_arg: cache})
        return (out.logits, *flat_cache(out.past_key_values))


def cache_argument(model: nn.Module) -> str:
    """The name of ``model.forward``'s cache argument: ``cache`` in transformers 5, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def flat_cache(cache: Any) -> list[torch.Tensor]:
    """``[key_0, value_0, key_1, value_1, ...]`` of a transformers cache (layered or legacy)."""
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    legacy = cache.to_legacy_cache() if hasattr(cache, "to_legacy_cache") else cache
    return [t for key, value in legacy for t in (key, value)]


def io_names(num_layers: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Input and output names of the exported graph (optimum's convention)."""
    kv = [(i, k) for i in range(num_layers) for k in ("key", "value")]
    inputs = ("input_ids", "attention_mask", "position_ids", *(f"past_key_values.{i}.{k}" for i, k in kv))
    return inputs, ("logits", *(f"present.{i}.{k}" for i, k in kv))


def export_onnx(model: nn.Module, out: str | Path, *, tokenizer: Any = None, overwrite: bool = False,
                opset: int | None = None) -> OnnxExport:
    """Write ``model`` to ``out`` as an ONNX decoder with a KV cache, atomically.

    Args:
        model: a Hugging Face causal LM of a supported type (:data:`SUPPORTED_MODEL_TYPES`), dense or with
            ``LowRankLinear`` layers; exported in its own dtype (onnxruntime's CPU kernels want float32).
        out: output directory; refused if it exists unless ``overwrite``.
        tokenizer: saved alongside when given.
        overwrite: replace an existing ``out``.
        opset: ONNX opset (default: the exporter's).

    Returns:
        The directory, the graph's layout and its sizes.

    Raises:
        ValueError: an unsupported model (nothing is written), or an existing ``out`` without ``overwrite``.
    """
    check_exportable(model)
    model.eval()
    dtype = next(model.parameters()).dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    device = next(model.parameters()).device
    probe = torch.zeros(1, 2, dtype=torch.long, device=device)
    with torch.no_grad():
        present = flat_cache(model(input_ids=probe, use_cache=True).past_key_values)
    num_layers, (_, kv_heads, _, head_dim) = len(present) // 2, present[0].shape
    widths = [int(t.shape[-1]) for t in present]  # per layer (key, value): narrowed attentions differ
    inputs, outputs = io_names(num_layers)
    batch, seq, past_len = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    total = torch.export.Dim("total")
    example = (torch.zeros(2, 4, dtype=torch.long, device=device),
               torch.ones(2, _PAST_EXAMPLE + 4, dtype=torch.long, device=device),
               torch.arange(_PAST_EXAMPLE, _PAST_EXAMPLE + 4, device=device).expand(2, 4),
               *(torch.zeros(2, kv_heads, _PAST_EXAMPLE, width, dtype=dtype, device=device) for width in widths))
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
               tuple({0: batch, 2: past_len} for _ in range(2 * num_layers)))
    with atomic_dir(out, overwrite) as tmp:
        with torch.no_grad(), warnings.catch_warnings(), _quiet_logger("torch.onnx"):
            # torch.export's own notices (a deprecated pytree spec, dynamic axes sharing a name): not the user's
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
            step = _DecoderStep(model, num_layers).eval()
            program = torch.onnx.export(step, example, None, input_names=list(inputs), output_names=list(outputs),
                                        dynamic_shapes=dynamic, opset_version=opset, dynamo=True, optimize=False,
                                        verbose=False)
        graph = program.model.graph
        for node in graph.all_nodes():
            node.metadata_props.clear()  # the exporter's stack traces: 2-3x the weights of a small model
        initializers = graph.initializers
        weight_bytes = 0
        for name, value in list(initializers.items()):
            value.name = name.removeprefix("model.")  # the wrapper's prefix: keep the model's own parameter names
            weight_bytes += value.const_value.nbytes if value.const_value is not None else 0
        program.save(str(tmp / ONNX_FILE), external_data=weight_bytes > EXTERNAL_DATA_BYTES)
        files = tuple(f for f in (ONNX_FILE, f"{ONNX_FILE}.data") if (tmp / f).is_file())
        layout = OnnxLayout(getattr(model.config, "model_type", ""), num_layers, int(kv_heads), int(head_dim),
                            str(dtype).removeprefix("torch."), inputs, outputs, files,
                            tuple(widths[::2]) if len(set(widths)) > 1 else ())
        (tmp / ONNX_MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, **asdict(layout)}, indent=1))
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        nbytes = sum((tmp / f).stat().st_size for f in files)
    return OnnxExport(Path(out), layout, nbytes, weight_bytes, weight_bytes + factorised_savings(model) * itemsize)
