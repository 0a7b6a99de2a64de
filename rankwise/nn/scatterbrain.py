"""Scatterbrain attention: a Performer low-rank estimate plus an exact local window. Chen, Dao et al.,
"Scatterbrain: Unifying Sparse and Low-rank Attention Approximation", NeurIPS 2021, https://arxiv.org/abs/2110.15343.

The unnormalised attention matrix ``A_ij = exp(s q_i . k_j)`` is estimated by positive random features (FAVOR+,
Choromanski et al. 2021, https://arxiv.org/abs/2009.14794, in its hyperbolic form) ``phi(q_i) . phi(k_j)``, an
unbiased estimate, plus a sparse correction ``exp(s q_i . k_j) - phi(q_i) . phi(k_j)`` on the entries of a local
window (the reference code's ``SBLocalAttention``). Low-rank + correction is therefore exact inside the window and the
Performer estimate outside it; each row is normalised by the same approximation of its sum. The implementation adds
the exact entries inside the window and the feature products outside it, which is the same sum without the
cancellation; the Performer part over the keys left of the window is a chunked causal prefix sum, so memory is
``O(tokens * (window + sink + features))``, never ``O(tokens^2)``.

Option ``sink``: the first ``sink`` keys are scored exactly for every query and left out of the feature sums (no
double counting, also where they fall inside the window). Language models put much attention on the first tokens
("attention sinks", Xiao et al. 2023, StreamingLLM, https://arxiv.org/abs/2309.17453), which a local window drops
and random features estimate badly.

Use in a Hugging Face model through transformers' attention interface: ``with use_scatterbrain(model, window=128):``.

Not implemented: the paper's LSH-bucket sparse part (SMYRF buckets instead of, or besides, the local window); the
local window is the variant of the reference code's language-modelling experiments.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

ATTN_NAME = "rankwise_scatterbrain"  # the key under which transformers' AttentionInterface finds it


@dataclass(frozen=True)
class ScatterbrainConfig:
    """Settings of :func:`scatterbrain_attention` (Chen, Dao et al. 2021, https://arxiv.org/abs/2110.15343).

    Attributes:
        window: exact local window: query ``i`` sees keys ``i - window < j <= i`` exactly (and ``j < i + window`` too
            when not causal); 0 = Performer only; ``>= tokens`` = exact softmax attention.
        num_features: number of positive random features (even: half are ``exp(w . x)``, half ``exp(-w . x)``).
        seed: seed of the random projection (a layer ``l`` of a model uses ``seed + l``); same seed, same output.
        chunk_size: queries per step of the chunked prefix sum (the step is ``max(window, chunk_size)``): memory per
            step is ``step * (2 step + sink + features)`` scores per head.
        sink: the first ``sink`` keys are scored exactly for every query and kept out of the features (attention
            sinks, Xiao et al. 2023, https://arxiv.org/abs/2309.17453); 0 = none; ``>= tokens`` = exact attention.
    """

    window: int = 128
    num_features: int = 128
    seed: int = 0
    chunk_size: int = 128
    sink: int = 0

    def __post_init__(self) -> None:
        _check_settings(self.window, self.num_features, self.chunk_size, self.sink)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")


def _check_settings(window: Any, num_features: Any, chunk_size: Any, sink: Any = 0) -> None:
    for name, value, low in (("window", window, 0), ("num_features", num_features, 2), ("chunk_size", chunk_size, 1),
                             ("sink", sink, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if num_features % 2:
        raise ValueError(f"num_features must be even (features come in exp(+w.x), exp(-w.x) pairs), got {num_features}")


def draw_projection(head_dim: int, num_features: int, generator: torch.Generator | None = None, *,
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The ``(num_features // 2, head_dim)`` random directions of the features: orthogonal blocks (QR of Gaussian
    matrices, signs fixed by ``R``'s diagonal) with rows rescaled by the norms of independent Gaussian vectors, so
    each row is marginally standard Gaussian (the reference code's ``gaussian_orthogonal_random_matrix``,
    ``scaling=0``; Choromanski et al. 2021, https://arxiv.org/abs/2009.14794). Drawn in float64 on the CPU from
    ``generator`` (``None``: a fresh default generator seeded 0), then cast."""
    _check_settings(0, num_features, 1)
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    rows = num_features // 2
    blocks = math.ceil(rows / head_dim)
    gauss = torch.randn(blocks, head_dim, head_dim, generator=generator, dtype=torch.float64)
    orth, upper = torch.linalg.qr(gauss)
    orth = orth * torch.diagonal(upper, dim1=-2, dim2=-1).sign().unsqueeze(-2)  # Haar-uniform
    directions = orth.transpose(-1, -2).reshape(blocks * head_dim, head_dim)[:rows]
    norms = torch.randn(rows, head_dim, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (norms * directions).to(device=device, dtype=dtype)


def log_features(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """``log phi(x)`` for ``phi(x) = exp(-|x|^2 / 2) / sqrt(m) [exp(W x), exp(-W x)]`` with ``m = 2 rows(W)``, so
    that ``E[phi(q) . phi(k)] = exp(q . k)`` (FAVOR+, hyperbolic form). ``x`` is ``(..., d)``, already scaled by
    ``sqrt(softmax scale)``; returns ``(..., m)``."""
    proj = x @ projection.T  # (..., m / 2)
    shift = x.square().sum(-1, keepdim=True) / 2 + math.log(2 * projection.shape[0]) / 2
    return torch.cat([proj, -proj], dim=-1) - shift


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, tokens, head_dim), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree in (batch, heads, tokens), got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q must have k's batch and a multiple of its heads (grouped-query attention), got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"q may not have more tokens than k, got {q.shape[2]} and {k.shape[2]}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or Inf")


def scatterbrain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                           window: int = 128, num_features: int = 128, seed: int | None = 0,
                           generator: torch.Generator | None = None, scale: float | None = None,
                           chunk_size: int = 128, sink: int = 0) -> torch.Tensor:
    """Scatterbrain attention (Chen, Dao et al. 2021, https://arxiv.org/abs/2110.15343): exact softmax weights on a
    local window (and on the first ``sink`` keys), positive random features (Performer) elsewhere, one normalisation
    over both.

    Args:
        q: queries ``(batch, heads, tokens_q, head_dim)``; when ``tokens_q < tokens`` they are the last positions
            (decoding with a cache).
        k: keys ``(batch, kv_heads, tokens, head_dim)``; ``heads`` a multiple of ``kv_heads`` (grouped-query
            attention: query head ``h`` reads kv head ``h // (heads // kv_heads)``).
        v: values ``(batch, kv_heads, tokens, value_dim)``.
        causal: decoder masking (query ``i`` sees keys ``j <= i``); otherwise all keys.
        window: exact entries: ``0 <= i - j < window`` (and ``|i - j| < window`` when not causal); 0 = Performer
            only; ``>= tokens`` = exact attention.
        num_features: number of random features ``m`` (even).
        seed: seed of the projection (:func:`draw_projection` with ``torch.Generator().manual_seed(seed)``).
        generator: draw the projection from this generator instead of ``seed``.
        scale: softmax scale ``s``; ``None`` = ``1 / sqrt(head_dim)``.
        chunk_size: queries per step (the step is ``max(window, chunk_size)``).
        sink: exact entries ``j < sink`` for every query (still causal), never in the features (attention sinks,
            Xiao et al. 2023, https://arxiv.org/abs/2309.17453); 0 = none; ``>= tokens`` = exact attention.

    Returns:
        ``(batch, heads, tokens_q, value_dim)`` in ``q``'s dtype (computed in float32, or float64 for float64).

    Raises:
        ValueError: a negative window or sink, ``num_features`` odd or < 2, mismatched shapes, NaN/Inf in the inputs.
    """
    _check_settings(window, num_features, chunk_size, sink)
    _check_inputs(q, k, v, scale)
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    head_dim, tokens_q, tokens = q.shape[-1], q.shape[2], k.shape[2]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    projection = draw_projection(head_dim, num_features, generator, dtype=compute, device=q.device)
    root = math.sqrt(scale)
    qs, ks, vs = (q.to(compute) * root), (k.to(compute) * root), v.to(compute)
    if tokens_q < tokens:  # the queries are the last positions: pad in front, keep the last rows
        qs = torch.cat([qs.new_zeros(*qs.shape[:2], tokens - tokens_q, head_dim), qs], dim=2)
    step = max(min(max(window, chunk_size), tokens), 1)
    batch, kv_heads = k.shape[:2]
    qs = qs.reshape(batch, kv_heads, -1, tokens, head_dim)  # (b, hk, group, t, d): query heads of one kv head
    ks, vs = ks.unsqueeze(2), vs.unsqueeze(2)  # (b, hk, 1, t, d), broadcast over the group
    sink = min(sink, tokens)
    lse, num, den = _lower_part(qs, ks, vs, projection, window, step, (0, sink), diagonal=True)
    if not causal:  # the keys after each query: the same sums on the reversed sequence (sinks last), no diagonal
        lse2, num2, den2 = (t.flip(3) for t in _lower_part(qs.flip(3), ks.flip(3), vs.flip(3), projection, window,
                                                             step, (tokens - sink, tokens), diagonal=False))
        top = torch.maximum(lse, lse2)
        a, b = torch.exp(lse - top), torch.exp(lse2 - top)
        num, den = num * a + num2 * b, den * a + den2 * b
    out = num / den.clamp_min(torch.finfo(compute).tiny)  # (b, hk, group, t, dv)
    return out.flatten(1, 2)[:, :, tokens - tokens_q:].to(q.dtype)


def _lower_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor, window: int, step: int,
                sinks: tuple[int, int], *, diagonal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row sums over keys ``j <= i`` (``j < i`` without ``diagonal``): exact ``exp(q . k)`` inside the window and on
    the sink keys ``sinks[0] <= j < sinks[1]``, feature products elsewhere. ``q`` is ``(b, hk, g, t, d)``, ``k`` and
    ``v`` ``(b, hk, 1, t, d)``. Returns ``(log_scale, numerator, denominator)``, each row's sums being
    ``exp(log_scale)`` times ``numerator`` / ``denominator``, shapes ``(b, hk, g, t, 1)``, ``(b, hk, g, t, dv)``,
    ``(b, hk, g, t, 1)``.

    Queries go ``step`` at a time; keys of the previous and current step are scored explicitly (exact or feature
    products by position), older sink keys exactly; older other keys enter through the running state
    ``S = sum phi(k) v^T``, ``z = sum phi(k)``, kept relative to a running maximum ``beta`` of the keys'
    log-features, so nothing depends on later tokens."""
    tokens = q.shape[3]
    m = 2 * projection.shape[0]
    state = q.new_zeros(*k.shape[:3], m, v.shape[-1])  # sum over old keys of phi(k) v^T: (b, hk, 1, m, dv)
    norm = q.new_zeros(*k.shape[:3], 1, m)  # sum over old keys of phi(k)
    beta = torch.full((*k.shape[:3], 1, 1), -math.inf, dtype=q.dtype, device=q.device)  # their log-scale
    low = 0 if diagonal else 1
    sink_lo, sink_hi = sinks
    positions = torch.arange(tokens, device=q.device)
    is_sink = (positions >= sink_lo) & (positions < sink_hi)
    lse_out, num_out, den_out = [], [], []
    log_prev = None  # the previous step's key log-features
    for start in range(0, tokens, step):
        stop = min(start + step, tokens)
        k_lo = max(start - step, 0)
        qc, kc, vc = q[..., start:stop, :], k[..., k_lo:stop, :], v[..., k_lo:stop, :]
        log_cur = log_features(k[..., start:stop, :], projection)  # (b, hk, 1, tq, m)
        log_k = log_cur if log_prev is None else torch.cat([log_prev, log_cur], dim=-2)
        delta = positions[start:stop, None] - positions[None, k_lo:stop]  # (tq, tk): i - j
        sink_k = is_sink[k_lo:stop]
        exact = (delta >= low) & ((delta < window) | sink_k)
        approx = (delta >= max(window, low)) & ~sink_k
        logits = (qc @ kc.transpose(-1, -2)).masked_fill_(~exact, -math.inf)  # (b, hk, g, tq, tk)
        old_hi = min(sink_hi, k_lo)  # sink keys older than the explicit block: all j < i - step, all exact
        sink_logits = qc @ k[..., sink_lo:old_hi, :].transpose(-1, -2)  # (b, hk, g, tq, sink) or empty
        log_q = log_features(qc, projection)  # (b, hk, g, tq, m)
        alpha = log_q.amax(-1, keepdim=True)
        phi_q = torch.exp_(log_q - alpha)
        kappa = log_k.amax(-1, keepdim=True)  # per key, so that masked (later) keys set no scale
        pair = (alpha + kappa.transpose(-1, -2)).masked_fill_(~approx, -math.inf)  # (b, hk, g, tq, tk)
        top = torch.maximum(torch.maximum(logits.amax(-1, keepdim=True), pair.amax(-1, keepdim=True)), alpha + beta)
        if sink_logits.shape[-1]:
            top = torch.maximum(top, sink_logits.amax(-1, keepdim=True))
        lse_out.append(top)  # -inf for a row with no keys at all (the first, diagonal excluded): its sums are 0
        top = top.nan_to_num(neginf=0.0)
        products = phi_q @ torch.exp(log_k - kappa).transpose(-1, -2)
        weights = torch.exp_(logits - top).add_(products.mul_(torch.exp_(pair - top)))  # (b, hk, g, tq, tk)
        old = torch.exp(alpha + beta - top)  # weight of the state's keys
        num = weights @ vc + old * (phi_q @ state)
        den = weights.sum(-1, keepdim=True) + old * (phi_q * norm).sum(-1, keepdim=True)
        if sink_logits.shape[-1]:
            sink_weights = torch.exp_(sink_logits - top)
            num = num + sink_weights @ v[..., sink_lo:old_hi, :]
            den = den + sink_weights.sum(-1, keepdim=True)
        num_out.append(num)
        den_out.append(den)
        # the previous step's keys are now older than the next queries' explicit block: all but the sinks enter S
        for lo, hi in ((k_lo, min(start, sink_lo)), (max(k_lo, sink_hi), start)):
            if log_prev is not None and lo < hi:
                state, norm, beta = _absorb(state, norm, beta, log_prev[..., lo - k_lo:hi - k_lo, :], v[..., lo:hi, :])
        log_prev = log_cur
    return torch.cat(lse_out, -2), torch.cat(num_out, -2), torch.cat(den_out, -2)


def _absorb(state: torch.Tensor, norm: torch.Tensor, beta: torch.Tensor, log_k: torch.Tensor, v: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add keys (their log-features ``log_k``, ``(..., t, m)``) and values ``v`` to the running state, rescaled to
    the new maximum."""
    new_beta = torch.maximum(beta, log_k.amax(dim=(-1, -2), keepdim=True))
    phi_k = torch.exp(log_k - new_beta)
    keep = torch.exp(beta - new_beta)
    return state * keep + phi_k.transpose(-1, -2) @ v, norm * keep + phi_k.sum(-2, keepdim=True), new_beta


# --------------------------------------------------------------------------------------------------- transformers


def _hf_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``(b, h, t, d)`` in, ``(b, t, h, d)`` out, no weights. The
    settings come from the module (set by :func:`use_scatterbrain`). transformers builds no mask for an
    implementation without a mask function, so none is ever ``O(tokens^2)``; an explicit mask is refused, and so is
    a padding mask given to the model (checked by :func:`use_scatterbrain`'s hook, since transformers drops it)."""
    config: ScatterbrainConfig | None = getattr(module, "_rankwise_scatterbrain", None)
    if config is None:
        raise ValueError(f"attn_implementation {ATTN_NAME!r} needs its settings: enable it with "
                         "rankwise.nn.scatterbrain.use_scatterbrain(model, ...)")
    if attention_mask is not None:
        raise ValueError(f"{ATTN_NAME} applies only causal masking; got an explicit attention mask of shape "
                         f"{tuple(attention_mask.shape)} (padding masks are not supported)")
    for option in ("sliding_window", "softcap", "s_aux"):  # attention variants the estimate does not reproduce
        if kwargs.get(option) is not None:
            raise ValueError(f"{ATTN_NAME} does not combine with the model's {option} attention")
    layer = getattr(module, "layer_idx", 0) or 0
    causal = bool(getattr(module, "is_causal", True))
    out = scatterbrain_attention(query, key, value, causal=causal, window=config.window,
                                 num_features=config.num_features, seed=config.seed + layer, scale=scaling,
                                 chunk_size=config.chunk_size, sink=config.sink)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _hf_attention)


@contextlib.contextmanager
def use_scatterbrain(model: nn.Module, config: ScatterbrainConfig | None = None, **settings: Any
                     ) -> Iterator[ScatterbrainConfig]:
    """Run a Hugging Face model's attention as Scatterbrain (Chen, Dao et al. 2021,
    https://arxiv.org/abs/2110.15343) inside the ``with`` block; the previous implementation is restored after it,
    even on error.

    Registers :func:`scatterbrain_attention` in transformers' ``AttentionInterface`` as ``"rankwise_scatterbrain"``,
    stores the settings on each attention module (layer ``l`` draws its features with ``seed + l``) and calls
    ``model.set_attn_implementation``. Padding is refused: an ``attention_mask`` with zeros raises (transformers
    builds no mask for this implementation, so it would be dropped).

    Args:
        model: a transformers ``PreTrainedModel`` whose attention goes through the ``AttentionInterface``.
        config: the settings; or give them as keywords (``window=``, ``num_features=``, ``seed=``, ``chunk_size=``,
            ``sink=``).

    Yields:
        The :class:`ScatterbrainConfig` in use.

    Raises:
        ValueError: both ``config`` and keywords, an unknown keyword, bad settings, or a model without attention
            modules that use the interface.
    """
    if config is not None and settings:
        raise ValueError("give use_scatterbrain either config or keyword settings, not both")
    allowed = {f.name for f in fields(ScatterbrainConfig)}
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise ValueError(f"unknown scatterbrain setting(s) {unknown}; allowed: {sorted(allowed)}")
    config = ScatterbrainConfig(**settings) if config is None else config
    set_impl = getattr(model, "set_attn_implementation", None)
    modules = [m for m in model.modules() if hasattr(m, "is_causal") and hasattr(m, "config")]
    if set_impl is None or not modules or not type(model)._can_set_attn_implementation():
        raise ValueError(f"model ({type(model).__name__}) must be a transformers model whose attention uses "
                         "AttentionInterface")
    _register()
    previous = model.config._attn_implementation
    for module in modules:
        module._rankwise_scatterbrain = config
    hook = model.register_forward_pre_hook(_refuse_padding, with_kwargs=True)
    try:
        set_impl(ATTN_NAME)
        yield config
    finally:
        hook.remove()
        set_impl(previous)
        for module in modules:
            del module._rankwise_scatterbrain


def _refuse_padding(_model: nn.Module, args: tuple, kwargs: dict) -> None:
    """transformers builds no mask for this implementation, so a padding mask would be dropped without a word."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and not bool((mask != 0).all()):
        raise ValueError(f"{ATTN_NAME} applies only causal masking; this input has padding (an attention_mask "
                         "with zeros): pass unpadded sequences, one length per batch")
