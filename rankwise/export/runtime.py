"""Run an exported decoder (:func:`rankwise.export.export_onnx`) in onnxruntime: logits, and greedy generation
with the KV cache fed back step by step.

A minimal loop rather than optimum's ``ORTModelForCausalLM``, which pins an older ``transformers``; the graph uses
optimum's input and output names, so that class can load the directory where both are installed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rankwise.export.onnx import OnnxLayout, cache_argument

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}


@dataclass(frozen=True)
class Generation:
    """Greedy tokens and the decode speed that produced them.

    Attributes:
        tokens: ``(batch, prompt + new)`` token ids, the prompt included.
        prefill_s: seconds for the prompt (first step).
        decode_s: seconds for the remaining steps, one token each.
        decode_tokens: tokens produced by those steps (per sequence).
    """

    tokens: torch.Tensor
    prefill_s: float
    decode_s: float
    decode_tokens: int

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


class OnnxCausalLM:
    """An exported decoder in an onnxruntime session.

    Args:
        directory: a directory written by :func:`~rankwise.export.export_onnx`.
        threads: onnxruntime intra-op threads (default: onnxruntime's, one per physical core).
        spinning: let idle onnxruntime threads spin-wait for the next step (its default: lowest latency, but the
            spinning threads take the cores from anything else running in the process, such as torch).
        verify: check the directory's files against its ``SHA256SUMS`` first.
    """

    def __init__(self, directory: str | Path, threads: int | None = None, spinning: bool = True,
                 verify: bool = True) -> None:
        import onnxruntime as ort

        from rankwise.io.integrity import verify_dir

        self.directory = Path(directory)
        if verify:  # rankwise's export wrote SHA256SUMS: a damaged model.onnx is named, not run
            verify_dir(self.directory)
        self.layout = OnnxLayout.read(self.directory)
        if self.layout.dtype not in _NUMPY_DTYPES:
            raise ValueError(f"{self.directory}: dtype {self.layout.dtype!r} cannot be fed from numpy; export the "
                             f"model in one of {', '.join(_NUMPY_DTYPES)}")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.directory / self.layout.files[0]), options,
                                            providers=["CPUExecutionProvider"])

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        """Past keys and values of length 0, for the first step."""
        dtype = _NUMPY_DTYPES[self.layout.dtype]
        return [np.zeros((batch, self.layout.kv_heads, 0, self.layout.layer_head_dim(k // 2)), dtype)
                for k in range(len(self.layout.past_names))]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray]
             ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder step: ``(logits, present)`` for ``input_ids`` ``(batch, seq)`` after ``past``.

        ``attention_mask`` ``(batch, past + seq)`` marks real tokens with 1 (left padding with 0); positions count
        the real tokens, as in ``transformers``' ``generate``.
        """
        positions = np.cumsum(attention_mask, axis=1) - 1
        positions = np.maximum(positions, 0)[:, -input_ids.shape[1]:]
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                "position_ids": positions.astype(np.int64), **dict(zip(self.layout.past_names, past, strict=True))}
        logits, *present = self.session.run(None, feed)
        return logits, present

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, seq, vocab)`` of whole windows (no cache), as a torch tensor."""
        ids = input_ids.numpy()
        logits, _ = self.step(ids, np.ones_like(ids), self.empty_cache(ids.shape[0]))
        return torch.from_numpy(logits)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None
                 ) -> Generation:
        """Greedy decoding: the prompt in one step, then one token per step with the cache fed back.

        A sequence stops at ``eos_token_id``; the batch stops when every sequence has (finished ones are padded
        with ``eos_token_id``, as ``transformers`` does).
        """
        ids = input_ids.numpy().astype(np.int64)
        mask = np.ones_like(ids)
        past = self.empty_cache(ids.shape[0])
        tokens, step_ids = [ids], ids
        done = np.zeros(ids.shape[0], dtype=bool)
        prefill_s = decode_s = 0.0
        for i in range(max_new_tokens):
            start = time.perf_counter()
            logits, past = self.step(step_ids, mask, past)
            nxt = logits[:, -1].argmax(-1)
            if eos_token_id is not None:
                nxt = np.where(done, eos_token_id, nxt)
                done |= nxt == eos_token_id
            elapsed = time.perf_counter() - start
            prefill_s, decode_s = (elapsed, decode_s) if i == 0 else (prefill_s, decode_s + elapsed)
            step_ids = nxt[:, None]
            tokens.append(step_ids)
            mask = np.concatenate([mask, np.ones_like(step_ids)], axis=1)
            if done.all():
                break
        out = torch.from_numpy(np.concatenate(tokens, axis=1))
        return Generation(out, prefill_s, decode_s, out.shape[1] - ids.shape[1] - 1)


def torch_generate(model: Any, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None
                   ) -> Generation:
    """The same greedy loop as :meth:`OnnxCausalLM.generate`, run by the torch model with its own cache, for a
    like-for-like speed comparison (the tokens equal ``model.generate(do_sample=False)``'s)."""
    ids, tokens, cache = input_ids, [input_ids], None
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    mask = torch.ones_like(ids)
    prefill_s = decode_s = 0.0
    cache_arg = cache_argument(model)
    with torch.no_grad():
        for i in range(max_new_tokens):
            start = time.perf_counter()
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_arg: cache})
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)
            if eos_token_id is not None:
                nxt = torch.where(done, eos_token_id, nxt)
                done |= nxt == eos_token_id
            elapsed = time.perf_counter() - start
            prefill_s, decode_s = (elapsed, decode_s) if i == 0 else (prefill_s, decode_s + elapsed)
            ids = nxt[:, None]
            tokens.append(ids)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            if bool(done.all()):
                break
    out_ids = torch.cat(tokens, dim=1)
    return Generation(out_ids, prefill_s, decode_s, out_ids.shape[1] - input_ids.shape[1] - 1)


def max_logit_diff(model: Any, onnx_model: OnnxCausalLM, windows: torch.Tensor, batch_size: int = 1) -> float:
    """Largest ``|logit_torch - logit_onnx|`` over ``windows`` ``(n, seq)``, each run whole (no cache)."""
    worst = 0.0
    with torch.no_grad():
        for chunk in windows.split(batch_size):
            ref = model(input_ids=chunk.to(next(model.parameters()).device)).logits.float().cpu()
            worst = max(worst, float((onnx_model.logits(chunk).float() - ref).abs().max()))
    return worst
