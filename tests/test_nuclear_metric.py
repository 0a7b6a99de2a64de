"""Matrix Nuclear-Norm (Li et al. 2024, https://arxiv.org/abs/2410.10672): the paper's formula against numpy and
hand-derived values, where its L1,2 approximation is exact and where it bounds, and the metric in eval and compare."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rankwise.cli import app
from rankwise.cli.metric import metric_names
from rankwise.eval import evaluate
from rankwise.eval.compare import compare
from rankwise.eval.measure import check_metrics
from rankwise.eval.nuclear import NuclearConfig, matrix_nuclear_norm, nuclear_norm, nuclear_score, nuclear_scores
from rankwise.methods.svd import SVDConfig
from tests.tiny_models import tiny_model, tiny_tokens


def _paper(R: np.ndarray) -> tuple[float, float]:
    """``(approx, exact)`` by the paper's recipe in numpy float64: centre columns, unit rows, top-D column norms or
    singular values, divided by the number of rows."""
    X = R - R.mean(axis=0)
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    D = min(X.shape)
    columns = np.sort(np.linalg.norm(X, axis=0))[::-1]
    return columns[:D].sum() / X.shape[0], np.linalg.norm(X, "nuc") / X.shape[0]


def _probs(rows: int, cols: int, seed: int, temperature: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(temperature * torch.randn(rows, cols, generator=g, dtype=torch.float64), dim=-1).float()


@pytest.mark.parametrize("shape", [(8, 20), (20, 8), (16, 300)])
def test_equals_the_papers_formula_in_numpy(shape):
    R = _probs(*shape, seed=sum(shape))
    approx, exact = _paper(R.double().numpy())
    assert matrix_nuclear_norm(R) == pytest.approx(approx, rel=1e-5)
    assert matrix_nuclear_norm(R, approx=False) == pytest.approx(exact, rel=1e-5)


def test_nuclear_norm_equals_svd_in_float64_also_rank_deficient():
    g = torch.Generator().manual_seed(0)
    full = torch.randn(12, 500, generator=g)
    low = torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g)  # rank 3: 27 zero singular values
    for X in (full, full.T, low):
        reference = float(torch.linalg.matrix_norm(X.double(), "nuc"))
        assert float(nuclear_norm(X)) == pytest.approx(reference, rel=1e-6)


def test_one_hot_rows_give_the_top_and_identical_rows_zero():
    L = 8
    one_hot = torch.eye(L, 50)  # L distinct tokens, each predicted with certainty
    # centred one-hot rows: (I - J/L) has singular values 1 (L - 1 times); unit rows scale them by sqrt(L / (L - 1)),
    # so ||X||_* / L = sqrt((L - 1) / L); every column has norm 1 after scaling, so the L1,2 value is L / L = 1
    assert matrix_nuclear_norm(one_hot) == pytest.approx(1.0, abs=1e-6)
    assert matrix_nuclear_norm(one_hot, approx=False) == pytest.approx(math.sqrt((L - 1) / L), abs=1e-6)
    uniform = torch.full((L, 50), 1 / 50)  # the same (uniform) prediction at every position: nothing after centring
    assert matrix_nuclear_norm(uniform) == 0.0 and matrix_nuclear_norm(uniform, approx=False) == 0.0
    for seed in range(5):  # every value lies between the two: [0, sqrt(D / L)] = [0, 1] here
        R = _probs(L, 50, seed, temperature=float(seed + 1))
        assert 0.0 < matrix_nuclear_norm(R, approx=False) <= 1.0 and 0.0 < matrix_nuclear_norm(R) <= 1.0


def test_approximation_exact_for_orthogonal_columns_and_invariant_to_offsets_and_row_scales():
    X = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # centred, unit rows, orthogonal columns
    R = torch.tensor([[0.3, -2.0]]) + torch.tensor([[5.0], [5.0], [0.5], [0.5]]) * X  # offset, row scales
    expected = 2 * math.sqrt(2) / 4  # singular values sqrt(2), sqrt(2) = the column norms
    assert matrix_nuclear_norm(R) == pytest.approx(expected, rel=1e-6)
    assert matrix_nuclear_norm(R, approx=False) == pytest.approx(expected, rel=1e-6)


def test_all_columns_bound_the_exact_value_the_top_d_may_not():
    for seed in range(5):  # d <= L: the top D columns are all of them, so the L1,2 norm bounds the nuclear norm
        R = _probs(30, 10, seed)
        assert matrix_nuclear_norm(R) >= matrix_nuclear_norm(R, approx=False) - 1e-6
    flat = _probs(4, 400, seed=0, temperature=0.5)  # mass spread over many more columns than rows
    assert matrix_nuclear_norm(flat) < matrix_nuclear_norm(flat, approx=False)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="finite"):
        matrix_nuclear_norm(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="matrix"):
        matrix_nuclear_norm(torch.ones(3))
    with pytest.raises(ValueError, match="matrix must be one of hidden, probs"):
        NuclearConfig(matrix="logits")
    model = tiny_model()
    with pytest.raises(ValueError, match="windows"):
        nuclear_score(model, tiny_tokens(2, 1))
    with pytest.raises(ValueError, match="batch_size"):
        nuclear_score(model, tiny_tokens(2, 8), batch_size=0)
    with pytest.raises(ValueError, match="metric must be one of perplexity, nuclear, nuclear_exact, got bogus"):
        check_metrics(["perplexity", "bogus"])


@torch.no_grad()
def test_model_score_is_the_mean_over_windows_of_the_last_hidden_state_and_probs():
    model, windows = tiny_model(), tiny_tokens(5, 24)
    hidden = model.model(input_ids=windows).last_hidden_state  # (5, 24, 64): independent of the head hook
    probs = torch.softmax(model(input_ids=windows).logits.float(), dim=-1)  # (5, 24, 256)
    configs = [NuclearConfig("hidden", True), NuclearConfig("hidden", False), NuclearConfig("probs", True),
               NuclearConfig("probs", False)]
    expected = [np.mean([_paper(m[w].double().numpy())[0 if c.approx else 1] for w in range(5)])
                for c in configs for m in [hidden if c.matrix == "hidden" else probs]]
    found = nuclear_scores(model, windows, configs, batch_size=2)
    assert found == pytest.approx(expected, rel=1e-4)
    assert nuclear_scores(model, windows, configs, batch_size=5) == pytest.approx(found, rel=1e-5)
    assert nuclear_score(model, windows, batch_size=2) == found[0]  # deterministic, the paper's variant by default
    assert [c.name for c in configs] == ["nuclear", "nuclear_exact", "nuclear_probs", "nuclear_probs_exact"]


def test_evaluate_and_compare_report_the_metric():
    model, windows = tiny_model(), tiny_tokens(4, 16)
    result = evaluate(model, windows, batch_size=2, metrics=("nuclear", "nuclear_exact"))
    assert result.perplexity is None and result.nuclear == nuclear_score(model, windows, batch_size=2)
    assert result.nuclear_exact == nuclear_score(model, windows, batch_size=2, approx=False)
    assert "nuclear" in result.describe() and "perplexity" not in result.describe()
    comparison = compare(model, tiny_tokens(4, 16, seed=1), windows, [SVDConfig(ratio=0.5)], batch_size=2,
                         progress=False, speed_repeats=1, metrics=["nuclear"])
    assert comparison.dense.nuclear == result.nuclear and comparison.dense.perplexity > 1
    assert comparison.rows[0].nuclear is not None and comparison.rows[0].nuclear != comparison.dense.nuclear
    assert "| perplexity | vs dense | nuclear |" in comparison.to_markdown()
    assert comparison.settings["metrics"] == ["perplexity", "nuclear"]  # comparison.json holds settings and rows
    assert asdict(comparison.rows[0])["nuclear"] == comparison.rows[0].nuclear


def test_cli_metric_option(tiny_dir, tmp_path):
    assert metric_names(None) == ("perplexity",)
    assert metric_names(["nuclear,perplexity", "nuclear"]) == ("nuclear", "perplexity")
    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(tiny_dir), "--json", "--seq-len", "16", "--eval-samples", "2",
                                 "--metric", "perplexity,nuclear"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["perplexity"] > 1 and 0 < data["nuclear"] <= 1 and data["nuclear_exact"] is None
    for args, message in [(["eval", str(tiny_dir), "--metric", "bogus"], "--metric must be one of perplexity"),
                          (["eval", str(tiny_dir), "--stream", "--metric", "nuclear"], "measures perplexity only"),
                          (["compare", str(tiny_dir), "--out", str(tmp_path / "o"), "--metric", "perplexity,"],
                           "--metric takes a comma list")]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output, result.output
