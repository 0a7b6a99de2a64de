"""Scatterbrain attention (Chen, Dao et al. 2021, https://arxiv.org/abs/2110.15343) against its references: exact
softmax attention when the window covers everything, the dense Performer estimate with no window, the dense
"exact in the window, features outside" matrix for every window and chunking, the unbiasedness of the features,
causality, grouped-query heads, error falling with features and window, bad input, and a tiny Llama under
``use_scatterbrain``; with attention sinks (Xiao et al. 2023, https://arxiv.org/abs/2309.17453): the dense matrix
exact on the first keys too, exact attention when the sinks cover everything, causality, and ``sink=0`` unchanged."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from rankwise.nn.scatterbrain import (
    ATTN_NAME,
    ScatterbrainConfig,
    draw_projection,
    log_features,
    scatterbrain_attention,
    use_scatterbrain,
)
from tests.tiny_models import tiny_model, tiny_tokens

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _qkv(seed: int = 0, batch: int = 2, heads: int = 4, kv_heads: int = 2, tokens: int = 96, dim: int = 16,
         qk_std: float = 0.7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tokens, dim, generator=g, dtype=F64) * qk_std
    k = torch.randn(batch, kv_heads, tokens, dim, generator=g, dtype=F64) * qk_std
    v = torch.randn(batch, kv_heads, tokens, dim, generator=g, dtype=F64)
    return q, k, v


def _exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def _dense_reference(q, k, v, window: int, num_features: int, seed: int, causal: bool, sink: int = 0) -> torch.Tensor:
    """The paper's estimate written densely: ``exp(s q.k)`` where ``|i - j| < window`` or ``j < sink``,
    ``phi(q).phi(k)`` elsewhere (low-rank + sparse correction), causal entries zeroed, rows normalised by their own
    sums."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    root = q.shape[-1] ** -0.25
    proj = draw_projection(q.shape[-1], num_features, torch.Generator().manual_seed(seed), dtype=q.dtype)
    low_rank = torch.exp(log_features(q * root, proj)) @ torch.exp(log_features(k * root, proj)).transpose(-1, -2)
    exact = torch.exp((q * root) @ (k * root).transpose(-1, -2))
    i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
    sparse = torch.where(((i - j).abs() < window) | (j < sink), exact - low_rank, torch.zeros_like(exact))
    attn = low_rank + sparse
    if causal:
        attn = attn.masked_fill(j > i, 0.0)
    return (attn @ v) / attn.sum(-1, keepdim=True)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk_size", [16, 40, 1000])
def test_full_window_is_exact_softmax_attention(causal: bool, chunk_size: int) -> None:
    q, k, v = _qkv()
    out = scatterbrain_attention(q, k, v, causal=causal, window=q.shape[2], num_features=8, chunk_size=chunk_size)
    torch.testing.assert_close(out, _exact(q, k, v, causal), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("window", "chunk_size"), [(0, 16), (0, 1000), (5, 16), (17, 16), (33, 40), (60, 16)])
def test_chunked_sums_equal_the_dense_estimate(causal: bool, window: int, chunk_size: int) -> None:
    """Window 0 is the plain Performer estimate; every window and chunking gives the dense low-rank + sparse matrix."""
    q, k, v = _qkv(1)
    out = scatterbrain_attention(q, k, v, causal=causal, window=window, num_features=32, seed=7,
                                 chunk_size=chunk_size)
    torch.testing.assert_close(out, _dense_reference(q, k, v, window, 32, 7, causal), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("window", "chunk_size", "sink"),
                         [(0, 16, 1), (0, 1000, 4), (5, 16, 4), (5, 16, 20), (17, 16, 3), (17, 16, 40), (33, 40, 7),
                          (60, 16, 50)])
def test_sinks_equal_the_dense_estimate(causal: bool, window: int, chunk_size: int, sink: int) -> None:
    """The first ``sink`` keys exact for every query, out of the features, once only where the window covers them
    too (sinks shorter and longer than the window and than a step, several chunkings)."""
    q, k, v = _qkv(1)
    out = scatterbrain_attention(q, k, v, causal=causal, window=window, num_features=32, seed=7,
                                 chunk_size=chunk_size, sink=sink)
    ref = _dense_reference(q, k, v, window, 32, 7, causal, sink)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    # the sinks matter, so the check can fail: without them the output is another one
    assert (out - _dense_reference(q, k, v, window, 32, 7, causal)).abs().max() > 1e-4


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("window", "sink"), [(0, 96), (0, 500), (7, 96)])
def test_sinks_covering_everything_are_exact_attention(causal: bool, window: int, sink: int) -> None:
    q, k, v = _qkv(8)
    out = scatterbrain_attention(q, k, v, causal=causal, window=window, num_features=8, chunk_size=16, sink=sink)
    torch.testing.assert_close(out, _exact(q, k, v, causal), rtol=1e-10, atol=1e-12)


