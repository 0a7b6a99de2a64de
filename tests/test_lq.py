"""LQ-LoRA: the NF-b quantiser (codebook, exact round trip, nearest level, scale bound, packing layout), the
alternation against the paper's two steps written out, its stopping rule, the data-aware and Fisher variants against
plain, the ``"lq"`` layer kind and the method's size contract."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F

from rankwise.calibrate import LayerStats
from rankwise.linalg import (
    lq_decompose,
    nf_codebook,
    nf_dequantize,
    nf_quantize,
    pack_codes,
    truncated_svd,
    whiten,
    whitened_svd,
)
from rankwise.linalg.quant import NF_BITS, packed_nbytes, unpack_codes
from rankwise.methods import config_class, method_for
from rankwise.nn import QuantLowRankLinear, kind_class

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _heavy(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """Gaussian entries plus a few large outliers and a strong low-rank part (the shape of LLM weights)."""
    g = _gen(seed)
    W = torch.randn(m, n, generator=g, dtype=F64)
    W += 3.0 * torch.randn(m, 2, generator=g, dtype=F64) @ torch.randn(2, n, generator=g, dtype=F64) / math.sqrt(n)
    outliers = torch.rand(m, n, generator=g, dtype=F64) < 0.01
    return W + outliers * torch.randn(m, n, generator=g, dtype=F64) * 15.0


# ---- the quantiser ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", NF_BITS)
def test_codebook_shape(bits):
    levels = nf_codebook(bits, dtype=F64)
    assert levels.numel() == 2**bits
    assert bool((levels[1:] > levels[:-1]).all())
    assert levels[0] == -1.0 and levels[-1] == 1.0 and int((levels == 0).sum()) == 1
    assert int((levels > 0).sum()) == 2 ** (bits - 1)  # QLoRA's asymmetric map: one more positive level


def test_nf4_codebook_is_qlora_table():
    # bitsandbytes' / torchao's NF4 table (QLoRA, Dettmers et al. 2023), as printed there to 4 decimals.
    table = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461,
                          0.3379, 0.4407, 0.5626, 0.7230, 1.0], dtype=F64)
    torch.testing.assert_close(nf_codebook(4, dtype=F64), table, atol=1e-4, rtol=0)


def _on_grid(bits: int, scale_block: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix every entry of which is a level times its block's scale, with scales the double quantisation
    represents exactly: ``W``, and its level indices."""
    g = _gen(bits)
    blocks, block = 8, 16
    idx = torch.randint(0, 2**bits, (blocks, block), generator=g)
    idx[:, 3] = 2**bits - 1  # level 1.0 in every block: the block's absmax is its scale
    c = torch.randint(0, 256, (blocks,), generator=g)
    c[0], c[1::scale_block] = 0, 255  # the global minimum, and a full-range code in each group
    scales = 0.5 + c.to(dtype) * 2.0**-6
    W = nf_codebook(bits, dtype=dtype)[idx] * scales[:, None]
    return W.reshape(4, 32), idx.reshape(4, 32)


