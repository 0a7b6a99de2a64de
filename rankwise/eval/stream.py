"""Perplexity of a checkpoint larger than memory: the evaluation windows stream through one block at a time."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rankwise.progress import progress_bar
from rankwise.stream import ActivationStore, CheckpointSource, capture_calls, first, head_loss


@torch.no_grad()
def streamed_perplexity(path: str | Path, windows: torch.Tensor, *, batch_size: int = 8,
                        device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                        activation_mb: float = 1024, offload_dir: str | Path | None = None,
                        progress: bool = False, trust_remote_code: bool = False,
                        verify: bool = True) -> tuple[float, CheckpointSource]:
    """``exp`` of the mean next-token NLL over ``windows``, holding one decoder block in memory at a time.

    Equal (up to float rounding) to :func:`~rankwise.eval.perplexity` of the loaded model. Works on dense Hugging
    Face checkpoints and on rankwise directories (factored or dense export). With ``verify``, the files are checked
    against the directory's checksums first (see :class:`~rankwise.stream.CheckpointSource`).

    Returns:
        ``(perplexity, source)``; the source's skeleton (on ``meta``) gives parameter counts.
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be token ids of shape (n, seq_len >= 2), got {tuple(windows.shape)}")
    source = CheckpointSource(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code, verify=verify)
    batches = list(windows.split(batch_size))
    with ActivationStore(int(activation_mb * 2**20), offload_dir) as store:
        source.load_rest()
        calls = []
        for b, batch in enumerate(batches):
            hidden, block_calls = capture_calls(source.model, source.blocks, batch.to(source.device))
            store.put(b, hidden)
            calls.append(block_calls)
        as_tuple = False
        for i in progress_bar(range(len(source.blocks)), "perplexity (streamed blocks)", enabled=progress):
            block = source.load(i)
            for b in range(len(batches)):
                call = calls[b][i].to(source.device)
                out = block(store.get(b).to(source.device), *call.args, **call.kwargs)
                as_tuple = isinstance(out, tuple | list)
                store.put(b, first(out))
            source.release(i)
        total, count = 0.0, 0
        for b, batch in enumerate(batches):
            tokens = batch[:, 1:].numel()
            loss = head_loss(source.model, source.blocks, batch.to(source.device), store.get(b).to(source.device),
                             as_tuple)
            total += float(loss) * tokens
            count += tokens
    source.release_rest()
    return math.exp(total / count), source
