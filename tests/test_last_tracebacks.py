"""Bad input that used to end in a traceback (or run forever) ends in one ``error: ...`` line and exit code 2, before
the expensive part: a prompt that is not UTF-8, more new tokens than the model's context holds, a recipe with a
repeated option, a task YAML that does not parse, a hand-edited report field of the wrong type, a full disk."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError
from typer.testing import CliRunner

from rankwise._errors import os_errors, wrapped_os_error
from rankwise.cli import app
from tests.tiny_models import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--seq-len", "16", "--calib-samples", "4"]
CONTEXT = 256  # the tiny Llama's max_position_embeddings
ENOSPC_NOW = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors 0.8
ENOSPC_OLD = ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" '
              '})')


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def rankwise(*args: str | bytes, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (arguments may be bytes: what a shell passes for text that is not UTF-8)."""
    code = "import sys; from rankwise.cli import main; sys.argv[0] = 'rankwise'; main()"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, timeout=timeout, env=env,
                          cwd=ROOT)


def one_error_line(stderr: str | bytes) -> str:
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    lines = text.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    return lines[0]


@pytest.fixture(scope="module")
def no_weights_dir(tiny_dir, tmp_path_factory):
    """The tiny model's config and tokenizer with a damaged weight file: an error about the prompt or the token
    count (and not about the weights) shows it was raised before the model was read."""
    path = tmp_path_factory.mktemp("broken") / "llama"
    path.mkdir()
    for file in tiny_dir.iterdir():
        if file.is_file() and file.suffix != ".safetensors":
            (path / file.name).write_bytes(file.read_bytes())
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    return path


# 1. a prompt that is not UTF-8


def test_generate_refuses_a_prompt_that_is_not_utf8(no_weights_dir):
    result = rankwise("generate", str(no_weights_dir), "--prompt", "hello", "--prompt", b"ab\xffcd")
    assert result.returncode == 2, result.stderr
    assert one_error_line(result.stderr) == "error: --prompt 2 of 2 is not valid UTF-8 (byte 0xff at byte 2); give " \
                                            "UTF-8 text"


def test_complete_refuses_text_that_no_tokenizer_encodes():
    from rankwise.eval.generate import check_prompts, complete

    model, tokenizer = tiny_model(), tiny_tokenizer()
    with pytest.raises(ValueError, match=r"^prompt 1 of 1 is not valid UTF-8 \(byte 0xc3 at byte 1\)"):
        complete(model, tokenizer, [b"a\xc3(".decode("utf-8", "surrogateescape")], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"lone surrogate U\+D800 at character 1"):
        check_prompts(["x\ud800"])
    check_prompts(["héllo ✓", "日本語"])  # UTF-8 beyond ASCII is fine


# 2. more new tokens than the context holds


def test_generate_refuses_max_new_tokens_beyond_the_context_quickly(no_weights_dir):
    start = time.monotonic()
    result = rankwise("generate", str(no_weights_dir), "--prompt", "hi", "--max-new-tokens", "100000000")
    assert result.returncode == 2, result.stderr
    assert one_error_line(result.stderr) == (f"error: a prompt of 2 tokens and max_new_tokens 100000000 exceed the "
                                             f"model's context of {CONTEXT} positions; at most {CONTEXT - 2} new "
                                             "tokens fit")
    assert time.monotonic() - start < 90  # start-up only: without the check it generates until killed
    assert result.stdout == b""


def test_complete_checks_the_context_before_generating(monkeypatch):
    from rankwise.eval.generate import complete

    model, tokenizer = tiny_model(), tiny_tokenizer()
    asked = []
    monkeypatch.setattr(model, "generate", lambda ids, **kw: asked.append(kw["max_new_tokens"]) or
                        torch.cat([ids, ids[:, :1].repeat(1, kw["max_new_tokens"])], dim=1))
    prompt = "abc"  # 3 tokens (one per byte)
    with pytest.raises(ValueError, match=f"context of {CONTEXT} positions; at most {CONTEXT - 3} new tokens fit"):
        complete(model, tokenizer, ["x", prompt], max_new_tokens=CONTEXT - 2)
    assert asked == []  # refused before the first prompt was generated
    assert len(complete(model, tokenizer, ["x", prompt], max_new_tokens=CONTEXT - 3)) == 2  # exactly full: fine
    assert asked == [CONTEXT - 3] * 2
    with pytest.raises(ValueError, match="shorten the prompt"):
        complete(model, tokenizer, ["a" * CONTEXT], max_new_tokens=1)


