"""Rank-shaping training: TRP's truncation and nuclear subgradient against reference SVDs, Maestro's factorised layer,
ordered dropout, group lasso and shrinking against their formulas."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rankwise.nn.maestro import MaestroLinear, MaestroSchedule
from rankwise.nn.train_layers import replace_linears
from rankwise.optim.trp import TRP, nuclear_subgradient
from tests.tiny_models import tiny_model, tiny_tokens


def _matrix(m: int, n: int, spectrum: list[float], seed: int = 0) -> torch.Tensor:
    """``Q1 diag(spectrum) Q2^T`` in float64 with orthonormal ``Q1``, ``Q2``."""
    g = torch.Generator().manual_seed(seed)
    Q1 = torch.linalg.qr(torch.randn(m, len(spectrum), generator=g, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(n, len(spectrum), generator=g, dtype=torch.float64)).Q
    return (Q1 * torch.tensor(spectrum, dtype=torch.float64)) @ Q2.T


# TRP
@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
def test_trp_truncation_keeps_exactly_the_promised_energy(energy):
    W0 = torch.randn(30, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = nn.Parameter(W0.clone())
    trp = TRP({"w": p}, period=2, energy=energy)
    assert trp.step() is None and torch.equal(p.detach(), W0)  # not a truncation step
    k = trp.step()["w"]
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    share = torch.cumsum(S**2, 0) / (S**2).sum()
    assert share[k - 1] >= energy - 1e-12  # the energy promised is kept...
    assert k == 1 or share[k - 2] < energy  # ...by the smallest rank that keeps it
    torch.testing.assert_close(p.detach(), (U[:, :k] * S[:k]) @ Vh[:k], atol=1e-12, rtol=0)
    assert torch.linalg.matrix_rank(p.detach()) == k
    kept = (p.detach() ** 2).sum() / (W0**2).sum()  # Eckart-Young: the energy kept is that of the top k values
    torch.testing.assert_close(kept, share[k - 1], atol=1e-12, rtol=0)


def test_trp_fixed_rank_is_the_eckart_young_truncation():
    W0 = _matrix(12, 9, [5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    p = nn.Parameter(W0.clone())
    assert TRP([p], period=1, rank=3).step() == {"0": 3}
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    torch.testing.assert_close(p.detach(), (U[:, :3] * S[:3]) @ Vh[:3], atol=1e-12, rtol=0)
    assert torch.linalg.matrix_norm(W0 - p.detach()).item() == pytest.approx((4 + 1 + 0.25) ** 0.5, abs=1e-10)


def test_nuclear_subgradient_is_uvt_and_the_finite_difference_gradient():
    W = _matrix(8, 6, [3.0, 2.5, 1.7, 1.1, 0.6, 0.2], seed=2)
    G = nuclear_subgradient(W)
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(G, U @ Vh, atol=1e-12, rtol=0)
    D = torch.randn(8, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    eps = 1e-6
    nuc = lambda A: torch.linalg.matrix_norm(A, "nuc")  # noqa: E731
    fd = (nuc(W + eps * D) - nuc(W - eps * D)) / (2 * eps)
    assert fd.item() == pytest.approx((G * D).sum().item(), abs=1e-7)
    low = _matrix(8, 6, [3.0, 1.0], seed=4)  # rank 2: U_2 V_2^T, the minimum-norm subgradient
    U2, _, Vh2 = torch.linalg.svd(low, full_matrices=False)
    torch.testing.assert_close(nuclear_subgradient(low), U2[:, :2] @ Vh2[:2], atol=1e-10, rtol=0)


def test_trp_regularize_adds_lambda_uvt_and_leaves_other_parameters_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    trp = TRP({"first": model[0]}, period=1, energy=0.9, nuclear=0.1, refresh=1)
    x = torch.randn(5, 6)
    model(x).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    W = model[0].weight.detach().clone()
    trp.regularize()
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(model[0].weight.grad - grads["0.weight"], 0.1 * U @ Vh, atol=1e-6, rtol=0)
    for name, p in model.named_parameters():
        if name != "0.weight":
            assert torch.equal(p.grad, grads[name])
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ranks = trp.step()
    assert ranks["first"] < 6
    for name, p in model.named_parameters():
        if name != "0.weight":
            assert torch.equal(p.detach(), before[name])  # bit for bit
    assert not torch.equal(model[0].weight.detach(), before["0.weight"])


def _trp_run(steps: int, state: dict | None = None, stop: int | None = None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trp = TRP({"a": model[0], "b": model[2]}, period=3, energy=0.95, nuclear=1e-2, refresh=2)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        trp.load_state_dict(state["trp"])
        start = state["step"]
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(4, 10, generator=g) for _ in range(steps)]
    for step in range(start, stop or steps):
        model(xs[step]).pow(2).mean().backward()
        trp.regularize()
        opt.step()
        opt.zero_grad()
        trp.step()
    return model, opt, trp


def test_trp_is_deterministic_and_resumes_identically():
    whole, _, _ = _trp_run(8)
    again, _, _ = _trp_run(8)
    model, opt, trp = _trp_run(8, stop=4)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "trp": trp.state_dict(), "step": 4})
    resumed, _, _ = _trp_run(8, state=saved)
    for a, b, c in zip(whole.parameters(), again.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"energy": 0.0}, "energy must be"), ({"energy": 1.5}, "energy must be"), ({"energy": None}, "give energy"),
    ({"rank": 0}, "rank must be an integer in \\[1, 4\\]"), ({"rank": 5}, "rank must be an integer in \\[1, 4\\]"),
    ({"period": 0}, "period must be"), ({"nuclear": -1.0}, "nuclear must be"),
    ({"nuclear": float("nan")}, "nuclear must be"), ({"refresh": 0}, "refresh must be"),
])
def test_trp_bad_input_is_a_one_line_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        TRP({"w": nn.Parameter(torch.zeros(6, 4))}, **kwargs)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="2-D weights"):
        TRP([nn.Parameter(torch.zeros(4))])


# Maestro
def test_maestro_at_full_rank_without_dropout_is_the_dense_layer():
    torch.manual_seed(0)
    linear = nn.Linear(12, 7)
    layer = MaestroLinear.from_linear(linear)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(layer(x), linear(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.dense_weight(), linear.weight, atol=1e-6, rtol=1e-5)
    assert layer.rank == 7 and layer.num_params == 7 * (12 + 7) + 7 == sum(p.numel() for p in layer.parameters())
    layer.active_rank = 2
    layer.eval()  # evaluation always uses the full (shrunk) rank
    torch.testing.assert_close(layer(x), linear(x), atol=1e-5, rtol=1e-5)
    model, reference = tiny_model("llama"), tiny_model("llama")
    names = replace_linears(model, lambda lin, name: MaestroLinear.from_linear(lin))
    assert len(names) == 14 and isinstance(model.get_submodule(names[0]), MaestroLinear)
    tokens = tiny_tokens(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, atol=1e-4, rtol=1e-4)


def test_ordered_dropout_uses_only_a_prefix_of_the_pairs():
    layer = MaestroLinear(9, 6, seed=3)
    x = torch.randn(4, 9)
    layer.active_rank = 2
    out = layer(x)
    U, V = layer.U.detach(), layer.V.detach()
    torch.testing.assert_close(out, x @ V[:, :2] @ U[:, :2].T + layer.bias.detach())
    out.pow(2).sum().backward()
    assert torch.equal(layer.U.grad[:, 2:], torch.zeros(6, 4)) and torch.equal(layer.V.grad[:, 2:], torch.zeros(9, 4))
    assert bool((layer.U.grad[:, :2].abs().sum(0) > 0).all()) and bool((layer.V.grad[:, :2].abs().sum(0) > 0).all())


def _norms_layer(u_norms: list[float], v_norms: list[float]) -> MaestroLinear:
    layer = MaestroLinear(8, 7, rank=len(u_norms), seed=0)
    with torch.no_grad():
        layer.U.copy_(layer.U / layer.U.norm(dim=0) * torch.tensor(u_norms))
        layer.V.copy_(layer.V / layer.V.norm(dim=0) * torch.tensor(v_norms))
    return layer


def test_group_lasso_and_importance_follow_the_hierarchical_formula():
    u, v = [3.0, 2.0, 1.0, 0.5, 0.1], [1.0, 1.5, 0.2, 0.3, 0.05]
    layer = _norms_layer(u, v)
    tail_u = [sum(a * a for a in u[b:]) ** 0.5 for b in range(5)]
    tail_v = [sum(a * a for a in v[b:]) ** 0.5 for b in range(5)]
    torch.testing.assert_close(layer.group_lasso(), torch.tensor([a + b for a, b in zip(tail_u, tail_v, strict=True)]))
    torch.testing.assert_close(layer.group_lasso(hierarchical=False), torch.tensor(u) + torch.tensor(v))
    torch.testing.assert_close(layer.importance(), torch.tensor([a * b for a, b in zip(tail_u, tail_v, strict=True)]))
    imp = layer.importance()
    assert bool((imp[1:] <= imp[:-1]).all())


def test_shrinking_removes_exactly_the_pairs_below_threshold_and_cuts_the_optimizer_state():
    u, v = [3.0, 2.0, 1.0, 0.5, 0.1, 0.01], [1.0, 1.5, 0.2, 0.3, 0.05, 0.01]
    layer = _norms_layer(u, v)
    imp = [sum(a * a for a in u[b:]) ** 0.5 * sum(a * a for a in v[b:]) ** 0.5 for b in range(6)]
    threshold = (imp[2] + imp[3]) / 2  # pairs 3, 4, 5 fall below
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    x = torch.randn(4, 8)
    layer(x).sum().backward()
    opt.step()
    opt.zero_grad()
    U, V = layer.U.detach().clone(), layer.V.detach().clone()
    alive = layer.group_lasso().sum() + layer(x).sum()  # a graph through the old parameters, still referenced
    assert layer.shrink(threshold, opt) == sum(i >= threshold for i in imp) == 3
    assert torch.equal(layer.U.detach(), U[:, :3]) and torch.equal(layer.V.detach(), V[:, :3])
    assert any(p is layer.U for g in opt.param_groups for p in g["params"])  # the optimizer holds the cut ones
    assert opt.state[layer.U]["exp_avg"].shape == (7, 3) and len(opt.state) == 3
    (layer.group_lasso().sum() + layer(x).sum()).backward()
    del alive
    assert layer.num_params == 3 * (8 + 7) + 7 == sum(p.numel() for p in layer.parameters())
    opt.step()  # the optimizer keeps working on the cut parameters
    assert layer.shrink(0.0) == 3 and layer.shrink(float(layer.importance()[0]) * 2) == 0
    assert torch.equal(layer(x), layer.bias.expand(4, 7))  # rank 0: the bias alone
    to_dense = _norms_layer(u, v)
    to_dense.truncate(4)
    torch.testing.assert_close(to_dense.to_linear()(x), to_dense(x))


def test_maestro_schedule_draws_are_seeded_and_follow_the_sampler():
    def draws(seed: int, sampler: str, n: int = 30):
        model = tiny_model("llama")
        replace_linears(model, lambda lin, name: MaestroLinear.from_linear(lin))
        schedule = MaestroSchedule(model, sampler=sampler, seed=seed)
        return schedule, [schedule.sample() for _ in range(n)]

    schedule, first = draws(3, "layer")
    assert first == draws(3, "layer")[1] and first != draws(4, "layer")[1]
    ranks = schedule.ranks()
    assert all(len(d) == 1 and 1 <= b <= ranks[n] for d in first for n, b in d.items())
    assert sum(m.active_rank is not None for _, m in schedule) == 1
    schedule.full()
    assert all(m.active_rank is None for _, m in schedule)
    schedule, indep = draws(3, "independent", 5)
    assert all(set(d) == set(ranks) and all(1 <= b <= ranks[n] for n, b in d.items()) for d in indep)
    state = schedule.state_dict()
    after = [schedule.sample() for _ in range(3)]
    schedule.load_state_dict(state)
    assert [schedule.sample() for _ in range(3)] == after
    penalty = schedule.penalty()
    expected = 5e-3 * sum(m.group_lasso().sum() for _, m in schedule)
    torch.testing.assert_close(penalty, expected)


def test_maestro_bad_input_is_a_one_line_value_error():
    for call, match in [(lambda: MaestroLinear(6, 4, rank=5), "rank must be an integer in \\[1, 4\\]"),
                        (lambda: MaestroLinear(6, 4, rank=0), "rank must be"),
                        (lambda: MaestroLinear(6, 4).truncate(5), "rank must be an integer in \\[0, 4\\]"),
                        (lambda: MaestroLinear(6, 4).shrink(-1.0), "threshold must be"),
                        (lambda: MaestroSchedule(nn.Sequential(MaestroLinear(6, 4)), sampler="uniform"), "sampler"),
                        (lambda: MaestroSchedule(nn.Sequential(nn.Linear(6, 4))), "no MaestroLinear"),
                        (lambda: MaestroSchedule(nn.Sequential(MaestroLinear(6, 4)), lasso=-1.0), "lasso")]:
        with pytest.raises(ValueError, match=match) as info:
            call()
        assert "\n" not in str(info.value)
