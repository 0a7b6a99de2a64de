"""Issue-4 features: budgeted allocation, sequential calibration, left-factor refit."""

from __future__ import annotations

import pytest
import torch

from rankwise.allocate import layer_params, threshold_ranks
from rankwise.calibrate import collect_stats
from rankwise.compression import compress_
from rankwise.methods.svd import SVDConfig
from rankwise.methods.svd_llm import SVDLLMConfig
from rankwise.nn import LowRankLinear, effective_weight, linear_weight
from rankwise.targets import find_targets
from tests.tiny_models import tiny_model, tiny_tokens


@pytest.mark.parametrize("allocation", ["welore", "loss"])
@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_budgeted_allocation_meets_ratio(allocation, ratio):
    model = tiny_model("llama")
    report = compress_(model, SVDLLMConfig(ratio=ratio, allocation=allocation), tiny_tokens(16), progress=False)
    assert ratio <= report.removed_fraction <= ratio + 0.005
    ranks = {layer.rank for layer in report.layers}
    assert len(ranks) > 1  # not uniform


def test_loss_allocation_lowers_estimated_loss():
    """The allocation minimises sum_k h_k / (2 out_k) ||dW_k X||^2 (Gauss-Newton estimate) better than uniform."""
    tokens = tiny_tokens(16)
    dense = tiny_model("gpt2")
    targets = find_targets(dense)
    stats = collect_stats(dense, tokens, targets, kinds=("xxt", "gout"))
    estimates = {}
    for allocation in ("uniform", "loss"):
        model = tiny_model("gpt2")
        compress_(model, SVDLLMConfig(ratio=0.4, allocation=allocation), tokens, progress=False)
        total = 0.0
        for name, module in targets.items():
            W = linear_weight(module).detach().double()
            D = W - effective_weight(model.get_submodule(name)).detach().double()
            h = stats[name].output_sensitivity(name) / W.shape[0]
            total += 0.5 * h * float(torch.trace(D @ stats[name].covariance @ D.T))
        estimates[allocation] = total
    assert estimates["loss"] < estimates["uniform"]


def test_threshold_ranks_exact_small_case():
    scores = {"a": torch.tensor([10.0, 1.0, 0.1]), "b": torch.tensor([5.0, 4.0, 3.0])}
    shapes = {"a": (3, 100), "b": (3, 100)}  # rank r costs 103 r; from the break-even rank 2 on, dense costs 300
    ranks = threshold_ranks(scores, shapes, budget=412)
    assert ranks == {"a": 1, "b": 3}  # threshold 3: 103 + 300 = 403 fits; threshold 1 would need 600
    assert sum(layer_params(*shapes[k], r) for k, r in ranks.items()) == 403
    assert threshold_ranks(scores, shapes, budget=10_000) == {"a": 3, "b": 3}
    with pytest.raises(ValueError, match="cannot be met: even rank 1 in every matrix keeps 206"):
        threshold_ranks(scores, shapes, budget=100)


def test_impossible_budget_is_a_clear_error():
    with pytest.raises(ValueError, match=r"ratio 0.99 is below what svd_llm can represent .* at most 0.9"):
        compress_(tiny_model("llama"), SVDLLMConfig(ratio=0.99, allocation="loss"), tiny_tokens(), progress=False)


def test_sequential_first_block_matches_one_shot_later_blocks_differ():
    tokens = tiny_tokens(8)
    one_shot, seq = tiny_model("llama"), tiny_model("llama")
    compress_(one_shot, SVDLLMConfig(ratio=0.4), tokens, progress=False)
    compress_(seq, SVDLLMConfig(ratio=0.4, sequential=True), tokens, progress=False)
    a0, b0 = one_shot.model.layers[0].self_attn.q_proj, seq.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(a0.dense_weight(), b0.dense_weight(), atol=1e-5, rtol=1e-4)
    a1, b1 = one_shot.model.layers[1].mlp.down_proj, seq.model.layers[1].mlp.down_proj
    assert not torch.allclose(a1.dense_weight(), b1.dense_weight(), atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_sequential_runs_on_every_architecture(arch):
    model = tiny_model(arch)
    report = compress_(model, SVDLLMConfig(ratio=0.3, sequential=True, update_u=True), tiny_tokens(8),
                       progress=False)
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == len(report.layers)
    with torch.no_grad():
        assert bool(torch.isfinite(model(tiny_tokens(2)).logits).all())


def test_update_u_never_increases_calibration_error():
    tokens = tiny_tokens(16)
    errs = {}
    for update in (False, True):
        model = tiny_model("llama")
        report = compress_(model, SVDConfig(ratio=0.4, update_u=update), tokens, progress=False)
        errs[update] = [layer.rel_error for layer in report.layers]
    assert all(b <= a + 1e-6 for a, b in zip(errs[False], errs[True], strict=True))
    assert sum(errs[True]) < sum(errs[False])


def test_options_need_calibration_data():
    with pytest.raises(ValueError, match="sequential and update_u need calibration data"):
        compress_(tiny_model("llama"), SVDConfig(ratio=0.2, sequential=True), progress=False)
    with pytest.raises(ValueError, match="allocation must be one of uniform, welore, loss"):
        SVDConfig(ratio=0.2, allocation="greedy")