def test_sink_zero_is_unchanged_and_decoding_keeps_the_sinks() -> None:
    q, k, v = _qkv(9)
    kw = {"window": 8, "num_features": 16, "seed": 2, "chunk_size": 16}
    assert torch.equal(scatterbrain_attention(q, k, v, **kw), scatterbrain_attention(q, k, v, sink=0, **kw))
    full = scatterbrain_attention(q, k, v, sink=4, **kw)
    torch.testing.assert_close(scatterbrain_attention(q[:, :, -3:], k, v, sink=4, **kw), full[:, :, -3:], rtol=1e-12,
                               atol=1e-12)


def test_features_are_unbiased() -> None:
    """E[phi(q).phi(k)] = exp(q.k): one projection of 2000 independent orthogonal blocks is 2000 seeded draws of the
    block estimate; their mean is within 4 standard errors of exp(q.k) for each of several pairs, and dropping the
    ``exp(-|x|^2/2)`` factor (a biased map) fails the same test."""
    g = torch.Generator().manual_seed(3)
    dim, blocks = 8, 2000
    q, k = torch.randn(5, 1, dim, generator=g, dtype=F64) * 0.4, torch.randn(5, 1, dim, generator=g, dtype=F64) * 0.4
    proj = draw_projection(dim, 2 * dim * blocks, torch.Generator().manual_seed(0), dtype=F64)
    terms = torch.exp(log_features(q, proj) + log_features(k, proj)).squeeze(1)  # (5, m): phi(q)_r phi(k)_r
    plus, minus = terms.chunk(2, dim=-1)  # exp(+w.x) and exp(-w.x) features of the same rows
    est = (plus + minus).reshape(5, blocks, dim).sum(-1) * blocks  # each block's own estimate, (5, blocks)
    target = torch.exp((q * k).sum(-1)).squeeze(1)
    torch.testing.assert_close(est.mean(1), terms.sum(-1), rtol=1e-12, atol=0)  # the mean is phi(q).phi(k)
    stderr = est.std(1) / math.sqrt(blocks)
    assert ((est.mean(1) - target).abs() < 4 * stderr).all()
    biased = est * torch.exp((q.square().sum(-1) + k.square().sum(-1)).squeeze(1) / 2)[:, None]
    assert ((biased.mean(1) - target).abs() > 4 * biased.std(1) / math.sqrt(blocks)).all()


def test_projection_rows_are_orthogonal_within_a_block() -> None:
    p = draw_projection(16, 32, torch.Generator().manual_seed(0), dtype=F64)  # 16 rows: one orthogonal block
    gram = p @ p.T
    torch.testing.assert_close(gram - torch.diag(gram.diagonal()), torch.zeros_like(gram), atol=1e-10, rtol=0)


@pytest.mark.parametrize(("window", "chunk_size", "sink"), [(0, 16, 0), (8, 16, 0), (24, 16, 0), (0, 16, 4),
                                                           (8, 16, 20), (8, 16, 60)])
def test_causal_output_ignores_later_tokens(window: int, chunk_size: int, sink: int) -> None:
    q, k, v = _qkv(2)
    t = 37
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, :, t + 1:] = torch.randn_like(q2[:, :, t + 1:]) * 3
    k2[:, :, t + 1:] = torch.randn_like(k2[:, :, t + 1:]) * 30  # huge later keys would set any shared scale
    v2[:, :, t + 1:] = 1e6
    kw = {"window": window, "num_features": 16, "chunk_size": chunk_size, "sink": sink}
    a, b = scatterbrain_attention(q, k, v, **kw), scatterbrain_attention(q2, k2, v2, **kw)
    torch.testing.assert_close(a[:, :, :t + 1], b[:, :, :t + 1], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a[:, :, t + 1:], b[:, :, t + 1:])


def test_grouped_query_heads_equal_repeated_kv() -> None:
    """SmolLM2's layout, 9 query heads on 3 kv heads: query head h reads kv head h // 3."""
    q, k, v = _qkv(4, batch=1, heads=9, kv_heads=3, tokens=50)
    out = scatterbrain_attention(q, k, v, window=8, num_features=16, seed=5, chunk_size=16)
    assert out.shape == (1, 9, 50, 16)
    full = scatterbrain_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), window=8, num_features=16,
                                  seed=5, chunk_size=16)
    torch.testing.assert_close(out, full, rtol=1e-12, atol=1e-12)


