"""Save / load round trips, dense export, atomic writes, model and text loading errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import rankwise
from rankwise.calibrate import load_text, split_windows
from rankwise.compression import compress_
from rankwise.io import load, save
from rankwise.io.atomic import atomic_dir
from rankwise.io.models import load_model
from rankwise.methods.svd_llm import SVDLLMConfig
from rankwise.nn import LowRankLinear
from tests.tiny_models import tiny_model, tiny_tokenizer, tiny_tokens


def _compressed(arch: str):
    model = tiny_model(arch)
    report = compress_(model, SVDLLMConfig(ratio=0.3), tiny_tokens(), progress=False)
    return model, report


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_save_load_identical_logits(tmp_path, arch):
    model, report = _compressed(arch)
    out = save(model, tmp_path / "m", tokenizer=tiny_tokenizer(), report=report)
    loaded = rankwise.load(out).model
    assert type(loaded) is type(model)
    x = tiny_tokens(3, 20, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert len(modules) == len(report.layers)
    assert {layer.name: layer.rank for layer in report.layers} == {n: s["rank"] for n, s in modules.items()}
    assert {s["kind"] for s in modules.values()} == {"lowrank"}
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pkl"))  # nothing pickled
    assert sum(isinstance(m, LowRankLinear) for m in loaded.modules()) == len(report.layers)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dense_export_loads_with_plain_transformers(tmp_path, arch):
    model, _ = _compressed(arch)
    save(model, tmp_path / "dense", export="dense")
    assert not (tmp_path / "dense" / "rankwise.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    x = tiny_tokens(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())  # export leaves the model factorised


def test_existing_output_refused_unless_overwrite(tmp_path):
    model, _ = _compressed("llama")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        save(model, tmp_path / "m")
    assert (tmp_path / "m" / "keep.txt").exists()
    save(model, tmp_path / "m", overwrite=True)
    assert not (tmp_path / "m" / "keep.txt").exists() and (tmp_path / "m" / "rankwise.json").exists()


def test_interrupted_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "half.safetensors").write_text("partial")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a rankwise directory"):
        load(tmp_path)
    with pytest.raises(ValueError, match=r"model path '\./nope' does not exist"):
        load_model("./nope")
    with pytest.raises(ValueError, match=r"model file .* does not exist"):
        load_model(str(tmp_path / "x.gguf"))


def test_load_model_from_local_hf_directory_and_compressed_dir(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    loaded = load_model(str(tmp_path / "hf"))
    x = tiny_tokens(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x).logits, model(x).logits)
    compress_(model, SVDLLMConfig(ratio=0.5), tiny_tokens(), progress=False)
    save(model, tmp_path / "c", tokenizer=tiny_tokenizer())
    again = load_model(str(tmp_path / "c"))
    assert any(isinstance(m, LowRankLinear) for m in again.model.modules())


def test_text_split_is_disjoint_and_errors():
    ids = torch.arange(1000)
    calib, evaluation = split_windows(ids, 10, 5, 7)
    assert calib.shape == (5, 10) and evaluation.shape == (7, 10)
    assert not set(calib.flatten().tolist()) & set(evaluation.flatten().tolist())
    with pytest.raises(ValueError, match=r"text too short: it has 1000 tokens but 50 calibration .* need 1100"):
        split_windows(ids, 10, 50, 60)
    assert len(load_text()) > 100_000


def test_load_text_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_text(tmp_path / "none.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="the text is empty"):
        load_text(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="either a text file or a dataset"):
        load_text(tmp_path / "empty.txt", dataset="wikitext")


def test_load_with_disk_offload_gives_identical_logits(tmp_path):
    model, _ = _compressed("llama")
    save(model, tmp_path / "m")
    x = tiny_tokens(2, 16, seed=3)
    with torch.no_grad():
        expected = model(x).logits
    # A memory budget below the model's size: the decoder blocks stay on disk (transformers reads them from the
    # safetensors shards as they run) and are streamed.
    big = load(tmp_path / "m", device_map="auto", max_memory={"cpu": 250_000}, offload_dir=tmp_path / "off")
    assert "disk" in big.hf_device_map.values()
    with torch.no_grad():
        assert torch.equal(big(x).logits, expected)
    with pytest.raises(ValueError, match="could not place"):
        load(tmp_path / "m", device_map={"": "nonsense"})
