"""Monarch: the factor layout against the paper's ``P L P^T R``, the projection against per-block Eckart-Young, the
whitened variant against its closed form and the plain projection, the layer kind and the method's size contract."""

from __future__ import annotations

import itertools

import pytest
import torch

from rankwise.calibrate import LayerStats
from rankwise.linalg import Monarch, monarch_dense, monarch_matmul, monarch_project, whitened_monarch_project
from rankwise.methods import config_class, method_for
from rankwise.nn import MonarchLinear, kind_class

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _factors(m: int, n: int, b: int, r: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    return torch.randn(b, m // b, b * r, generator=g, dtype=F64), torch.randn(b, b * r, n // b, generator=g, dtype=F64)


def _perm(index: torch.Tensor) -> torch.Tensor:
    """The permutation matrix ``P`` with ``(P v)[i] = v[index[i]]``."""
    P = torch.zeros(len(index), len(index), dtype=F64)
    P[torch.arange(len(index)), index] = 1.0
    return P


def _paper_dense(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``P_out blockdiag(L) P_mid blockdiag(R)`` with the permutations written as explicit index maps."""
    b, q, br = left.shape
    r = br // b
    # After R, intermediate (k, l, rho) sits at k b r + l r + rho; L's block l wants (l, k, rho) at l b r + k r + rho.
    mid = torch.tensor([k * br + g * r + rho for g in range(b) for k in range(b) for rho in range(r)])
    # After L, value (l, a) sits at l q + a and is output row a b + l.
    out = torch.tensor([(o % b) * q + o // b for o in range(b * q)])
    return _perm(out) @ torch.block_diag(*left) @ _perm(mid) @ torch.block_diag(*right)


def _correlated(n: int, tokens: int, seed: int) -> torch.Tensor:
    """``(n, tokens)`` inputs correlated across all channels (hence across the input blocks)."""
    g = _gen(seed)
    mix = torch.randn(n, n, generator=g, dtype=F64) * torch.logspace(0, -2, n, dtype=F64)
    return mix @ torch.randn(n, tokens, generator=g, dtype=F64)


def _out_err(W: torch.Tensor, M: torch.Tensor, X: torch.Tensor) -> float:
    return float(torch.linalg.norm((W - M) @ X))


# --- layout ---------------------------------------------------------------------------------------------------------


def test_square_rank_one_is_the_papers_p_l_pt_r():
    """``m = n = b^2``, ``r = 1``: ``M = P L P^T R`` with ``P`` the reshape-and-transpose permutation."""
    b = 4
    left, right = _factors(16, 16, b, 1)
    P = _perm(torch.arange(16).reshape(b, b).T.reshape(-1))  # (P v) reads v as b x b and transposes
    torch.testing.assert_close(P, P.T)
    expected = P @ torch.block_diag(*left) @ P.T @ torch.block_diag(*right)
    torch.testing.assert_close(monarch_dense(left, right), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("m", "n", "b", "r"), [(12, 18, 3, 2), (24, 8, 2, 3), (20, 20, 5, 1), (6, 10, 1, 4)])
def test_dense_and_matmul_match_explicit_permutations(m, n, b, r):
    left, right = _factors(m, n, b, r, seed=1)
    M = _paper_dense(left, right)
    torch.testing.assert_close(monarch_dense(left, right), M, rtol=1e-12, atol=1e-12)
    x = torch.randn(2, 3, n, generator=_gen(2), dtype=F64)
    torch.testing.assert_close(monarch_matmul(x, left, right), x @ M.T, rtol=1e-12, atol=1e-12)
    assert Monarch(left, right).shape == (m, n) and Monarch(left, right).rank == r


# --- projection -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("m", "n", "b", "r"), [(16, 16, 4, 1), (24, 36, 3, 2), (40, 20, 2, 5)])
def test_projection_is_per_block_eckart_young(m, n, b, r):
    W = torch.randn(m, n, generator=_gen(3), dtype=F64)
    M = monarch_project(W, b, r).to_dense()
    p = n // b
    total = 0.0
    for g in range(b):
        for k in range(b):
            block = W[g::b, k * p:(k + 1) * p]  # rows a b + g, columns of input block k
            U, s, Vh = torch.linalg.svd(block, full_matrices=False)
            best = (U[:, :r] * s[:r]) @ Vh[:r]
            torch.testing.assert_close(M[g::b, k * p:(k + 1) * p], best, rtol=1e-10, atol=1e-10)
            total += float(s[r:].pow(2).sum())
    assert float(torch.linalg.norm(W - M)) == pytest.approx(total**0.5, rel=1e-10)


def test_rank_one_square_projection_is_frobenius_optimal():
    """The paper's case: no random Monarch matrix and no small move of the optimal factors does better."""
    b = 4
    W = torch.randn(16, 16, generator=_gen(4), dtype=F64)
    opt = monarch_project(W, b, 1)
    best = float(torch.linalg.norm(W - opt.to_dense()))
    g = _gen(5)
    for scale in (1e-3, 1e-1):
        for _ in range(50):
            dl = scale * torch.randn(opt.left.shape, generator=g, dtype=F64)
            dr = scale * torch.randn(opt.right.shape, generator=g, dtype=F64)
            assert best <= float(torch.linalg.norm(W - monarch_dense(opt.left + dl, opt.right + dr))) + 1e-12
    for _ in range(50):
        left, right = torch.randn(opt.left.shape, generator=g, dtype=F64), torch.randn(opt.right.shape, generator=g,
                                                                                       dtype=F64)
        assert best <= float(torch.linalg.norm(W - monarch_dense(left, right)))


@pytest.mark.parametrize(("m", "n", "b", "r"), [(16, 16, 4, 1), (24, 36, 3, 2), (40, 20, 2, 3)])
def test_exact_on_monarch_matrices_and_at_full_rank(m, n, b, r):
    left, right = _factors(m, n, b, r, seed=6)
    W = monarch_dense(left, right)
    torch.testing.assert_close(monarch_project(W, b, r).to_dense(), W, rtol=1e-9, atol=1e-9)
    A = torch.randn(m, n, generator=_gen(7), dtype=F64)
    full = min(m, n) // b
    torch.testing.assert_close(monarch_project(A, b, full).to_dense(), A, rtol=1e-10, atol=1e-10)
    assert float(torch.linalg.norm(A - monarch_project(A, b, full - 1).to_dense())) > 1e-3


def test_error_decreases_with_rank_and_blocks_of_one_are_low_rank():
    W = torch.randn(24, 36, generator=_gen(8), dtype=F64)
    errors = [float(torch.linalg.norm(W - monarch_project(W, 3, r).to_dense())) for r in range(1, 9)]
    assert all(a > b for a, b in itertools.pairwise(errors)) and errors[-1] < 1e-10
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(monarch_project(W, 1, 5).to_dense(), (U[:, :5] * s[:5]) @ Vh[:5])


def test_dtype_device_and_determinism():
    W = torch.randn(32, 48, generator=_gen(9)).to(torch.bfloat16)
    a, b = monarch_project(W, 4, 3), monarch_project(W, 4, 3)
    assert a.left.dtype == a.right.dtype == torch.bfloat16
    assert torch.equal(a.left, b.left) and torch.equal(a.right, b.right)
    ref = monarch_project(W.double(), 4, 3).to_dense()
    torch.testing.assert_close(a.to_dense().double(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize(("args", "field"), [((5, 1), "nblocks"), ((0, 1), "nblocks"), ((4, 7), "rank"),
                                             ((4, 0), "rank"), ((2.0, 1), "nblocks")])
def test_projection_rejects_bad_sizes(args, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        monarch_project(torch.randn(24, 28), *args)


# --- whitened -------------------------------------------------------------------------------------------------------


def test_whitened_is_exact_for_block_diagonal_covariance():
    """Inputs independent across blocks: each block pair is SVD-LLM's closed form ``[W S_k]_r S_k^-1``."""
    m, n, b, r = 18, 24, 3, 2
    p = n // b
    W = torch.randn(m, n, generator=_gen(10), dtype=F64)
    C = torch.block_diag(*[(x := _correlated(p, 60, 11 + k)) @ x.T for k in range(b)])
    fit = whitened_monarch_project(W, C, b, r)
    assert fit.whitening == ("cholesky",) * b
    M = fit.to_dense()
    for g in range(b):
        for k in range(b):
            S = torch.linalg.cholesky(C[k * p:(k + 1) * p, k * p:(k + 1) * p])
            U, s, Vh = torch.linalg.svd(W[g::b, k * p:(k + 1) * p] @ S, full_matrices=False)
            best = (U[:, :r] * s[:r]) @ Vh[:r] @ torch.linalg.inv(S)
            torch.testing.assert_close(M[g::b, k * p:(k + 1) * p], best, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(whitened_monarch_project(W, C, b, r, refit=False).to_dense(), M, rtol=1e-8,
                               atol=1e-8)


@pytest.mark.parametrize("r", [1, 2, 4])
def test_whitened_beats_plain_on_correlated_inputs(r):
    m, n, b = 24, 32, 4
    W = torch.randn(m, n, generator=_gen(12), dtype=F64)
    X = _correlated(n, 200, 13)
    C = X @ X.T
    plain = _out_err(W, monarch_project(W, b, r).to_dense(), X)
    blockwise = _out_err(W, whitened_monarch_project(W, C, b, r, refit=False).to_dense(), X)
    refit = _out_err(W, whitened_monarch_project(W, C, b, r).to_dense(), X)
    assert blockwise < 0.95 * plain  # the block-diagonal whitening alone already helps
    assert refit <= blockwise + 1e-9  # and the refit against the full covariance can only help further
    assert refit < 0.9 * plain


def test_whitened_is_exact_at_full_rank():
    W = torch.randn(24, 32, generator=_gen(27), dtype=F64)
    X = _correlated(32, 200, 28)
    for refit in (False, True):
        M = whitened_monarch_project(W, X @ X.T, 4, 6, refit=refit).to_dense()
        assert _out_err(W, M, X) < 1e-8 * float(torch.linalg.norm(W @ X))


def test_whitened_refit_is_least_squares_optimal_for_its_right_factor():
    m, n, b, r = 16, 24, 2, 3
    W = torch.randn(m, n, generator=_gen(14), dtype=F64)
    X = _correlated(n, 120, 15)
    fit = whitened_monarch_project(W, X @ X.T, b, r)
    best = _out_err(W, fit.to_dense(), X)
    g = _gen(16)
    for _ in range(30):
        left = fit.left + 1e-2 * torch.randn(fit.left.shape, generator=g, dtype=F64)
        assert best <= _out_err(W, monarch_dense(left, fit.right), X) + 1e-12


def test_whitened_ignores_the_covariance_scale_and_survives_singular_ones():
    W = torch.randn(12, 16, generator=_gen(17), dtype=F64)
    X = _correlated(16, 100, 18)
    a = whitened_monarch_project(W, X @ X.T, 2, 3).to_dense()
    torch.testing.assert_close(whitened_monarch_project(W, 1e3 * X @ X.T, 2, 3).to_dense(), a, rtol=1e-7, atol=1e-7)
    few = X[:, :3]  # 3 tokens for 8 inputs per block: singular blocks
    fit = whitened_monarch_project(W, few @ few.T, 2, 3)
    assert fit.whitening == ("eigh", "eigh") and bool(torch.isfinite(fit.to_dense()).all())
    zero = whitened_monarch_project(W, torch.zeros(16, 16, dtype=F64), 2, 3)
    assert bool(torch.isfinite(zero.to_dense()).all())
    with pytest.raises(ValueError, match="C must have shape"):
        whitened_monarch_project(W, torch.eye(12, dtype=F64), 2, 3)


# --- layer kind -----------------------------------------------------------------------------------------------------


def _layer(bias: bool = True, dtype: torch.dtype = F64) -> MonarchLinear:
    fit = monarch_project(torch.randn(24, 36, generator=_gen(19), dtype=F64), 3, 2)
    b = torch.randn(24, generator=_gen(20), dtype=F64) if bias else None
    return MonarchLinear.from_monarch(fit, b).to(dtype)


def test_layer_forward_equals_dense_weight():
    layer = _layer()
    x = torch.randn(5, 7, 36, generator=_gen(21), dtype=F64)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().T + layer.bias, rtol=1e-12, atol=1e-12)
    assert layer.weight.numel() == 0 and "weight" in layer.state_dict()


def test_layer_round_trips_through_spec_and_state_dict():
    layer = _layer()
    spec = layer.full_spec()
    assert spec == {"kind": "monarch", "in_features": 36, "out_features": 24, "bias": True, "nblocks": 3, "rank": 2}
    cls = kind_class(spec["kind"])
    assert cls.check_spec(36, 24, layer.spec()) is None
    twin = cls.from_spec(36, 24, True, layer.spec(), dtype=F64)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(4, 36, generator=_gen(22), dtype=F64)
    assert torch.equal(twin(x), layer(x))


@pytest.mark.parametrize(("spec", "field"), [
    ({"nblocks": 5, "rank": 1}, "nblocks"), ({"nblocks": 0, "rank": 1}, "nblocks"),
    ({"nblocks": True, "rank": 1}, "nblocks"), ({"nblocks": 3, "rank": 9}, "rank"),
    ({"nblocks": 3, "rank": 0}, "rank"), ({"nblocks": 3, "rank": 2.0}, "rank"), ({"nblocks": 3}, "rank"),
    ({"nblocks": 3, "rank": 1, "seed": 0}, "seed"),
])
def test_bad_spec_is_one_line_naming_the_field(spec, field):
    error = MonarchLinear.check_spec(36, 24, spec)
    assert error is not None and error.startswith(f"{field}: ") and "\n" not in error
    if set(spec) == {"nblocks", "rank"}:
        with pytest.raises(ValueError, match=f"^{field}: "):
            MonarchLinear(36, 24, spec["nblocks"], spec["rank"])


# --- method ---------------------------------------------------------------------------------------------------------


def _stats(X: torch.Tensor) -> LayerStats:
    return LayerStats(n=X.shape[0], xxt=X @ X.T, count=X.shape[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("whiten", [False, True])
def test_method_cost_equals_layer_size(dtype, whiten):
    config = config_class("monarch")(nblocks=4, whiten=whiten)
    W = torch.randn(32, 48, generator=_gen(23)).to(dtype)
    X = _correlated(48, 100, 24)
    layer = method_for(config)(W, _stats(X), 3, config, "w")
    assert isinstance(layer, MonarchLinear) and layer.bias is None and layer.left.dtype == dtype
    cost = config.cost(32, 48, 3, dtype.itemsize)
    assert (cost.params, cost.bytes) == (layer.num_params, layer.nbytes) == (4 * 3 * 80, 4 * 3 * 80 * dtype.itemsize)
    assert cost.bytes == layer.stored_bytes(dtype.itemsize)
    again = method_for(config)(W, _stats(X), 3, config, "w")
    assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), again.state_dict().values(),
                                                 strict=True))


def test_method_whitening_lowers_output_error_and_needs_statistics():
    cls = config_class("monarch")
    plain, whitened = cls(whiten=False), cls()
    assert plain.needs == frozenset() and whitened.needs == frozenset({"xxt"})
    W = torch.randn(32, 48, generator=_gen(25), dtype=F64)
    X = _correlated(48, 200, 26)
    errs = [_out_err(W, method_for(c)(W, _stats(X), 2, c, "w").dense_weight().detach(), X) for c in (plain, whitened)]
    assert errs[1] < 0.9 * errs[0]
    with pytest.raises(ValueError, match="needs the input covariance for w"):
        method_for(whitened)(W, None, 2, whitened, "w")
    assert isinstance(method_for(plain)(W, None, 2, plain, "w"), MonarchLinear)


def test_method_knob_range_and_cost():
    config = config_class("monarch")(nblocks=4)
    assert config.knob == "rank" and config.knob_range(576, 192) == (1, 48)
    costs = [config.cost(576, 192, r, 2).bytes for r in range(1, 49)]
    assert costs == sorted(costs) and costs[0] == 4 * 768 * 2
    with pytest.raises(ValueError, match="nblocks: 4 does not divide"):
        config.knob_range(576, 190)


@pytest.mark.parametrize(("field", "value"), [("nblocks", 0), ("nblocks", 2.5), ("nblocks", True),
                                              ("whiten", "yes"), ("damp", -1.0), ("damp", float("nan"))])
def test_bad_config_fields(field, value):
    with pytest.raises(ValueError, match=f"^{field} must"):
        config_class("monarch")(**{field: value})
