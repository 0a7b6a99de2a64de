"""SLTrain, SST and LOST layers: their weights are the papers' formulas, the sparse support and the spectrum behave as
promised, and a model built from a config trains with them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.linalg import svd_flip
from rankwise.nn import LOSTLinear, SLTrainLinear, SSTLinear, SSTSchedule, replace_linears
from tests.tiny_models import tiny_model, tiny_tokens


def test_sltrain_weight_is_low_rank_plus_a_fixed_sparse_support():
    layer = SLTrainLinear(20, 12, 3, density=0.1, alpha=6.0, seed=1)
    S = torch.zeros(12 * 20)
    S[layer.support] = layer.values.detach()
    expected = 2.0 * layer.B.detach() @ layer.A.detach() + S.view(12, 20)
    torch.testing.assert_close(layer.dense_weight().detach(), expected)
    assert layer.values.numel() == 24 and layer.num_params == 3 * (20 + 12) + 24 + 12
    x = torch.randn(5, 20)
    torch.testing.assert_close(layer(x), x @ expected.T + layer.bias.detach())
    support = layer.support.clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(3):
        layer(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(layer.support, support)  # the support never moves
    residual = layer.dense_weight().detach() - 2.0 * layer.B.detach() @ layer.A.detach()
    off = torch.ones(240, dtype=torch.bool)
    off[support] = False
    assert residual.flatten()[off].abs().max() < 1e-6
    same = SLTrainLinear(20, 12, 3, density=0.1, alpha=6.0, seed=1)
    assert torch.equal(same.support, support)
    with pytest.raises(ValueError, match="rank must be in"):
        SLTrainLinear(20, 12, 13)


def test_sst_trains_all_values_and_only_the_active_vectors():
    layer = SSTLinear(16, 10, 3, seed=0)
    W0 = layer.dense_weight().detach()
    U = layer.U.clone()
    torch.testing.assert_close(U.T @ U, torch.eye(10), atol=1e-5, rtol=0)
    x = torch.randn(6, 16)
    layer(x).pow(2).sum().backward()
    assert layer.s.grad is not None and bool((layer.s.grad != 0).all())
    assert layer.U_active.grad.shape == (10, 3) and layer.U.grad is None  # inactive vectors are buffers
    with torch.no_grad():
        layer.U_active.add_(0.01)
        layer.s.mul_(1.1)
    changed = layer.dense_weight().detach()
    layer.resample()
    torch.testing.assert_close(layer.dense_weight().detach(), changed)  # committing and redrawing keeps W
    inactive = [j for j in range(10) if j not in layer.active.tolist()]
    layer.reorthogonalize()
    torch.testing.assert_close(layer.dense_weight().detach(), changed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.U.T @ layer.U, torch.eye(10), atol=1e-5, rtol=0)
    assert inactive and not torch.equal(W0, changed)


def test_sst_schedule_clears_the_state_of_swapped_vectors_and_resumes_identically():
    layer = SSTLinear(16, 10, 3, seed=0)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    schedule = SSTSchedule(layer, opt, resample_every=2, reorthogonalize_every=5)
    x = torch.randn(6, 16)
    for _ in range(2):
        layer(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
    assert layer.U_active not in opt.state and layer.s in opt.state
    saved = layer.state_dict()
    twin = SSTLinear(16, 10, 3, seed=99)
    twin.load_state_dict(saved)
    layer.resample()
    twin.resample()
    assert torch.equal(layer.active, twin.active)  # the generator state travels in the state dict


def test_lost_splits_one_svd_into_low_rank_and_the_strongest_remaining_channels():
    layer = LOSTLinear(20, 12, 3, channels=0.25, gamma=0.7, activation=None, seed=2)
    # the random weight it starts from, drawn as the layer draws it
    g = torch.Generator().manual_seed(2)
    W0 = (torch.rand(12, 20, generator=g, dtype=torch.float64) * 2 - 1) / 20**0.5
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    U, Vh = svd_flip(U, Vh)
    low = (U[:, :3] * S[:3]) @ Vh[:3]
    torch.testing.assert_close((layer.A @ layer.B).mT.double(), low, atol=1e-6, rtol=0)
    rest = W0 - low
    assert layer.sparse_channels.tolist() == sorted(rest.norm(dim=0).topk(5).indices.tolist())
    torch.testing.assert_close(layer.S.double(), rest[:, layer.sparse_channels], atol=1e-6, rtol=0)
    assert layer.num_params == 3 * (20 + 12) + 12 * 5 + 12
    x = torch.randn(4, 20)
    expected = 0.7 * x @ low.float().T
    expected[:, :] += 0.3 * x[:, layer.sparse_channels] @ layer.S.detach().T
    torch.testing.assert_close(layer(x).detach(), expected + layer.bias.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer(x).detach(), x @ layer.dense_weight().detach().T + layer.bias.detach(),
                               atol=1e-5, rtol=0)
    # the channels are fixed, A, B and S all learn; the SiLU form has no dense weight
    layer(x).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (layer.A, layer.B, layer.S))
    assert "sparse_channels" in layer.state_dict() and not layer.sparse_channels.requires_grad
    assert torch.equal(LOSTLinear(20, 12, 3, channels=0.25, seed=2).sparse_channels, layer.sparse_channels)
    with pytest.raises(ValueError, match="no equivalent dense weight"):
        LOSTLinear(20, 12, 3).dense_weight()
    with pytest.raises(ValueError, match="channels must be a fraction"):
        LOSTLinear(20, 12, 3, channels=1.5)


@pytest.mark.parametrize("make", [
    lambda lin, _name: SLTrainLinear(lin.in_features, lin.out_features, 8, bias=lin.bias is not None),
    lambda lin, _name: SSTLinear(lin.in_features, lin.out_features, 8, bias=lin.bias is not None),
    lambda lin, _name: LOSTLinear(lin.in_features, lin.out_features, 8, bias=lin.bias is not None),
])
def test_a_model_built_from_a_config_trains_with_them(make):
    torch.manual_seed(0)
    model = tiny_model("llama")
    replaced = replace_linears(model, make)
    assert replaced and "lm_head" not in replaced and all("layers." in n for n in replaced)
    x = tiny_tokens(4, seq_len=16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert not any(isinstance(m, nn.Linear) and m is not model.lm_head for m in model.modules())
