"""The 2025-2026 records (issue 21): the anchored closed form (AA-SVD), the left-factor refit's guarantee,
sequential compression one input group at a time, and the ZS-SVD and D-Rank allocations."""

from __future__ import annotations

import json

import pytest
import torch

from rankwise.allocate import layer_params
from rankwise.allocate.drank import QK_TAX, drank_ranks, effective_rank
from rankwise.allocate.zero_sum import zero_sum_ranks, zero_sum_scores
from rankwise.compression import compress_
from rankwise.linalg import anchored_svd, refit_left, whiten, whitened_svd
from rankwise.methods.svd_llm import SVDLLMConfig
from tests.tiny_models import tiny_model, tiny_tokens


def paired(n: int = 24, tokens: int = 400, m: int = 16, seed: int = 0):
    """Original inputs ``X``, drifted compressed-model inputs ``Xh`` of the same tokens, and a weight."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5 + torch.eye(n, dtype=torch.float64)
    scale = torch.linspace(3, 0.1, n, dtype=torch.float64)[:, None]
    X = torch.randn(n, tokens, generator=g, dtype=torch.float64) * scale
    Xh = 0.8 * X + 0.3 * (mix @ X) + 0.05 * torch.randn(n, tokens, generator=g, dtype=torch.float64)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    return X, Xh, W


def objective(W, X, Xh, Wp) -> float:
    return float((W @ X - Wp @ Xh).pow(2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refit_never_increases_the_objective_it_minimises(seed):
    X, Xh, W = paired(seed=seed)
    C, cross = Xh @ Xh.T, X @ Xh.T
    for rank in (2, 6, 12):
        lr = whitened_svd(W, C, rank)
        before = objective(W, X, Xh, lr.to_dense())
        U = refit_left(W, lr.Vh, C, cross)
        after = objective(W, X, Xh, U @ lr.Vh)
        assert after <= before * (1 + 1e-9)
        # and it is the least-squares optimum for this right factor: any perturbation of U is worse
        for _ in range(3):
            assert objective(W, X, Xh, (U + 1e-3 * torch.randn_like(U)) @ lr.Vh) >= after


@pytest.mark.parametrize("seed", [0, 1])
def test_anchored_svd_is_the_rank_constrained_optimum(seed):
    X, Xh, W = paired(seed=seed)
    C, cross = Xh @ Xh.T, X @ Xh.T
    for rank in (3, 8):
        lr = anchored_svd(W, C, cross, rank)
        assert lr.rank == rank and lr.info["anchored"] is True
        best = objective(W, X, Xh, lr.to_dense())
        plain = whitened_svd(W, C, rank)
        refit = refit_left(W, plain.Vh, C, cross) @ plain.Vh
        assert best <= objective(W, X, Xh, refit) * (1 + 1e-9) <= objective(W, X, Xh, plain.to_dense()) * (1 + 1e-9)
        g = torch.Generator().manual_seed(seed)
        for _ in range(5):  # no nearby rank-r matrix does better
            L = lr.U * lr.S + 1e-3 * torch.randn(lr.U.shape, generator=g, dtype=lr.U.dtype)
            R = lr.Vh + 1e-3 * torch.randn(lr.Vh.shape, generator=g, dtype=lr.Vh.dtype)
            assert objective(W, X, Xh, L @ R) >= best
    # full rank: the least-squares map from Xh to the original outputs
    full = anchored_svd(W, C, cross, W.shape[0]).to_dense()
    lstsq = torch.linalg.lstsq(Xh.T, (W @ X).T).solution.T
    torch.testing.assert_close(full, lstsq, atol=1e-8, rtol=1e-6)
    # a weight a < 1 fits the target W (a X + (1 - a) Xh): the same as the full fit with that cross moment
    for a in (0.0, 0.3):
        torch.testing.assert_close(anchored_svd(W, C, cross, 4, weight=a).to_dense(),
                                   anchored_svd(W, C, a * cross + (1 - a) * C, 4).to_dense(), atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(anchored_svd(W, C, cross, 4, weight=0.0).to_dense(), whitened_svd(W, C, 4).to_dense(),
                               atol=1e-9, rtol=1e-7)
    with pytest.raises(ValueError, match="weight must be in"):
        anchored_svd(W, C, cross, 4, weight=1.5)
    # without drift it is SVD-LLM's whitened truncation
    torch.testing.assert_close(anchored_svd(W, X @ X.T, X @ X.T, 5).to_dense(), whitened_svd(W, X @ X.T, 5).to_dense(),
                               atol=1e-9, rtol=1e-7)


def test_a_singular_covariance_is_regressed_on_the_directions_it_spans():
    """10 tokens for 24 inputs: ``Xh Xh^T`` has rank 10. The anchored fit is AA-SVD's optimum on the span, from the
    SVD ``Xh = U_x diag(s) V_x^T``: ``W' = [W X V_x]_r diag(1/s) U_x^T``, the minimum-norm minimiser (nothing along
    the 14 directions the compressed inputs do not span)."""
    X, Xh, W = paired(tokens=10)
    C, cross = Xh @ Xh.T, X @ Xh.T
    assert whiten(C).method == "eigh" and whiten(C).clamped == 14
    lr = anchored_svd(W, C, cross, 4, weight=1.0)
    assert not lr.anchored_fallback and lr.info["anchored"] is True and lr.info["anchored_dropped"] == 14
    assert lr.whitening_fallback
    Ux, s, Vxt = torch.linalg.svd(Xh, full_matrices=False)
    Ux, s, Vxt = Ux[:, :10], s[:10], Vxt[:10]
    B = torch.linalg.svd(W @ X @ Vxt.T, full_matrices=False)
    expected = (B.U[:, :4] * B.S[:4]) @ B.Vh[:4] @ torch.diag(1 / s) @ Ux.T
    torch.testing.assert_close(lr.to_dense(), expected, atol=1e-8, rtol=1e-6)
    assert objective(W, X, Xh, lr.to_dense()) < objective(W, X, Xh, whitened_svd(W, C, 4).to_dense())
    null = torch.linalg.svd(Xh)[0][:, 10:]  # (24, 14) the directions the compressed inputs do not span
    # statistics summed from float32 products, as calibration collects them: their rounding is not taken for signal
    C32, cross32 = (Xh.float() @ Xh.float().T).double(), (X.float() @ Xh.float().T).double()
    lr32 = anchored_svd(W, C32, cross32, 4, weight=1.0).to_dense()
    assert float((lr32 @ null).norm()) < 1e-6 * float(lr32.norm())
    torch.testing.assert_close(lr32, expected, atol=1e-4, rtol=1e-3)
    # a < 1: along those directions the layer keeps (1 - a) of its own map, projected on the kept outputs
    a = 0.25
    mixed = anchored_svd(W, C, cross, 4, weight=a)
    U = torch.linalg.qr(mixed.U)[0]
    torch.testing.assert_close(mixed.to_dense() @ null, (1 - a) * U @ U.T @ W @ null, atol=1e-8, rtol=1e-6)

def test_a_singular_refit_system_is_refused():
    X, _Xh, W = paired(tokens=10)
    Vh = torch.ones(3, W.shape[1], dtype=W.dtype)  # rank-1 right factor: singular 3 x 3 system
    full = X @ X.T + torch.eye(X.shape[0], dtype=X.dtype)
    assert refit_left(W, Vh, full) is None
    assert refit_left(W, torch.eye(3, W.shape[1], dtype=W.dtype), full) is not None


def test_anchored_sequential_runs_and_is_reported():
    tokens = tiny_tokens(48)
    model = tiny_model("llama")
    report = compress_(model, SVDLLMConfig(ratio=0.3, sequential=True, anchored=True), tokens, progress=False)
    assert "anchored to the original outputs" in report.notes[0]
    assert 0.3 <= report.removed_fraction <= 0.31
    with torch.no_grad():
        assert bool(torch.isfinite(model(tiny_tokens(2)).logits).all())
    with pytest.raises(ValueError, match=r"anchored=True .* also set sequential=True"):
        SVDLLMConfig(ratio=0.3, anchored=True)
    with pytest.raises(ValueError, match=r"anchor must be the weight of the original outputs in \(0, 1\]"):
        SVDLLMConfig(ratio=0.3, sequential=True, anchored=True, anchor=0.0)


def test_anchored_sequential_tracks_the_dense_model_better_on_calibration():
    tokens = tiny_tokens(48, seq_len=32)
    dense = tiny_model("llama")
    with torch.no_grad():
        target = dense.model(tokens).last_hidden_state
    errors = {}
    for anchored in (False, True):
        model = tiny_model("llama")
        config = SVDLLMConfig(ratio=0.4, sequential=True, anchored=anchored, anchor=1.0)
        compress_(model, config, tokens, progress=False)
        with torch.no_grad():
            errors[anchored] = float((model.model(tokens).last_hidden_state - target).pow(2).mean())
    assert errors[True] < errors[False]


def test_zero_sum_score_is_minus_sigma_times_the_loss_derivative():
    """Reference: ``d_i = -s_i dL/ds_i``, the derivative taken by autograd through ``W = U diag(s) V^T S^-1``."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 9, generator=g, dtype=torch.float64)
    X = torch.randn(9, 50, generator=g, dtype=torch.float64)
    Y = torch.randn(6, 50, generator=g, dtype=torch.float64)

    def loss(w):
        return torch.tanh(w @ X - Y).pow(2).mean()

    Wg = W.clone().requires_grad_(True)
    loss(Wg).backward()
    wh = whiten(X @ X.T / 50)
    scores = zero_sum_scores(W, wh, Wg.grad)
    U, s, Vh = torch.linalg.svd(wh.right_multiply(W), full_matrices=False)
    s = s.clone().requires_grad_(True)
    loss(wh.right_solve(U @ torch.diag(s) @ Vh)).backward()
    torch.testing.assert_close(scores, -s.detach() * s.grad, atol=1e-10, rtol=1e-8)


