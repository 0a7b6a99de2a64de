"""The CLI on a tiny model saved to disk: commands work, bad input gives one-line errors and exit code 2."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from rankwise.cli import app
from rankwise.stream.source import fast_bf16
from tests.tiny_models import tiny_model, tiny_tokenizer, tiny_tokens

runner = CliRunner()
SMALL = ["--seq-len", "16", "--calib-samples", "4"]


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_compress_then_eval_json(tiny_dir, tmp_path):
    out = tmp_path / "c"
    result = run("compress", tiny_dir, "--method", "svd_llm", "--ratio", "0.3", "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    assert "kept" in result.output and "removed" in result.output
    assert (out / "rankwise.json").exists()
    result = run("eval", out, "--json", "--seq-len", "16", "--eval-samples", "4")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    for key in ("perplexity", "params_total", "params_targeted", "tokens_per_s", "eval_tokens"):
        assert key in data
    assert data["eval_tokens"] == 4 * 15 and data["perplexity"] > 1


def test_compare_writes_table_and_plot(tiny_dir, tmp_path):
    out = tmp_path / "cmp"
    result = run("compare", tiny_dir, "--methods", "svd,svd_llm", "--ratios", "0.2,0.5", "--out", out,
                 "--eval-samples", "4", *SMALL)
    assert result.exit_code == 0, result.output
    table = (out / "comparison.md").read_text()
    assert table.count("| svd |") == 2 and table.count("| svd_llm |") == 2 and "| dense |" in table
    assert (out / "comparison.png").stat().st_size > 1000 and (out / "ranks.png").stat().st_size > 1000
    data = json.loads((out / "comparison.json").read_text())
    assert len(data["rows"]) == 4


@pytest.mark.parametrize("args,message", [
    (["compress", "{model}", "--method", "nope", "--out", "{tmp}/o"], "'nope' is not one of 'asvd'"),
    (["compress", "{model}", "--ratio", "1.5", "--out", "{tmp}/o"], "ratio must be a fraction"),
    (["compress", "{model}", "--ratio", "0", "--out", "{tmp}/o"], "ratio must be a fraction"),
    (["compress", "{tmp}/missing", "--out", "{tmp}/o"], "does not exist"),
    (["compress", "{model}", "--out", "{tmp}/o", "--calib-samples", "100000"], "text too short: it has"),
    (["compress", "{model}", "--out", "{tmp}"], "exists; pass --overwrite"),
    (["compress", "{model}"], "Missing option '--out'"),
    (["compare", "{model}", "--methods", "svd,bogus", "--out", "{tmp}/o"], "unknown method 'bogus'"),
    (["compare", "{model}", "--ratios", "0.2,x", "--out", "{tmp}/o"], "comma-separated list of numbers"),
    (["eval", "{model}", "--text", "{tmp}/none.txt"], "text file"),
    (["compress", "{model}", "--out", "{tmp}/o", "--calib-samples", "0"], "'--calib-samples': Input should be greater"),
    (["eval", "{model}", "--eval-samples", "0"], "'--eval-samples': Input should be greater"),
    (["compress", "{model}", "--out", "{tmp}/o", "--batch-size", "0"], "'--batch-size': Input should be greater"),
    (["eval", "{model}", "--threads", "0"], "'--threads': Input should be greater"),
    (["compare", "{model}", "--out", "{tmp}/o", "--seq-len", "1"], "'--seq-len': Input should be greater"),
    (["compress", "{model}", "--out", "{tmp}/o", "--batch-size", "two"], "Invalid value for '--batch-size'"),
    (["compress", "{model}", "--out", "{tmp}/o", "--bogus"], "No such option: --bogus"),
    (["eval", "{model}/config.json"], "is a file; give its directory"),
    (["compress", "{model}", "--out", "{model}", "--overwrite"], "is the input model"),
    (["compare", "{model}", "--out", "{model}/..", "--overwrite"], "contains the input model"),
    (["eval", "{model}", "--device", "meta"], "--device 'meta' is not supported"),
    (["eval", "{model}", "--device", "cuda:x"], "is not a device"),
    (["compress", "{model}", "--out", "{tmp}/o", "--activation-mb", "inf"], "--activation-mb must be a finite"),
    (["compress", "{model}", "--out", "{tmp}/o", "--json-report", "{model}/config.json"],
     "/config.json' is inside the input model"),
    (["eval", "{model}", "--dtype", "int8"], "'int8' is not one of 'auto', 'float32'"),
])
def test_bad_input_one_line_error(tiny_dir, tmp_path, args, message):
    result = run(*[a.format(model=tiny_dir, tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1
    assert not (tmp_path / "o").exists()


def test_non_finite_weights_named(tmp_path):
    import torch

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[1, 1] = float("inf")
    model.save_pretrained(tmp_path / "bad")
    tiny_tokenizer().save_pretrained(tmp_path / "bad")
    result = run("compress", tmp_path / "bad", "--out", tmp_path / "o", *SMALL)
    assert result.exit_code == 2
    assert ("tensor 'model.layers.0.self_attn.o_proj.weight' in " f"{tmp_path / 'bad' / 'model.safetensors'} holds 1 "
            "NaN or Inf values") in result.output
    assert not (tmp_path / "o").exists()


def test_compress_options_and_compensate(tiny_dir, tmp_path):
    out = tmp_path / "c"
    result = run("compress", tiny_dir, "--ratio", "0.4", "--allocation", "loss", "--sequential", "--update-u",
                 "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    adapter = tmp_path / "adapter"
    result = run("compensate", out, "--base", tiny_dir, "--rank", "4", "--out", adapter, *SMALL)
    assert result.exit_code == 0, result.output
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    result = run("compensate", out, "--base", tiny_dir, "--rank", "4", "--merge", "--out", tmp_path / "m", *SMALL)
    assert result.exit_code == 0 and (tmp_path / "m" / "rankwise.json").exists()
    result = run("compensate", out, "--base", tiny_dir, "--rank", "999", "--out", tmp_path / "x", *SMALL)
    assert result.exit_code == 2 and "rank 999 is larger than layer" in result.output
    assert not (tmp_path / "x").exists()


def test_compress_streams_with_dtype_and_json_report(tiny_dir, tmp_path):
    out, report = tmp_path / "c", tmp_path / "report.json"
    result = run("compress", tiny_dir, "--ratio", "0.3", "--out", out, "--dtype", "bfloat16", "--json-report", report,
                 "--activation-mb", "0", "--offload-dir", tmp_path / "spill", *SMALL)
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]  # written block by block, one shard
    data = json.loads(report.read_text())
    assert len(data["block_seconds"]) == 2 and 0.3 <= data["removed_fraction"] < 0.33
    assert json.loads((out / "rankwise.json").read_text())["dtype"] == "bfloat16"
    result = run("compress", tiny_dir, "--out", tmp_path / "o2", "--dtype", "int4", *SMALL)
    assert result.exit_code == 2 and "is not one of 'auto', 'float32', 'bfloat16', 'float16'" in result.output


def test_deleted_manifest_is_an_error_not_a_perplexity(tiny_dir, tmp_path):
    out = tmp_path / "c"
    assert run("compress", tiny_dir, "--method", "svd_llm", "--out", out, *SMALL).exit_code == 0
    (out / "rankwise.json").unlink()  # config.json's quantization_config still describes the layers
    result = run("eval", out, "--json", "--seq-len", "16", "--eval-samples", "4")
    assert result.exit_code == 2 and "rankwise.json is listed in SHA256SUMS but missing" in result.output
    result = run("eval", out, "--json", "--seq-len", "16", "--eval-samples", "4", "--no-verify")
    assert result.exit_code == 0 and "perplexity" in result.output, result.output
    (out / "SHA256SUMS").unlink()  # from here on, validation alone must refuse the damage
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    for stream in ("--stream", "--no-stream"):
        result = run("eval", out, "--json", stream, "--seq-len", "16", "--eval-samples", "4")
        assert result.exit_code == 2, result.output
        assert "holds factorised tensors" in result.output and "perplexity" not in result.output


def test_remote_code_is_refused_without_prompting(tiny_dir, tmp_path):
    import shutil

    model = tmp_path / "remote"
    shutil.copytree(tiny_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    for args in (["eval", model, "--seq-len", "16", "--eval-samples", "4"],
                 ["compress", model, "--out", tmp_path / "o", *SMALL]):
        result = runner.invoke(app, [str(a) for a in args], input="y\n")
        assert result.exit_code == 2, result.output
        assert "--trust-remote-code" in result.output and "[y/N]" not in result.output
        assert "remote code ran" not in result.output
    assert not (tmp_path / "o").exists()


def test_gguf_garbage_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    result = run("eval", bad, "--seq-len", "16", "--eval-samples", "4")
    assert result.exit_code == 2 and "is not a readable GGUF model" in result.output, result.output
    bad.write_bytes(b"PK\x03\x04 not gguf at all")
    result = run("eval", bad, "--seq-len", "16", "--eval-samples", "4")
    assert result.exit_code == 2 and "is not a GGUF file" in result.output, result.output


def test_text_is_checked_before_the_model(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    result = run("eval", broken, "--text", tmp_path / "missing.txt")
    assert result.exit_code == 2 and "text file" in result.output, result.output


def test_non_utf8_text_warns(tiny_dir, tmp_path):
    text = tmp_path / "latin1.txt"
    text.write_bytes(("café naïve déjà vu " * 400).encode("latin-1"))
    result = run("eval", tiny_dir, "--text", text, "--seq-len", "16", "--eval-samples", "4")
    assert result.exit_code == 0, result.output
    assert "warning: text file" in result.output and "is not valid UTF-8" in result.output


def test_generate_is_greedy_and_deterministic(tiny_dir, tmp_path):
    out = tmp_path / "c"
    assert run("compress", tiny_dir, "--method", "svd_llm", "--out", out, *SMALL).exit_code == 0
    for model in (tiny_dir, out):
        first = run("generate", model, "--prompt", "abc", "--prompt", "hello", "--max-new-tokens", "5")
        assert first.exit_code == 0, first.output
        assert first.output.count("### ") == 2 and "### abc" in first.output and "### hello" in first.output
        assert run("generate", model, "--prompt", "abc", "--prompt", "hello", "--max-new-tokens", "5").output == \
            first.output


def test_generate_matches_the_model_and_bad_input(tiny_dir, tmp_path):
    from rankwise.eval import complete
    from rankwise.io.models import load_model

    loaded = load_model(str(tiny_dir))
    ids = loaded.tokenizer("abc", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = loaded.model(ids).logits[0, -1]
    first = complete(loaded.model, loaded.tokenizer, ["abc"], max_new_tokens=1)[0]
    assert first == loaded.tokenizer.decode([int(logits.argmax())], skip_special_tokens=True)  # greedy
    for args, message in ((["--prompt", "x", "--chat"], "needs a tokenizer with a chat template"),
                          ([], "give at least one --prompt"), (["--prompt", " "], "must not be empty"),
                          (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens")):
        result = run("generate", tiny_dir, *args)
        assert result.exit_code == 2 and message in result.output, result.output
    result = run("generate", tmp_path, "--prompt", "x")
    assert result.exit_code == 2 and result.output.startswith("error:"), result.output


def test_info_shows_method_ranks_and_provenance(tiny_dir, tmp_path):
    out = tmp_path / "c"
    assert run("compress", tiny_dir, "--method", "svd_llm", "--ratio", "0.3", "--out", out, *SMALL).exit_code == 0
    data = json.loads(run("info", out, "--json").output)
    assert data["method"] == "svd_llm" and data["ratio"] == 0.3 and data["factorised_layers"] == 14
    assert data["params_targeted_kept"] + data["params_targeted_removed"] > data["params_targeted_kept"] > 0
    assert sum(data["rank_histogram"].values()) == 14
    origin = data["provenance"]
    assert origin["source"] == str(tiny_dir) and len(origin["source_fingerprint"]) == 64
    assert origin["calibration_windows"] == [4, 16] and origin["options"]["ratio"] == 0.3
    text = run("info", out).output
    assert "method svd_llm at ratio 0.3" in text and "removed" in text and "source_fingerprint:" in text
    result = run("info", tiny_dir)
    assert result.exit_code == 2 and "not a rankwise directory" in result.output


def test_compare_recipes_with_side_by_side_completions(tiny_dir, tmp_path):
    out = tmp_path / "cmp"
    result = run("compare", tiny_dir, "--recipes", "svd_llm,svd_llm+loss+seq", "--ratios", "0.3", "--out", out,
                 "--eval-samples", "4", "--prompt", "abc", "--prompt", "xyz", "--max-new-tokens", "4", *SMALL)
    assert result.exit_code == 0, result.output
    table = (out / "comparison.md").read_text()
    assert "| svd_llm |" in table and "| svd_llm +loss +seq |" in table
    assert "**abc** ..." in table and "**xyz** ..." in table
    assert table.count("| svd_llm +loss +seq @ 0.3 |") == 2 and table.count("| dense |") == 3
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [len(r["completions"]) for r in rows] == [2, 2]
    bad = run("compare", tiny_dir, "--recipes", "svd_llm+fast", "--out", tmp_path / "o")
    assert bad.exit_code == 2 and "unknown option 'fast'" in bad.output


def test_heal_saves_a_compressed_model_of_the_same_size(tiny_dir, tmp_path):
    import rankwise
    from rankwise.eval.measure import count_params
    from rankwise.io.manifest import read_manifest

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and {i % 11}" for i in range(3000)))
    out, healed = tmp_path / "c", tmp_path / "h"
    assert run("compress", tiny_dir, "--ratio", "0.4", "--out", out, "--text", text, *SMALL).exit_code == 0
    result = run("heal", out, "--base", tiny_dir, "--steps", "4", "--out", healed, "--text", text, "--seq-len", "16",
                 "--eval-samples", "4", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert "held-out perplexity" in result.output and "->" in result.output
    assert count_params(rankwise.load(healed).model) == count_params(rankwise.load(out).model)
    assert read_manifest(healed).modules == read_manifest(out).modules
    assert read_manifest(healed).provenance["heal"]["steps"] == 4
    assert read_manifest(healed).provenance["heal"]["bf16"] is fast_bf16("cpu")  # what --dtype auto chose, recorded
    assert not (tmp_path / "h.checkpoint").exists()
    assert run("eval", healed, "--text", text, "--seq-len", "16", "--eval-samples", "4").exit_code == 0
    for args, message in (
        (("heal", tiny_dir, "--out", tmp_path / "x"), "not a compressed rankwise directory"),
        (("heal", out, "--out", tmp_path / "y", "--steps", "0"), "--steps"),
        (("heal", out, "--out", tmp_path / "v", "--minutes", "0"), "--minutes"),
        (("heal", out, "--out", tmp_path / "u", "--minutes", "5", "--resume"), "cannot resume"),
        (("heal", out, "--out", tmp_path / "z", "--base", tiny_dir, "--text", text, "--seq-len", "16",
          "--eval-samples", "4", "--steps", "4", "--resume"), "no training state"),
        (("heal", out, "--out", tmp_path / "t", "--resume"), "no training state"),
        (("heal", out, "--out", tmp_path / "w", "--base", tiny_dir, "--json-report", tmp_path / "nowhere" / "r.json"),
         "does not exist"),
        (("heal", out, "--out", tiny_dir / "inner", "--base", tiny_dir), "inside the input model"),
    ):
        result = run(*args)
        assert result.exit_code == 2 and message in result.output, result.output


def test_heal_defaults_to_a_ten_minute_budget(tiny_dir, tmp_path, monkeypatch):
    from rankwise.cli import heal as heal_cli
    from rankwise.io.manifest import read_manifest

    monkeypatch.setattr(heal_cli, "HEAL_MAX_STEPS", 3)  # the tiny model's steps take milliseconds: cap the count
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and {i % 11}" for i in range(3000)))
    out, healed = tmp_path / "c", tmp_path / "h"
    assert run("compress", tiny_dir, "--ratio", "0.4", "--out", out, "--text", text, *SMALL).exit_code == 0
    result = run("heal", out, "--base", tiny_dir, "--out", healed, "--text", text, "--seq-len", "16",
                 "--eval-samples", "4", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert "time budget 10 min" in result.output and "3 steps" in result.output
    record = read_manifest(healed).provenance["heal"]
    assert record["minutes"] == 10 and record["steps"] == 3


@pytest.mark.parametrize("method", ["lora", "pissa", "svfit"])
def test_adapt_saves_an_adapter_or_a_merged_model(tiny_dir, tmp_path, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and {i % 11}" for i in range(3000)))
    common = ["--method", method, "--rank", "4", "--text", text, "--steps", "3", "--seq-len", "16",
              "--eval-samples", "4", "--batch-size", "2", "--lr", "1e-2"]
    result = run("adapt", tiny_dir, *common, "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert "held-out loss" in result.output
    merged = run("adapt", tiny_dir, *common, "--out", tmp_path / "m", "--merge")
    assert merged.exit_code == 0, merged.output
    ids = tiny_tokens(2, 16)
    with torch.no_grad():
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "a")
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
        torch.testing.assert_close(adapter(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-4,
                                   rtol=1e-4)  # same seed, same training: the adapter equals the merged model
        base = AutoModelForCausalLM.from_pretrained(tiny_dir)
        assert not torch.allclose(plain(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4)  # it trained
    summary = json.loads((tmp_path / "a" / "rankwise_adapt.json").read_text())
    assert (summary["steps"], summary["bf16"]) == (3, fast_bf16("cpu"))
    assert not (tmp_path / "a.checkpoint").exists()


def test_adapt_training_state_is_guarded(tiny_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and {i % 11}" for i in range(3000)))
    common = ["--rank", "4", "--text", text, "--steps", "3", "--seq-len", "16", "--eval-samples", "4",
              "--batch-size", "2"]
    stale = tmp_path / "o.checkpoint"
    stale.mkdir()
    (stale / "trainer_state.pt").write_bytes(b"old")
    result = run("adapt", tiny_dir, *common, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "previous run's resumable state" in result.output
    (stale / "mine.txt").write_text("user data")
    result = run("adapt", tiny_dir, *common, "--out", tmp_path / "o", "--overwrite")
    assert result.exit_code == 2 and "not a rankwise training state" in result.output
    assert (stale / "mine.txt").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "nope"], "'nope' is not one of 'lora'"),
    (["--rank", "500"], "is not below the smallest targeted dimension"),
    (["--steps", "0"], "--steps"),
    (["--seq-len", "4096"], "fewer than one batch"),
])
def test_adapt_bad_input(tiny_dir, tmp_path, args, message):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and {i % 11}" for i in range(3000)))
    result = run("adapt", tiny_dir, "--text", text, "--out", tmp_path / "o", "--seq-len", "16", *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_second_compress_and_compare_read_the_cache(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RANKWISE_CALIBRATION_CACHE", str(tmp_path / "cache"))
    outputs = {}
    for name, ratio, extra in [("a", "0.3", []), ("b", "0.5", []), ("c", "0.5", ["--no-cache"])]:
        result = run("compress", tiny_dir, "--ratio", ratio, "--allocation", "loss", "--out", tmp_path / name,
                     *SMALL, *extra)
        assert result.exit_code == 0, result.output
        outputs[name] = result.output
    assert "read from the cache" not in outputs["a"]
    assert "read from the cache" in outputs["b"]
    assert "read from the cache" not in outputs["c"]
    from safetensors.torch import load_file

    b, c = ({k: v for f in sorted((tmp_path / n).glob("*.safetensors")) for k, v in load_file(f).items()}
            for n in "bc")
    assert b and b.keys() == c.keys() and all(torch.equal(b[k], c[k]) for k in b)
    for n, expect in ((1, False), (2, True)):
        result = run("compare", tiny_dir, "--methods", "svd_llm", "--ratios", "0.3", "--out", tmp_path / f"cmp{n}",
                     "--eval-samples", "4", *SMALL)
        assert result.exit_code == 0, result.output
        assert ("read from the cache" in result.output) is expect


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _last_json(output: str) -> dict:
    line = next(line for line in reversed(output.splitlines()) if '{"perplexity"' in line)
    return json.loads(line[line.index('{"perplexity"'):])  # stderr's progress bars share the captured output


def test_eval_tasks_runs_a_local_lm_eval_task(tiny_dir, tmp_path, monkeypatch):
    """End to end through lm-eval, offline: the multiple-choice task rankwise ships, found from any directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    out = tmp_path / "c"
    assert run("compress", tiny_dir, "--ratio", "0.5", "--out", out, *SMALL).exit_code == 0
    scores = {}
    for name, model in (("dense", tiny_dir), ("compressed", out)):
        result = run("eval", model, "--tasks", "pydoc_cloze", "--json",
                     "--seq-len", "16", "--eval-samples", "4", "--limit", "40")
        assert result.exit_code == 0, result.output
        data = _last_json(result.output)
        assert data["perplexity"] > 1
        scores[name] = data["tasks"]["pydoc_cloze"]
    for metrics in scores.values():
        assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
        assert metrics["acc"] * 40 == round(metrics["acc"] * 40)  # a fraction of the 40 documents
    # the same model and documents give the same accuracy (deterministic)
    again = run("eval", tiny_dir, "--tasks", "pydoc_cloze", "--json",
                "--seq-len", "16", "--eval-samples", "4", "--limit", "40")
    assert _last_json(again.output)["tasks"]["pydoc_cloze"] == scores["dense"]
    text = run("eval", tiny_dir, "--tasks", "pydoc_cloze", "--seq-len", "16",
               "--eval-samples", "4", "--limit", "8")
    assert text.exit_code == 0 and "pydoc_cloze: acc " in text.output and "perplexity" in text.output


