"""EoRA compensation: closed form, error reduction, merge, PEFT export/load, mismatch errors."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from rankwise.calibrate import LayerStats
from rankwise.compensate import compensate, eora, export_peft, load_adapter, merge_
from rankwise.compression import compress_
from rankwise.io import save
from rankwise.io.integrity import verify_dir
from rankwise.methods.svd import SVDConfig
from rankwise.nn import LowRankLinear
from rankwise.targets import find_targets
from tests.tiny_models import tiny_model, tiny_tokens


@pytest.fixture
def pair():
    base = tiny_model("llama")
    compressed = copy.deepcopy(base)
    compress_(compressed, SVDConfig(ratio=0.5), progress=False)
    return base, compressed


def test_eora_equals_eigenspace_closed_form():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(20, 12, generator=g, dtype=torch.float64)
    Wc = W + 0.1 * torch.randn(20, 12, generator=g, dtype=torch.float64)
    X = torch.randn(12, 50, generator=g, dtype=torch.float64)
    stats = LayerStats(n=12, xxt=X @ X.T, count=1)
    lr = eora(W, Wc, stats, 4)
    evals, Q = torch.linalg.eigh(X @ X.T)
    P = Q * evals.sqrt()  # Q Lambda^1/2
    U, s, Vh = torch.linalg.svd((W - Wc) @ P)
    ref = (U[:, :4] * s[:4]) @ Vh[:4] @ torch.linalg.inv(P)
    torch.testing.assert_close(lr.to_dense(), ref, atol=1e-8, rtol=1e-6)


def test_compensation_reduces_error_and_merge_matches_adapter(pair, tmp_path):
    base, compressed = pair
    calib, x = tiny_tokens(8), tiny_tokens(2, 16, seed=4)
    result = compensate(base, compressed, calib, rank=4, progress=False)
    assert len(result.adapters) == len(find_targets(base))
    assert all(result.error_after[n] < result.error_before[n] for n in result.adapters)
    export_peft(result, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (verify_dir(tmp_path / "adapter").against, verify_dir(tmp_path / "adapter").unlisted) == ("SHA256SUMS", [])
    with_adapter = load_adapter(copy.deepcopy(compressed), tmp_path / "adapter")
    merged = copy.deepcopy(compressed)
    merge_(merged, result)
    q = merged.model.layers[0].self_attn.q_proj
    assert isinstance(q, LowRankLinear) and q.rank == compressed.model.layers[0].self_attn.q_proj.rank + 4
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(x).logits, merged(x).logits, atol=1e-5, rtol=1e-5)
        dense_ref = base(x).logits
        err_merged = float((merged(x).logits - dense_ref).norm())
        err_plain = float((compressed(x).logits - dense_ref).norm())
    assert err_merged < err_plain


def test_plain_peft_loads_adapter_on_dense_export(pair, tmp_path):
    base, compressed = pair
    result = compensate(base, compressed, tiny_tokens(8), rank=2, progress=False)
    export_peft(result, tmp_path / "adapter")
    save(compressed, tmp_path / "dense", export="dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    peft_model = PeftModel.from_pretrained(plain, str(tmp_path / "adapter")).eval()
    merged = copy.deepcopy(compressed)
    merge_(merged, result)
    x = tiny_tokens(2, 16, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, merged(x).logits, atol=1e-4, rtol=1e-4)


def test_mismatch_and_rank_errors(pair, tmp_path):
    base, compressed = pair
    with pytest.raises(ValueError, match="does not match the base model: model_type"):
        compensate(tiny_model("gpt2"), compressed, tiny_tokens(4), rank=2, progress=False)
    with pytest.raises(ValueError, match=r"rank 100 is larger than layer .* allows"):
        compensate(base, compressed, tiny_tokens(4), rank=100, progress=False)
    with pytest.raises(ValueError, match="identical to the base model"):
        compensate(base, copy.deepcopy(base), tiny_tokens(4), rank=2, progress=False)
