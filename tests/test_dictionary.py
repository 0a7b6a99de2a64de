"""CoSpaDi sparse dictionaries: the pursuit against planted codes and the thresholding closed form, K-SVD's monotone
error, exactness at full size, the whitened objective against its definition and against SVD-LLM, the layer kind and
the method's size contract."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from rankwise.calibrate import LayerStats
from rankwise.linalg import omp, sparse_dictionary, whitened_dictionary, whitened_svd
from rankwise.linalg.dictionary import ksvd, scatter_codes
from rankwise.methods import config_class, method_for
from rankwise.nn import DictionaryLinear, kind_class
from rankwise.nn.dictionary import GATHER_LIMIT, index_dtype

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _planted(m: int, n: int, k: int, s: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                       torch.Tensor]:
    """``(Y, D, values, indices)`` with ``Y = codes @ D``: ``s`` random atoms per row, values bounded away from 0."""
    g = _gen(seed)
    D = torch.randn(k, n, generator=g, dtype=F64)
    D /= D.norm(dim=1, keepdim=True)
    indices = torch.stack([torch.randperm(k, generator=g)[:s] for _ in range(m)]).sort(1).values
    values = torch.randn(m, s, generator=g, dtype=F64).sign() * (1 + torch.rand(m, s, generator=g, dtype=F64))
    return scatter_codes(values, indices, k) @ D, D, values, indices


def _correlated(n: int, tokens: int, seed: int) -> torch.Tensor:
    """``(n, tokens)`` inputs with strongly correlated channels of very different scales."""
    g = _gen(seed)
    mix = torch.randn(n, n, generator=g, dtype=F64) * torch.logspace(0, -2, n, dtype=F64)
    return mix @ torch.randn(n, tokens, generator=g, dtype=F64)


def _out_err(W: torch.Tensor, M: torch.Tensor, X: torch.Tensor) -> float:
    return float(torch.linalg.norm((W - M) @ X))


def _stats(X: torch.Tensor) -> LayerStats:
    return LayerStats(n=X.shape[0], xxt=X @ X.T, count=X.shape[1])


# --- orthogonal matching pursuit ------------------------------------------------------------------------------------


def test_omp_recovers_a_planted_code_exactly():
    Y, D, values, indices = _planted(m=200, n=64, k=96, s=4)
    got_values, got_indices = omp(Y, D, 4)
    assert torch.equal(got_indices, indices)
    torch.testing.assert_close(got_values, values, rtol=1e-10, atol=1e-10)


def test_omp_chooses_by_normalised_atoms_and_scales_the_coefficients():
    Y, D, _, _ = _planted(m=50, n=32, k=48, s=3, seed=1)
    scale = torch.linspace(0.5, 3.0, 48, dtype=F64)[:, None]
    unit_values, unit_indices = omp(Y, D, 3)
    values, indices = omp(Y, D * scale, 3)
    assert torch.equal(indices, unit_indices)
    torch.testing.assert_close(values * scale[indices, 0], unit_values, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("steps", [None, 4, 1])
def test_omp_on_an_orthonormal_dictionary_is_hard_thresholding(steps):
    """With ``D D^T = I`` every pursuit step keeps the largest correlations: the top-``s`` of ``|Y D^T|``."""
    g = _gen(2)
    D = torch.linalg.qr(torch.randn(40, 24, generator=g, dtype=F64)).Q.T  # (24, 40) orthonormal rows
    Y = torch.randn(30, 40, generator=g, dtype=F64)
    corr = Y @ D.T
    top = corr.abs().topk(10, dim=1).indices.sort(1).values
    values, indices = omp(Y, D, 10, steps=steps)
    assert torch.equal(indices, top)
    torch.testing.assert_close(values, corr.gather(1, top), rtol=1e-12, atol=1e-12)


def test_omp_least_squares_on_its_support():
    """The values are the least-squares coefficients on the chosen atoms (each step, so also at the end)."""
    g = _gen(3)
    Y, D = torch.randn(20, 16, generator=g, dtype=F64), torch.randn(24, 16, generator=g, dtype=F64)
    values, indices = omp(Y, D, 5, steps=3)
    for row in range(20):
        sub = D[indices[row]]  # (5, n)
        best = torch.linalg.lstsq(sub.T, Y[row][:, None]).solution.squeeze(1)
        torch.testing.assert_close(values[row], best, rtol=1e-9, atol=1e-9)


def test_omp_survives_dependent_and_zero_atoms():
    """Repeated and zero atoms add nothing to the span: no NaN, the fit is still exact, the extra slots get 0."""
    Y, D, _, _ = _planted(m=30, n=20, k=10, s=3, seed=4)
    D2 = torch.cat([D, D[:4], torch.zeros(2, 20, dtype=F64)])  # atoms 10..13 repeat 0..3, 14 and 15 are zero
    values, indices = omp(Y, D2, 8, steps=3)
    assert bool(torch.isfinite(values).all())
    torch.testing.assert_close(scatter_codes(values, indices, 16) @ D2, Y, rtol=1e-9, atol=1e-9)


def test_omp_rejects_bad_arguments():
    Y, D = torch.randn(4, 6), torch.randn(5, 6)
    with pytest.raises(ValueError, match="nonzeros must be at most the number of atoms 5"):
        omp(Y, D, 6)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        omp(Y, D, 2, steps=0)
    with pytest.raises(ValueError, match="columns"):
        omp(Y, torch.randn(5, 7), 2)


# --- K-SVD and the fit of a weight ----------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [None, 2])
def test_ksvd_never_increases_the_error(steps):
    g = _gen(5)
    Y = torch.randn(120, 40, generator=g, dtype=F64)
    D0 = torch.randn(30, 40, generator=g, dtype=F64)
    D, values, indices, errors = ksvd(Y, D0, 6, 5, steps=steps)
    assert len(errors) == 1 + 5 + 6 * 2 * 2  # the first codes, 5 pursuits, after each of the 6 two sweeps + refits
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(errors))
    assert errors[-1] < 0.9 * errors[0]  # and it does learn
    torch.testing.assert_close(torch.linalg.vector_norm(D, dim=1), torch.ones(30, dtype=F64))
    R = Y - scatter_codes(values, indices, 30) @ D
    assert float((R * R).sum()) == pytest.approx(errors[-1], rel=1e-10)
    assert bool((indices[:, 1:] > indices[:, :-1]).all())  # distinct and ascending


def test_fit_errors_are_reported_and_monotone():
    W = torch.randn(90, 48, generator=_gen(6), dtype=F64)
    result = sparse_dictionary(W, 24, 12, iterations=4)
    errors = result.info["errors"]
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(errors))
    assert float(torch.linalg.norm(W - result.to_dense()) / torch.linalg.norm(W)) == pytest.approx(errors[-1])


def test_full_dictionary_reconstructs_exactly():
    """``s = k = n``: the singular-vector start spans everything, so both fits are exact."""
    g = _gen(7)
    W = torch.randn(30, 20, generator=g, dtype=F64)
    X = _correlated(20, 200, seed=7)
    for result in (sparse_dictionary(W, 20, 20, iterations=1), whitened_dictionary(W, X @ X.T, 20, 20)):
        torch.testing.assert_close(result.to_dense(), W, rtol=1e-9, atol=1e-9)


def test_with_all_codes_the_start_is_the_best_rank_k_fit():
    """``s = k``: every row uses every atom, so the fit is the Eckart-Young truncation."""
    W = torch.randn(40, 30, generator=_gen(9), dtype=F64)
    result = sparse_dictionary(W, 8, 8, iterations=2)
    S = torch.linalg.svdvals(W)
    assert float(torch.linalg.norm(W - result.to_dense())) == pytest.approx(float(S[8:].norm()), rel=1e-9)


def test_whitened_fit_is_the_plain_fit_of_w_l_mapped_back():
    """With ``C = L L^T``: ``W' L`` equals the plain fit of ``W L`` (``D = D_w L^-1``, codes unchanged)."""
    g = _gen(10)
    W = torch.randn(50, 24, generator=g, dtype=F64)
    X = _correlated(24, 300, seed=10)
    C = X @ X.T
    L = torch.linalg.cholesky(C)
    whitened = whitened_dictionary(W, C, 16, 8, iterations=2, steps=4)
    plain = sparse_dictionary(W @ L, 16, 8, iterations=2, steps=4)
    assert torch.equal(whitened.indices, plain.indices)
    torch.testing.assert_close(whitened.to_dense() @ L, plain.to_dense(), rtol=1e-8, atol=1e-8)
    assert whitened.info["whitening"]["method"] == "cholesky"