@pytest.mark.parametrize("args,message", [
    (["--tasks", "arc_eazy"], "unknown lm-eval task 'arc_eazy'; close matches: arc_easy"),
    (["--tasks", "pydoc_clozes"], "unknown lm-eval task 'pydoc_clozes'; close matches: pydoc_cloze"),  # shipped
    (["--task-dir", "tasks"], "--task-dir needs --tasks"), (["--limit", "3"], "--limit needs --tasks"),
    (["--tasks", "arc_easy", "--task-dir", "no/such/dir"], "is not a directory"),
    (["--tasks", "arc_easy", "--stream"], "--tasks needs the model in memory"),
])
def test_eval_tasks_bad_input(tiny_dir, monkeypatch, args, message):
    monkeypatch.chdir(REPO)
    result = run("eval", tiny_dir, *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_compress_structured_methods_with_settings_and_bits(tiny_dir, tmp_path):
    """A method's own fields through --set, a budget in bits, and the one-line errors around them."""
    out = tmp_path / "m"
    result = run("compress", tiny_dir, "--method", "monarch", "--set", "nblocks=2", "--set", "whiten=false",
                 "--ratio", "0.3", "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    data = json.loads(run("info", out, "--json").output)
    assert data["kinds"] == {"monarch": 14} and data["provenance"]["options"]["nblocks"] == 2
    out = tmp_path / "q"
    result = run("compress", tiny_dir, "--method", "lq", "--bits", "5", "--set", "quant_bits=4", "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    data = json.loads(run("info", out, "--json").output)
    assert data["kinds"] == {"lq": 14} and data["bits_budget"] == 5.0
    assert data["bits_per_targeted_weight"] <= 5.0 + 1e-9  # the tiny model has no biases in its projections
    assert "at a budget of 5 bits per targeted weight" in run("info", out).output
    for args, message in [
        (["--method", "monarch", "--set", "blocks=2"], "with NAME one of monarch's fields: nblocks"),
        (["--method", "monarch", "--set", "nblocks=two"], "--set nblocks: 'two' is not a valid int"),
        (["--method", "lq"], "method 'lq' takes a budget in bits (bits=, --bits), not a ratio of parameters"),
        (["--method", "nf", "--bits", "1"], "the budget of 1.0 bits per weight is below what nf can represent"),
    ]:
        result = run("compress", tiny_dir, "--out", tmp_path / "o", *args, *SMALL)
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1
        assert not (tmp_path / "o").exists()
