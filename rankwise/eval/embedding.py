"""Evaluate an encoder: how close its sentence embeddings stay to the dense model's, and how well it retrieves.

Two measures on held-out text pairs (a perplexity does not exist for a bidirectional encoder without an LM head):

* **embedding cosine**: the mean cosine between each text's embedding by the evaluated model and by the dense
  reference (1 for the dense model itself), over every query and document;
* **retrieval**: each query ranks all ``N`` documents by cosine similarity; *top-1 accuracy* is the fraction whose
  own document ranks first, *MRR* the mean of ``1 / rank`` of the own document (a tie with another document counts
  against the query: rank = 1 + the number of documents scoring at least as high, the own one excluded).

The pairs come from the standard library's pydoc topics (:func:`topic_pairs`): the topic's first paragraph (of at
least five words, after its title) is the query, the rest of the topic the document. The title is dropped from both,
since it would make the match trivial. Held out means never calibrated on: :func:`held_out_pairs` keeps only topics
that start after the text the calibration windows were cut from.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.calibrate.objective import pool, pooling_of
from rankwise.eval.measure import count_params, peak_rss_mb

__all__ = ["EncoderResult", "embed", "embedding_cosine", "evaluate_encoder", "evaluate_encoder_spec",
           "held_out_pairs", "is_encoder_dir", "retrieval", "topic_pairs"]

MIN_QUERY_WORDS = 5


def _split_topic(text: str) -> tuple[str, str] | None:
    """``(query, document)`` of one pydoc topic, or ``None`` when it has no such two parts."""
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if paragraphs and len(lines := paragraphs[0].splitlines()) == 2 and set(lines[1].strip()) <= set("*=-~^"):
        paragraphs = paragraphs[1:]  # the title and its underline
    for k, paragraph in enumerate(paragraphs):
        if len(paragraph.split()) >= MIN_QUERY_WORDS:
            rest = "\n\n".join(paragraphs[k + 1:])
            return (paragraph, rest) if rest else None
    return None


def topic_pairs(skip_chars: int = 0) -> list[tuple[str, str]]:
    """``(query, document)`` pairs of the pydoc topics, in the order :func:`rankwise.calibrate.default_text` joins
    them, keeping only topics that start at or after character ``skip_chars`` of that text."""
    from pydoc_data.topics import topics

    pairs, start = [], 0
    for key in sorted(topics):
        if start >= skip_chars and (pair := _split_topic(topics[key])) is not None:
            pairs.append(pair)
        start += len(topics[key]) + 2  # the "\n\n" that joins topics
    return pairs


def held_out_pairs(tokenizer: Any, raw: str | None, calibration_tokens: int, n: int) -> list[tuple[str, str]]:
    """The last ``n`` (at most) topic pairs that lie wholly after the calibration text.

    Args:
        tokenizer: the model's tokenizer (a fast one: its character offsets locate the calibration's end).
        raw: the text calibration windows were cut from; ``None`` or another text than the default (pydoc topics)
            means no topic was calibrated on.
        calibration_tokens: tokens the calibration windows took from the start of ``raw``.
        n: pairs wanted (>= 2).

    Raises:
        ValueError: ``n < 2``, or no two topics are left after the calibration text.
    """
    from rankwise.calibrate import default_text

    if n < 2:
        raise ValueError(f"retrieval needs at least 2 held-out pairs, got {n}")
    skip = 0
    if raw is not None and calibration_tokens > 0 and raw == default_text():
        offsets = tokenizer(raw, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
        skip = offsets[min(calibration_tokens, len(offsets)) - 1][1]
    pairs = topic_pairs(skip)
    if len(pairs) < 2:
        raise ValueError(f"only {len(pairs)} pydoc topics lie after the {calibration_tokens} calibration tokens; "
                         "use fewer or shorter calibration windows")
    return pairs[-n:]


@torch.no_grad()
def embed(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, pooling: str | None = None,
          max_length: int = 256, batch_size: int = 16) -> torch.Tensor:
    """Sentence embeddings ``(len(texts), dim)`` in float32 (not normalised), each text truncated to
    ``max_length`` tokens, padded within a batch (one text at a time when the tokenizer has no padding token) and
    pooled over its real tokens (``pooling``: the model's own, :func:`~rankwise.calibrate.objective.pooling_of`,
    when ``None``)."""
    mode = pooling or pooling_of(model)
    body = getattr(model, "base_model", model)
    device = next(model.parameters()).device
    if getattr(tokenizer, "pad_token", None) is None:
        batch_size = 1  # nothing to pad with: one text at a time
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), padding=batch_size > 1, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        hidden = body(**{k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
                      ).last_hidden_state  # (batch, seq, dim)
        out.append(pool(hidden.float(), enc["attention_mask"], mode).cpu())
    return torch.cat(out)


def embedding_cosine(embeddings: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine between each row of ``embeddings`` and the same row of ``reference``."""
    if embeddings.shape != reference.shape:
        raise ValueError(f"embeddings {tuple(embeddings.shape)} and reference {tuple(reference.shape)} differ in shape")
    return float(F.cosine_similarity(embeddings.double(), reference.double(), dim=-1).mean())