def test_whitened_beats_unwhitened_on_the_output_error():
    g = _gen(11)
    W = torch.randn(64, 32, generator=g, dtype=F64)
    X = _correlated(32, 400, seed=11)
    whitened = whitened_dictionary(W, X @ X.T, 16, 8, iterations=2)
    plain = sparse_dictionary(W, 16, 8, iterations=2)
    assert _out_err(W, whitened.to_dense(), X) < 0.8 * _out_err(W, plain.to_dense(), X)


def test_dictionary_beats_svd_llm_on_a_dictionary_sparse_weight():
    """``W = S D`` with 16 of 32 atoms per row: at the same parameter count the rank SVD-LLM affords (19) loses.

    (K-SVD from the singular vectors does not recover the planted atoms exactly, it stops near 0.66x.)"""
    m, n, k, s = 256, 64, 32, 16
    W, _, _, _ = _planted(m, n, k, s, seed=12)
    X = _correlated(n, 500, seed=13)
    C = X @ X.T
    rank = (k * n + m * s) // (m + n)
    svd = whitened_svd(W, C, rank)
    result = whitened_dictionary(W, C, k, s, iterations=3, steps=4)
    assert result.num_params <= k * n + m * s and svd.num_params <= k * n + m * s
    assert _out_err(W, result.to_dense(), X) < 0.75 * _out_err(W, svd.to_dense(), X)