@pytest.mark.parametrize("bits", NF_BITS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("scale_block", [3, 256])
def test_round_trip_exact_on_codebook_values(bits, dtype, scale_block):
    W, idx = _on_grid(bits, scale_block, dtype)
    q = nf_quantize(W, bits, block_size=16, scale_block=scale_block)
    assert torch.equal(q.codes.long(), idx)
    assert torch.equal(q.dequantize(), W)
    assert torch.equal(nf_dequantize(q.packed(), q.scale_codes, q.scale_steps, q.scale_offset, bits, 16, scale_block,
                                     q.shape), W)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_each_entry_takes_the_nearest_level_and_scales_are_within_half_a_step(bits):
    W = torch.randn(8, 48, generator=_gen(1), dtype=F64) * torch.logspace(-2, 1, 48, dtype=F64)
    q = nf_quantize(W, bits, block_size=16, scale_block=5)
    blocks = W.reshape(-1, 16)
    group = torch.arange(blocks.shape[0]) // 5
    scales = q.scale_offset + q.scale_codes.to(F64) * q.scale_steps[group]  # (blocks,)
    assert bool(((scales - blocks.abs().amax(1)).abs() <= q.scale_steps[group] / 2 + 1e-12).all())
    candidates = nf_codebook(bits, dtype=F64)[None, None, :] * scales[:, None, None]  # (blocks, 1, levels)
    best = (blocks[..., None] - candidates).abs().amin(-1)  # brute-force nearest level
    err = (blocks - q.dequantize().reshape(-1, 16)).abs()
    torch.testing.assert_close(err, best, atol=1e-12, rtol=0)


def test_error_falls_with_bits():
    W = torch.randn(64, 128, generator=_gen(2), dtype=torch.float32)
    errors = [float((nf_quantize(W, b).dequantize() - W).norm() / W.norm()) for b in NF_BITS]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.02


@pytest.mark.parametrize("bits", [*NF_BITS, 1, 5, 9, 11, 15, 16, 31])
@pytest.mark.parametrize("numel", [1, 7, 8, 1001])
def test_packing_round_trip(bits, numel):
    dtype = torch.uint8 if bits <= 8 else torch.int64
    codes = torch.randint(0, 2**bits, (numel,), generator=_gen(numel), dtype=dtype)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(numel, bits) == math.ceil(numel / 8) * bits
    unpacked = unpack_codes(packed, bits, numel)
    assert unpacked.dtype == dtype and torch.equal(unpacked, codes)


def test_packing_layout():
    # Codes are padded to a multiple of 8 with zeros; the first code goes to the lowest bits.
    assert pack_codes(torch.tensor([1, 2]), 4).tolist() == [0x21, 0, 0, 0]
    assert pack_codes(torch.tensor([1, 2, 3, 0, 3]), 2).tolist() == [1 | 2 << 2 | 3 << 4, 3]
    # 3 bits: a plane of the low 2 bits (4 codes a byte), then a plane of the high bit (8 codes a byte).
    assert pack_codes(torch.arange(8), 3).tolist() == [0b11100100, 0b11100100, 0b11110000]
    assert pack_codes(torch.tensor([200]), 8).tolist() == [200, 0, 0, 0, 0, 0, 0, 0]
    # 11 bits: an 8-bit plane, a 2-bit plane, a 1-bit plane.
    assert pack_codes(torch.tensor([0x5FF]), 11).tolist() == [0xFF] + [0] * 7 + [0b01, 0] + [1]
    with pytest.raises(ValueError, match=r"bits must be an integer in \[1, 31\], got 32"):
        pack_codes(torch.tensor([1]), 32)
    with pytest.raises(ValueError, match="packed must be a flat uint8 tensor of 3 bytes"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 3, 8)


def test_quantiser_rejects_bad_layouts():
    W = torch.randn(4, 6)
    with pytest.raises(ValueError, match="block_size must divide the matrix's 24 entries, got 16"):
        nf_quantize(W, 3, block_size=16)
    with pytest.raises(ValueError, match="scale_block must be a positive integer"):
        nf_quantize(W, 3, block_size=8, scale_block=0)


# ---- the alternation --------------------------------------------------------------------------------------------

def _paper_rounds(W: torch.Tensor, rank: int, rounds: int) -> list[tuple[float, torch.Tensor]]:
    """LQ-LoRA's loop written out: ``L = SVD_r(W - Q)``, ``Q = quant(W - L)``, from ``Q = 0``; (error, Q + L)."""
    Q = torch.zeros_like(W)
    out = []
    for _ in range(rounds):
        L = truncated_svd(W - Q, rank, solver="exact").to_dense()
        Q = nf_quantize(W - L, 3, block_size=16).dequantize()
        out.append((float(torch.linalg.norm(W - Q - L)), Q + L))
    return out


def test_alternation_equals_the_paper_steps():
    W = _heavy(24, 48)
    rounds = _paper_rounds(W, 3, 3)
    for t in (1, 2, 3):
        res = lq_decompose(W, 3, bits=3, block_size=16, iterations=t, solver="exact")
        expected = [e for e, _ in rounds[:t]]
        assert res.errors == pytest.approx(expected[:len(res.errors)], rel=1e-10)
        best = min(range(len(res.errors)), key=res.errors.__getitem__)
        torch.testing.assert_close(res.to_dense(), rounds[best][1], atol=1e-10, rtol=0)


@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_alternation_stops_when_the_error_rises_and_keeps_the_best(solver):
    W = torch.randn(32, 64, generator=_gen(0), dtype=torch.float32)
    res = lq_decompose(W, 4, bits=3, block_size=16, iterations=60, solver=solver)
    assert len(res.errors) < 60  # it did stop on a rise, not on the round limit
    assert res.kept == len(res.errors) - 2
    assert res.errors[-1] >= res.errors[-2]
    assert all(a > b for a, b in zip(res.errors[:-1], res.errors[1:-1], strict=False))  # fell until then
    assert res.error == min(res.errors)
    assert float(torch.linalg.norm(W - res.to_dense())) == pytest.approx(res.error, rel=1e-5)


def test_lq_beats_quantisation_alone_svd_alone_and_one_round():
    W = _heavy(64, 128, seed=3).float()
    rank = 8

    def rel(approx: torch.Tensor) -> float:
        return float(torch.linalg.norm(W - approx) / torch.linalg.norm(W))

    lq = rel(lq_decompose(W, rank, bits=3, block_size=32).to_dense())
    nf = rel(nf_quantize(W, 3, block_size=32).dequantize())
    svd = rel(truncated_svd(W, rank, solver="exact").to_dense())
    one_round = rel(lq_decompose(W, rank, bits=3, block_size=32, iterations=1).to_dense())
    assert lq < one_round < nf < svd
    assert lq < 0.9 * nf


def test_rank_zero_is_plain_quantisation_and_full_rank_is_exact():
    W = _heavy(16, 32)
    res = lq_decompose(W, 0, bits=4, block_size=16)
    assert res.errors == (res.error,) and res.lowrank.rank == 0
    torch.testing.assert_close(res.to_dense(), nf_quantize(W, 4, block_size=16).dequantize(), atol=0, rtol=0)
    full = lq_decompose(W, 16, bits=2, block_size=16, solver="exact")
    torch.testing.assert_close(full.to_dense(), W, atol=1e-10, rtol=0)


def test_error_falls_with_the_rank():
    W = _heavy(32, 64, seed=1)
    errors = [lq_decompose(W, r, bits=3, block_size=16).error for r in (0, 1, 2, 4, 8, 16, 32)]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-9 * errors[0]


def _correlated(m: int = 32, n: int = 64, tokens: int = 400, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    W = _heavy(m, n, seed)
    mix = torch.randn(n, n, generator=g, dtype=F64) * torch.logspace(0, -2, n, dtype=F64)
    return W, mix @ torch.randn(n, tokens, generator=g, dtype=F64)  # anisotropic, correlated inputs


@pytest.mark.parametrize(("seed", "rank"), [(4, 4), (5, 8), (6, 16)])
def test_data_aware_beats_plain_on_the_output_error(seed, rank):
    W, X = _correlated(seed=seed)
    plain = lq_decompose(W, rank, bits=3, block_size=16)
    aware = lq_decompose(W, rank, bits=3, block_size=16, whitening=whiten(X @ X.T))
    out_err = [float(torch.linalg.norm((W - r.to_dense()) @ X)) for r in (plain, aware)]
    assert out_err[1] < 0.9 * out_err[0], out_err
    assert aware.error == pytest.approx(out_err[1], rel=1e-6)  # its stopping rule watched ||(W - W') X||
    assert aware.start_errors == plain.errors  # it started from the plain decomposition ...
    refit = whitened_svd(W - plain.quant.dequantize(), X @ X.T, rank).to_dense()  # ... and refit L for its Q first
    assert aware.errors[0] == pytest.approx(float(torch.linalg.norm((W - plain.quant.dequantize() - refit) @ X)),
                                            rel=1e-6)
    assert aware.errors[0] <= out_err[0]


@pytest.mark.parametrize("seed", [5, 7])
def test_fisher_weighted_beats_plain_on_the_weighted_error(seed):
    W = _heavy(32, 64, seed=seed)
    g = _gen(seed)
    a, b = torch.rand(32, generator=g, dtype=F64) * 10, torch.rand(64, generator=g, dtype=F64) * 10

    def weighted(r) -> float:
        return float(torch.linalg.norm(a[:, None] * (W - r.to_dense()) * b))

    plain = lq_decompose(W, 8, bits=3, block_size=16)
    fisher = lq_decompose(W, 8, bits=3, block_size=16, row_weights=a, col_weights=b)
    assert weighted(fisher) < 0.9 * weighted(plain)
    assert fisher.error == pytest.approx(weighted(fisher), rel=1e-6)
    assert all(x > y for x, y in zip(fisher.errors[:-1], fisher.errors[1:-1], strict=False))


def test_decomposition_rejects_bad_arguments():
    W, X = _correlated()
    with pytest.raises(ValueError, match="pass one"):
        lq_decompose(W, 2, block_size=16, whitening=whiten(X @ X.T), row_weights=torch.ones(32))
    with pytest.raises(ValueError, match="iterations must be an integer >= 1"):
        lq_decompose(W, 2, block_size=16, iterations=0)
    with pytest.raises(ValueError, match="bits must be one of"):
        lq_decompose(W, 2, bits=6, block_size=16)


# ---- the layer kind ---------------------------------------------------------------------------------------------

def _layer(m=24, n=40, bits=3, rank=3, block=8, scale_block=7, bias=True, dtype=F64, seed=6) -> QuantLowRankLinear:
    W = _heavy(m, n, seed).to(dtype)
    res = lq_decompose(W, rank, bits=bits, block_size=block, scale_block=scale_block)
    b = torch.randn(m, generator=_gen(seed), dtype=dtype) if bias else None
    return QuantLowRankLinear.from_lq(res, dtype=dtype, bias=b)


@pytest.mark.parametrize("rank", [0, 3])
def test_forward_is_the_dense_weight(rank):
    layer = _layer(rank=rank)
    x = torch.randn(5, 2, 40, generator=_gen(7), dtype=F64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight(), layer.bias), atol=1e-12, rtol=0)
    assert layer.codes.dtype == torch.uint8 and layer.scale_codes.dtype == torch.uint8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spec_and_state_dict_round_trip(dtype):
    layer = _layer(dtype=dtype)
    spec = layer.full_spec()
    assert spec["kind"] == "lq" and {k: spec[k] for k in ("bits", "block_size", "scale_block", "rank")} == \
        {"bits": 3, "block_size": 8, "scale_block": 7, "rank": 3}
    copy = kind_class("lq").from_spec(40, 24, True, layer.spec(), dtype=dtype)
    copy.load_state_dict(layer.state_dict())
    x = torch.randn(3, 40, generator=_gen(8)).to(dtype)
    assert torch.equal(copy(x), layer(x))
    assert torch.equal(copy.dense_weight(), layer.dense_weight())


@pytest.mark.parametrize(("m", "n", "bits", "block", "scale_block", "rank"),
                         [(24, 40, 3, 8, 7, 3), (3, 4, 2, 4, 256, 0), (16, 32, 4, 64, 1, 16), (8, 24, 8, 12, 2, 5)])
@pytest.mark.parametrize(("dtype", "value_bytes"), [(torch.float32, 4), (torch.bfloat16, 2)])
def test_cost_is_what_the_layer_stores(m, n, bits, block, scale_block, rank, dtype, value_bytes):
    config = config_class("lq")(bits=6.0, quant_bits=bits, block_size=block, scale_block=scale_block)
    weight = _heavy(m, n).to(dtype)
    layer = method_for(config)(weight, None, rank, config, "layer")
    cost = config.cost(m, n, rank, value_bytes)
    assert layer.bias is None and layer.scale_steps.dtype == dtype and layer.up.dtype == dtype
    assert (cost.params, cost.bytes) == (layer.num_params, layer.nbytes)
    assert cost.params == m * n + rank * (m + n)
    layer.set_bias(torch.ones(m))
    assert layer.num_params == cost.params + m and layer.nbytes == cost.bytes + m * value_bytes


def test_cost_matches_the_hand_count_and_buys_the_rank_a_bit_budget_allows():
    config = config_class("lq")(bits=3.5, quant_bits=3)
    m, n = 576, 1536
    nf = m * n * 3 // 8 + m * n // 64 + (math.ceil(m * n / 64 / 256) + 1) * 2  # codes, scale codes, steps + offset
    assert config.cost(m, n, 0, 2).bytes == nf == 345710
    costs = [config.cost(m, n, r, 2).bytes for r in range(0, 20)]
    assert all(b - a == (m + n) * 2 for a, b in itertools.pairwise(costs))
    assert config.knob_for(m, n, 3.5 / 8 * m * n, 2) == (3.5 / 8 * m * n - nf) // ((m + n) * 2) == 9
    assert config.knob_range(m, n) == (0, 576)


def test_bad_specs_are_one_line_errors():
    check = QuantLowRankLinear.check_spec
    good = {"bits": 3, "block_size": 8, "scale_block": 7, "rank": 3}
    assert check(40, 24, good) is None
    cases = [({**good, "extra": 1}, "extra: "), ({"bits": 3, "block_size": 8, "rank": 3}, "scale_block: "),
             ({**good, "bits": 5}, "bits: must be one of 2, 3, 4, 8"), ({**good, "bits": True}, "bits: "),
             ({**good, "block_size": 7}, "block_size: 7 does not divide the 24 x 40"),
             ({**good, "block_size": 0}, "block_size: must be"), ({**good, "scale_block": 2.0}, "scale_block: "),
             ({**good, "rank": 25}, r"rank: must be an integer in \[0, min"), ({**good, "rank": -1}, "rank: ")]
    for spec, message in cases:
        problem = check(40, 24, spec)
        assert problem is not None and "\n" not in problem
        assert re.match(message, problem), problem
    with pytest.raises(ValueError, match="rank: "):
        QuantLowRankLinear(40, 24, 3, 8, 99)


# ---- the method -------------------------------------------------------------------------------------------------

def test_config_fields_are_validated():
    cls = config_class("lq")
    for kwargs, field in [({"quant_bits": 5}, "quant_bits"), ({"block_size": 0}, "block_size"),
                          ({"scale_block": True}, "scale_block"), ({"iterations": 0}, "iterations"),
                          ({"data_aware": 1}, "data_aware"), ({"damp": -1.0}, "damp"), ({"solver": "qr"}, "solver"),
                          ({"seed": 1.5}, "seed"), ({"data_aware": True, "fisher": True}, "data_aware and fisher")]:
        with pytest.raises(ValueError, match=field):
            cls(**kwargs)
    assert cls().needs == frozenset() and cls(data_aware=True).needs == {"xxt"} and cls(fisher=True).needs == {"fisher"}
    with pytest.raises(ValueError, match="block_size must divide the matrix's 15 entries, got 64"):
        cls().knob_range(3, 5)


def test_method_is_deterministic_under_a_seed_and_uses_the_statistics():
    W, X = _correlated()
    config = config_class("lq")(bits=4.0, block_size=16, seed=3)
    first, second = (method_for(config)(W.float(), None, 4, config, "q") for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                                                 strict=True))
    stats = LayerStats(64)
    stats.add(X.T, frozenset({"xxt"}))
    aware = config_class("lq")(bits=4.0, block_size=16, data_aware=True)
    with pytest.raises(ValueError, match="data_aware needs the input covariance for q"):
        method_for(aware)(W, None, 4, aware, "q")
    layers = [method_for(c)(W, stats, 4, c, "q") for c in (config, aware)]
    out_err = [float(torch.linalg.norm((W - layer.dense_weight().detach()) @ X)) for layer in layers]
    assert out_err[1] < out_err[0]
    fisher = config_class("lq")(bits=4.0, block_size=16, fisher=True)
    with pytest.raises(ValueError, match="fisher needs Fisher statistics for q"):
        method_for(fisher)(W, stats, 4, fisher, "q")
