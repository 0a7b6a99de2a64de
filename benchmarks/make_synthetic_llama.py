"""Write a randomly initialised Llama checkpoint (Hugging Face layout) one tensor at a time.

Usage:
    python benchmarks/make_synthetic_llama.py --preset 1b --out /tmp/rankwise-scale/llama-1b [--seed 0]

The presets have the shapes of Llama-3.2-1B / -3B (tied embeddings). Linear and embedding weights are
``randn * 0.02`` drawn from a ``torch.Generator`` seeded with ``seed + index`` (the tensor's position in the
``LlamaForCausalLM`` state dict), so a seed always gives the same bytes; norm weights are ones. Shards of at most
~1 GB are written with ``safetensors`` and indexed as ``save_pretrained`` does, so only one shard is ever in memory.
The SmolLM2 tokenizer (ids < 49152) is copied from the rankwise cache. Nothing here is a trained model: the weights
are for measuring time and memory only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from rankwise.io.atomic import atomic_dir

INIT_STD = 0.02  # transformers' default initializer_range for Llama
MAX_SHARD_BYTES = 10**9  # save_pretrained's "1GB"
CHUNK_ELEMENTS = 2**24  # float32 elements drawn at once before casting (64 MB)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions that fix a Llama checkpoint's tensors.

    Attributes:
        hidden: model width (``hidden_size``).
        layers: number of decoder blocks.
        intermediate: MLP width.
        heads: attention heads.
        kv_heads: key-value heads (grouped-query attention).
        vocab: vocabulary size (rows of the tied embedding).
    """

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int = 128256


PRESETS = {
    "1b": LlamaShape(hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8),  # Llama-3.2-1B
    "3b": LlamaShape(hidden=3072, layers=28, intermediate=8192, heads=24, kv_heads=8),  # Llama-3.2-3B
}


@dataclass(frozen=True)
class TensorSpec:
    """One state-dict entry: its name, shape and how it is initialised (``"normal"`` or ``"ones"``)."""

    name: str
    shape: tuple[int, ...]
    init: str

    def nbytes(self, dtype: torch.dtype) -> int:
        return torch.Size(self.shape).numel() * dtype.itemsize


def tensor_specs(shape: LlamaShape) -> list[TensorSpec]:
    """Every tensor of ``LlamaForCausalLM`` with tied embeddings, in state-dict order."""
    head_dim = shape.hidden // shape.heads
    kv_dim = shape.kv_heads * head_dim
    h, f = shape.hidden, shape.intermediate
    specs = [TensorSpec("model.embed_tokens.weight", (shape.vocab, h), "normal")]
    for i in range(shape.layers):
        p = f"model.layers.{i}"
        specs += [
            TensorSpec(f"{p}.self_attn.q_proj.weight", (shape.heads * head_dim, h), "normal"),
            TensorSpec(f"{p}.self_attn.k_proj.weight", (kv_dim, h), "normal"),
            TensorSpec(f"{p}.self_attn.v_proj.weight", (kv_dim, h), "normal"),
            TensorSpec(f"{p}.self_attn.o_proj.weight", (h, shape.heads * head_dim), "normal"),
            TensorSpec(f"{p}.mlp.gate_proj.weight", (f, h), "normal"),
            TensorSpec(f"{p}.mlp.up_proj.weight", (f, h), "normal"),
            TensorSpec(f"{p}.mlp.down_proj.weight", (h, f), "normal"),
            TensorSpec(f"{p}.input_layernorm.weight", (h,), "ones"),
            TensorSpec(f"{p}.post_attention_layernorm.weight", (h,), "ones"),
        ]
    specs.append(TensorSpec("model.norm.weight", (h,), "ones"))
    return specs


