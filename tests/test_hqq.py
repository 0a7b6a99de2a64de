"""HQQ as rankwise's quantiser: the codes equal HQQ's own layer, the ``"affine"`` kind stores what its cost says,
LQ-LoRA with HQQ improves on HQQ alone, and the user's next steps on an HQQ model (EoRA compensation merged, plain
``from_pretrained``, the CLI) work."""

from __future__ import annotations

import copy
import json
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from rankwise.compensate import compensate, merge_
from rankwise.compression import compress_
from rankwise.io import save
from rankwise.linalg import lq_decompose
from rankwise.linalg.affine import affine_storage, hqq_quantize
from rankwise.methods import config_class, method_for
from rankwise.nn import AffineLowRankLinear, compressed_modules, kind_class
from rankwise.report import CompressionReport
from tests.tiny_models import tiny_model, tiny_tokens

hqq_quantize_module = pytest.importorskip("hqq.core.quantize")


def _heavy(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """Gaussian entries, a strong low-rank part and a few outliers (the shape of LLM weights), float32."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g) + 3.0 * torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g) / n**0.5
    return W + (torch.rand(m, n, generator=g) < 0.01) * torch.randn(m, n, generator=g) * 15.0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_equal_hqq_own_layer(bits):
    """The reference is HQQ's ``HQQLinear`` with its default config: the same matrix, bit for bit."""
    W = _heavy(48, 96)
    linear = torch.nn.Linear(96, 48, bias=False)
    with torch.no_grad():
        linear.weight.copy_(W)
    reference = hqq_quantize_module.HQQLinear(
        linear, hqq_quantize_module.BaseQuantizeConfig(nbits=bits, group_size=32), compute_dtype=torch.float32,
        device="cpu").dequantize()
    q = hqq_quantize(W, bits, group_size=32)
    assert torch.equal(q.dequantize(), reference)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < 2**bits
    assert q.nbytes() == affine_storage(W.numel(), bits, 32, 4) == 48 * 96 * bits // 8 + 2 * 48 * 96 // 32 * 4


def _layer(rank=3, bits=3, group=16, bias=True, dtype=torch.float32) -> AffineLowRankLinear:
    W = _heavy(24, 40).to(dtype)
    res = lq_decompose(W, rank, bits=bits, block_size=group, quantiser="hqq", iterations=3)
    b = torch.randn(24, generator=torch.Generator().manual_seed(1)).to(dtype) if bias else None
    return AffineLowRankLinear.from_lq(res, dtype=dtype, bias=b)


@pytest.mark.parametrize("rank", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_forward_spec_and_state_dict_round_trip(rank, dtype):
    layer = _layer(rank=rank, dtype=dtype)
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(2)).to(dtype)
    if dtype == torch.float32:  # in bfloat16 the two orders of rounding differ
        torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight(), layer.bias), atol=1e-5, rtol=1e-5)
    spec = layer.full_spec()
    assert spec["kind"] == "affine" and layer.spec() == {"bits": 3, "group_size": 16, "rank": rank}
    copy_ = kind_class("affine").from_spec(40, 24, True, layer.spec(), dtype=dtype)
    copy_.load_state_dict(layer.state_dict())
    assert torch.equal(copy_(x), layer(x))


@pytest.mark.parametrize(("m", "n", "bits", "group", "rank"), [(24, 40, 3, 16, 3), (16, 32, 4, 64, 0),
                                                               (8, 24, 2, 8, 5), (16, 16, 8, 32, 2)])