def test_decode_queries_are_the_last_positions() -> None:
    q, k, v = _qkv(5)
    full = scatterbrain_attention(q, k, v, window=8, num_features=16)
    last = scatterbrain_attention(q[:, :, -3:], k, v, window=8, num_features=16)
    torch.testing.assert_close(last, full[:, :, -3:], rtol=1e-12, atol=1e-12)


def test_same_seed_same_output_and_dtype_kept() -> None:
    q, k, v = (t.float() for t in _qkv(6))
    a = scatterbrain_attention(q, k, v, window=4, num_features=16, seed=11)
    assert a.dtype == torch.float32
    assert torch.equal(a, scatterbrain_attention(q, k, v, window=4, num_features=16, seed=11))
    assert torch.equal(a, scatterbrain_attention(q, k, v, window=4, num_features=16,
                                                 generator=torch.Generator().manual_seed(11)))
    assert not torch.allclose(a, scatterbrain_attention(q, k, v, window=4, num_features=16, seed=12))
    assert scatterbrain_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), window=4, num_features=16).dtype \
        == torch.bfloat16


def _mean_error(window: int, num_features: int, seeds: range = range(4)) -> float:
    total = 0.0
    for s in seeds:
        q, k, v = _qkv(100 + s, batch=1, tokens=128)
        ref = _exact(q, k, v, True)
        out = scatterbrain_attention(q, k, v, window=window, num_features=num_features, seed=s, chunk_size=32)
        total += ((out - ref).norm() / ref.norm()).item()
    return total / len(seeds)


def test_error_falls_as_window_and_features_grow() -> None:
    by_window = [_mean_error(w, 16) for w in (0, 8, 32, 64)]
    by_features = [_mean_error(0, m) for m in (2, 8, 32, 128)]
    assert all(a > b for a, b in itertools.pairwise(by_window)), by_window
    assert all(a > b for a, b in itertools.pairwise(by_features)), by_features
    assert by_window[0] > 0.1  # the estimate is not already exact, so the test can fail


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"window": -1}, "window must be an int >= 0"),
    ({"num_features": 0}, "num_features must be an int >= 2"),
    ({"num_features": 7}, "num_features must be even"),
    ({"chunk_size": 0}, "chunk_size must be an int >= 1"),
    ({"sink": -1}, "sink must be an int >= 0"),
    ({"sink": 2.0}, "sink must be an int >= 0"),
    ({"scale": float("nan")}, "scale must be"),
])
def test_bad_settings_raise_one_line(kwargs: dict, match: str) -> None:
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match) as err:
        scatterbrain_attention(q, k, v, **kwargs)
    assert "\n" not in str(err.value)


def test_bad_tensors_raise_one_line() -> None:
    q, k, v = _qkv()
    nan_q = q.clone()
    nan_q[0, 0, 3, 1] = float("nan")
    cases = [((q[..., :8], k, v), "same head_dim"), ((nan_q, k, v), "q contains NaN"),
             ((q, k, v[:, :, :5]), "k and v must agree"), ((q[:, :3], k, v), "multiple of its heads"),
             ((q[0], k, v), "q must be a 4-D tensor"), ((q, k[:, :, :10], v[:, :, :10]), "more tokens than k")]
    for args, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            scatterbrain_attention(*args)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="window must be"):
        ScatterbrainConfig(window=-2)
    with pytest.raises(ValueError, match="sink must be an int >= 0") as err:
        ScatterbrainConfig(sink=-4)
    assert "\n" not in str(err.value)


def test_tiny_llama_full_window_equals_eager_and_is_restored() -> None:
    model, x = tiny_model("llama"), tiny_tokens(2, 40)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(x).logits
        with use_scatterbrain(model, window=40, num_features=8) as config:
            assert model.config._attn_implementation == ATTN_NAME and config.window == 40
            out = model(x).logits
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        with use_scatterbrain(model, window=4, num_features=16, seed=3):
            small, again = model(x).logits, model(x).logits
    assert torch.equal(small, again) and torch.isfinite(small).all()
    assert (small - ref).abs().max() > 1e-3  # a short window changes the output, so the first check can fail
    assert model.config._attn_implementation == "eager"
    assert not any(hasattr(m, "_rankwise_scatterbrain") for m in model.modules())


