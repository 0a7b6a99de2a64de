"""Block streaming: models run one decoder block at a time, from memory or lazily from a checkpoint on disk."""

from rankwise.stream.blocks import (
    BlockCall,
    block_of,
    capture_calls,
    decoder_blocks,
    first,
    head_loss,
    loss_and_grad,
    run_block,
)
from rankwise.stream.sink import InPlaceSink, ShardSink
from rankwise.stream.source import AUTO, DTYPES, CheckpointSource, ModelSource, compute_dtype, dtype_name, parse_dtype
from rankwise.stream.store import ActivationStore, check_offload_dir

__all__ = [
    "AUTO",
    "DTYPES",
    "ActivationStore",
    "BlockCall",
    "CheckpointSource",
    "InPlaceSink",
    "ModelSource",
    "ShardSink",
    "block_of",
    "capture_calls",
    "check_offload_dir",
    "compute_dtype",
    "decoder_blocks",
    "dtype_name",
    "first",
    "head_loss",
    "loss_and_grad",
    "parse_dtype",
    "run_block",
]