@pytest.mark.parametrize(("dtype", "value_bytes"), [(torch.float32, 4), (torch.bfloat16, 2)])
def test_cost_is_what_the_layer_stores(m, n, bits, group, rank, dtype, value_bytes):
    config = config_class("lq")(bits=9.0, quant_bits=bits, quantiser="hqq", block_size=group)
    layer = method_for(config)(_heavy(m, n).to(dtype), None, rank, config, "layer")
    assert isinstance(layer, AffineLowRankLinear) and layer.scale.dtype == dtype and layer.up.dtype == dtype
    cost = config.cost(m, n, rank, value_bytes)
    assert (cost.params, cost.bytes) == (layer.num_params, layer.nbytes)
    assert cost.bytes == -(-m * n // 8) * bits + 2 * (m * n // group) * value_bytes + rank * (m + n) * value_bytes


def test_lq_with_hqq_improves_on_hqq_alone_and_keeps_its_best_pair():
    W = _heavy(64, 96, seed=3)
    alone = float(torch.linalg.norm(W - hqq_quantize(W, 3, group_size=32).dequantize()))
    res = lq_decompose(W, 8, bits=3, block_size=32, quantiser="hqq", iterations=5)
    assert res.error == min(res.errors) and res.error < 0.9 * alone
    assert float(torch.linalg.norm(W - res.to_dense())) == pytest.approx(res.error, rel=1e-5)


def test_bad_specs_and_configs_are_one_line_errors(monkeypatch):
    check = AffineLowRankLinear.check_spec
    good = {"bits": 3, "group_size": 16, "rank": 3}
    assert check(40, 24, good) is None
    for spec, message in [({**good, "extra": 1}, "extra: "), ({"bits": 3, "rank": 3}, "group_size: "),
                          ({**good, "bits": 5}, "bits: must be one of 2, 3, 4, 8"),
                          ({**good, "group_size": 7}, "group_size: 7 does not divide the 24 x 40"),
                          ({**good, "rank": 25}, r"rank: must be an integer in \[0, min")]:
        problem = check(40, 24, spec)
        assert problem is not None and "\n" not in problem and re.match(message, problem), problem
    lq = config_class("lq")
    with pytest.raises(ValueError, match="quantiser must be one of nf, hqq, got 'gptq'"):
        lq(bits=4.0, quantiser="gptq")
    with pytest.raises(ValueError, match="block_size must be a multiple of 8 with quantiser='hqq'"):
        lq(bits=4.0, quantiser="hqq", block_size=12)
    with pytest.raises(ValueError, match="quantiser: the hqq method quantises with hqq, got 'nf'"):
        config_class("hqq")(bits=4.5, quantiser="nf")
    with pytest.raises(ValueError, match="quantiser: the nf method quantises with nf, got 'hqq'"):
        config_class("nf")(bits=4.5, quantiser="hqq")
    with pytest.raises(ValueError, match="budget"):  # 4-bit codes and their scales do not fit in 4 bits
        compress_(tiny_model("llama"), config_class("hqq")(bits=4.0, quant_bits=4), progress=False)
    monkeypatch.setitem(sys.modules, "hqq.core.quantize", None)  # as if hqq were not installed
    with pytest.raises(ValueError, match=r"needs the hqq package: pip install 'rankwise\[quant\]'"):
        hqq_quantize(_heavy(8, 16), 4, group_size=16)


def test_eora_on_an_hqq_model_merges_and_loads_with_plain_transformers(tmp_path):
    """HQQ 2-bit alone, then EoRA of rank 4 merged into the same layers: the output error falls on every layer,
    the layers stay ``"affine"`` with rank 4, and the saved directory loads with ``from_pretrained`` to equal
    logits."""
    base = tiny_model("llama")
    model = copy.deepcopy(base)
    calibration, x = tiny_tokens(8), tiny_tokens(2, 16, seed=4)
    report = compress_(model, config_class("hqq")(bits=3.5, quant_bits=2, block_size=64), calibration,
                       progress=False)
    assert {row.kind for row in report.layers} == {"affine"} and report.bits_at(4) <= 3.5
    assert CompressionReport.from_dict(report.to_dict()).to_dict() == report.to_dict()
    result = compensate(base, model, calibration, rank=4, progress=False)
    assert all(result.error_after[n] < result.error_before[n] for n in result.adapters)
    before = copy.deepcopy(model)
    merge_(model, result)
    layers = compressed_modules(model)
    assert all(isinstance(layer, AffineLowRankLinear) and layer.rank == 4 for layer in layers.values())
    with torch.no_grad():
        dense = base(x).logits
        errs = [float(torch.linalg.norm(m(x).logits - dense)) for m in (before, model)]
    assert errs[1] < errs[0]
    save(model, tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)


def test_cli_compress_with_hqq_then_merge_eora(tiny_dir, tmp_path):
    """The commands a user runs: quantise with HQQ into rankwise's format, then fold EoRA of rank 2 into it."""
    from typer.testing import CliRunner

    from rankwise.cli.app import app

    def run(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    small = ["--seq-len", "16", "--calib-samples", "4"]
    result = run("compress", tiny_dir, "--method", "hqq", "--bits", "5", "--set", "quant_bits=4", "--out",
                 tmp_path / "q", *small)
    assert result.exit_code == 0, result.output
    result = run("compensate", tmp_path / "q", "--base", tiny_dir, "--rank", "2", "--merge", "--out", tmp_path / "e",
                 *small)
    assert result.exit_code == 0, result.output
    infos = [json.loads(run("info", tmp_path / d, "--json").output) for d in ("q", "e")]
    assert infos[0]["kinds"] == infos[1]["kinds"] == {"affine": 14}
    assert infos[0]["bits_per_targeted_weight"] <= 5.0 + 1e-9
    assert infos[1]["bits_per_targeted_weight"] > infos[0]["bits_per_targeted_weight"]  # the rank-2 factors
    assert any("EoRA compensation of rank 2 merged into 14 layers" in n for n in infos[1]["notes"])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "e")
    assert all(layer.rank == 2 for layer in compressed_modules(loaded).values())