def test_zero_sum_removal_order_keeps_the_running_sum_balanced():
    shapes = {"a": (4, 100), "b": (4, 100)}  # rank 1 costs 104, rank 2 208; from the break-even rank 3 on, 400
    scores = {"a": torch.tensor([5.0, 1.0, 0.3, 0.2]), "b": torch.tensor([5.0, 1.0, -0.1, 0.25])}
    # sum 0: a's +0.2; sum > 0 but no negative tail: b's +0.25 (smaller than a's +0.3); sum 0.45: b's -0.1, and
    # b at rank 2 brings the total to 608
    assert zero_sum_ranks(scores, shapes, 608) == {"a": 3, "b": 2}
    assert zero_sum_ranks(scores, shapes, 416) == {"a": 2, "b": 2}  # then a's +0.3
    with pytest.raises(ValueError, match=r"cannot be met: even rank 1 in every matrix keeps 208 \(8 too many\)"):
        zero_sum_ranks(scores, shapes, 200)


def test_effective_rank_and_drank_allocation():
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    shapes = {f"layers.{i}.mlp.up_proj": (64, 32) for i in range(3)}
    shapes |= {f"layers.{i}.self_attn.q_proj": (32, 32) for i in range(2)} | {f"layers.{i}.self_attn.v_proj": (16, 32)
                                                                         for i in range(2)}
    flat, steep = torch.ones(32), torch.tensor([0.5**i for i in range(32)])
    scores = {k: (flat if ".0." in k else steep).clone() for k in shapes}
    budget = int(0.6 * sum(m * n for m, n in shapes.values()))
    ranks = drank_ranks(scores, shapes, budget)
    total = sum(layer_params(*shapes[k], r) for k, r in ranks.items())
    assert budget - 96 <= total  # within one rank of the most expensive matrix
    assert ranks["layers.0.mlp.up_proj"] > ranks["layers.1.mlp.up_proj"]  # the flat spectrum gets more rank
    assert ranks["layers.0.self_attn.q_proj"] > ranks["layers.1.self_attn.q_proj"]
    assert total <= budget


