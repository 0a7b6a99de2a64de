"""Low-rank factors stored at 8 bits (``factor_bits=8``, layer kind ``"lowrank_int8"``): the per-row quantiser's
bound, the kind's exact bytes, and what it buys: at the same budget in bits, more rank and a lower output error than
floating-point factors; at the same ratio, the same rank in fewer bytes."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from rankwise.compression import compress_
from rankwise.io import save
from rankwise.linalg import truncated_svd
from rankwise.linalg.quant import int8_rows, int8_rows_decode
from rankwise.methods import config_class
from rankwise.nn import Int8LowRankLinear, compressed_modules, kind_class
from tests.tiny_models import svd_family, tiny_model, tiny_tokens


def test_int8_rows_is_within_half_a_step_and_keeps_zero_rows():
    X = torch.randn(6, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    X[2] = 0
    codes, scale = int8_rows(X)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127 and scale[2] == 0
    assert bool(((int8_rows_decode(codes, scale) - X).abs() <= scale[:, None] / 2 + 1e-15).all())
    torch.testing.assert_close(scale, X.abs().amax(1) / 127)


@pytest.mark.parametrize(("dtype", "value_bytes"), [(torch.float32, 4), (torch.bfloat16, 2)])
def test_layer_stores_what_the_cost_says_and_round_trips(dtype, value_bytes):
    W = torch.randn(24, 40, generator=torch.Generator().manual_seed(1)).to(dtype)
    layer = Int8LowRankLinear.from_lowrank(truncated_svd(W, 6), bias=torch.ones(24, dtype=dtype))
    cost = config_class("svd")(factor_bits=8).cost(24, 40, 6, value_bytes)
    assert (layer.num_params, layer.stored_bytes(value_bytes)) == (cost.params + 24, cost.bytes + 24 * value_bytes)
    assert cost.bytes == 6 * 64 + (24 + 6) * value_bytes
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(2)).to(dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight(), layer.bias), atol=1e-5, rtol=1e-5)
        exact = truncated_svd(W, 6).to_dense()
        assert float(torch.linalg.norm(layer.dense_weight().detach() - exact)) < 0.02 * float(torch.linalg.norm(exact))
    copy_ = kind_class("lowrank_int8").from_spec(40, 24, True, layer.spec(), dtype=dtype)
    copy_.load_state_dict(layer.state_dict())
    assert torch.equal(copy_(x), layer(x))
    for spec, message in [({"rank": 0}, r"rank: must be an integer in \[1, min"), ({"rank": 6, "x": 1}, "x: ")]:
        problem = Int8LowRankLinear.check_spec(40, 24, spec)
        assert problem is not None and re.match(message, problem), problem


@pytest.mark.parametrize("method", svd_family())
def test_same_bits_buy_more_rank_and_less_error_same_ratio_fewer_bytes(method):
    calibration = tiny_tokens()
    rows = {}
    for factor_bits in (None, 8):
        for budget in ({"bits": 12.0}, {"ratio": 0.5}):
            model = tiny_model("llama")
            report = compress_(model, config_class(method)(**budget, factor_bits=factor_bits), calibration,
                               progress=False)
            rows[factor_bits, next(iter(budget))] = report
            kinds = {type(m) for m in compressed_modules(model).values()}
            assert kinds == {Int8LowRankLinear} if factor_bits == 8 else Int8LowRankLinear not in kinds
    floats, int8 = rows[None, "bits"], rows[8, "bits"]
    assert int8.bits_at(4) <= 12.0 and floats.bits_at(4) <= 12.0
    assert all(b.rank >= 2 * a.rank for a, b in zip(floats.layers, int8.layers, strict=True))
    if method != "svd":  # the errors are measured on the calibration inputs; plain SVD does not minimise them
        assert sum(r.rel_error for r in int8.layers) < sum(r.rel_error for r in floats.layers)
    same = rows[None, "ratio"], rows[8, "ratio"]
    assert [r.rank for r in same[0].layers] == [r.rank for r in same[1].layers]
    assert same[1].bits_at(2) < 0.6 * same[0].bits_at(2)


def test_reloads_with_plain_transformers_refuses_merges_and_bad_settings(tmp_path):
    model = tiny_model("llama")
    compress_(model, config_class("svd_llm")(bits=10.0, factor_bits=8), tiny_tokens(), progress=False)
    save(model, tmp_path / "m")
    x = tiny_tokens(2, 16, seed=3)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)
    from rankwise.adapt.compressed import append_factors

    layer = next(iter(compressed_modules(model).values()))
    with pytest.raises(ValueError, match="lowrank_int8 layer, which a low-rank update cannot be merged into"):
        append_factors(copy.deepcopy(layer), torch.zeros(layer.out_features, 1), torch.zeros(1, layer.in_features),
                       layer="q", check_size=False)
    with pytest.raises(ValueError, match="factor_bits must be None"):
        config_class("svd_llm")(factor_bits=4)


def test_compare_gives_eora_rows_only_to_kinds_that_merge_and_says_which_do_not():
    from rankwise.eval.compare import compare

    model = tiny_model("llama")
    calibration, evaluation = tiny_tokens(4), tiny_tokens(2, seed=9)
    configs = [config_class("svd")(ratio=0.3, factor_bits=8), config_class("svd")(ratio=0.3)]
    result = compare(model, calibration, evaluation, configs, eora_rank=2, progress=False, speed_repeats=1)
    assert [row.method for row in result.rows] == ["svd +factor_bits=8", "svd", "svd +eora2"]
    assert any("no EoRA row for svd +factor_bits=8: their layer kinds cannot merge" in n for n in result.notes)
