"""rankwise.optim: GaLore and APOLLO against direct implementations of the papers' formulas, AdamW fallback, resume,
bad input, per-layer updates, convolutions, and Trainer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from rankwise._errors import RankwiseWarning
from rankwise.linalg import subspace_basis, svd_flip
from rankwise.optim import APOLLOAdamW, GaLoreAdamW, LowRankAdamW, param_groups
from rankwise.optim.projection import basis, dct_matrix
from tests.tiny_models import tiny_model, tiny_tokens


def _problem(seed: int = 0, m: int = 24, n: int = 40):
    """A least-squares layer whose gradients have a decaying spectrum (so the top-r subspace is well defined)."""
    g = torch.Generator().manual_seed(seed)
    W = nn.Parameter(torch.randn(m, n, generator=g) * 0.1)
    X = torch.randn(n, 64, generator=g) * torch.logspace(0, -4, n)[:, None]
    Y = torch.randn(m, 64, generator=g)
    return W, X, Y


def _loss(W, X, Y):
    return ((W @ X - Y) ** 2).mean()


def _galore_reference(W0, X, Y, steps, rank, gap, scale, lr, betas=(0.9, 0.999), eps=1e-8):
    """GaLore with an exact SVD basis, written out from the paper's Algorithm 1."""
    W = W0.detach().clone().requires_grad_(True)
    m_, v_ = None, None
    for t in range(steps):
        (G,) = torch.autograd.grad(_loss(W, X, Y), W)
        if t % gap == 0:
            # the moments carry over a refresh, so the basis signs matter there: both sides use svd_flip's
            U, _, Vh = torch.linalg.svd(G if G.shape[0] <= G.shape[1] else G.T, full_matrices=False)
            P, _ = svd_flip(U[:, :rank], Vh[:rank])
        R = P.T @ G if G.shape[0] <= G.shape[1] else G @ P
        m_ = torch.zeros_like(R) if m_ is None else m_
        v_ = torch.zeros_like(R) if v_ is None else v_
        m_ = betas[0] * m_ + (1 - betas[0]) * R
        v_ = betas[1] * v_ + (1 - betas[1]) * R * R
        N = (m_ / (1 - betas[0] ** (t + 1))) / ((v_ / (1 - betas[1] ** (t + 1))).sqrt() + eps)
        update = P @ N if G.shape[0] <= G.shape[1] else N @ P.T
        with torch.no_grad():
            W -= lr * scale * update
    return W.detach()


def _run(opt_cls, W0, X, Y, steps, **kwargs):
    W = nn.Parameter(W0.detach().clone())
    opt = opt_cls([W], **kwargs)
    for _ in range(steps):
        opt.zero_grad()
        _loss(W, X, Y).backward()
        opt.step()
    return W.detach(), opt


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_galore_svd_matches_the_paper_with_exact_svd(shape):
    W0, X, Y = _problem(m=shape[0], n=shape[1]) if shape[0] <= shape[1] else _problem(m=40, n=24)
    ref = _galore_reference(W0, X, Y, steps=9, rank=4, gap=4, scale=0.5, lr=1e-2)
    got, _ = _run(GaLoreAdamW, W0, X, Y, 9, rank=4, update_gap=4, scale=0.5, lr=1e-2)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-4)
    assert not torch.allclose(got, W0.detach(), atol=1e-3)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
@pytest.mark.parametrize("scaling", ["channel", "tensor"])
def test_apollo_matches_its_formula(shape, scaling):
    W0, X, Y = _problem(m=shape[0], n=shape[1])
    got, opt = _run(APOLLOAdamW, W0, X, Y, 4, rank=4, update_gap=10, scale=2.0, lr=1e-2, scaling=scaling)
    # the same steps written out, with the optimizer's own (seeded) random projection
    W = W0.detach().clone().requires_grad_(True)
    left = shape[0] <= shape[1]
    P = basis("random", W.detach(), 4, opt.state[next(iter(opt.state))])
    m_ = v_ = None
    last = None
    for t in range(4):
        (G,) = torch.autograd.grad(_loss(W, X, Y), W)
        R = P.T @ G if left else G @ P
        m_ = 0.1 * R if m_ is None else 0.9 * m_ + 0.1 * R
        v_ = 0.001 * R * R if v_ is None else 0.999 * v_ + 0.001 * R * R
        N = (m_ / (1 - 0.9 ** (t + 1))) / ((v_ / (1 - 0.999 ** (t + 1))).sqrt() + 1e-8)
        if scaling == "tensor":
            scaled = G * (N.norm() / (R.norm() + 1e-8))
        elif left:
            scaled = G * (N.norm(dim=0) / (R.norm(dim=0) + 1e-8))[None, :]
        else:
            scaled = G * (N.norm(dim=1) / (R.norm(dim=1) + 1e-8))[:, None]
        norm = scaled.norm()
        if last is not None and norm > 1.01 * last:
            scaled, norm = scaled * (1.01 * last / norm), 1.01 * last
        last = norm
        with torch.no_grad():
            W -= 1e-2 * 2.0 * scaled
    torch.testing.assert_close(got, W.detach(), rtol=0, atol=1e-6)