def test_drank_moves_query_and_key_rank_to_the_values(monkeypatch):
    import rankwise.allocate.drank as drank

    shapes = {f"layers.{i}.attn.{p}": (16 if p == "v_proj" else 32, 32) for i in range(2) for p in ("q_proj", "v_proj")}
    scores = {k: torch.tensor([0.8**i for i in range(32)]) for k in shapes}
    budget = int(0.5 * sum(m * n for m, n in shapes.values()))
    taxed = drank_ranks(scores, shapes, budget)
    monkeypatch.setattr(drank, "QK_TAX", 0.0)
    untaxed = drank_ranks(scores, shapes, budget)
    assert QK_TAX == 0.2
    assert all(taxed[k] < untaxed[k] for k in shapes if "q_proj" in k)
    assert all(taxed[k] > untaxed[k] for k in shapes if "v_proj" in k)


@pytest.mark.parametrize("allocation", ["zs", "drank"])
@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_record_allocations_meet_the_budget(allocation, ratio):
    model = tiny_model("llama")
    report = compress_(model, SVDLLMConfig(ratio=ratio, allocation=allocation), tiny_tokens(16), progress=False)
    assert ratio <= report.removed_fraction <= ratio + 0.01
    uniform = compress_(tiny_model("llama"), SVDLLMConfig(ratio=ratio), tiny_tokens(16), progress=False)
    assert [layer.rank for layer in report.layers] != [layer.rank for layer in uniform.layers]
    assert f"allocation {allocation}" in report.notes[0]


