"""M-FAC (https://arxiv.org/abs/2107.03356): inverse empirical-Fisher products against explicit solves, the sliding
window, the optimizer's step against Newton's step, and the ``loss_mfac`` allocation against the explicit quadratic
form and the full-model statistics."""

from __future__ import annotations

import pytest
import torch

from rankwise.allocate import ALLOCATIONS
from rankwise.allocate.fisher import fisher_loss_scores, nonincreasing_fit, truncation_losses
from rankwise.calibrate import collect_stats
from rankwise.compression import compress_
from rankwise.linalg import whiten
from rankwise.methods.svd_llm import SVDLLMConfig
from rankwise.nn import linear_weight
from rankwise.optim.mfac import MFAC, MFACOptimizer
from rankwise.targets import find_targets
from tests.tiny_models import tiny_model, tiny_tokens

F64 = torch.float64


def _problem(m: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=g, dtype=F64), torch.randn(3, d, generator=g, dtype=F64)


def _fisher(G: torch.Tensor, damp: float, block: int | None = None) -> torch.Tensor:
    """The explicit (block-diagonal) ``lambda I + G^T G / m``."""
    m, d = G.shape
    F = damp * torch.eye(d, dtype=F64)
    for s in range(0, d, block or d):
        e = min(s + (block or d), d)
        F[s:e, s:e] += G[:, s:e].T @ G[:, s:e] / m
    return F


