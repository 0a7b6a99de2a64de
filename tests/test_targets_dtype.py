"""``--targets`` names groups or layers, the same in compress, compare and adapt; ``--dtype auto`` computes
half-precision weights in float32 on a CPU and keeps the stored dtype in what is written."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import rankwise
from rankwise.cli import app
from rankwise.stream.source import fast_bf16
from rankwise.targets import check_targets, find_targets, selects, unmatched_targets
from tests.tiny_models import tiny_model, tiny_tokenizer

SMALL = ["--seq-len", "16", "--calib-samples", "4"]
TEXT = " ".join(f"word{i % 37} and {i % 11}" for i in range(3000))


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKWISE_CALIBRATION_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def bf16_dir(tmp_path):
    path = tmp_path / "bf16"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_groups_and_layer_names_select_layers():
    model = tiny_model("llama")
    everything = find_targets(model)
    assert find_targets(model, ("attn", "mlp")) == everything
    q_and_down = find_targets(model, ("q_proj", "down_proj"))
    assert q_and_down and all(n.endswith((".q_proj", ".down_proj")) for n in q_and_down)
    assert set(find_targets(model, ("attn",))) == {n for n in everything if "self_attn" in n}
    assert set(find_targets(model, ("attn", "down_proj"))) == {
        n for n in everything if "self_attn" in n or n.endswith("down_proj")}
    assert selects("model.layers.0.mlp.up_proj", ("mlp",)) and not selects("model.layers.0.mlp.up_proj", ("attn",))
    assert unmatched_targets(model, ("q_proj", "qproj")) == ["qproj"]
    for bad in ([], ["a.b"], ["q_proj*"], [""]):
        with pytest.raises(ValueError, match="targets must be groups"):
            check_targets(bad)


def test_compress_only_the_named_layers(tiny_dir, tmp_path, text):
    result = CliRunner().invoke(app, ["compress", str(tiny_dir), "--targets", "q_proj,down_proj", "--text",
                                      str(text), *SMALL, "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    layers = json.loads((tmp_path / "o" / "rankwise.json").read_text())["report"]["layers"]
    assert len(layers) == 4 and {layer["name"].rsplit(".", 1)[-1] for layer in layers} == {"q_proj", "down_proj"}


def test_a_misspelt_layer_name_lists_the_allowed_ones(tiny_dir, tmp_path, text):
    result = CliRunner().invoke(app, ["compress", str(tiny_dir), "--targets", "attn,qproj", "--text", str(text),
                                      *SMALL, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.startswith("error: targets qproj match no linear layer") and "q_proj" in result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "o").exists()


def test_adapt_targets_as_peft_paths():
    from rankwise.adapt.job import _peft_targets

    model = tiny_model("llama")
    assert _peft_targets(model, ["attn", "mlp"]) is None  # every layer: PEFT's own default, as before
    attn = _peft_targets(model, ["attn"])
    assert attn == [n for n in find_targets(model) if "self_attn" in n]
    with pytest.raises(ValueError, match=r"targets nope match no linear layer.*q_proj"):
        _peft_targets(model, ["nope"])


def test_adapt_cli_takes_groups(tiny_dir, tmp_path, text):
    result = CliRunner().invoke(app, ["adapt", str(tiny_dir), "--targets", "mlp", "--text", str(text),
                                      "--seq-len", "16", "--steps", "2", "--eval-samples", "2", "--rank", "2",
                                      "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] and all(".mlp." in n for n in config["target_modules"])


def test_compare_takes_targets(tiny_dir, tmp_path, text):
    result = CliRunner().invoke(app, ["compare", str(tiny_dir), "--methods", "svd", "--ratios", "0.3", "--targets",
                                      "mlp", "--text", str(text), *SMALL, "--eval-samples", "2",
                                      "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "c" / "comparison.json").read_text())["rows"]
    assert rows


def test_auto_computes_in_float32_on_cpu_and_stores_bf16(bf16_dir, tmp_path, text):
    from rankwise.cli.common import prepare

    work = prepare(str(bf16_dir), str(text), None, 16, 0, 2, "cpu", None)
    assert {p.dtype for p in work.model.parameters()} == {torch.float32}  # the CLI's default, auto
    kept = prepare(str(bf16_dir), str(text), None, 16, 0, 2, "cpu", None, dtype=None)
    assert {p.dtype for p in kept.model.parameters()} == {torch.bfloat16}
    asked = prepare(str(bf16_dir), str(text), None, 16, 0, 2, "cpu", None, dtype="bf16")
    assert {p.dtype for p in asked.model.parameters()} == {torch.bfloat16}
    result = CliRunner().invoke(app, ["compress", str(bf16_dir), "--text", str(text), *SMALL,
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "rankwise.json").read_text())["dtype"] == "bfloat16"
    assert {p.dtype for p in rankwise.load(tmp_path / "o").model.parameters()} == {torch.bfloat16}


def test_auto_in_python_returns_the_dtype_that_came_in(bf16_dir, text):
    model = rankwise.load_model(bf16_dir).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    result = rankwise.compress(model, tokenizer=tiny_tokenizer(), text=text, seq_len=16, calib_samples=4,
                               progress=False)
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}


def test_training_dtype_reaches_the_trainer(tiny_dir, tmp_path, text, monkeypatch):
    import rankwise.adapt.job as job

    seen = []
    real = job.adapt_model

    def spy(*args, **kwargs):
        seen.append(kwargs["config"].bf16)
        return real(*args, **kwargs)

    monkeypatch.setattr("rankwise.adapt.job.adapt_model", spy)
    common = ["adapt", str(tiny_dir), "--text", str(text), "--seq-len", "16", "--steps", "1", "--eval-samples", "2",
              "--rank", "2"]
    for dtype, out in (("auto", "a"), ("bf16", "b")):
        result = CliRunner().invoke(app, [*common, "--dtype", dtype, "--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
    assert seen == [fast_bf16("cpu"), True]  # auto: bfloat16 autocast where this CPU has bfloat16 instructions
    result = CliRunner().invoke(app, [*common, "--dtype", "fp16", "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "float16 is not supported for training" in result.output