def test_block_refinement_lowers_each_blocks_calibration_error():
    tokens = tiny_tokens(16)
    model = tiny_model("llama")
    plain = tiny_model("llama")
    config = SVDLLMConfig(ratio=0.4, sequential=True, anchored=True, refine_epochs=2, refine_lr=1e-3)
    report = compress_(model, config, tokens, progress=False)
    compress_(plain, SVDLLMConfig(ratio=0.4, sequential=True, anchored=True), tokens, progress=False)
    note = next(n for n in report.notes if n.startswith("block refinement (2 epochs per block)"))
    assert float(note.split("best x", 1)[1].split(",")[0]) < 1.0
    # block 0 sees the same inputs in both runs: its factors differ by the refinement alone
    assert not torch.allclose(model.model.layers[0].mlp.down_proj.up, plain.model.layers[0].mlp.down_proj.up)
    assert model.model.layers[1].mlp.down_proj.bias is None
    with pytest.raises(ValueError, match=r"refine_epochs .* also set sequential=True"):
        SVDLLMConfig(ratio=0.3, refine_epochs=1)


def run_cli(*args):
    from typer.testing import CliRunner

    from rankwise.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_best_expands_by_ratio():
    """``best`` fits on the dense model's statistics below 0.3 and sequentially, anchored, from 0.3 (and for a budget
    in bits, whose ratio depends on the stored dtype); its text (the CLI's help) says so; a ratio out of range is the
    config's one-line error."""
    from rankwise.methods.recipes import NAMED_RECIPES, NamedRecipe, parse_recipe

    light, heavy = parse_recipe("best", 0.2), parse_recipe("best", 0.3)
    assert (light.allocation, light.output_weighted, light.sequential, light.anchored) == ("loss", True, False, False)
    assert (heavy.allocation, heavy.output_weighted, heavy.sequential, heavy.anchored) == ("loss", True, True, True)
    assert parse_recipe("best", 0.4).sequential and parse_recipe("best", bits=10.0).sequential
    assert parse_recipe("best", 0.29).ratio == 0.29 and not parse_recipe("best", 0.29).sequential
    assert not parse_recipe("best").sequential  # the default ratio, 0.2
    assert str(NAMED_RECIPES["best"]) == ("svd_llm+loss+ow below ratio 0.3, svd_llm+loss+seq+anc+ow from 0.3 (with "
                                          "--bits, the last)")
    for bad in (-0.1, float("nan"), 1.5):
        with pytest.raises(ValueError, match=r"ratio must be a fraction of parameters removed in \(0, 1\)"):
            parse_recipe("best", bad)
    with pytest.raises(ValueError, match="by_ratio must start from ratio 0 and ascend"):
        NamedRecipe(((0.3, "svd_llm"), (0.0, "svd")))
    from rankwise.api import build_config

    assert build_config(recipe="best", bits=10.0).sequential and not build_config(recipe="best", ratio=0.2).sequential