def test_tiny_llama_sinks_covering_everything_equal_eager() -> None:
    """``sink`` reaches every layer through ``use_scatterbrain``: sinks over all 40 tokens, no window, are exact."""
    model, x = tiny_model("llama"), tiny_tokens(2, 40)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(x).logits
        with use_scatterbrain(model, window=0, num_features=8, sink=40) as config:
            assert config.sink == 40
            out = model(x).logits
        with use_scatterbrain(model, window=0, num_features=8, sink=4):
            partial = model(x).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert (partial - ref).abs().max() > 1e-3  # fewer sinks than tokens is an estimate, so the check can fail


def test_use_scatterbrain_restores_on_error_and_checks_settings() -> None:
    model = tiny_model("llama")
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"), use_scatterbrain(model, window=8):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == before
    with pytest.raises(ValueError, match="unknown scatterbrain setting"):
        use_scatterbrain(model, windw=8).__enter__()  # settings are checked on entry
    with pytest.raises(ValueError, match="num_features must be even"):
        use_scatterbrain(model, num_features=3).__enter__()  # settings are checked on entry
    with pytest.raises(ValueError, match="sink must be an int >= 0"):
        use_scatterbrain(model, sink=-1).__enter__()  # settings are checked on entry
    with pytest.raises(ValueError, match="must be a transformers model"):
        use_scatterbrain(torch.nn.Linear(2, 2)).__enter__()  # settings are checked on entry


def test_tiny_llama_generation_with_cache_matches_eager() -> None:
    """Decoding with a KV cache (one query, many keys) under a window covering everything gives eager's tokens."""
    model, prompt = tiny_model("llama"), tiny_tokens(1, 12)
    model.set_attn_implementation("eager")
    ref = model.generate(prompt, max_new_tokens=6, do_sample=False)
    with use_scatterbrain(model, window=64, num_features=8):
        out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref)


def _eval_json(*args: object) -> dict:
    import json

    from typer.testing import CliRunner

    from rankwise.cli import app

    result = CliRunner().invoke(app, ["eval", *(str(a) for a in args), "--json", "--seq-len", "16",
                                      "--eval-samples", "4"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def test_cli_eval_with_scatterbrain_attention(tiny_dir) -> None:
    """`rankwise eval --attention scatterbrain`: a window covering every token gives the exact perplexity, a short
    one without sinks another; the settings are reported; they are refused without the option and with --stream."""
    from typer.testing import CliRunner

    from rankwise.cli import app

    exact = _eval_json(tiny_dir)
    covered = _eval_json(tiny_dir, "--attention", "scatterbrain", "--window", "16", "--features", "8")
    short = _eval_json(tiny_dir, "--attention", "scatterbrain", "--window", "2", "--features", "8")
    assert "attention" not in exact
    assert covered["attention"] == {"kind": "scatterbrain", "window": 16, "features": 8, "sink": 0, "seed": 0}
    assert covered["perplexity"] == pytest.approx(exact["perplexity"], rel=1e-5)
    # a random tiny model attends almost uniformly, so the estimate moves perplexity only slightly (1.7e-4 here)
    assert abs(short["perplexity"] - exact["perplexity"]) > 5e-5 * exact["perplexity"]
    for args, message in ((["--window", "8"], "add --attention scatterbrain"),
                          (["--attention", "scatterbrain", "--stream"], "drop --stream"),
                          (["--attention", "scatterbrain", "--features", "3"], "--features must be even")):
        result = CliRunner().invoke(app, ["eval", str(tiny_dir), "--seq-len", "16", "--eval-samples", "4", *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


def test_padding_and_model_attention_variants_are_refused() -> None:
    """transformers builds no mask for this implementation, so a padding mask would be dropped: it is refused, as
    are attention variants (softcap) the estimate does not reproduce."""
    model, x = tiny_model("llama"), tiny_tokens(2, 12)
    mask = torch.ones_like(x)
    with use_scatterbrain(model, window=4, num_features=8):
        model(x, attention_mask=mask)  # all ones: no padding, accepted
        mask[0, :3] = 0
        with pytest.raises(ValueError, match="this input has padding"):
            model(x, attention_mask=mask)
    from rankwise.nn.scatterbrain import _hf_attention

    module = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 8, 16)
    with use_scatterbrain(model, window=4, num_features=8), pytest.raises(ValueError, match="softcap"):
        _hf_attention(module, q, q[:, :2], q[:, :2], None, softcap=30.0)


def test_cli_refuses_tasks_and_odd_features_with_scatterbrain(tiny_dir) -> None:
    from typer.testing import CliRunner

    from rankwise.cli import app

    for args, message in ((["--tasks", "pydoc_cloze"], "lm-eval pads its batches"),
                          (["--features", "7"], "--features must be even")):
        result = CliRunner().invoke(app, ["eval", str(tiny_dir), "--attention", "scatterbrain", *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