def test_rank_none_is_adamw():
    W0, X, Y = _problem()
    got, _ = _run(LowRankAdamW, W0, X, Y, 5, rank=None, lr=1e-2, weight_decay=0.1)
    ref, _ = _run(torch.optim.AdamW, W0, X, Y, 5, lr=1e-2, weight_decay=0.1)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_subspace_basis_finds_the_top_subspace_and_warm_start_helps():
    W0, X, Y = _problem(m=64, n=96)
    (G,) = torch.autograd.grad(_loss(W0, X, Y), W0)
    U = torch.linalg.svd(G.double(), full_matrices=False).U[:, :6].float()
    P = subspace_basis(G, 6, power_iters=3)
    assert P.shape == (64, 6) and torch.allclose(P.T @ P, torch.eye(6), atol=1e-5)
    assert torch.linalg.matrix_norm(U - P @ (P.T @ U)) < 1e-2  # the same subspace
    G2 = G + 0.05 * G.norm() / 64 * torch.randn(64, 96, generator=torch.Generator().manual_seed(3))
    U2 = torch.linalg.svd(G2.double(), full_matrices=False).U[:, :6].float()
    cold = subspace_basis(G2, 6, power_iters=1, oversample=1, generator=1)
    warm = subspace_basis(G2, 6, power_iters=1, oversample=1, start=P, generator=1)
    err = [float(torch.linalg.matrix_norm(U2 - B @ (B.T @ U2))) for B in (cold, warm)]
    assert err[1] < err[0]
    assert torch.equal(subspace_basis(G2, 6, start=P, generator=5), subspace_basis(G2, 6, start=P, generator=5))


def test_dct_picks_the_best_aligned_columns():
    D = dct_matrix(16, torch.device("cpu"))
    torch.testing.assert_close(D.T @ D, torch.eye(16), atol=1e-5, rtol=0)
    G = D[:, [3, 7, 11]] @ torch.diag(torch.tensor([5.0, 3.0, 1.0])) @ torch.randn(3, 30)
    W = nn.Parameter(torch.zeros(16, 30))
    opt = GaLoreAdamW([W], rank=2, projection="dct")
    W.grad = G
    opt.step()
    assert opt.state[W]["indices"].tolist() == [3, 7]  # only indices are stored, not a basis
    assert "basis" not in opt.state[W]


def _train(model, opt, steps, tokens, start=0, per_layer=False):
    losses = []
    for s in range(start, steps):
        x = tokens[s % len(tokens)][None]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if not per_layer:
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("make", [
    lambda groups: GaLoreAdamW(groups, lr=3e-3, update_gap=2),
    lambda groups: GaLoreAdamW(groups, lr=3e-3, update_gap=2, projection="dct"),
    lambda groups: APOLLOAdamW(groups, lr=3e-3, update_gap=2),
    lambda groups: APOLLOAdamW(groups, lr=3e-3, update_gap=2, rank=1, scaling="tensor"),
])
def test_resume_from_a_checkpoint_gives_the_same_curve(tmp_path, make):
    tokens = tiny_tokens(8, seq_len=16)
    model = tiny_model("llama")
    start = copy.deepcopy(model.state_dict())
    opt = make(param_groups(model, rank=4))
    full = _train(model, opt, 6, tokens)
    final = copy.deepcopy(model.state_dict())

    model = tiny_model("llama")
    model.load_state_dict(start)
    opt = make(param_groups(model, rank=4))
    first = _train(model, opt, 3, tokens)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    del model, opt
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model = tiny_model("llama")
    model.load_state_dict(saved["model"])
    opt = make(param_groups(model, rank=4))
    opt.load_state_dict(saved["opt"])
    rest = _train(model, opt, 6, tokens, start=3)
    assert first + rest == full
    for key, value in final.items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_same_seed_same_bytes_and_low_rank_state_is_smaller():
    tokens = tiny_tokens(4, seq_len=16)
    states = []
    for _ in range(2):
        model = tiny_model("llama")
        opt = GaLoreAdamW(param_groups(model, rank=4), lr=1e-3, seed=7)
        _train(model, opt, 3, tokens)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    model = tiny_model("llama")
    adam = LowRankAdamW(model.parameters(), rank=None)
    low = GaLoreAdamW(param_groups(model, rank=4))
    _train(model, adam, 1, tokens)
    model.zero_grad()
    _train(model, low, 1, tokens)
    assert low.state_bytes() < adam.state_bytes()


def test_loading_another_models_state_names_the_mismatch():
    tokens = tiny_tokens(2, seq_len=16)
    a = tiny_model("llama")
    opt = GaLoreAdamW(param_groups(a, rank=4))
    _train(a, opt, 1, tokens)
    saved = opt.state_dict()
    other = tiny_model("gpt2")
    with pytest.raises(ValueError, match="another model"):
        GaLoreAdamW(param_groups(other, rank=4)).load_state_dict(saved)
    with pytest.raises(ValueError, match="rank"):
        opt2 = GaLoreAdamW(param_groups(tiny_model("llama"), rank=8))
        opt2.load_state_dict(saved)
    with pytest.raises(ValueError, match="projection"):
        GaLoreAdamW(param_groups(tiny_model("llama"), rank=4), projection="dct").load_state_dict(saved)