def test_cli_recipe_best_and_anchored_rows(tiny_dir, tmp_path):
    from rankwise.methods.recipes import NAMED_RECIPES, parse_recipe

    small = ["--seq-len", "16", "--calib-samples", "8"]
    result = run_cli("compress", tiny_dir, "--recipe", "best", "--ratio", "0.3", "--out", tmp_path / "b", *small)
    assert result.exit_code == 0, result.output
    expected = parse_recipe(NAMED_RECIPES["best"].expand(0.3), 0.3)
    config = json.loads((tmp_path / "b" / "rankwise.json").read_text())["provenance"]["options"]
    assert expected.sequential and expected.anchored and expected.output_weighted
    for key in ("allocation", "sequential", "anchored", "anchor", "output_weighted"):
        assert config[key] == getattr(expected, key), key
    bad = run_cli("compress", tiny_dir, "--recipe", "best", "--sequential", "--out", tmp_path / "o", *small)
    assert bad.exit_code == 2 and "--recipe replaces --sequential" in bad.output
    bad = run_cli("compress", tiny_dir, "--method", "svd", "--anchored", "--sequential", "--out", tmp_path / "o")
    assert bad.exit_code == 2 and "--anchored applies to svd_llm" in bad.output
    result = run_cli("compare", tiny_dir, "--recipes", "best,svd_llm+seq+ow", "--ratios", "0.3", "--eval-samples",
                     "4", "--out", tmp_path / "best", "--speed-repeats", "1", *small)
    assert result.exit_code == 0, result.output  # compare's shared statistics carry the output gradients
    table = (tmp_path / "best" / "comparison.md").read_text()
    assert "| svd_llm +loss +seq +anc +ow |" in table and "| svd_llm +seq +ow |" in table
    result = run_cli("compare", tiny_dir, "--methods", "svd_llm", "--allocations", "uniform,zs", "--sequential", "on",
                     "--anchored", "both", "--ratios", "0.3", "--eval-samples", "4", "--out", tmp_path / "cmp",
                     "--speed-repeats", "1", *small)
    assert result.exit_code == 0, result.output
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    for row in ("| svd_llm +seq |", "| svd_llm +seq +anc |", "| svd_llm +zs +seq |", "| svd_llm +zs +seq +anc |"):
        assert row in table
    bad = run_cli("compare", tiny_dir, "--recipes", "svd+anc", "--out", tmp_path / "o")
    assert bad.exit_code == 2 and "option 'anc' (anchored) applies to svd_llm, not svd" in bad.output
    bad = run_cli("compare", tiny_dir, "--methods", "svd_llm", "--anchored", "on", "--out", tmp_path / "o")
    assert bad.exit_code == 2 and "needs sequential rows: add --sequential on" in bad.output


def test_score_samples_scores_on_the_first_windows_only():
    """The allocation's scoring pass on the first 8 of 16 windows chooses the ranks it chooses when those 8 are all
    the calibration there is (the ranks depend on the scores alone); the factors still see all 16 windows."""
    tokens = tiny_tokens(16)
    ranks, models = [], []
    for calibration, samples in ((tokens, 8), (tokens[:8], None)):
        model = tiny_model("llama")
        report = compress_(model, SVDLLMConfig(ratio=0.3, allocation="loss", score_samples=samples), calibration,
                           progress=False)
        ranks.append({layer.name: layer.rank for layer in report.layers})
        models.append(model)
    assert ranks[0] == ranks[1]
    assert len(set(ranks[0].values())) > 1  # the loss allocation, not uniform ranks
    factorised = [n for n, m in models[0].named_modules() if hasattr(m, "dense_weight")]
    assert factorised
    fits = [m.get_submodule(factorised[0]).dense_weight().detach() for m in models]
    assert not torch.allclose(fits[0], fits[1])  # fitted on 16 windows against 8
    with pytest.raises(ValueError, match=r"score_samples must be a number of calibration windows >= 1"):
        SVDLLMConfig(ratio=0.3, score_samples=0)


def test_score_samples_is_part_of_the_cache_key(tmp_path):
    tokens = tiny_tokens(16)
    notes = []
    for samples in (None, 8, 8):
        report = compress_(tiny_model("llama"), SVDLLMConfig(ratio=0.3, allocation="loss", score_samples=samples),
                           tokens, progress=False, cache=tmp_path)
        notes.append(any("read from the cache" in note for note in report.notes))
    assert notes == [False, False, True]


def output_weighted_case(seed: int = 0):
    """A weight, its input second moment and per-channel output-gradient energies spanning two decades."""
    from rankwise.calibrate import LayerStats

    g = torch.Generator().manual_seed(seed)
    m, n, tokens = 12, 20, 300
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.linspace(2, 0.2, n, dtype=torch.float64)
    W = torch.randn(m, n, generator=g, dtype=torch.float64).float()
    stats = LayerStats(n=n)
    stats.add(X, frozenset({"xxt"}))
    energy = torch.logspace(-2, 0, m, dtype=torch.float64)[torch.randperm(m, generator=g)]
    stats.grad_channels["w"] = energy * tokens
    stats.grad_tokens["w"] = tokens
    stats.grad_out["w"] = float(energy.sum()) * tokens
    return W, X, stats, energy.sqrt()


