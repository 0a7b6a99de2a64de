"""The calibration cache's size cap (least recently used entries evicted, never the run's own nor one another run
reads), and ``rankwise cache list`` / ``rankwise cache clear``."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import rankwise.calibrate.cache_store as cache_mod
from rankwise.calibrate.cache import StatsCache
from rankwise.calibrate.cache_store import MAX_GB_ENV, USED, evict, format_bytes, list_entries, remove_entry
from rankwise.cli import app
from rankwise.compression import compress_, compress_checkpoint
from rankwise.io.integrity import content_identity
from rankwise.methods.svd_llm import SVDLLMConfig
from tests.tiny_models import tiny_model, tiny_tokens

runner = CliRunner()
TARGETS = [lambda n, _m: "self_attn" in n, lambda n, _m: "mlp" in n, None]  # attention, MLP, both


def _names(root: Path) -> set[str]:
    return {e.name for e in list_entries(root)}


def _disk(root: Path) -> int:
    """Every file under ``root``: entries, scratch, anything."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _compress(root: Path, seed: int, ratio: float = 0.3, targets=None):
    """One compression of the tiny model, calibrated on tokens of ``seed`` (a new cache key for each seed)."""
    return compress_(tiny_model("llama"), SVDLLMConfig(ratio=ratio), tiny_tokens(8, seed=seed), filter_fn=targets,
                     progress=False, cache=root)


def _new_entry(root: Path, seed: int, **kwargs) -> str:
    before = _names(root)
    _compress(root, seed, **kwargs)
    (name,) = _names(root) - before
    return name


