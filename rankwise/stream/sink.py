"""Where compressed blocks go: nowhere (in-place on an in-memory model) or into safetensors shards on disk."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise._errors import os_errors
from rankwise.io.atomic import destination_of
from rankwise.io.save import dense_state, unique_state, write_config, write_manifest
from rankwise.io.shards import DEFAULT_MAX_SHARD_SIZE, ShardWriter


class InPlaceSink:
    """The compressed layers already sit in the caller's model: nothing to write."""

    def write_block(self, i: int, block: nn.Module) -> None:
        """Nothing to do."""


class ShardSink:
    """Writes each block as it is done, then the rest, the config and the rankwise manifest, in the layout
    :func:`rankwise.save` writes for the same model (:class:`~rankwise.io.shards.ShardWriter`): the same bytes.

    Args:
        out: a directory (the temporary directory of an atomic write).
        blocks_name: dotted name of the blocks' ``ModuleList`` (tensor names are prefixed with it).
        dtype: storage dtype of floating-point tensors.
        export: ``"factored"`` (rankwise format) or ``"dense"`` (factors multiplied out: a plain HF checkpoint).
        model_type: the config's ``model_type`` (GPT-2 stores ``Conv1D`` weights transposed).
        max_shard_size: the largest safetensors shard.
    """

    def __init__(self, out: Path, blocks_name: str, *, dtype: torch.dtype, export: str = "factored",
                 model_type: str = "", max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
        self.out, self.blocks_name, self.export, self.model_type = Path(out), blocks_name, export, model_type
        self.dtype = dtype
        self.writer = ShardWriter(self.out, dtype=dtype, max_shard_size=max_shard_size, stream=True)
        self.target = destination_of(self.out)  # what errors name: the output, not its temporary directory

    def write_block(self, i: int, block: nn.Module) -> None:
        state = dense_state(block, self.model_type) if self.export == "dense" else unique_state(block)
        with os_errors(self.target):  # a full disk: an OSError (errno, message), not safetensors' own error
            self.writer.add((f"{self.blocks_name}.{i}.{k}", v) for k, v in state.items())

    def write_rest(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        with os_errors(self.target):
            self.writer.add(tensors)

    def finish(self, model: nn.Module, report: Any = None, tokenizer: Any = None,
               provenance: dict[str, Any] | None = None) -> None:
        with os_errors(self.target):
            self.writer.finish()
        write_config(model, self.out, self.dtype, factored=self.export == "factored")
        if hasattr(report, "record_storage"):
            report.record_storage(self.out, self.dtype)
        if self.export == "factored":
            write_manifest(model, self.out, self.dtype, report, provenance)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.out)
