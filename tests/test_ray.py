"""compare on Ray: the same rows as in one process; one-line errors without ray or without a cluster.

The error tests come first: they need a process not yet connected to Ray (a connected process keeps its connection).
"""

from __future__ import annotations

import sys
import time

import pytest
import torch
from typer.testing import CliRunner

ray = pytest.importorskip("ray")

from rankwise import distributed as ray_compare  # noqa: E402
from rankwise.cli import app  # noqa: E402
from rankwise.eval.compare import compare  # noqa: E402
from rankwise.methods import config_class  # noqa: E402
from tests.tiny_models import tiny_model, tiny_tokenizer, tiny_tokens  # noqa: E402

UNREACHABLE = "127.0.0.1:1"  # loopback, nothing listens on port 1


@pytest.fixture(scope="module")
def data():
    return tiny_model("llama"), tiny_tokens(8, 32, seed=1), tiny_tokens(8, 32, seed=2)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # "local": never join a `ray start` cluster
    yield
    ray.shutdown()

# Ray tasks run torch on one thread; so does the reference (conftest's one_thread), since thread counts change the
# summation order.


def configs():
    return [config_class("svd")(ratio=0.3), config_class("svd_llm")(ratio=0.3),
            config_class("svd_llm")(ratio=0.3, allocation="loss")]


def test_without_ray_the_error_says_how_to_install(monkeypatch, data, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ValueError, match=r"^--ray needs the 'ray' package: pip install 'rankwise\[ray\]'$"):
        compare(*data, configs(), progress=False, ray_address="local")
    result = CliRunner().invoke(app, ["compare", "unused", "--out", str(tmp_path / "o"), "--ray", "local"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: --ray needs the 'ray' package: pip install 'rankwise[ray]'"


def test_unreachable_address_is_a_one_line_error_within_30_s(data, tmp_path):
    assert not ray.is_initialized(), "run before any test that connects to Ray"
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"'{UNREACHABLE}'") as info:
        compare(*data, configs(), progress=False, ray_address=UNREACHABLE)
    assert time.perf_counter() - start < 30
    assert "\n" not in str(info.value)
    result = CliRunner().invoke(app, ["compare", "unused", "--out", str(tmp_path / "o"), "--ray", UNREACHABLE])
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith(f"error: cannot reach the Ray cluster at '{UNREACHABLE}'")
    assert not ray.is_initialized()


def test_session_shuts_down_only_what_it_started(monkeypatch):
    calls = []
    running = False
    monkeypatch.setattr(ray, "is_initialized", lambda: running)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(("init", kwargs["address"])))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append(("shutdown",)))
    with ray_compare.ray_session("local"):
        assert calls == [("init", "local")]
    assert calls == [("init", "local"), ("shutdown",)]
    running = True
    with ray_compare.ray_session("local"):
        assert calls == [("init", "local"), ("shutdown",)]  # already connected: no second init
    assert calls == [("init", "local"), ("shutdown",)]


def test_rows_on_ray_equal_the_single_process_rows(local_ray, one_thread, data):
    alone = compare(*data, configs(), eora_rank=4, batch_size=4, progress=False)
    on_ray = compare(*data, configs(), eora_rank=4, batch_size=4, progress=False, ray_address="local")
    assert len(on_ray.rows) == 6 and [r.method for r in on_ray.rows] == [r.method for r in alone.rows]
    for a, b in zip([alone.dense, *alone.rows], [on_ray.dense, *on_ray.rows], strict=True):
        assert (a.method, a.ratio, a.params_targeted_kept, a.params_targeted_removed, a.params_total) == (
            b.method, b.ratio, b.params_targeted_kept, b.params_targeted_removed, b.params_total)
        assert a.perplexity == b.perplexity, a.method  # same code, same thread count: bit for bit
        assert a.kept == b.kept
    assert on_ray.to_markdown().count("\n") == alone.to_markdown().count("\n")
    assert ray.is_initialized()  # compare did not start this instance, so it left it running


def test_results_in_order_and_task_errors_come_back_unwrapped(local_ray):
    assert ray_compare.map_on_ray(int, ["a", "10", "ff"], {"base": 16}, progress=False) == [10, 16, 255]
    with pytest.raises(ValueError, match=r"^invalid literal for int\(\) with base 10: 'x'$"):
        ray_compare.map_on_ray(int, ["1", "x"], {}, progress=False)


def test_cli_compare_on_ray(local_ray, tmp_path):
    model = tmp_path / "llama"
    tiny_model("llama").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", str(model), "--methods", "svd,svd_llm", "--ratios", "0.3",
                                      "--out", str(out), "--seq-len", "16", "--calib-samples", "4",
                                      "--eval-samples", "4", "--ray", "local"])
    assert result.exit_code == 0, result.output
    table = (out / "comparison.md").read_text()
    assert table.count("| svd |") == 1 and table.count("| svd_llm |") == 1 and "| dense |" in table


@pytest.mark.parametrize("name,options", [("svd_llm", {}), ("fwsvd", {}), ("svd_llm", {"sequential": True,
                                                                                      "update_u": True})])
def test_block_factorisations_on_ray_equal_the_serial_ones(local_ray, one_thread, name, options):
    from rankwise.compression import compress_

    calib, x = tiny_tokens(8, 32, seed=1), tiny_tokens(2, 16, seed=3)
    serial, fanned = tiny_model("llama"), tiny_model("llama")
    config = config_class(name)(ratio=0.3, **options)
    a = compress_(serial, config, calib, progress=False)
    b = compress_(fanned, config, calib, progress=False, ray="local")
    assert [(r.name, r.rank, r.params_after) for r in a.layers] == [(r.name, r.rank, r.params_after) for r in b.layers]
    with torch.no_grad():
        assert torch.equal(serial(x).logits, fanned(x).logits)  # same code, same thread count: bit for bit


def test_cli_compress_checkpoint_on_ray(local_ray, tmp_path):
    model = tmp_path / "llama"
    tiny_model("llama").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    result = CliRunner().invoke(app, ["compress", str(model), "--method", "svd_llm", "--out", str(tmp_path / "c"),
                                      "--seq-len", "16", "--calib-samples", "4", "--ray", "local"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c" / "rankwise.json").exists()