def _age(root: Path, name: str, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(root / name / USED, (when, when))


def _set_cap(monkeypatch, max_bytes: float) -> None:
    monkeypatch.setenv(MAX_GB_ENV, repr(max_bytes / 1e9))


def _largest_entry(tmp_path: Path) -> int:
    probe = tmp_path / "probe"
    _compress(probe, 99)  # both targets: the largest entry
    (entry,) = list_entries(probe)
    assert entry.bytes == _disk(probe)
    return entry.bytes


def test_ten_runs_stay_under_the_cap_and_evict_the_oldest_first(tmp_path, monkeypatch):
    cap = 2.5 * _largest_entry(tmp_path)
    _set_cap(monkeypatch, cap)
    root = tmp_path / "cache"
    created = []
    for i in range(10):
        created.append(_new_entry(root, seed=i, ratio=0.1 + 0.05 * i, targets=TARGETS[i % 3]))
        entries = list_entries(root)
        assert sum(e.bytes for e in entries) <= cap
        assert _disk(root) <= cap  # no scratch left behind either
        kept = [e.name for e in entries]  # least recently used first
        assert kept == created[-len(kept):]  # the newest runs' entries, in order: the oldest went first
        assert len(kept) >= min(i + 1, 2)  # the cap holds two of the largest: nothing was evicted early
    assert len(kept) < 10


@pytest.mark.parametrize("hit", [True, False])
def test_a_hit_makes_an_entry_recently_used(tmp_path, monkeypatch, hit):
    """A is older than B; a hit on A makes B the least recently used, so B goes when C arrives (A without it)."""
    _set_cap(monkeypatch, 2.5 * _largest_entry(tmp_path))
    root = tmp_path / "cache"
    a, b = _new_entry(root, 0), _new_entry(root, 1)
    _age(root, a, 1000)
    _age(root, b, 500)
    if hit:
        report = _compress(root, 0, ratio=0.5)
        assert any("read from the cache" in note for note in report.notes)
        assert time.time() - (root / a / USED).stat().st_mtime < 60
    c = _new_entry(root, 2)
    assert _names(root) == ({a, c} if hit else {b, c})


def test_an_entry_larger_than_the_cap_is_kept_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setenv(MAX_GB_ENV, "1e-9")  # one byte
    root = tmp_path / "cache"
    first = _new_entry(root, 0)
    report = _compress(root, 1)
    (entry,) = list_entries(root)
    assert entry.name != first  # the older entry was evicted, this run's kept
    (note,) = [n for n in report.notes if "cap" in n]
    assert "\n" not in note and MAX_GB_ENV in note
    assert "1 B" in note and format_bytes(entry.bytes) in note  # both sizes named


@pytest.mark.parametrize("value", ["abc", "0", "-2", "nan", "4GB"])
def test_a_bad_cap_is_a_one_line_error(tmp_path, monkeypatch, value):
    monkeypatch.setenv(MAX_GB_ENV, value)
    with pytest.raises(ValueError, match=MAX_GB_ENV) as err:
        StatsCache(tmp_path)
    assert "\n" not in str(err.value) and "positive number of gigabytes" in str(err.value)
    with pytest.raises(ValueError, match=MAX_GB_ENV):
        _compress(tmp_path, 0)  # refused before any work
    assert not list_entries(tmp_path)
    result = runner.invoke(app, ["cache", "list"], env={"RANKWISE_CALIBRATION_CACHE": str(tmp_path)})
    assert result.exit_code == 2 and f"error: {MAX_GB_ENV}=" in result.output
    with pytest.raises(ValueError, match="max_bytes must be a positive"):
        StatsCache(tmp_path, max_bytes=0)


def test_cap_default_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(MAX_GB_ENV, raising=False)
    assert StatsCache(tmp_path).max_bytes == cache_mod.DEFAULT_MAX_GB * 1e9 == 4e9
    monkeypatch.setenv(MAX_GB_ENV, "0.5")
    assert StatsCache(tmp_path).max_bytes == 0.5e9
    assert StatsCache(tmp_path, max_bytes=123).max_bytes == 123  # the argument wins
    monkeypatch.setenv(MAX_GB_ENV, "inf")
    assert StatsCache(tmp_path).max_bytes == float("inf")


def _commit(cache: StatsCache, key: int, size: int = 4000):
    entry = cache.open(["p"], k=key)
    entry.write("p", {"x": torch.zeros(size // 4)})
    entry.commit()
    return entry


def test_an_entry_another_run_reads_is_not_evicted(tmp_path):
    first = _commit(StatsCache(tmp_path), 1)
    size = list_entries(tmp_path)[0].bytes
    reader = StatsCache(tmp_path).open(["p"], k=1)  # another run, reading entry 1 (the least recently used)
    assert reader.hit
    _age(tmp_path, first.name, 1000)
    small = StatsCache(tmp_path, max_bytes=1.5 * size)
    second = _commit(small, 2)
    assert _names(tmp_path) == {first.name, second.name}
    assert "in use" in second.note and "over its cap" in second.note
    reader.read("p")  # still readable
    reader.release()  # that run is done
    third = _commit(StatsCache(tmp_path, max_bytes=1.5 * size), 3)  # a later run
    assert _names(tmp_path) == {third.name}  # entry 1 (the oldest) went, then entry 2: one fits
    assert third.note is None


def test_only_complete_entries_are_evicted_and_a_vanished_one_is_tolerated(tmp_path, monkeypatch):
    cache = StatsCache(tmp_path)
    old, new = _commit(cache, 1), _commit(cache, 2)
    _age(tmp_path, old.name, 1000)
    scratch = tmp_path / f".{'a' * 32}.tmp-{os.getpid()}-00000000-x"  # a live run's entry being written
    scratch.mkdir()
    (scratch / "block-0.safetensors").write_bytes(b"0" * 100_000)
    incomplete = tmp_path / ("b" * 32)  # no manifest: not an entry
    incomplete.mkdir()
    (incomplete / "block-0.safetensors").write_bytes(b"0" * 100_000)
    stale = list_entries(tmp_path)
    assert [e.name for e in stale] == [old.name, new.name]
    shutil.rmtree(old.path)  # another run evicted it after we listed
    monkeypatch.setattr(cache_mod, "list_entries", lambda _root: stale)
    removed = evict(tmp_path, 1, keep=())
    assert [e.name for e in removed] == [old.name, new.name]
    assert scratch.is_dir() and incomplete.is_dir() and not new.path.exists()
    assert remove_entry(old.path)  # gone already: nothing to do


# ``rankwise cache list`` / ``clear`` on two checkpoints compressed from disk (their identity is their content)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    paths = []
    for seed in (0, 1):
        path = root / f"llama-{seed}"
        tiny_model("llama", seed=seed).save_pretrained(path)
        paths.append(path)
    return paths


def _cli(cache: Path, *args: str):
    return runner.invoke(app, ["cache", *map(str, args)], env={"RANKWISE_CALIBRATION_CACHE": str(cache),
                                                                MAX_GB_ENV: "1"})


def _fill(tmp_path: Path, models: list[Path]) -> Path:
    """Two entries of the first model (two calibrations), one of the second."""
    cache = tmp_path / "cache"
    for i, (model, seed) in enumerate([(models[0], 0), (models[0], 1), (models[1], 0)]):
        compress_checkpoint(model, SVDLLMConfig(ratio=0.3), tiny_tokens(8, seed=seed), tmp_path / f"out-{i}",
                            progress=False, cache=cache)
    return cache


def test_list_json_shows_every_entry_and_sizes_sum_to_the_directory(tmp_path, two_models):
    cache = _fill(tmp_path, two_models)
    result = _cli(cache, "list", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert len(data["entries"]) == 3
    assert sum(e["bytes"] for e in data["entries"]) == data["total_bytes"] == _disk(cache)
    identities = [content_identity(m)[0] for m in two_models]
    assert sorted(e["model"] for e in data["entries"]) == sorted([identities[0]] * 2 + [identities[1]])
    assert data["max_bytes"] == 1e9 and all(e["kinds"] == ["xxt"] for e in data["entries"])
    text = _cli(cache, "list")
    assert text.exit_code == 0, text.output
    assert all(i[:12] in text.output for i in identities)
    assert f"of a cap of 1.0 GB ({data['total_bytes'] / 1e9:.0%})" in text.output


def test_clear_by_model_directory_or_prefix_then_all(tmp_path, two_models):
    cache = _fill(tmp_path, two_models)
    first, second = (content_identity(m)[0] for m in two_models)
    result = _cli(cache, "clear", "--model", two_models[0])
    assert result.exit_code == 0, result.output
    assert f"removed 2 entries of model {first[:12]}" in result.output and "1 entry left" in result.output
    assert [e.model for e in list_entries(cache)] == [second]
    result = _cli(cache, "clear", "--model", two_models[0])  # nothing of it left
    assert result.exit_code == 2
    assert "no calibration cache entry holds model" in result.output and "has 1 entry" in result.output
    result = _cli(cache, "clear", "--model", "not-a-model")
    assert result.exit_code == 2 and "neither a model directory nor a hex prefix" in result.output
    result = _cli(cache, "clear", "--model", second[:8].upper())
    assert result.exit_code == 0, result.output
    assert list_entries(cache) == [] and _disk(cache) == 0
    result = _cli(cache, "clear")
    assert result.exit_code == 0 and "is empty; nothing to clear" in result.output
    assert "is empty" in _cli(cache, "list").output


def test_clear_all_says_what_it_freed(tmp_path, two_models):
    cache = _fill(tmp_path, two_models)
    total = _disk(cache)
    result = _cli(cache, "clear", "--all")
    assert result.exit_code == 0, result.output
    assert f"removed 3 entries from {cache}, freed {total / 1e6:,.1f} MB; 0 entries left" in result.output
    assert list_entries(cache) == [] and _disk(cache) == 0
    assert _cli(cache, "clear", "--all", "--model", "ab").exit_code == 2


def test_folders_rankwise_did_not_write_are_never_evicted_or_cleared(tmp_path, monkeypatch):
    """A cache root pointed at a shared folder: a hex-named folder with a manifest that is not a calibration's is
    not an entry, so neither the cap nor ``cache clear`` removes it."""
    from typer.testing import CliRunner

    for name, manifest in (("c" * 32, "{}"), ("d" * 32, "not json"), ("e" * 32, '{"key": {}, "files": {}}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(manifest)
        (tmp_path / name / "data.bin").write_bytes(b"0" * 1000)
    assert list_entries(tmp_path) == []
    assert evict(tmp_path, 1, keep=()) == []
    monkeypatch.setenv("RANKWISE_CALIBRATION_CACHE", str(tmp_path))
    CliRunner().invoke(app, ["cache", "clear"])
    assert all((tmp_path / n / "data.bin").exists() for n in ("c" * 32, "d" * 32, "e" * 32))
