"""Choosing calibration windows from a pool: scores against the closed form, determinism, the wiring, the cache."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import rankwise
from rankwise.calibrate.select import EVAL_ROOM, SelectConfig, check_pool, check_room, select_windows, window_features
from rankwise.cli.app import app
from rankwise.compression.job import compress_model
from rankwise.methods.svd_llm import SVDLLMConfig
from rankwise.targets import find_targets
from tests.tiny_models import tiny_model, tiny_tokenizer, tiny_tokens

TEXT = " ".join(f"word{i % 37} and {i % 11} or {i % 5}" for i in range(3000))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _exact_scores(model, pool: torch.Tensor, ridge: float) -> torch.Tensor:
    """``sum over distinct targeted inputs of tr(C_i (C + lam I)^-1)`` per window, from hooks on the whole model."""
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.setdefault(n, []).append(args[0].double()))
               for n, m in find_targets(model, ("attn", "mlp")).items() if n.endswith(("q_proj", "o_proj", "gate_proj",
                                                                                       "down_proj"))]
    with torch.no_grad():
        for window in pool:
            model(window[None])
    for h in handles:
        h.remove()
    total = torch.zeros(pool.shape[0], dtype=torch.float64)
    for xs in inputs.values():
        X = torch.cat(xs)  # (P, T, n)
        C = torch.einsum("ptn,ptm->nm", X, X)
        M = torch.linalg.inv(C + ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=torch.float64))
        total += torch.einsum("ptn,nm,ptm->p", X, M, X)
    return total


def test_window_scores_estimate_the_summed_ridge_leverage(model):
    pool = tiny_tokens(12, 16, seed=1)
    config = SelectConfig("leverage", features=1024, ridge=0.05)
    F = window_features(model, pool, config, batch_size=5)
    assert F.shape == (12, 2 * 4 * 1024)  # 2 blocks x 4 distinct inputs (q/k/v, o, gate/up, down)
    exact = _exact_scores(model, pool, 0.05)
    torch.testing.assert_close(F.pow(2).sum(1), exact, rtol=0.06, atol=0.0)


def test_volume_never_picks_two_copies_and_leverage_ranks_the_odd_window_first(model):
    base, odd = tiny_tokens(1, 16, seed=2), tiny_tokens(1, 16, seed=3)
    pool = torch.cat([base.repeat(5, 1), odd, base.repeat(2, 1)])  # window 5 differs, the rest are copies
    for seed in range(3):
        chosen = select_windows(model, pool, 2, SelectConfig("volume", seed=seed, features=8))
        assert 5 in chosen.indices.tolist()  # det of two identical feature rows is 0
        assert torch.equal(chosen.weights, torch.ones(2, dtype=torch.float64))
    chosen = select_windows(model, pool, 3, SelectConfig("leverage", features=8))
    assert int(chosen.scores.argmax()) == 5 and len(set(chosen.indices.tolist())) == 3
    copies = chosen.scores[[0, 1, 2, 3, 4, 6, 7]]
    assert torch.equal(copies, copies[:1].expand(7))  # identical windows, identical scores


@pytest.mark.parametrize("how", ["leverage", "sensitivity", "volume"])
def test_selection_is_seeded_and_returns_distinct_sorted_windows(model, how):
    pool = tiny_tokens(10, 16, seed=4)
    a = select_windows(model, pool, 3, SelectConfig(how, seed=7, features=4), batch_size=3)
    b = select_windows(model, pool, 3, SelectConfig(how, seed=7, features=4), batch_size=4)
    assert torch.equal(a.indices, b.indices) and torch.allclose(a.weights, b.weights)
    assert a.indices.tolist() == sorted(set(a.indices.tolist())) and int(a.indices.min()) >= 0
    assert int(a.indices.max()) < 10 and a.how == how and a.pool == 10
    first = select_windows(model, pool, 3, SelectConfig("first"))
    assert first.indices.tolist() == [0, 1, 2] and first.scores is None


def test_bad_selection_input_is_refused(model):
    pool = tiny_tokens(4, 16)
    with pytest.raises(ValueError, match=r"calib_samples=5 exceeds the pool of 4 windows"):
        select_windows(model, pool, 5, SelectConfig("leverage"))
    with pytest.raises(ValueError, match=r"calib_select must be one of first, leverage, sensitivity, volume"):
        SelectConfig("random")
    with pytest.raises(ValueError, match=r"p must be a finite number >= 1"):
        SelectConfig("sensitivity", p=0.5)
    with pytest.raises(ValueError, match=r"calib_pool must be an integer >= calib_samples=4"):
        rankwise.compress(tiny_model("llama"), tokenizer=tiny_tokenizer(), calib_samples=4, calib_pool=2,
                          calib_select="volume", cache=False, progress=False)

    with pytest.raises(ValueError, match=r"calib_pool \(--calib-pool\) needs calib_select"):
        rankwise.compress(tiny_model("llama"), tokenizer=tiny_tokenizer(), calib_samples=4, calib_pool=8,
                          cache=False, progress=False)


def test_the_pool_leaves_room_for_evaluation():
    """A pool is cut from the start of the text and must leave the evaluation windows at its end untouched."""
    assert check_pool(8, None, "first") == 8 and check_pool(8, None, "volume") == 32
    check_room(256 * (32 + EVAL_ROOM), 256, 32, "volume")
    check_room(256 * 33, 256, 32, "first")  # the first windows: as before, no pool
    with pytest.raises(ValueError, match=r"the text has 47 windows of 256 tokens: a calibration pool of 32 leaves"):
        check_room(256 * (32 + EVAL_ROOM - 1), 256, 32, "leverage")
    result = CliRunner().invoke(app, ["compress", "--calib-pool", "64", "--out", "x"])
    assert result.exit_code == 2 and "needs calib_select" in result.output


def test_api_selection_changes_the_cache_key_and_is_reused(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    cache = tmp_path / "cache"
    small = {"seq_len": 16, "calib_samples": 2, "text": text, "cache": cache, "progress": False,
             "tokenizer": tiny_tokenizer()}
    first = rankwise.compress(tiny_model("llama"), "svd_llm", 0.3, calib_select="first", **small)
    assert not any("calibration windows" in n for n in first.report.notes)
    small["calib_pool"] = 8
    vol = rankwise.compress(tiny_model("llama"), "svd_llm", 0.3, calib_select="volume", **small)
    assert any(n.startswith("calibration windows: volume, 2 of a pool of 8") for n in vol.report.notes)
    entries = {p.name for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert len(entries) == 2  # other windows, other statistics: another key
    again = rankwise.compress(tiny_model("llama"), "svd_llm", 0.3, calib_select="volume", **small)
    assert any("read from the cache" in n for n in again.report.notes)  # same seed, same windows, same key


def test_streamed_job_and_cli_choose_from_the_pool(tmp_path):
    path = tmp_path / "llama"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    compress_model(str(path), SVDLLMConfig(ratio=0.3), tmp_path / "job", text=str(text), seq_len=16,
                   calib_samples=2, calib_select="leverage", calib_pool=6, progress=False)
    record = json.loads((tmp_path / "job" / "rankwise.json").read_text())
    assert "calibration windows: leverage, 2 of a pool of 6" in json.dumps(record)
    cli = CliRunner().invoke(app, ["compress", str(path), "--ratio", "0.3", "--text", str(text), "--seq-len", "16",
                                   "--calib-samples", "2", "--calib-select", "leverage", "--calib-pool", "6",
                                   "--no-cache", "--out", str(tmp_path / "cli")])
    assert cli.exit_code == 0, cli.output
    a, b = load_file(tmp_path / "job" / "model.safetensors"), load_file(tmp_path / "cli" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same windows chosen, same factors
    bad = CliRunner().invoke(app, ["compress", str(path), "--calib-select", "best", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "first" in bad.output and "volume" in bad.output