def plan_shards(specs: list[TensorSpec], dtype: torch.dtype, max_bytes: int = MAX_SHARD_BYTES
                ) -> list[list[tuple[int, TensorSpec]]]:
    """Group ``(index, spec)`` greedily into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[list[tuple[int, TensorSpec]]] = [[]]
    size = 0
    for index, spec in enumerate(specs):
        nbytes = spec.nbytes(dtype)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((index, spec))
        size += nbytes
    return shards


def make_tensor(spec: TensorSpec, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Draw one tensor in row chunks straight into a ``dtype`` buffer (no full-size float32 copy)."""
    out = torch.empty(spec.shape, dtype=dtype)  # (rows, cols) or (cols,)
    if spec.init == "ones":
        return out.fill_(1.0)
    generator = torch.Generator().manual_seed(seed)
    rows, cols = spec.shape
    step = max(1, CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        out[start:stop] = torch.randn(stop - start, cols, generator=generator).mul_(INIT_STD)
    return out


def shard_name(number: int, total: int) -> str:
    return f"model-{number:05d}-of-{total:05d}.safetensors"


def write_shards(out: Path, shards: list[list[tuple[int, TensorSpec]]], seed: int, dtype: torch.dtype
                 ) -> Iterator[tuple[str, str]]:
    """Write each shard in turn, yielding ``(tensor name, file name)``; only one shard is alive at a time."""
    for number, shard in enumerate(shards, start=1):
        file = shard_name(number, len(shards))
        tensors = {spec.name: make_tensor(spec, seed + index, dtype) for index, spec in shard}
        save_file(tensors, out / file, metadata={"format": "pt"})
        (out / file).chmod(out.stat().st_mode & 0o666)  # safetensors writes 0600; follow the directory (umask)
        del tensors
        print(f"  wrote {file} ({len(shard)} tensors)", flush=True)
        yield from ((spec.name, file) for _, spec in shard)


def write_index(out: Path, weight_map: dict[str, str], specs: list[TensorSpec], dtype: torch.dtype) -> int:
    """Write ``model.safetensors.index.json`` as ``save_pretrained`` does; return the total tensor bytes."""
    total_size = sum(spec.nbytes(dtype) for spec in specs)
    total_parameters = sum(torch.Size(spec.shape).numel() for spec in specs)
    index = {"metadata": {"total_parameters": total_parameters, "total_size": total_size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return total_size


def write_config(out: Path, shape: LlamaShape, dtype_name: str) -> None:
    """``config.json`` via ``LlamaConfig.save_pretrained`` (rope and eps as in Llama-3.2)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        architectures=["LlamaForCausalLM"],
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        initializer_range=INIT_STD,
        dtype=dtype_name,
    )
    config.save_pretrained(out)


def smollm2_tokenizer_dir() -> Path:
    """The cached converted SmolLM2 directory holding ``tokenizer.json``; converted once if missing."""
    from rankwise.io.models import cache_root, load_model

    def cached() -> list[Path]:
        found = [p for p in cache_root().glob("SmolLM2*") if (p / "tokenizer.json").is_file()]
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)

    if not cached():
        print("  no cached SmolLM2 tokenizer; converting the default model once", flush=True)
        load_model()
    return cached()[0]


def copy_tokenizer(out: Path) -> list[str]:
    """Copy the SmolLM2 tokenizer files that exist into ``out``; return their names."""
    source = smollm2_tokenizer_dir()
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copy2(source / name, out / name)
    return copied


def write_checkpoint(out: Path, shape: LlamaShape, seed: int, dtype_name: str, overwrite: bool) -> int:
    """Build the whole directory under a temporary name beside ``out``; return the total tensor bytes."""
    dtype = DTYPES[dtype_name]
    specs = tensor_specs(shape)
    shards = plan_shards(specs, dtype)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        weight_map = dict(write_shards(tmp, shards, seed, dtype))
        total = write_index(tmp, weight_map, specs, dtype)
        write_config(tmp, shape, dtype_name)
        print(f"  tokenizer: {', '.join(copy_tokenizer(tmp))}", flush=True)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to create")
    parser.add_argument("--seed", type=int, default=0, help="tensor i is drawn with seed + i")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args()
    if args.out.exists() and not args.overwrite:
        parser.error(f"{args.out} exists; pass --overwrite to replace it")
    start = time.perf_counter()
    print(f"# {args.preset} ({PRESETS[args.preset]}), {args.dtype}, seed {args.seed} -> {args.out}", flush=True)
    total = write_checkpoint(args.out, PRESETS[args.preset], args.seed, args.dtype, args.overwrite)
    print(f"wrote {total / 1e9:.2f} GB of weights to {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