def retrieval(queries: torch.Tensor, documents: torch.Tensor) -> tuple[float, float]:
    """``(top-1 accuracy, MRR)`` of query ``i`` retrieving document ``i`` among all rows of ``documents`` by
    cosine similarity (ties count against the query)."""
    if queries.shape != documents.shape or queries.shape[0] < 2:
        raise ValueError(f"need as many queries as documents (>= 2), got {tuple(queries.shape)} and "
                         f"{tuple(documents.shape)}")
    sim = F.normalize(queries.double(), dim=-1) @ F.normalize(documents.double(), dim=-1).T  # (n, n)
    own = sim.diagonal().unsqueeze(1)  # (n, 1)
    rank = (sim >= own).sum(1)  # the own document, and every other scoring at least as high
    return float((rank == 1).double().mean()), float((1.0 / rank.double()).mean())


@dataclass
class EncoderResult:
    """What ``rankwise eval`` reports for an encoder."""

    top1: float
    mrr: float
    candidates: int  # documents each query ranks (= held-out pairs)
    cosine: float | None  # mean cosine to the reference model's embeddings (None without a reference)
    params_total: int
    params_targeted: int
    texts_per_s: float
    peak_rss_mb: float
    model_mb: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        cosine = "" if self.cosine is None else f"embedding cosine to the reference {self.cosine:.4f}; "
        return (f"{cosine}retrieval top-1 {self.top1:.3f}, MRR {self.mrr:.3f} over {self.candidates} held-out "
                f"query/document pairs; params {self.params_total:,} total, {self.params_targeted:,} in "
                f"attention/MLP projections; {self.texts_per_s:,.1f} texts/s; model {self.model_mb:.1f} MB, peak "
                f"RSS {self.peak_rss_mb:.0f} MB")


def evaluate_encoder(model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], *,
                     reference: torch.Tensor | None = None, pooling: str | None = None, max_length: int = 256,
                     batch_size: int = 16) -> tuple[EncoderResult, torch.Tensor]:
    """Retrieval on ``pairs`` and, given the ``reference`` model's embeddings of the same texts (queries, then
    documents), the embedding cosine to it.

    Returns:
        ``(result, embeddings)``: the embeddings ``(2 * len(pairs), dim)`` serve as the reference of other models.
    """
    texts = [q for q, _ in pairs] + [d for _, d in pairs]
    start = time.perf_counter()
    embeddings = embed(model, tokenizer, texts, pooling=pooling, max_length=max_length, batch_size=batch_size)
    seconds = time.perf_counter() - start
    top1, mrr = retrieval(embeddings[:len(pairs)], embeddings[len(pairs):])
    total, targeted = count_params(model)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    cosine = None if reference is None else embedding_cosine(embeddings, reference)
    return EncoderResult(top1, mrr, len(pairs), cosine, total, targeted, len(texts) / seconds, peak_rss_mb(),
                         model_mb), embeddings


def is_encoder_dir(path: str | Path) -> bool:
    """Whether ``path`` (a resolved model location) is a local directory holding an encoder (a sentence-transformers
    directory, a Hugging Face encoder or a compressed one)."""
    from rankwise.arch import is_encoder_config
    from rankwise.io.checkpoint import load_config
    from rankwise.io.sentence import transformer_dir

    if not isinstance(path, Path) or not path.is_dir():
        return False
    inner = transformer_dir(path)
    if not (inner / "config.json").is_file():
        return False
    try:
        return is_encoder_config(load_config(inner))
    except ValueError:
        return False  # remote code or a broken config: the causal-LM path reports it


def evaluate_encoder_spec(model: str, raw: str, calibration_tokens: int, pairs: int, *, reference: str | None = None,
                          batch_size: int = 16, device: str = "cpu", trust_remote_code: bool = False,
                          verify: bool = True) -> EncoderResult:
    """:func:`evaluate_encoder` of the model at ``model`` (a directory or hub id) on at most ``pairs`` held-out
    pairs (:func:`held_out_pairs`), with the embedding cosine to ``reference`` when given; texts are truncated to
    the model's ``max_seq_length`` (sentence-transformers config; 256 without one)."""
    from rankwise.io.models import load_model, resolve
    from rankwise.io.sentence import max_seq_length

    loaded = load_model(model, device=device, trust_remote_code=trust_remote_code, verify=verify)
    chosen = held_out_pairs(loaded.tokenizer, raw, calibration_tokens, pairs)
    where = resolve(model)[0]
    max_length = (max_seq_length(where) if isinstance(where, Path) else None) or 256
    ref = None
    if reference is not None:
        dense = load_model(reference, device=device, trust_remote_code=trust_remote_code, verify=verify)
        _, ref = evaluate_encoder(dense.model, dense.tokenizer, chosen, max_length=max_length, batch_size=batch_size)
        del dense
    return evaluate_encoder(loaded.model, loaded.tokenizer, chosen, reference=ref, max_length=max_length,
                            batch_size=batch_size)[0]
