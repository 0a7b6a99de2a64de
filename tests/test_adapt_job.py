"""``heal_model`` and ``adapt_model``, the library calls behind ``rankwise heal`` and ``rankwise adapt``, on a tiny
Llama saved to disk: what they save reloads and reproduces what they report."""

from __future__ import annotations

import json
import math

import pytest
import torch

import rankwise
from rankwise.adapt.heal import HealConfig, heal_model
from rankwise.adapt.job import adapt_model
from rankwise.adapt.train import TrainConfig, evaluate_loss, training_windows
from rankwise.compression.job import compress_model
from rankwise.eval.measure import count_params, perplexity
from rankwise.io.integrity import verify_dir
from rankwise.io.manifest import read_manifest
from rankwise.io.models import load_tokenizer
from rankwise.methods.svd_llm import SVDLLMConfig

SEQ, HELD, BATCH = 16, 4, 2


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(f"word{i % 37} and {i % 11}" for i in range(3000)))
    return path


@pytest.fixture(scope="module")
def compressed(tiny_dir, text, tmp_path_factory):
    out = tmp_path_factory.mktemp("compressed") / "c"
    compress_model(str(tiny_dir), SVDLLMConfig(ratio=0.4), out, text=str(text), seq_len=SEQ, calib_samples=4,
                   progress=False)
    return out


def _held_out(model_dir, text):
    return training_windows(load_tokenizer(model_dir), text.read_text(), SEQ, HELD, BATCH, "the text")[1]


def test_heal_model_saves_what_it_reports(tiny_dir, text, compressed, tmp_path):
    out, report, lines = tmp_path / "h", tmp_path / "heal.json", []
    config = TrainConfig(steps=4, lr=1e-3, batch_size=BATCH, save_every=2)
    result = heal_model(compressed, out, config=config, options=HealConfig(distill=0.5), base=str(tiny_dir),
                        text=str(text), seq_len=SEQ, eval_samples=HELD, json_report=report, progress=False,
                        say=lines.append)
    healed, before = rankwise.load(out).model, rankwise.load(compressed).model
    assert count_params(healed) == count_params(before)  # same ranks, same size
    assert read_manifest(out).modules == read_manifest(compressed).modules
    assert any(not torch.equal(a, b) for a, b in zip(healed.state_dict().values(), before.state_dict().values(),
                                                     strict=True))  # the factors trained
    held = _held_out(compressed, text)
    assert math.isclose(perplexity(healed, held), result.perplexity_after, rel_tol=1e-4)  # the saved model's
    assert math.isclose(perplexity(before, held), result.perplexity_before, rel_tol=1e-4)
    assert result.perplexity_after == pytest.approx(math.exp(result.training.evals[-1][1]))
    provenance = read_manifest(out).provenance
    assert provenance == json.loads(json.dumps(result.provenance))
    assert {k: v for k, v in provenance.items() if k != "heal"} == read_manifest(compressed).provenance
    heal = provenance["heal"]
    assert (heal["steps"], heal["distill"], heal["base"], heal["eval_windows"]) == (4, 0.5, str(tiny_dir),
                                                                                    [HELD, SEQ])
    assert heal["training_windows"][1] == SEQ and heal["perplexity_dense"] > 1
    assert json.loads(report.read_text()) == json.loads(json.dumps(result.to_dict()))
    assert len(result.training.losses) == 4
    assert not (tmp_path / "h.checkpoint").exists()
    assert (verify_dir(out).against, verify_dir(out).unlisted) == ("SHA256SUMS", [])  # every file checksummed
    assert lines[0].startswith("held-out perplexity") and lines[1].startswith("healed 4 steps")
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        heal_model(compressed, out, config=config, base=str(tiny_dir), text=str(text), seq_len=SEQ,
                   eval_samples=HELD, progress=False)
    with pytest.raises(ValueError, match="not a compressed rankwise directory"):
        heal_model(tiny_dir, tmp_path / "x", config=config, text=str(text), progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.checkpoint").exists()


def test_adapt_model_saves_the_adapter_it_evaluated(tiny_dir, text, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = TrainConfig(steps=3, lr=1e-2, batch_size=BATCH, save_every=1)
    lines = []
    result = adapt_model(str(tiny_dir), "lora", tmp_path / "a", config=config, rank=4, text=str(text), seq_len=SEQ,
                         eval_samples=HELD, progress=False, say=lines.append)
    assert not result.merged and result.out == tmp_path / "a"
    assert json.loads((tmp_path / "a" / "rankwise_adapt.json").read_text()) == json.loads(json.dumps(result.summary))
    assert (result.summary["steps"], result.summary["rank"], result.summary["load_with"]) == (3, 4, None)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "a")
    held = _held_out(tiny_dir, text)
    assert evaluate_loss(adapted, held) == pytest.approx(result.training.evals[-1][1], rel=1e-4)
    assert result.training.evals[-1][1] != result.training.evals[0][1]  # it trained
    assert lines[0].startswith("lora rank 4:") and "held-out loss" in lines[0]
    assert not (tmp_path / "a.checkpoint").exists()
    assert (verify_dir(tmp_path / "a").against, verify_dir(tmp_path / "a").unlisted) == ("SHA256SUMS", [])
    with pytest.raises(ValueError, match="unknown adapter method 'nope'"):
        adapt_model(str(tiny_dir), "nope", tmp_path / "n", config=config, text=str(text), progress=False)
    assert not (tmp_path / "n").exists() and not (tmp_path / "n.checkpoint").exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"out": ""}, "out is required"),
    ({"seq_len": 0}, r"seq_len must be an integer >= 2 \(tokens per window\), got 0"),
    ({"eval_samples": 0}, r"eval_samples must be an integer >= 1 \(held-out windows\), got 0"),
])
def test_jobs_refuse_bad_settings_before_touching_anything(tmp_path, kwargs, message):
    """One-line errors before any file is written or model read (the CLI's typer limits do not guard the library)."""
    args = {"out": tmp_path / "o", **kwargs}
    with pytest.raises(ValueError, match=message):
        heal_model(tmp_path / "missing", args.pop("out"), config=TrainConfig(steps=1), **args)
    args = {"out": tmp_path / "o", **kwargs}
    with pytest.raises(ValueError, match=message):
        adapt_model(tmp_path / "missing", "lora", args.pop("out"), config=TrainConfig(steps=1), **args)
    with pytest.raises(ValueError, match=r"rank must be an integer >= 1, got 0"):
        adapt_model(tmp_path / "missing", "lora", tmp_path / "o", config=TrainConfig(steps=1), rank=0)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("*.checkpoint"))