def test_rank_above_the_dimensions_is_clamped_with_a_warning():
    W = nn.Parameter(torch.randn(6, 10))
    with pytest.warns(RankwiseWarning, match="clamped to 6"):
        opt = GaLoreAdamW([{"params": [W], "names": ["w"], "rank": 50}])
    W.grad = torch.randn(6, 10)
    opt.step()
    assert opt.state[W]["exp_avg"].shape == (6, 10)


def test_non_finite_gradients_skip_the_step_and_are_counted():
    model = tiny_model("llama")
    opt = GaLoreAdamW(param_groups(model, rank=4), lr=1e-2)
    before = copy.deepcopy(model.state_dict())
    x = tiny_tokens(1, seq_len=16)
    model(input_ids=x, labels=x).loss.backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.warns(RankwiseWarning, match="skipped"):
        opt.step()
    assert opt.skipped_steps == 1 and not opt.state
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert opt.state_dict()["rankwise"]["skipped_steps"] == 1


def test_huge_finite_gradients_are_applied_not_skipped():
    # their squared norm overflows float32: the fast check must fall back to the exact one
    W = nn.Parameter(torch.zeros(6, 10))
    opt = GaLoreAdamW([W], lr=1e-2, rank=2)
    W.grad = torch.full((6, 10), 1e19)
    assert not torch.isfinite(torch._foreach_norm([W.grad])[0])
    opt.step()
    assert opt.skipped_steps == 0 and bool(torch.isfinite(W).all()) and W.abs().sum() > 0


@pytest.mark.parametrize("scaling", ["channel", "tensor"])
def test_apollo_survives_an_overflowing_gradient(scaling):
    W = nn.Parameter(torch.zeros(6, 10))
    opt = APOLLOAdamW([W], lr=1e-2, rank=2, scaling=scaling)
    W.grad = torch.full((6, 10), 1e19)  # finite, but its projection's norms overflow
    opt.step()
    W.grad = torch.randn(6, 10)
    opt.step()
    assert bool(torch.isfinite(W).all()) and opt.skipped_steps == 0


@pytest.mark.parametrize("projection", ["svd", "dct"])
def test_bfloat16_parameters_follow_the_float32_update(projection):
    W0, X, Y = _problem()
    W32, _ = _run(GaLoreAdamW, W0, X, Y, 3, lr=1e-2, rank=4, update_gap=2, projection=projection)
    W = nn.Parameter(W0.detach().clone().bfloat16())
    opt = GaLoreAdamW([W], lr=1e-2, rank=4, update_gap=2, projection=projection)
    for _ in range(3):
        opt.zero_grad()
        _loss(W.float(), X, Y).backward()
        opt.step()
    assert W.dtype == torch.bfloat16 and opt.state[W]["exp_avg"].dtype == torch.float32
    assert torch.allclose(W.float(), W32, atol=2e-2)


@pytest.mark.parametrize("bad,message", [
    ({"rank": 0}, "rank must be a positive integer"), ({"update_gap": 0}, "update_gap"),
    ({"projection": "qr"}, "projection must be one of svd, dct, random"), ({"lr": float("nan")}, "lr"),
    ({"scale": -1.0}, "scale"),
])
def test_bad_options_are_one_line_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        GaLoreAdamW([nn.Parameter(torch.randn(4, 4))], **bad)


def test_per_layer_updates_equal_the_step_and_free_gradients():
    tokens = tiny_tokens(4, seq_len=16)
    a, b = tiny_model("llama"), tiny_model("llama")
    b.load_state_dict(a.state_dict())
    opt_a = GaLoreAdamW(param_groups(a, rank=4), lr=3e-3, update_gap=2)
    opt_b = GaLoreAdamW(param_groups(b, rank=4), lr=3e-3, update_gap=2)
    opt_b.attach_per_layer()
    assert _train(a, opt_a, 4, tokens) == _train(b, opt_b, 4, tokens, per_layer=True)
    assert all(p.grad is None for p in b.parameters())
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_convolutions_are_projected_and_vectors_fall_back():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    opt = GaLoreAdamW(param_groups(net, rank=2), lr=1e-2)
    listed = opt.describe()
    assert any(s.startswith("0.weight (8, 3, 3, 3) rank 2") for s in listed["projected"])
    assert any(s.startswith("0.bias") for s in listed["adamw"])
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert opt.state[net[0].weight]["exp_avg"].shape == (2, 27)  # (out=8, in*k*k=27): left projection
    assert losses[-1] < losses[0]


def test_works_as_a_trainer_optimizer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model("llama")
    data = [{"input_ids": t, "labels": t} for t in tiny_tokens(8, seq_len=16)]
    opt = GaLoreAdamW(param_groups(model, rank=4), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True)
    before = [p.detach().clone() for p in model.parameters()]
    Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched)).train()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(int(s["step"]) == 3 for s in opt.state.values())
    assert math.isfinite(opt.state_bytes())