# 3. a recipe with a repeated option


@pytest.mark.parametrize("recipe,message", [
    ("svd_llm+loss+loss+seq+seq", "recipe 'svd_llm+loss+loss+seq+seq': option 'loss' is repeated"),
    ("svd_llm+seq+seq", "recipe 'svd_llm+seq+seq': option 'seq' is repeated"),
    ("svd_llm+loss+welore", "options 'loss' and 'welore' both set allocation"),
    ("svd_llm+anc+anchored=true+seq", "options 'anc' and 'anchored=true' both set anchored"),
    ("monarch+whiten=false+whiten=true", "options 'whiten=false' and 'whiten=true' both set whiten"),
])
def test_a_recipe_with_a_repeated_option_is_refused(recipe, message):
    from rankwise.methods.recipes import parse_recipe

    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        parse_recipe(recipe, 0.2)
    parse_recipe(recipe.split("+")[0], 0.2)  # the method alone is fine


@pytest.mark.parametrize("args", [
    ["compare", "{model}", "--recipes", "svd,svd_llm+loss+loss+seq+seq", "--out", "{out}"],
    ["compress", "{model}", "--recipe", "svd_llm+loss+loss+seq+seq", "--out", "{out}"],
])
def test_cli_refuses_a_repeated_recipe_option(tiny_dir, tmp_path, args):
    out = tmp_path / "o"
    result = run(*[a.format(model=tiny_dir, out=out) for a in args], *SMALL)
    assert result.exit_code == 2, result.output
    assert one_error_line(result.stderr) == ("error: recipe 'svd_llm+loss+loss+seq+seq': option 'loss' is repeated; "
                                             "give each option once")
    assert not out.exists()


# 4. a task YAML that does not parse


BAD_YAML = "task: foo\ndataset_path: json\n  data_files: [a.jsonl\noutput_type: multiple_choice\n"


def test_a_task_yaml_that_does_not_parse_is_named(tmp_path):
    from rankwise.eval.tasks import check_yaml

    (tmp_path / "foo.yaml").write_text(BAD_YAML)
    with pytest.raises(ValueError, match=r"foo\.yaml is not valid YAML \(line 3, column 13: mapping values are not "
                                         r"allowed here\)$"):
        check_yaml(tmp_path / "foo.yaml")
    (tmp_path / "two.yaml").write_text("task: a\n---\ntask: b\n")
    with pytest.raises(ValueError, match=r"line 2, column 1: expected a single document in the stream, but found "):
        check_yaml(tmp_path / "two.yaml")
    (tmp_path / "ok.yaml").write_text("task: ok\nprocess_docs: !function utils.process\n")
    check_yaml(tmp_path / "ok.yaml")  # lm-eval's tags are lm-eval's business