@pytest.mark.parametrize("seed", [0, 1])
def test_output_weighted_minimises_the_output_fisher_weighted_error(seed):
    from rankwise.methods.svd_llm import svd_llm

    W, X, stats, d = output_weighted_case(seed)

    def error(Wp: torch.Tensor, rows: torch.Tensor) -> float:
        return float((rows[:, None] * ((W.double() - Wp.double()) @ X.T)).pow(2).sum())

    ones = torch.ones_like(d)
    for rank in (3, 7):
        plain = svd_llm(W, stats, rank, SVDLLMConfig(ratio=0.3), "w").to_dense()
        weighted = svd_llm(W, stats, rank, SVDLLMConfig(ratio=0.3, output_weighted=True), "w")
        assert weighted.rank == rank and weighted.info["output_weighted"] is True
        assert error(weighted.to_dense(), d) < error(plain, d)  # better where the loss is sensitive ...
        assert error(plain, ones) < error(weighted.to_dense(), ones)  # ... at the price of the plain error
    # with equal channel weights it is the plain whitened truncation
    stats.grad_channels["w"] = torch.full_like(d, 3.0) * stats.grad_tokens["w"]
    torch.testing.assert_close(svd_llm(W, stats, 5, SVDLLMConfig(ratio=0.3, output_weighted=True), "w").to_dense(),
                               svd_llm(W, stats, 5, SVDLLMConfig(ratio=0.3), "w").to_dense(), atol=1e-4, rtol=1e-4)


def test_output_weighted_runs_the_gradient_pass_and_refuses_statistics_without_it():
    from rankwise.calibrate import LayerStats
    from rankwise.methods.svd_llm import svd_llm

    model = tiny_model("llama")
    report = compress_(model, SVDLLMConfig(ratio=0.3, output_weighted=True), tiny_tokens(8), progress=False)
    assert 0.3 <= report.removed_fraction <= 0.31
    stats = LayerStats(n=4)
    stats.add(torch.randn(10, 4), frozenset({"xxt"}))
    with pytest.raises(ValueError, match=r"output_weighted needs the loss gradients at w's outputs"):
        svd_llm(torch.randn(3, 4), stats, 2, SVDLLMConfig(ratio=0.3, output_weighted=True), "w")


def test_loss_channels_scores_are_the_diagonal_gauss_newton_loss_of_each_component():
    """Reference: removing whitened component ``i`` of ``D W S`` raises ``0.5 ||D (W - W') S||^2`` by
    ``0.5 s_i^2`` (``D^2`` the per-channel mean squared output gradient); per parameter, ``/(m + n)``. With equal
    channel energies it ranks components exactly as the isotropic ``loss`` allocation does."""
    from rankwise.allocate.policy import ALLOCATIONS

    W, X, stats, d = output_weighted_case()
    m, n = W.shape
    scores = ALLOCATIONS["loss_channels"].score("w", W, stats)
    S = torch.linalg.cholesky(X.T @ X / X.shape[0])
    expected = 0.5 * torch.linalg.svdvals(d[:, None] * W.double() @ S).pow(2) / (m + n)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-12)
    stats.grad_channels["w"] = torch.full_like(d, 2.0) * stats.grad_tokens["w"]
    stats.grad_out["w"] = 2.0 * m * stats.grad_tokens["w"]
    torch.testing.assert_close(ALLOCATIONS["loss_channels"].score("w", W, stats),
                               ALLOCATIONS["loss"].score("w", W, stats), rtol=1e-4, atol=1e-12)
    from rankwise.calibrate import LayerStats

    bare = LayerStats(n=n)
    bare.add(X, frozenset({"xxt"}))
    with pytest.raises(ValueError, match=r"allocation 'loss_channels' needs calibration data"):
        ALLOCATIONS["loss_channels"].score("w", W, bare)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_output_weighted_in_half_precision_stays_finite_with_tiny_gradients(dtype):
    """Mean-loss gradients are tiny (here 1e-5 to 1e-8 RMS): the fit must not underflow or overflow a half type."""
    from rankwise.methods.svd_llm import svd_llm

    W, _X, stats, _d = output_weighted_case()
    stats.grad_channels["w"] = stats.grad_channels["w"] * 1e-10
    reference = svd_llm(W, stats, 5, SVDLLMConfig(ratio=0.3, output_weighted=True), "w").to_dense()
    half = svd_llm(W.to(dtype), stats, 5, SVDLLMConfig(ratio=0.3, output_weighted=True), "w")
    assert half.U.dtype == dtype and bool(torch.isfinite(half.to_dense().float()).all())
    torch.testing.assert_close(half.to_dense().float(), reference, atol=0.05, rtol=0.05)


def test_compare_refuses_score_samples(tiny_dir, tmp_path):
    result = run_cli("compare", tiny_dir, "--recipes", "svd_llm+loss+score_samples=4", "--ratios", "0.3",
                     "--out", tmp_path / "c", "--seq-len", "16", "--calib-samples", "8")
    assert result.exit_code != 0 and "score_samples narrows rankwise compress's scoring pass" in result.output
