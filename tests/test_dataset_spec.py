"""``--dataset NAME[:CONFIG[:SPLIT]]``: the spec parsed, the right config and split read, and a config, split or
package that is missing named in one line with what there is instead. Offline: the datasets are local directories
of JSON-lines files (one with the single config ``default``, one with two configs declared in its README)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rankwise.calibrate.text import DatasetSpec, load_text, parse_dataset_spec
from rankwise.cli import app

SPLITS = ("train", "test")


@pytest.mark.parametrize("spec,expected", [
    ("wikitext", DatasetSpec("wikitext", None, "train")),
    ("wikitext:wikitext-2-raw-v1", DatasetSpec("wikitext", "wikitext-2-raw-v1", "train")),
    ("wikitext:wikitext-2-raw-v1:test", DatasetSpec("wikitext", "wikitext-2-raw-v1", "test")),
    ("allenai/c4:en:validation", DatasetSpec("allenai/c4", "en", "validation")),
    ("/data/my corpus:default:test", DatasetSpec("/data/my corpus", "default", "test")),
    ("wikitext:wikitext-2-raw-v1:test[:10%]", DatasetSpec("wikitext", "wikitext-2-raw-v1", "test[:10%]")),
])
def test_parse_dataset_spec(spec, expected):
    assert parse_dataset_spec(spec) == expected


def test_parse_dataset_spec_with_config_and_split_given_apart():
    assert parse_dataset_spec("wikitext", config="wikitext-2-raw-v1", split="test") == DatasetSpec(
        "wikitext", "wikitext-2-raw-v1", "test")
    # named both ways, the same: allowed
    assert parse_dataset_spec("wikitext:c:test", config="c", split="test") == DatasetSpec("wikitext", "c", "test")
    with pytest.raises(ValueError, match=r"^dataset 'wikitext:c' names the config 'c', and the config argument "
                                         r"'d' disagrees; name it once$"):
        parse_dataset_spec("wikitext:c", config="d")
    with pytest.raises(ValueError, match=r"names the split 'test', and the split argument 'train' disagrees"):
        parse_dataset_spec("wikitext:c:test", split="train")


@pytest.mark.parametrize("spec", ["", ":", "name:", "name::", "name::test", ":config", "name:config:", "name: :x"])
def test_parse_dataset_spec_refuses_an_empty_part(spec):
    with pytest.raises(ValueError) as info:
        parse_dataset_spec(spec)
    assert str(info.value) == (f"dataset {spec!r} has an empty part; give NAME, NAME:CONFIG or NAME:CONFIG:SPLIT "
                               "(e.g. wikitext:wikitext-2-raw-v1:test)")


def _write_jsonl(path: Path, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))


def _rows(config: str, split: str) -> list[str]:
    return [f"{config} {split} row {i}: the quick brown fox jumps over the lazy dog." for i in range(3)]


MULTI_README = """---
configs:
- config_name: alpha
  data_files:
  - split: train
    path: alpha/train.jsonl
  - split: test
    path: alpha/test.jsonl
- config_name: beta
  data_files:
  - split: train
    path: beta/train.jsonl
  - split: test
    path: beta/test.jsonl
---
"""


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network for ``datasets``, and its cache under ``tmp_path``."""
    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    datasets = pytest.importorskip("datasets")
    # read once, when datasets is imported (perhaps by an earlier test): set where load_dataset reads them
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")


@pytest.fixture
def single(tmp_path) -> str:
    """A directory of data files: the one config ``default``, splits train and test."""
    root = tmp_path / "single"
    for split in SPLITS:
        _write_jsonl(root / f"{split}.jsonl", _rows("single", split))
    return str(root)


@pytest.fixture
def multi(tmp_path) -> str:
    """A directory with two configs, alpha and beta, declared in its README, each with train and test."""
    root = tmp_path / "multi"
    for config in ("alpha", "beta"):
        for split in SPLITS:
            _write_jsonl(root / config / f"{split}.jsonl", _rows(config, split))
    (root / "README.md").write_text(MULTI_README)
    return str(root)


def test_load_text_reads_the_named_config_and_split(offline, single, multi):
    assert load_text(dataset=single) == "\n\n".join(_rows("single", "train"))
    assert load_text(dataset=f"{single}:default:test") == "\n\n".join(_rows("single", "test"))
    for config in ("alpha", "beta"):
        for split in SPLITS:
            assert load_text(dataset=f"{multi}:{config}:{split}") == "\n\n".join(_rows(config, split))
    assert load_text(dataset=f"{multi}:beta") == "\n\n".join(_rows("beta", "train"))  # the default split
    # the keyword arguments say the same
    assert load_text(dataset=multi, dataset_config="beta", split="test") == load_text(dataset=f"{multi}:beta:test")
    with pytest.raises(ValueError, match=r"names the config 'alpha', and the config argument 'beta' disagrees"):
        load_text(dataset=f"{multi}:alpha", dataset_config="beta")


def test_load_text_names_what_is_missing_in_one_line(offline, single, multi):
    cases = [
        (f"{single}:nope", f"dataset {single!r} has no config 'nope'; configs: default"),
        (f"{multi}:gamma:test", f"dataset {multi!r} has no config 'gamma'; configs: alpha, beta"),
        (f"{multi}", f"dataset {multi!r} has several configs, name one as NAME:CONFIG; configs: alpha, beta"),
        (f"{multi}:alpha:validation", f"dataset {multi!r} has no split 'validation'; splits: train, test"),
        (f"{single}:default:dev", f"dataset {single!r} has no split 'dev'; splits: train, test"),
    ]
    for spec, message in cases:
        with pytest.raises(ValueError) as info:
            load_text(dataset=spec)
        assert str(info.value) == message
    with pytest.raises(ValueError, match=r"^dataset '.*' has no field 'body'; fields: text$"):
        load_text(dataset=single, field="body")


def test_load_text_without_the_datasets_package(monkeypatch, single):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ValueError, match=r"^--dataset needs the 'datasets' package: pip install "
                                         r"'rankwise\[datasets\]'$"):
        load_text(dataset=f"{single}:default:test")


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_eval_reads_the_dataset_spec(offline, multi, tiny_dir, tmp_path):
    """``eval --dataset DIR:CONFIG:SPLIT`` evaluates on that split's text: the same perplexity as the same text
    given as a file; a config that does not exist is one error line, before the model is read."""
    text = tmp_path / "beta-test.txt"
    text.write_text(load_text(dataset=f"{multi}:beta:test"))
    small = ["--json", "--seq-len", "8", "--eval-samples", "2"]
    from_dataset = run("eval", tiny_dir, "--dataset", f"{multi}:beta:test", *small)
    from_file = run("eval", tiny_dir, "--text", text, *small)
    assert from_dataset.exit_code == 0 and from_file.exit_code == 0, from_dataset.output + from_file.output
    perplexity = [json.loads(r.stdout.strip().splitlines()[-1])["perplexity"] for r in (from_dataset, from_file)]
    assert perplexity[0] == perplexity[1] > 1
    bad = run("eval", tmp_path / "no-model", "--dataset", f"{multi}:gamma")
    assert bad.exit_code == 2
    assert bad.stderr.strip() == f"error: dataset {multi!r} has no config 'gamma'; configs: alpha, beta"