def test_eval_names_the_task_yaml_that_does_not_parse(tiny_dir, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    (tasks / "sub").mkdir(parents=True)
    (tasks / "sub" / "foo.yaml").write_text(BAD_YAML)
    monkeypatch.chdir(tmp_path)
    result = run("eval", tiny_dir, "--tasks", "foo", "--task-dir", "tasks", "--eval-samples", "2", *SMALL[:2])
    assert result.exit_code == 2, result.output
    assert one_error_line(result.stderr) == ("error: tasks/sub/foo.yaml is not valid YAML (line 3, column 13: "
                                             "mapping values are not allowed here)")


# 5. a report field of the wrong type


@pytest.fixture(scope="module")
def compressed_dir(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("info") / "c"
    result = run("compress", tiny_dir, "--method", "svd", "--ratio", "0.3", "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    return out


def test_info_names_a_report_field_of_the_wrong_type(compressed_dir, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(compressed_dir, edited)
    (edited / "SHA256SUMS").unlink(missing_ok=True)  # a hand-edited file; the checksums are not this test's subject
    manifest = json.loads((edited / "rankwise.json").read_text())
    manifest["report"]["ratio"] = "0.2"
    (edited / "rankwise.json").write_text(json.dumps(manifest))
    for extra in ([], ["--json"]):
        result = run("info", edited, *extra)
        assert result.exit_code == 2, result.output
        assert one_error_line(result.stderr) == (f"error: {edited}/rankwise.json: field 'report.ratio' is '0.2'; "
                                                 "expected a number")
    assert run("info", compressed_dir).exit_code == 0


@pytest.mark.parametrize("field,value,expected", [
    ("ratio", True, "is True; expected a number"),
    ("ratio", None, "is None; expected a number (or 'report.bits', a budget in bits)"),
    ("bits", "4", "is '4'; expected a number"),
    ("bytes_dense", [1], "is [1]; expected a number"),
    ("bits_per_targeted_weight", {}, "is {}; expected a number"),
    ("params_total_after", 1.5, "is 1.5; expected a whole number >= 0"),
    ("params_targeted_before", -3, "is -3; expected a whole number >= 0"),
    ("params_total_before", None, "is None; expected a whole number >= 0"),  # shown beside the targeted counts
    ("layers", 3, "is 3; expected a list"),
    ("notes", "a note", "is 'a note'; expected a list"),
    ("method", 7, "is 7; expected a method name"),
])
def test_every_report_field_info_shows_is_checked(field, value, expected):
    from rankwise.cli.info import check_report

    report = {"method": "svd", "ratio": 0.3, "params_total_before": 10, "params_total_after": 8,
              "params_targeted_before": 6, "params_targeted_after": 4, "layers": [], "notes": [], "bits": None,
              "bytes_dense": 40, "bits_per_targeted_weight": 21.3}
    assert check_report(SimpleNamespace(report=report, file=Path("d/rankwise.json"))) == report
    with pytest.raises(ValueError, match=rf"^d/rankwise\.json: field 'report\.{field}' {re.escape(expected)}$"):
        check_report(SimpleNamespace(report={**report, field: value}, file=Path("d/rankwise.json")))


# 6. a full disk while writing the output


@pytest.mark.parametrize("message", [ENOSPC_NOW, ENOSPC_OLD])
def test_a_full_disk_while_compressing_is_one_line_and_leaves_nothing(tiny_dir, tmp_path, monkeypatch, message):
    import rankwise.io.shards as shards

    written = []

    def full_disk(tensors, filename, *args, **kwargs):
        written.append(filename)
        raise SafetensorError(message)

    monkeypatch.setattr(shards, "save_file", full_disk)
    out = tmp_path / "out"
    result = run("compress", tiny_dir, "--method", "svd", "--ratio", "0.3", "--out", out, *SMALL)
    assert written, result.output  # the fake disk was reached: the streamed writer saves through it
    assert result.exit_code == 2, result.output
    assert one_error_line(result.stderr) == f"error: {out}: No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary directory, no lock


def test_safetensors_os_errors_become_os_errors(tmp_path):
    err = wrapped_os_error(SafetensorError(ENOSPC_NOW), tmp_path / "out")
    assert type(err) is OSError and err.errno == 28 and err.strerror == os.strerror(28)
    assert err.filename == str(tmp_path / "out")
    denied = wrapped_os_error(SafetensorError('Error while serializing: I/O error: Permission denied (os error 13) '
                                              'at path "/x/.tmpAB"'))
    assert isinstance(denied, PermissionError) and denied.filename is None
    assert wrapped_os_error(SafetensorError("Error while serializing: the data is not contiguous")) is None
    with pytest.raises(SafetensorError, match="not contiguous"), os_errors(tmp_path):  # not an OS error: as it was
        raise SafetensorError("Error while serializing: the data is not contiguous")
    with pytest.raises(FileNotFoundError) as caught, os_errors(tmp_path / "x"):
        raise SafetensorError("Error while serializing: I/O error: No such file or directory (os error 2)")
    assert caught.value.filename == str(tmp_path / "x") and isinstance(caught.value.__cause__, SafetensorError)
