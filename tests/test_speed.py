"""Speed measurement and the layers kept fast: fused input groups, compiled decoding."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from rankwise.compression import compress_
from rankwise.eval.measure import count_params
from rankwise.eval.speed import COMPILE_MODES, check_compile, decode_tokens_per_s, measure_speed
from rankwise.methods.svd_llm import SVDLLMConfig
from rankwise.nn import LowRankLinear, compressed_modules
from rankwise.nn.fused import fuse_inputs_, unfuse_
from tests.tiny_models import tiny_model, tiny_tokens


def _compressed(arch: str = "llama", ratio: float = 0.4, allocation: str = "uniform"):
    model = tiny_model(arch)
    compress_(model, SVDLLMConfig(ratio=ratio, allocation=allocation), tiny_tokens(), progress=False)
    return model


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_fused_groups_give_the_same_logits(arch):
    model = _compressed(arch)
    ids = tiny_tokens(2, 16, seed=3)
    with torch.no_grad():
        before = model(ids).logits
        groups = fuse_inputs_(model)
        after = model(ids).logits
    names = {n for g in groups for n in g}
    # q/k/v read one input in both, gate/up too in llama; k/v are narrower than q (grouped KV heads in llama)
    assert all(len(g) == 3 for g in groups[::2 if arch == "llama" else 1])
    assert len(groups) == len(model.model.layers if arch == "llama" else model.model.decoder.layers) * (
        2 if arch == "llama" else 1)
    if arch == "llama":
        assert len({compressed_modules(model)[n].rank for n in names}) > 1
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert unfuse_(model) == len(names)
    assert all(m.input_group is None for m in compressed_modules(model).values())


def test_fused_groups_leave_dense_members_alone():
    model = _compressed(allocation="loss")  # loss allocation keeps some layers dense
    ids = tiny_tokens(2, 16, seed=3)
    with torch.no_grad():
        before = model(ids).logits
        groups = fuse_inputs_(model)
        after = model(ids).logits
    layers = compressed_modules(model)
    assert groups and all(n in layers for g in groups for n in g)
    assert len(layers) < 14  # some layer of the two blocks stayed dense
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_fused_group_recomputes_for_another_input_and_after_weights_change():
    model = _compressed()
    fuse_inputs_(model)
    attn = model.model.layers[0].self_attn
    x, y = torch.randn(1, 3, attn.q_proj.in_features), torch.randn(1, 3, attn.q_proj.in_features)
    with torch.no_grad():
        assert isinstance(attn.q_proj, LowRankLinear) and attn.q_proj.input_group is not None
        attn.q_proj(x)
        # k with another tensor: its own product, not q's cached slice
        torch.testing.assert_close(attn.k_proj(y), torch.nn.functional.linear(
            y @ attn.k_proj.down.T, attn.k_proj.up, attn.k_proj.bias))
        x.mul_(2)  # in place: the cached product is stale
        torch.testing.assert_close(attn.v_proj(x), torch.nn.functional.linear(
            x @ attn.v_proj.down.T, attn.v_proj.up, attn.v_proj.bias))
        attn.k_proj.down.mul_(3)  # new weights: the concatenation is rebuilt
        torch.testing.assert_close(attn.k_proj(x), torch.nn.functional.linear(
            x @ attn.k_proj.down.T, attn.k_proj.up, attn.k_proj.bias))


def _linear_calls(model, ids) -> int:
    calls = []
    real = torch.nn.functional.linear

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    torch.nn.functional.linear = counting
    try:
        with torch.no_grad():
            model(ids)
    finally:
        torch.nn.functional.linear = real
    return len(calls)


def test_a_fused_group_projects_down_in_one_matmul():
    model = _compressed()
    ids = tiny_tokens(1, 8, seed=5)
    unfused = _linear_calls(model, ids)
    groups = fuse_inputs_(model)
    saved = sum(len(g) - 1 for g in groups)  # one matmul per group instead of one per member
    assert saved == 2 * (2 + 1) and _linear_calls(model, ids) == unfused - saved
    with torch.inference_mode():  # inference tensors have no version counter: recognised by identity
        torch.testing.assert_close(model(ids).logits, copy.deepcopy(model)(ids).logits)


def test_fused_model_trains_exactly_copies_and_pickles(tmp_path):
    model = _compressed()
    reference = copy.deepcopy(model)
    fuse_inputs_(model)
    copied = copy.deepcopy(model)
    attn = copied.model.layers[0].self_attn
    assert attn.q_proj.input_group.members[0] is attn.q_proj  # the copy's group holds the copy's layers
    assert attn.q_proj.input_group is attn.k_proj.input_group is attn.v_proj.input_group
    ids = tiny_tokens(2, 16, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(copied(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
        model(ids)  # caches filled (a weak reference among them): pickling drops them
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    for m in (model, reference):
        m(ids, labels=ids).loss.backward()
    for (name, p), (_, r) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        if r.grad is not None:
            torch.testing.assert_close(p.grad, r.grad, msg=name)


def test_speed_reports_every_batch_and_length():
    model = _compressed()
    result = measure_speed(model, decode_batches=(1, 2), prefill_shapes=((1, 16), (2, 8), (1, 4096)), new_tokens=12,
                           repeats=1)
    assert set(result.decode_tokens_per_s) == {1, 2} and set(result.prefill_tokens_per_s) == {"1x16", "2x8"}
    assert all(v > 0 for v in [*result.decode_tokens_per_s.values(), *result.prefill_tokens_per_s.values()])
    assert "skipped" in result.notes[0]  # the tiny model has 64 positions
    assert "decode tokens/s" in result.describe()


def test_decode_generates_exactly_the_tokens_timed(monkeypatch):
    model = tiny_model()
    lengths = []
    generate = model.generate

    def spy(*args, **kwargs):
        out = generate(*args, **kwargs)
        lengths.append(out.shape[1] - args[0].shape[1])
        return out

    monkeypatch.setattr(model, "generate", spy)
    decode_tokens_per_s(model, 2, new_tokens=5, prompt_tokens=3, repeats=2)
    assert lengths == [6, 6, 6, 1, 1]  # warm-up, 2 x (new + 1), 2 x 1


def test_compiled_decode_is_timed_and_the_model_restored():
    model = _compressed()
    result = measure_speed(model, decode_batches=(1,), prefill_shapes=(), new_tokens=12, repeats=2,
                           compile="default")
    assert result.compile == "default" and result.decode_tokens_per_s[1] > 0
    assert "forward" not in model.__dict__  # the compiled forward is gone again


def test_bad_speed_settings_are_refused():
    with pytest.raises(ValueError, match="compile mode must be one of"):
        check_compile("fastest", torch.device("cpu"))
    with pytest.raises(ValueError, match="decode batch sizes"):
        measure_speed(tiny_model(), decode_batches=())
    assert "reduce-overhead" in COMPILE_MODES


def test_compile_needs_a_compiler(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        check_compile("default", torch.device("cpu"))


def test_crossing_interpolates_where_the_pair_stops_being_faster():
    from rankwise.allocate.latency import crossing

    assert crossing([10, 20, 30], [5.0, 6.0, 7.0], 10.0, 40) == 40  # always faster: up to the break-even rank
    assert crossing([10, 20, 30], [11.0, 12.0, 13.0], 10.0, 40) == 0  # never faster
    assert crossing([10, 20, 30], [8.0, 12.0, 14.0], 10.0, 40) == 15  # 8 -> 12 reaches 10 halfway, at rank 15
    assert crossing([10, 20, 30], [8.0, 9.0, 14.0], 10.0, 40) == 22  # 9 -> 14 reaches 10 a fifth of the way


def test_rank_limits_are_measured_once_and_cached(tmp_path, monkeypatch):
    from rankwise.allocate import latency

    monkeypatch.setenv("RANKWISE_LATENCY_CACHE", str(tmp_path))
    timed = []
    real = latency.time_shape

    def spy(m, n, **kw):
        timed.append((m, n))
        return real(m, n, **kw)

    monkeypatch.setattr(latency, "COLD_BYTES", 2**16)  # small, so the test is quick
    monkeypatch.setattr(latency, "time_shape", spy)
    shapes = {"a": (64, 32), "b": (64, 32), "c": (32, 32)}
    first = latency.rank_limits(shapes)
    assert sorted(timed) == [(32, 32), (64, 32)] and first["a"] == first["b"]
    assert all(0 <= v <= 64 * 32 // 96 for v in first.values())
    assert latency.rank_limits(shapes) == first and len(timed) == 2  # read back, nothing timed again
    latency.rank_limits({"d": (16, 32)})
    cached = json.loads(latency.cache_file(torch.device("cpu"), torch.float32, 1).read_text())
    assert len(timed) == 3 and set(cached) == {"64x32", "32x32", "16x32"}


def test_limits_keep_slow_ranks_dense_and_meet_the_budget():
    from rankwise.allocate.budget import layer_params
    from rankwise.methods.base import choose_knobs

    shapes = {"q": (64, 64), "k": (16, 64), "up": (128, 64)}
    config = SVDLLMConfig(ratio=0.3)
    dense = sum(m * n for m, n in shapes.values())
    for limits in ({}, {"k": 0}, {"k": 5, "up": 20}):
        for fractions in (dict.fromkeys(shapes, 0.7), {"q": 0.5, "k": 0.9, "up": 0.7}):
            ranks = choose_knobs(config, shapes, fractions, 4, limits)
            assert all(r < limits.get(k, 10**9) for k, r in ranks.items())
            kept = sum(layer_params(*shapes[k], ranks[k]) if k in ranks else shapes[k][0] * shapes[k][1]
                       for k in shapes)
            assert kept <= 0.7 * dense
    assert "k" not in choose_knobs(config, shapes, dict.fromkeys(shapes, 0.7), 4, {"k": 0})
    with pytest.raises(ValueError, match="with objective 'speed' \\(3 matrices stay dense"):
        choose_knobs(config, shapes, dict.fromkeys(shapes, 0.7), 4, dict.fromkeys(shapes, 0))


def test_speed_objective_in_the_policy_and_the_pipeline(monkeypatch):
    from rankwise.allocate import latency
    from rankwise.allocate.policy import allocation_policy

    scores = {"a": torch.linspace(1, 0.01, 64), "b": torch.linspace(1, 0.5, 16)}
    shapes = {"a": (64, 64), "b": (16, 64)}
    ranks = allocation_policy("welore").ranks(shapes, 0.3, scores, {"b": 3})
    assert "b" not in ranks or ranks["b"] < 3
    # the pipeline asks for limits only with objective="speed", and keeps k/v dense when no rank is faster there
    monkeypatch.setattr(latency, "rank_limits", lambda shapes, **kw: {
        n: 0 if n.endswith(("k_proj", "v_proj")) else 10**6 for n in shapes})
    model = tiny_model()
    _, before = count_params(model)
    report = compress_(model, SVDLLMConfig(ratio=0.3, objective="speed"), tiny_tokens(), progress=False)
    layers = compressed_modules(model)
    assert layers and not any(n.endswith(("k_proj", "v_proj")) for n in layers)
    assert count_params(model)[1] <= 0.7 * before
    assert any(note.startswith("objective speed") for note in report.notes)


def test_bad_objectives_are_refused():
    with pytest.raises(ValueError, match="objective must be one of size, speed"):
        SVDLLMConfig(objective="fast")
    with pytest.raises(ValueError, match="factor_bits"):
        SVDLLMConfig(objective="speed", factor_bits=8)


def _cli(*args):
    from typer.testing import CliRunner

    from rankwise.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


SMALL_SPEED = ["--speed", "--new-tokens", "12", "--decode-batches", "1,2", "--prefill", "1x16,2x8"]


def test_eval_and_compare_time_decode_and_prefill(tiny_dir, tmp_path, monkeypatch):
    from rankwise.allocate import latency

    # the tiny model's matrices are so small that on a loaded machine no factor pair may time faster than dense
    # (then the budget is refused, tested above): fix the limits, so this test checks the commands, not the machine
    monkeypatch.setattr(latency, "rank_limits", lambda shapes, **kw: {n: min(s) for n, s in shapes.items()})
    out = tmp_path / "c"
    result = _cli("compress", tiny_dir, "--method", "svd_llm", "--ratio", "0.3", "--objective", "speed",
                  "--out", out, "--seq-len", "16", "--calib-samples", "4")
    assert result.exit_code == 0, result.output
    assert "objective speed" in result.output
    result = _cli("eval", out, "--json", "--seq-len", "16", "--eval-samples", "2", "--fuse", *SMALL_SPEED)
    assert result.exit_code == 0, result.output
    speed = json.loads(result.output.strip().splitlines()[-1])["speed"]
    assert set(speed["decode_tokens_per_s"]) == {"1", "2"} and set(speed["prefill_tokens_per_s"]) == {"1x16", "2x8"}
    cmp = tmp_path / "cmp"
    result = _cli("compare", tiny_dir, "--recipes", "svd_llm,svd_llm+objective=speed", "--ratios", "0.3", "--out",
                  cmp, "--eval-samples", "2", "--seq-len", "16", "--calib-samples", "4", "--fuse", *SMALL_SPEED)
    assert result.exit_code == 0, result.output
    table = (cmp / "comparison.md").read_text()
    assert "decode b2 vs dense" in table and "input groups fused" in table
    assert table.count("| svd_llm +objective=speed |") == 2  # in the main table and the speed table
    assert (cmp / "comparison_speed.png").stat().st_size > 1000


@pytest.mark.parametrize("args,message", [
    (["eval", "{model}", "--compile", "default"], "--compile applies to the timings: add --speed"),
    (["eval", "{model}", "--speed", "--compile", "fastest"], "compile mode must be one of default"),
    (["eval", "{model}", "--speed", "--prefill", "512"], "--prefill takes BATCHxTOKENS items"),
    (["eval", "{model}", "--speed", "--decode-batches", "1,x"], "--decode-batches must be a comma-separated list"),
    (["eval", "{model}", "--speed", "--stream"], "--speed times the whole model in memory"),
    (["eval", "{model}", "--fuse", "--stream"], "--fuse runs the whole model in memory"),
    (["eval", "{model}", "--speed", "--fuse", "--compile", "default"], "--fuse and --compile do not combine"),
    (["compare", "{model}", "--speed", "--ray", "local", "--out", "{tmp}/o"], "--speed and --ray do not combine"),
    (["compress", "{model}", "--method", "monarch", "--objective", "speed", "--out", "{tmp}/o"],
     "--objective applies to the low-rank methods"),
    (["compress", "{model}", "--objective", "fast", "--out", "{tmp}/o"], "'fast' is not one of 'size', 'speed'"),
])
def test_bad_speed_input_is_one_line(tiny_dir, tmp_path, args, message):
    result = _cli(*[a.format(model=tiny_dir, tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()