@pytest.mark.parametrize("block", [None, 4, 7])
@pytest.mark.parametrize("m", [1, 5, 30])
def test_products_equal_the_explicit_fisher(m, block):
    """ifvp = solve(F, x), fvp = F x, quadratic forms and diag(F^-1) from the explicit (block-diagonal) F."""
    G, X = _problem(m, 18)
    damp = 0.3
    F = _fisher(G, damp, block)
    mfac = MFAC(G, damp, block_size=block)
    torch.testing.assert_close(mfac.ifvp(X), torch.linalg.solve(F, X.T).T, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mfac.ifvp(X[0]), torch.linalg.solve(F, X[0]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mfac.fvp(X), X @ F, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mfac.quad(X), ((X @ F) * X).sum(-1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mfac.quad_inverse(X), (torch.linalg.solve(F, X.T).T * X).sum(-1), rtol=1e-9,
                               atol=1e-10)
    torch.testing.assert_close(mfac.diag_inverse(), torch.linalg.inv(F).diagonal(), rtol=1e-10, atol=1e-10)


def test_float32_window_is_close_and_keeps_the_input_dtype():
    G, X = _problem(8, 40)
    out = MFAC(G.float(), 0.5, dtype=torch.float32).ifvp(X.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), torch.linalg.solve(_fisher(G, 0.5), X.T).T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block", [None, 5])
def test_sliding_window_equals_recomputing_from_the_current_window(block):
    G, X = _problem(6, 17)
    new, _ = _problem(9, 17, seed=1)
    mfac = MFAC(G, 0.2, block_size=block)
    window = G.clone()
    for k, g in enumerate(new):  # more updates than slots: the ring wraps around
        mfac.update(g)
        window[k % 6] = g  # the oldest gradient is replaced
        fresh = MFAC(window, 0.2, block_size=block)
        torch.testing.assert_close(mfac.ifvp(X), fresh.ifvp(X), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(mfac.diag_inverse(), fresh.diag_inverse(), rtol=1e-10, atol=1e-10)


def _train(opt_kwargs: dict, grads: torch.Tensor, w0: torch.Tensor) -> tuple[torch.Tensor, MFACOptimizer]:
    w = torch.nn.Parameter(w0.clone())
    opt = MFACOptimizer([w], **opt_kwargs)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w.detach(), opt


def test_optimizer_step_is_the_inverse_fisher_step_of_the_window():
    """Every step equals ``-lr F^-1 (g + wd w)`` with F from the last m (decayed) gradients (zeros before m steps),
    and momentum averages those directions, as the reference optimizer."""
    m, damp, lr, wd, mom = 4, 0.1, 0.05, 0.01, 0.5
    grads, _ = _problem(7, 9)
    w0 = torch.randn(9, generator=torch.Generator().manual_seed(3), dtype=F64).float()
    w = w0.double().clone()
    window, v = torch.zeros(m, 9, dtype=F64), torch.zeros(9, dtype=F64)
    for k, g in enumerate(grads):
        full = g.float().double() + wd * w.float().double()
        window[k % m] = full
        v = mom * v + (1 - mom) * torch.linalg.solve(_fisher(window, damp), full)
        w = w - lr * v
        got, _ = _train({"lr": lr, "m": m, "damp": damp, "momentum": mom, "weight_decay": wd},
                        grads[:k + 1].float(), w0)
        torch.testing.assert_close(got.double(), w, rtol=1e-4, atol=1e-5)


def test_one_step_with_lr_1_is_newtons_step_on_the_window_fisher_quadratic():
    """On f(w) = 1/2 (w - w*)^T F (w - w*) with F the empirical Fisher of the window (this step's gradient
    included), one step with lr = 1 lands on w*."""
    m, d, damp = 5, 12, 0.05
    G, _ = _problem(m, d)
    w = torch.nn.Parameter(torch.randn(d, generator=torch.Generator().manual_seed(4)))
    opt = MFACOptimizer([w], lr=0.0, m=m, damp=damp)
    for g in G[:-1]:  # lr = 0: fill the window without moving
        w.grad = g.float()
        opt.step()
    F = _fisher(G.float().double(), damp)
    target = w.detach().double() - torch.linalg.solve(F, G[-1].float().double())  # the minimiser w*
    w.grad = (F @ (w.detach().double() - target)).float()  # the quadratic's gradient at w: G[-1]
    opt.param_groups[0]["lr"] = 1.0
    opt.step()
    torch.testing.assert_close(w.detach().double(), target, rtol=1e-4, atol=1e-4)


def test_state_dict_round_trip_and_determinism():
    grads, _ = _problem(10, 6)
    grads = grads.float()
    w0 = torch.ones(6)
    kwargs = {"lr": 0.1, "m": 3, "damp": 0.2, "momentum": 0.9}
    full, _ = _train(kwargs, grads, w0)
    again, _ = _train(kwargs, grads, w0)
    assert torch.equal(full, again)  # same inputs, same bytes
    half, opt = _train(kwargs, grads[:5], w0)
    w = torch.nn.Parameter(half.clone())
    resumed = MFACOptimizer([w], **kwargs)
    resumed.load_state_dict(opt.state_dict())
    for g in grads[5:]:
        w.grad = g.clone()
        resumed.step()
    assert torch.equal(w.detach(), full)


def test_bad_input_raises_one_line_value_errors():
    w = torch.nn.Parameter(torch.zeros(3))
    cases = [(lambda: MFACOptimizer([w], m=0), "m \\(the gradient window size\\) must be an int >= 1"),
             (lambda: MFACOptimizer([w], damp=0.0), "damp must be a finite float > 0"),
             (lambda: MFACOptimizer([w], damp=-1.0), "damp must be a finite float > 0"),
             (lambda: MFACOptimizer([w], momentum=1.0), "momentum must be in \\[0, 1\\)"),
             (lambda: MFAC(torch.zeros(0, 3), 0.1), "grads must be an \\(m, d\\) tensor with m >= 1"),
             (lambda: MFAC(torch.full((2, 3), float("nan")), 0.1), "grads holds NaN or Inf"),
             (lambda: MFAC(torch.ones(2, 3), 0.0), "damp must be a finite float > 0"),
             (lambda: MFAC(torch.ones(2, 3), 0.1, block_size=0), "block_size must be an int >= 1"),
             (lambda: MFAC(torch.ones(2, 3), 0.1).ifvp(torch.ones(4)), "x must be \\(d,\\) or \\(n, d\\) with d = 3"),
             (lambda: MFAC(torch.ones(2, 3), 0.1).update(torch.tensor([1.0, float("inf"), 0.0])),
              "gradient holds NaN or Inf")]
    for make, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            make()
        assert "\n" not in str(info.value)
    opt = MFACOptimizer([w], m=2)
    w.grad = torch.tensor([0.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="gradient holds NaN or Inf"):
        opt.step()


def test_nonincreasing_fit_pools_violators():
    x = torch.tensor([5.0, 1.0, 3.0, 2.0, 0.5, 0.7])
    fit = nonincreasing_fit(x)
    assert torch.all(fit[1:] <= fit[:-1])
    torch.testing.assert_close(fit.sum(), x.double().sum())
    torch.testing.assert_close(fit, torch.tensor([5.0, 2.0, 2.0, 2.0, 0.6, 0.6], dtype=F64))
    ordered = torch.tensor([3.0, 2.0, 2.0, -1.0])
    torch.testing.assert_close(nonincreasing_fit(ordered), ordered.double())


@pytest.mark.parametrize("out_f, in_f", [(7, 5), (5, 7)])
def test_truncation_losses_equal_the_mfac_quadratic_form_of_the_removed_part(out_f, in_f):
    """L(r) = 1/2 vec(W - W_r)^T F vec(W - W_r) with W_r the rank-r whitened truncation and F M-FAC's Fisher."""
    g = torch.Generator().manual_seed(0)
    m, damp = 6, 0.1
    W = torch.randn(out_f, in_f, generator=g, dtype=F64)
    X = torch.randn(in_f, 40, generator=g, dtype=F64) * torch.linspace(0.2, 2.0, in_f, dtype=F64)[:, None]
    S = whiten(X @ X.T)
    windows = torch.randn(m, out_f, in_f, generator=g, dtype=F64)
    losses = truncation_losses(W, S, windows.float(), damp)
    Gf = windows.float().double().reshape(m, -1)
    mfac = MFAC(Gf, damp * float(Gf.pow(2).sum()) / (m * out_f * in_f))
    U, s, Vh = torch.linalg.svd(W @ S.factor)
    for r in range(min(out_f, in_f) + 1):
        kept = (U[:, :r] * s[:r]) @ Vh[:r] @ torch.linalg.inv(S.factor)  # the rank-r whitened truncation
        expected = 0.5 * mfac.quad((W - kept).reshape(-1))
        torch.testing.assert_close(losses[r], expected, rtol=2e-4, atol=1e-6)
    scores = fisher_loss_scores(W, S, [windows[:2].float(), windows[2:].float()], damp)  # chunks as collected
    assert torch.all(scores[1:] <= scores[:-1])
    torch.testing.assert_close(scores.sum() * (out_f + in_f), losses[0] - losses[-1])


def test_window_gradients_split_the_weight_gradient_by_window():
    """"gwin" holds, per window, the gradient of that window's own mean loss: over a batch of B windows they sum to
    B times the batch-loss gradient, each equals the window's gradient alone, and a short last batch weighs the same."""
    model, tokens = tiny_model("llama"), tiny_tokens(4, 16)
    name = "model.layers.1.mlp.down_proj"
    modules = {name: model.get_submodule(name)}
    stats = collect_stats(model, tokens, modules, kinds=("gwin", "grad"), batch_size=4)[name]
    windows = torch.cat(stats.grad_windows[name])
    assert windows.shape == (4, *linear_weight(modules[name]).shape)
    torch.testing.assert_close(windows.sum(0), 4 * stats.grad_sum[name], rtol=1e-4, atol=1e-6)
    one = collect_stats(model, tokens[2:3], modules, kinds=("grad",), batch_size=1)[name]
    torch.testing.assert_close(windows[2], one.grad_sum[name], rtol=1e-4, atol=1e-6)
    uneven = collect_stats(model, tokens[:3], modules, kinds=("gwin",), batch_size=2)[name]  # batches of 2 and 1
    torch.testing.assert_close(torch.cat(uneven.grad_windows[name])[2], one.grad_sum[name], rtol=1e-4, atol=1e-6)


def test_loss_mfac_streamed_equals_full_model_statistics():
    """The block-by-block gradient pass gives the ranks and model that full-model statistics give, and the
    allocation is a registered name (so ``--allocation loss_mfac`` reaches it)."""
    assert "loss_mfac" in ALLOCATIONS
    tokens = tiny_tokens(4, 24)
    dense = tiny_model("llama")
    stats = collect_stats(dense, tokens, find_targets(dense), kinds=("xxt", "gwin"), batch_size=2)
    config = SVDLLMConfig(ratio=0.4, allocation="loss_mfac")
    streamed, reference = tiny_model("llama"), tiny_model("llama")
    got = compress_(streamed, config, tokens, progress=False, batch_size=2)
    ref = compress_(reference, config, tokens, stats=stats, progress=False, batch_size=2)
    assert [layer.rank for layer in got.layers] == [layer.rank for layer in ref.layers]
    assert got.params_targeted_after <= 0.6 * got.params_targeted_before  # the budget: ratio 0.4 removed
    ids = tokens[:2]
    torch.testing.assert_close(streamed(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="allocation 'loss_mfac' needs calibration data"):
        ALLOCATIONS["loss_mfac"].score("x", torch.ones(3, 3), None)


def test_compare_refuses_loss_mfac_instead_of_holding_every_window_gradient():
    """compare shares whole-model statistics: per-window gradients of every layer at once would be a model's size
    per window, so it refuses loss_mfac with one line pointing to compress (which scores one block at a time)."""
    from rankwise.eval.compare import compare

    model, tokens = tiny_model("llama"), tiny_tokens(4, 16)
    with pytest.raises(ValueError, match="allocation loss_mfac keeps each window's weight gradient"):
        compare(model, tokens, tiny_tokens(2, 16, seed=1), [SVDLLMConfig(ratio=0.3, allocation="loss_mfac")],
                progress=False)
