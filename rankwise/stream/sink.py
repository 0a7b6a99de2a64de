"""Where compressed blocks go: nowhere (in-place on an in-memory model) or into safetensors shards on disk."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from rankwise.io.checkpoint import INDEX
from rankwise.io.save import dense_state, unique_state, write_factored_metadata


class InPlaceSink:
    """The compressed layers already sit in the caller's model: nothing to write."""

    def write_block(self, i: int, block: nn.Module) -> None:
        """Nothing to do."""


class ShardSink:
    """Writes one safetensors shard per block, one for the rest, the index, config and rankwise manifest.

    Args:
        out: a directory (the temporary directory of an atomic write).
        blocks_name: dotted name of the blocks' ``ModuleList`` (tensor names are prefixed with it).
        num_blocks: number of blocks (the shard count is ``num_blocks + 1``).
        export: ``"factored"`` (rankwise format) or ``"dense"`` (factors multiplied out: a plain HF checkpoint).
        model_type: the config's ``model_type`` (GPT-2 stores ``Conv1D`` weights transposed).
    """

    def __init__(self, out: Path, blocks_name: str, num_blocks: int, *, export: str = "factored",
                 model_type: str = "") -> None:
        self.out, self.blocks_name, self.export, self.model_type = Path(out), blocks_name, export, model_type
        self.total = num_blocks + 1
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def _shard(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        file = f"model-{index + 1:05d}-of-{self.total:05d}.safetensors"
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(tensors, str(self.out / file), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        (self.out / file).chmod(0o666 & ~umask)  # safetensors writes 0600; outputs follow the umask like the rest
        self.weight_map.update(dict.fromkeys(tensors, file))
        self.total_size += sum(t.numel() * t.element_size() for t in tensors.values())

    def write_block(self, i: int, block: nn.Module) -> None:
        state = dense_state(block, self.model_type) if self.export == "dense" else unique_state(block)
        self._shard(i, {f"{self.blocks_name}.{i}.{k}": v for k, v in state.items()})

    def write_rest(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._shard(self.total - 1, dict(tensors))

    def finish(self, model: nn.Module, dtype: torch.dtype, report: Any = None, tokenizer: Any = None,
               provenance: dict[str, Any] | None = None) -> None:
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out / INDEX).write_text(json.dumps(index, indent=1))
        model.config.dtype = dtype
        model.config.save_pretrained(self.out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(self.out)
        if self.export == "factored":
            write_factored_metadata(model, self.out, dtype, report, provenance)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.out)
