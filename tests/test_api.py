"""The one-call Python API, ``rankwise.compress``: the CLI's job with the CLI's option names and defaults, the same
bytes out, the same cache, dtypes kept, and one-line errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import rankwise
from rankwise.cli import app
from tests.tiny_models import tiny_model, tiny_tokenizer, tiny_tokens

SMALL = {"seq_len": 16, "calib_samples": 4}
TEXT = " ".join(f"word{i % 37} and {i % 11}" for i in range(3000))


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """The default calibration cache, as the CLI's, under this test's directory."""
    monkeypatch.setenv("RANKWISE_CALIBRATION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_same_bytes_as_the_cli_and_the_saved_model_is_returned(tiny_dir, tmp_path, text):
    result = rankwise.compress(str(tiny_dir), "svd_llm", 0.3, allocation="loss", text=text, out=tmp_path / "py",
                               progress=False, **SMALL)
    cli = CliRunner().invoke(app, ["compress", str(tiny_dir), "--method", "svd_llm", "--ratio", "0.3",
                                   "--allocation", "loss", "--text", str(text), "--seq-len", "16",
                                   "--calib-samples", "4", "--out", str(tmp_path / "cli")])
    assert cli.exit_code == 0, cli.output
    a, b = load_file(tmp_path / "py" / "model.safetensors"), load_file(tmp_path / "cli" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert result.out == tmp_path / "py" and result.report.ratio == 0.3
    ids = tiny_tokens(2, 16)
    with torch.no_grad():
        assert torch.equal(result.model(ids).logits, rankwise.load(tmp_path / "py").model(ids).logits)
    assert result.tokenizer("abc").input_ids  # the tokenizer came with the model


def test_in_memory_equals_saved_and_uses_the_default_cache(tiny_dir, tmp_path, text, own_cache):
    saved = rankwise.compress(str(tiny_dir), recipe="svd_llm+loss", ratio=0.3, text=text, out=tmp_path / "o",
                              progress=False, **SMALL)
    assert any(p.is_dir() for p in own_cache.iterdir())  # the CLI's default cache, on by default
    first = rankwise.compress(str(tiny_dir), recipe="svd_llm+loss", ratio=0.3, text=text, progress=False, **SMALL)
    in_memory = rankwise.compress(str(tiny_dir), recipe="svd_llm+loss", ratio=0.3, text=text, progress=False,
                                  **SMALL)
    assert in_memory.out is None and not any("read from the cache" in note for note in first.report.notes)
    assert any("read from the cache" in note for note in in_memory.report.notes)
    ids = tiny_tokens(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(in_memory.model(ids).logits, saved.model(ids).logits, rtol=1e-5, atol=1e-5)
    off = rankwise.compress(str(tiny_dir), recipe="svd_llm+loss", ratio=0.3, text=text, progress=False, cache=False,
                            **SMALL)
    assert not any("cache" in note for note in off.report.notes)


def test_model_object_is_compressed_in_place_with_its_method_settings(tmp_path, text):
    model = tiny_model("llama")
    result = rankwise.compress(model, "svd_llm", 0.4, tokenizer=tiny_tokenizer(), text=text, progress=False,
                               cache=False, sequential=True, anchored=True, anchor=0.3, **SMALL)
    assert result.model is model and any("anchored to the original outputs" in n for n in result.report.notes)
    from rankwise.api import build_config

    config = build_config("svd_llm", 0.4, sequential=True, anchored=True, settings={"anchor": 0.3})
    assert (config.anchor, config.anchored, config.sequential) == (0.3, True, True)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in tiny_model("llama").parameters())


def test_dtype_is_kept_unless_asked(tmp_path, text):
    path = tmp_path / "bf16"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    kept = rankwise.compress(str(path), ratio=0.3, text=text, progress=False, cache=False, **SMALL)
    assert next(kept.model.parameters()).dtype == torch.bfloat16
    assert rankwise.load_model(str(path)).model.dtype == torch.bfloat16  # load_model keeps it too
    asked = rankwise.compress(str(path), ratio=0.3, text=text, progress=False, cache=False, dtype="float32", **SMALL)
    assert next(asked.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "nope"}, "unknown method 'nope'"),
    ({"recipe": "best", "sequential": True}, "--recipe replaces --sequential"),
    ({"nblocks": 4}, "--set 'nblocks=4': expected NAME=VALUE with NAME one of svd_llm's fields"),
    ({"text": "/no/such/file.txt"}, "does not exist"),
])
def test_bad_options_are_one_line_errors(tiny_dir, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        rankwise.compress(str(tiny_dir), progress=False, **{**SMALL, **kwargs})
    assert "\n" not in str(info.value)


def test_a_model_object_needs_its_tokenizer():
    with pytest.raises(ValueError, match="needs its tokenizer="):
        rankwise.compress(tiny_model("llama"), progress=False)


def test_a_model_object_is_saved_or_refused_before_it_is_changed(tmp_path, text):
    model, before = tiny_model("llama"), tiny_model("llama")
    result = rankwise.compress(model, ratio=0.3, tokenizer=tiny_tokenizer(), text=text, out=tmp_path / "o",
                               progress=False, cache=False, **SMALL)
    ids = tiny_tokens(2, 16)
    with torch.no_grad():
        assert torch.equal(rankwise.load(tmp_path / "o").model(ids).logits, result.model(ids).logits)
    untouched = tiny_model("llama")
    with pytest.raises(ValueError, match="exists"):
        rankwise.compress(untouched, ratio=0.3, tokenizer=tiny_tokenizer(), text=text, out=tmp_path / "o",
                          progress=False, cache=False, **SMALL)
    assert all(torch.equal(a, b) for a, b in zip(untouched.state_dict().values(), before.state_dict().values(),
                                                 strict=True))


def test_load_and_load_model_are_one_loader(tiny_dir, tmp_path, text):
    rankwise.compress(str(tiny_dir), out=tmp_path / "c", text=text, progress=False, **SMALL)
    for spec in (tiny_dir, tmp_path / "c"):
        loaded = rankwise.load(spec)
        assert type(loaded) is type(rankwise.load_model(spec))
        model, tokenizer = loaded  # unpacks like transformers' pair
        assert model is loaded.model and tokenizer is loaded.tokenizer and loaded.source
    ids = tiny_tokenizer()("word1 and 2", return_tensors="pt").input_ids
    low_level = rankwise.io.load(tmp_path / "c")  # the compressed-directory reader alone: just the module
    assert torch.equal(low_level(ids).logits, rankwise.load(tmp_path / "c").model(ids).logits)
    with pytest.raises(ValueError, match="device_map, max_memory and offload_dir are for compressed directories"):
        rankwise.load(tiny_dir, device_map="auto")
