"""HQQ rows in compare (an anchor from the hqq package) and the storage dtype every row's bytes are counted at."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from rankwise.cli import app
from rankwise.eval.anchors import HQQ, hqq_row, hqq_stored_bytes, quantize_hqq
from rankwise.eval.compare import candidate_rows, compare, declared_dtype
from rankwise.eval.measure import count_params
from rankwise.methods.svd_llm import SVDLLMConfig
from rankwise.targets import find_targets
from tests.tiny_models import tiny_model, tiny_tokens

pytest.importorskip("hqq")


def packed_bytes(m: int, n: int, nbits: int, group: int, value_bytes: int) -> int:
    """HQQ's format for one ``m x n`` matrix, from its documented layout: the weights in ``m n / group`` groups of
    ``group`` (rows of a ``(groups, group)`` matrix), packed along the groups: 8 bits one byte each, 4 bits two per
    byte, 2 bits four per byte, 3 bits ten per int32 (groups padded to a multiple of ten); one scale and one zero per
    group as floating-point values."""
    groups = m * n // group
    codes = {8: groups * group, 4: math.ceil(groups / 2) * group, 2: math.ceil(groups / 4) * group,
             3: math.ceil(groups / 10) * group * 4}[nbits]
    return codes + 2 * groups * value_bytes


@pytest.fixture(scope="module")
def data():
    return tiny_model(), tiny_tokens(8, 32, seed=1), tiny_tokens(8, 32, seed=2)


@pytest.mark.parametrize("nbits", [2, 3, 4, 8])
def test_hqq_bits_are_its_packed_format(data, nbits):
    model, _, evaluation = data
    row = hqq_row(model, HQQ(nbits, 64), evaluation, value_bytes=2, speed_repeats=1)
    shapes = [tuple(m.weight.shape) for m in find_targets(model).values()]
    dense = sum(m * n for m, n in shapes)
    expected = sum(packed_bytes(m, n, nbits, 64, 2) for m, n in shapes)
    assert row.bits_per_weight == pytest.approx(8 * expected / dense, rel=1e-12)
    assert row.bits == round(row.bits_per_weight, 2) and row.method == f"hqq {nbits}-bit g64"
    total, targeted = count_params(model)
    assert (row.params_targeted_kept, row.params_targeted_removed, row.params_total) == (targeted, 0, total)
    assert row.weights_mb == pytest.approx((expected + (total - targeted) * 2) / 1e6)
    if nbits == 4:  # 4 bits + a bf16 scale and zero per 64 weights: the 4.5 bits quoted for HQQ 4-bit g64
        assert row.bits_per_weight == pytest.approx(4.5)


def test_hqq_bytes_count_scale_and_zero_at_the_storage_dtype(data):
    model = data[0]
    _, layers = quantize_hqq(model, HQQ(4, 32))
    layer = layers["model.layers.0.self_attn.q_proj"]  # 64 x 64: 128 groups of 32
    assert hqq_stored_bytes(layer, 2) == 64 * 64 // 2 + 2 * 128 * 2
    assert hqq_stored_bytes(layer, 4) - hqq_stored_bytes(layer, 2) == 2 * 128 * 2


def test_hqq_8_bit_is_within_one_percent_of_dense_and_leaves_the_model_untouched(data):
    model, calibration, evaluation = data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = compare(model, calibration, evaluation, [], progress=False, hqq_bits=(8, 2), speed_repeats=1)
    eight, two = result.rows
    assert eight.method == "hqq 8-bit g64" and two.method == "hqq 2-bit g64"
    assert abs(eight.perplexity / result.dense.perplexity - 1) < 0.01
    assert two.bits_per_weight < eight.bits_per_weight
    assert abs(two.perplexity / result.dense.perplexity - 1) > abs(eight.perplexity / result.dense.perplexity - 1)
    assert all(type(m) is nn.Linear for m in find_targets(model).values())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_bad_hqq_settings_are_one_line_errors(data):
    with pytest.raises(ValueError, match=r"^nbits must be one of 2, 3, 4, 8, got 5$"):
        HQQ(5)
    with pytest.raises(ValueError, match=r"^group_size must be a positive multiple of 8"):
        HQQ(4, 60)
    with pytest.raises(ValueError, match=r"^group_size must divide every targeted matrix's size; .* not a multiple "
                                         r"of 48$"):
        quantize_hqq(data[0], HQQ(4, 48))  # 64 x 64 = 4096 weights


def test_missing_hqq_names_the_extra(data, tiny_dir, tmp_path, monkeypatch):
    for name in ("hqq", "hqq.core", "hqq.core.quantize"):
        monkeypatch.setitem(sys.modules, name, None)  # import hqq... raises ImportError
    model, calibration, evaluation = data
    with pytest.raises(ValueError) as err:
        compare(model, calibration, evaluation, [], progress=False, hqq_bits=(4,))
    assert str(err.value) == "HQQ rows need the hqq package: pip install 'rankwise[quant]'"
    result = CliRunner().invoke(app, ["compare", str(tiny_dir), "--hqq-bits", "4", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "pip install 'rankwise[quant]'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_cli_hqq_rows_beside_the_recipes(tiny_dir, tmp_path):
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", str(tiny_dir), "--recipes", "svd_llm", "--ratios", "0.3",
                                      "--hqq-bits", "4,8", "--hqq-group", "32", "--out", str(out), "--seq-len", "16",
                                      "--calib-samples", "4", "--eval-samples", "4", "--speed-repeats", "1"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["svd_llm", "hqq 4-bit g32", "hqq 8-bit g32"]
    # the tiny directory declares float32: a float32 scale and zero per 32 weights add 2 bits
    assert [r["bits_per_weight"] for r in rows[1:]] == pytest.approx([6.0, 10.0])
    assert "| hqq 4-bit g32 | 6 bits |" in (out / "comparison.md").read_text()


def test_rows_count_bytes_at_the_storage_dtype(data):
    model, calibration, evaluation = data
    shared = {"model": model, "calibration": calibration, "evaluation": evaluation, "stats": {},
              "dense_targeted": count_params(model)[1], "speed_repeats": 1}
    half, full = (candidate_rows(None, **shared, storage_dtype=d)[0] for d in (torch.bfloat16, torch.float32))
    assert (half.bits_per_weight, full.bits_per_weight) == (16.0, 32.0)
    total = sum(p.numel() for p in model.parameters())
    assert (half.weights_mb, full.weights_mb) == (pytest.approx(2 * total / 1e6), pytest.approx(4 * total / 1e6))


def test_a_bit_budget_is_met_at_the_storage_dtype(data):
    model, calibration, evaluation = data
    result = compare(model, calibration, evaluation, [SVDLLMConfig(bits=8.0)], progress=False, speed_repeats=1,
                     storage_dtype="bfloat16")
    (row,) = result.rows
    assert result.settings["dtype"] == "bfloat16" and result.settings["compute_dtype"] == "float32"
    # 8 bits of 16: about half of the parameters kept (at float32 counting it would be a quarter)
    assert 7.0 < row.bits_per_weight <= 8.0
    assert 0.42 < row.params_targeted_kept / (row.params_targeted_kept + row.params_targeted_removed) <= 0.5
    with pytest.raises(ValueError, match="storage_dtype must be a floating dtype"):
        compare(model, calibration, evaluation, [], progress=False, storage_dtype="int8")


def test_declared_dtype_is_the_checkpoints(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["dtype"] = "bfloat16"  # the tensors stay float32, as in the default model's converted checkpoint
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert next(loaded.parameters()).dtype == torch.float32 and loaded.config.dtype == torch.float32
    assert declared_dtype(loaded) == torch.bfloat16
    assert declared_dtype(tiny_model()) == torch.float32  # built in memory: its parameters' dtype