def test_error_does_not_rise_with_atoms():
    W = torch.randn(80, 40, generator=_gen(14), dtype=F64)
    X = _correlated(40, 300, seed=14)
    errors = [_out_err(W, whitened_dictionary(W, X @ X.T, k, k // 2).to_dense(), X) for k in (4, 8, 16, 32)]
    assert errors == sorted(errors, reverse=True)


def test_atoms_beyond_the_rank_are_drawn_with_the_seed():
    W = torch.randn(20, 8, generator=_gen(15), dtype=F64)
    a, b = (sparse_dictionary(W, 14, 3, iterations=1, generator=seed) for seed in (0, 0))
    c = sparse_dictionary(W, 14, 3, iterations=1, generator=1)
    assert torch.equal(a.dictionary, b.dictionary) and torch.equal(a.values, b.values)
    assert not torch.equal(a.dictionary, c.dictionary)


def test_fit_returns_the_input_dtype():
    W = torch.randn(24, 16, generator=_gen(16)).to(torch.bfloat16)
    result = sparse_dictionary(W, 8, 4)
    assert result.dictionary.dtype == result.values.dtype == torch.bfloat16
    assert result.indices.dtype == torch.int64


def test_fit_rejects_bad_sizes():
    W = torch.randn(8, 6)
    with pytest.raises(ValueError, match="nonzeros must be at most atoms = 4"):
        sparse_dictionary(W, 4, 5)
    with pytest.raises(ValueError, match="atoms must be an integer >= 1"):
        sparse_dictionary(W, 0, 1)
    with pytest.raises(ValueError, match="iterations must be an integer >= 0"):
        sparse_dictionary(W, 4, 2, iterations=-1)
    with pytest.raises(ValueError, match=r"C must have shape \(n, n\)"):
        whitened_dictionary(W, torch.eye(5), 4, 2)


# --- the layer kind -------------------------------------------------------------------------------------------------


def _layer(m: int = 24, n: int = 16, k: int = 10, s: int = 4, bias: bool = True, seed: int = 0) -> DictionaryLinear:
    W = torch.randn(m, n, generator=_gen(seed), dtype=F64)
    layer = DictionaryLinear.from_dictionary(sparse_dictionary(W, k, s), None)
    if bias:
        layer.set_bias(torch.randn(m, generator=_gen(seed + 1), dtype=F64))
    return layer


@pytest.mark.parametrize("tokens", [3, GATHER_LIMIT])  # the gathering path (decoding) and the dense-codes path
def test_forward_equals_the_dense_weight(tokens):
    layer = _layer()
    x = torch.randn(tokens // (24 * 4) + 1, 16, generator=_gen(17), dtype=F64)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().T + layer.bias, rtol=1e-12, atol=1e-12)


def test_dense_weight_is_codes_times_dictionary():
    W = torch.randn(24, 16, generator=_gen(18), dtype=F64)
    result = sparse_dictionary(W, 10, 4)
    layer = DictionaryLinear.from_dictionary(result)
    torch.testing.assert_close(layer.dense_weight(), result.to_dense())
    dense = torch.zeros(24, 10, dtype=F64)
    for row in range(24):
        for j in range(4):
            dense[row, int(result.indices[row, j])] = result.values[row, j]
    torch.testing.assert_close(layer.codes(), dense)
    assert layer.indices.dtype == torch.int16


def test_spec_and_state_dict_round_trip():
    layer = _layer()
    cls = kind_class("dictionary")
    assert cls.check_spec(16, 24, layer.spec()) is None
    fresh = cls.from_spec(16, 24, True, layer.spec(), dtype=F64)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(5, 16, generator=_gen(19), dtype=F64)
    assert torch.equal(fresh(x), layer(x))
    assert layer.full_spec() == {"kind": "dictionary", "in_features": 16, "out_features": 24, "bias": True,
                                 "atoms": 10, "nonzeros": 4}


def test_wide_dictionaries_store_int32_indices():
    assert index_dtype(32767) == torch.int16 and index_dtype(32768) == torch.int32
    layer = DictionaryLinear(1, 3, 40000, 2, bias=False)
    assert layer.indices.dtype == torch.int32
    assert layer.nbytes == (40000 * 1 + 3 * 2) * 4 + 3 * 2 * 4


@pytest.mark.parametrize("bad", [10, -1])
def test_out_of_range_indices_are_refused_at_load(bad):
    parent = nn.Sequential(_layer())
    state = parent.state_dict()
    state["0.indices"] = state["0.indices"].clone()
    state["0.indices"][3, 1] = bad
    with pytest.raises(ValueError, match=r"^dictionary layer 0: indices: must lie in \[0, atoms = 10\)"):
        parent.load_state_dict(state)


def test_out_of_range_indices_are_refused_after_loading_in_place():
    """transformers assigns tensors without ``load_state_dict``; the post-load hook checks them."""
    parent = nn.Sequential(nn.Identity(), _layer())
    parent.get_submodule("1").resolve(parent)  # valid: nothing happens
    with torch.no_grad():
        parent[1].indices[0, 0] = 10
    with pytest.raises(ValueError, match=r"^dictionary layer 1: indices: must lie in \[0, atoms = 10\)"):
        parent[1].resolve(parent)


def test_save_and_load_round_trip_and_refuse_corrupt_indices(tmp_path):
    from safetensors.torch import load_file, save_file

    from rankwise.compression import compress_
    from rankwise.io.save import load, save
    from tests.tiny_models import tiny_model, tiny_tokens

    model, tokens = tiny_model("llama"), tiny_tokens()
    compress_(model, config_class("dictionary")(ratio=0.3), tokens, progress=False)
    save(model, tmp_path / "out")
    loaded = load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    shard = next((tmp_path / "out").glob("*.safetensors"))
    state = load_file(shard)
    key = next(k for k in state if k.endswith(".indices"))
    state[key][0, 0] = -1
    save_file(state, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"dictionary layer {key.removesuffix('.indices')}: indices: must lie in"):
        load(tmp_path / "out", verify=False)  # past the checksum: validation alone refuses it


def test_float_indices_are_refused_at_load():
    layer = _layer(bias=False)
    state = layer.state_dict()
    state["indices"] = state["indices"].double()
    with pytest.raises(ValueError, match="indices: must be integers"):
        layer.load_state_dict(state)


@pytest.mark.parametrize(("spec", "field"), [
    ({"atoms": 4}, "nonzeros"),
    ({"atoms": 4, "nonzeros": 2, "rank": 3}, "rank"),
    ({"atoms": 0, "nonzeros": 1}, "atoms"),
    ({"atoms": True, "nonzeros": 1}, "atoms"),
    ({"atoms": 2**31, "nonzeros": 1}, "atoms"),
    ({"atoms": 4, "nonzeros": 5}, "nonzeros"),
    ({"atoms": 4, "nonzeros": 0}, "nonzeros"),
    ({"atoms": 4, "nonzeros": 2.0}, "nonzeros"),
])
def test_bad_specs_name_the_field(spec, field):
    error = DictionaryLinear.check_spec(16, 24, spec)
    assert error is not None and error.startswith(f"{field}: ") and "\n" not in error


def test_constructor_refuses_a_bad_spec():
    with pytest.raises(ValueError, match=r"^nonzeros: must be an integer in"):
        DictionaryLinear(16, 24, 4, 5)


def test_num_params_counts_values_and_nbytes_adds_indices():
    layer = _layer(m=24, n=16, k=10, s=4)
    assert layer.num_params == 10 * 16 + 24 * 4 + 24
    assert layer.nbytes == (10 * 16 + 24 * 4 + 24) * 8 + 24 * 4 * 2


# --- the method -----------------------------------------------------------------------------------------------------


def _method(**fields):
    cls = config_class("dictionary")
    return cls(**fields), method_for(cls(**fields))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_method_cost_is_the_built_layer(dtype):
    config, fn = _method(ratio=0.2)
    X = _correlated(48, 400, seed=20)
    stats = _stats(X)
    W = torch.randn(80, 48, generator=_gen(20)).to(dtype)
    size = torch.finfo(dtype).bits // 8
    for knob in (1, 7, 30, config.knob_range(80, 48)[1]):
        layer = fn(W, stats, knob, config, "layer")
        cost = config.cost(80, 48, knob, size)
        assert layer.bias is None
        assert all(t.dtype == dtype for t in layer.parameters())
        assert (cost.params, cost.bytes) == (layer.num_params, layer.stored_bytes(size)) == (layer.num_params,
                                                                                             layer.nbytes)
        assert layer.spec() == {"atoms": knob, "nonzeros": config.nonzeros(knob)}


def test_method_cost_formula_and_range():
    config, _ = _method(atoms_per_nonzero=2.0)
    assert config.cost(1536, 576, 526, 2).params == 526 * 576 + 1536 * 263
    assert config.cost(1536, 576, 526, 2).bytes == (526 * 576 + 1536 * 263) * 2 + 1536 * 263 * 2
    for m, n in [(1536, 576), (576, 1536), (192, 576), (5, 3), (1, 1)]:
        lo, hi = config.knob_range(m, n)
        assert lo == 1 and hi <= m and config.nonzeros(hi) <= n
        costs = [config.cost(m, n, k, 2).bytes for k in range(lo, hi + 1)]
        assert costs == sorted(costs)
    assert _method(atoms_per_nonzero=1.0)[0].knob_range(576, 192) == (1, 192)


def test_method_is_deterministic_under_a_seed():
    config, fn = _method(seed=3, iterations=1)
    W = torch.randn(30, 12, generator=_gen(21))
    stats = _stats(_correlated(12, 100, seed=21).float())
    a, b = (fn(W, stats, 20, config, "layer") for _ in range(2))  # 20 atoms > min(m, n): some drawn at random
    for key, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[key])


def test_method_without_covariance_needs_whiten_off():
    config, fn = _method()
    with pytest.raises(ValueError, match=r"needs the input covariance for blocks\.0\.q"):
        fn(torch.randn(8, 6), None, 4, config, "blocks.0.q")
    assert config.needs == frozenset({"xxt"})
    plain, fn = _method(whiten=False)
    assert plain.needs == frozenset()
    W = torch.randn(8, 6, generator=_gen(22), dtype=F64)
    expected = sparse_dictionary(W, 6, 3, iterations=plain.iterations, steps=plain.omp_steps,
                                 sweeps=plain.sweeps).to_dense()
    torch.testing.assert_close(fn(W, None, 6, plain, "q").dense_weight(), expected)


@pytest.mark.parametrize(("fields", "message"), [
    ({"atoms_per_nonzero": 0.5}, "atoms_per_nonzero must be a finite number >= 1"),
    ({"atoms_per_nonzero": True}, "atoms_per_nonzero"),
    ({"iterations": -1}, "iterations must be an integer >= 0"),
    ({"iterations": 1.5}, "iterations"),
    ({"omp_steps": 0}, "omp_steps must be an integer >= 1"),
    ({"sweeps": -1}, "sweeps must be an integer >= 0"),
    ({"whiten": 1}, "whiten must be True or False"),
    ({"damp": -0.1}, "damp must be a finite number >= 0"),
    ({"seed": "a"}, "seed must be an integer"),
])
def test_config_rejects_bad_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        config_class("dictionary")(**fields)
