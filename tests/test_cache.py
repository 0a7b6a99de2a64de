"""The calibration cache: a cached run equals an uncached one byte for byte, skips the model's forward passes, is
keyed by everything the statistics depend on, and never uses a damaged entry."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from rankwise.calibrate import collect_stats
from rankwise.calibrate.cache import StatsCache, pack, unpack
from rankwise.compression import compress_, compress_checkpoint
from rankwise.methods import config_class
from rankwise.methods.svd_llm import SVDLLMConfig
from rankwise.targets import find_targets
from tests.tiny_models import budget, structured_methods, svd_family, tiny_model, tiny_tokens

OPTIONS = [("uniform", False), ("loss", False), ("loss", True)]  # (allocation, sequential)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _count_block_calls(model):
    """Count forward calls of the first decoder block (a cached non-sequential run makes none)."""
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("method,allocation,sequential",
                         [(m, *o) for m in svd_family() for o in OPTIONS] + [(m, *OPTIONS[0]) for m in
                                                                             structured_methods()])
def test_cached_run_equals_uncached_and_skips_the_passes(tmp_path, method, allocation, sequential):
    tokens = tiny_tokens(8)
    make = config_class(method)
    reference = tiny_model("llama")
    compress_(reference, make(**budget(method, 0.3), allocation=allocation, sequential=sequential), tokens,
              progress=False)
    first = tiny_model("llama")
    compress_(first, make(**budget(method, 0.5), allocation=allocation, sequential=sequential), tokens,
              progress=False, cache=tmp_path)
    entries = [p for p in tmp_path.iterdir() if p.name != "weights" and not p.name.startswith(".")]
    cacheable = not sequential or allocation == "loss"
    assert len(entries) == (1 if cacheable else 0)
    second = tiny_model("llama")
    calls = _count_block_calls(second)
    report = compress_(second, make(**budget(method, 0.3), allocation=allocation, sequential=sequential), tokens,
                       progress=False, cache=tmp_path)
    expected, got = _state(reference), _state(second)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    if cacheable:
        assert any("read from the cache" in note for note in report.notes)
    if cacheable and not sequential:
        assert not calls  # no forward pass through the model at all


@pytest.mark.parametrize("allocation", ["welore"])
def test_a_run_that_kept_layers_dense_caches_them_for_a_later_ratio(tmp_path, allocation):
    """At ratio 0.05 under welore some layers stay dense (uniform never keeps one dense: every matrix gets the same
    share); a later run that compresses them must find their statistics in the entry."""
    tokens = tiny_tokens(8)
    first = tiny_model("llama")
    report = compress_(first, SVDLLMConfig(ratio=0.05, allocation=allocation), tokens, progress=False,
                       cache=tmp_path)
    assert any("kept dense" in note for note in report.notes)
    reference = tiny_model("llama")
    compress_(reference, SVDLLMConfig(ratio=0.5, allocation=allocation), tokens, progress=False)
    second = tiny_model("llama")
    report = compress_(second, SVDLLMConfig(ratio=0.5, allocation=allocation), tokens, progress=False,
                       cache=tmp_path)
    assert any("read from the cache" in note for note in report.notes)
    for key, value in _state(reference).items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_model_with_a_scalar_parameter_is_hashed():
    from rankwise.calibrate.cache import tensor_digest

    assert tensor_digest([("s", torch.tensor(1.5))]) != tensor_digest([("s", torch.tensor(2.5))])


def test_key_changes_with_weights_tokens_and_kinds(tmp_path):
    tokens = tiny_tokens(8)
    compress_(tiny_model("llama"), SVDLLMConfig(ratio=0.3), tokens, progress=False, cache=tmp_path)
    other = tiny_model("llama")
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    for model, data, config in [(other, tokens, SVDLLMConfig(ratio=0.3)),
                                (tiny_model("llama"), tiny_tokens(8, seed=1), SVDLLMConfig(ratio=0.3)),
                                (tiny_model("llama"), tokens, config_class("asvd")(ratio=0.3))]:
        report = compress_(model, config, data, progress=False, cache=tmp_path)
        assert not any("read from the cache" in note for note in report.notes)
    entries = [p for p in tmp_path.iterdir() if p.name != "weights" and not p.name.startswith(".")]
    assert len(entries) == 4


def _only_entry(root):
    (entry,) = [p for p in root.iterdir() if p.name != "weights" and not p.name.startswith(".")]
    return entry


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "missing_file", "foreign_manifest",
                                    "unlisted_part", "garbled_manifest"])
def test_damaged_entry_is_detected_and_recomputed(tmp_path, damage):
    tokens = tiny_tokens(8)
    config = SVDLLMConfig(ratio=0.3)
    reference = tiny_model("llama")
    compress_(reference, config, tokens, progress=False, cache=tmp_path)
    entry = _only_entry(tmp_path)
    block = entry / "block-1.safetensors"
    if damage == "truncate":
        block.write_bytes(block.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(block.read_bytes())
        data[-9] ^= 0xFF
        block.write_bytes(bytes(data))
    elif damage == "no_manifest":
        (entry / "manifest.json").unlink()
    elif damage == "missing_file":
        block.unlink()
    elif damage == "garbled_manifest":
        (entry / "manifest.json").write_text('{"key": 1, "files": {"a": 3}}')
    else:
        manifest = json.loads((entry / "manifest.json").read_text())
        if damage == "unlisted_part":
            del manifest["files"]["block-1.safetensors"]
            block.unlink()
        else:
            manifest["key"]["tokens"] = "0" * 64
        (entry / "manifest.json").write_text(json.dumps(manifest))
    model = tiny_model("llama")
    calls = _count_block_calls(model)
    report = compress_(model, config, tokens, progress=False, cache=tmp_path)
    assert any("damaged" in note for note in report.notes)
    assert not any("read from the cache" in note for note in report.notes)
    assert calls  # recomputed
    for key, value in _state(reference).items():
        assert torch.equal(value, model.state_dict()[key]), key
    # the entry was rebuilt whole and is used next time
    again = compress_(tiny_model("llama"), config, tokens, progress=False, cache=tmp_path)
    assert any("read from the cache" in note for note in again.notes)


@pytest.mark.parametrize("where", ["scratch", "write"])
def test_unwritable_cache_still_compresses_with_a_note(tmp_path, monkeypatch, where):
    """A read-only or full cache directory (simulated: this suite may run as root, who can write anywhere)."""
    import errno

    import rankwise.calibrate.cache as cache

    def refuse(*_args, **_kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(cache, "make_scratch_dir" if where == "scratch" else "save_file", refuse)
    root = tmp_path / "cache"
    model = tiny_model("llama")
    report = compress_(model, SVDLLMConfig(ratio=0.3), tiny_tokens(8), progress=False, cache=root)
    monkeypatch.undo()
    assert any("not cached" in note and "read-only" in note.lower() for note in report.notes)
    reference = tiny_model("llama")
    compress_(reference, SVDLLMConfig(ratio=0.3), tiny_tokens(8), progress=False)
    for key, value in _state(reference).items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert [p for p in root.iterdir() if p.name != "weights"] == []


def test_a_failed_run_leaves_no_entry(tmp_path, monkeypatch):
    import rankwise.compression.pipeline as pipeline

    def boom(*_args, **_kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(pipeline, "factorise_group", boom)
    with pytest.raises(RuntimeError, match="killed"):
        compress_(tiny_model("llama"), SVDLLMConfig(ratio=0.3), tiny_tokens(8), progress=False, cache=tmp_path)
    assert [p for p in tmp_path.iterdir() if p.name != "weights"] == []


def test_streamed_checkpoint_uses_the_cache(tmp_path, tiny_dir):
    tokens = tiny_tokens(8)
    config = config_class("svd_llm")(ratio=0.3, allocation="loss")
    compress_checkpoint(tiny_dir, config, tokens, tmp_path / "a", progress=False, cache=tmp_path / "cache")
    report = compress_checkpoint(tiny_dir, config.__class__(ratio=0.5, allocation="loss"), tokens, tmp_path / "b",
                                 progress=False, cache=tmp_path / "cache")
    assert any("read from the cache" in note for note in report.notes)


def _edit_in_place_keeping_times(file: Path, tensor: str) -> None:
    """Halve one value of ``tensor`` inside the safetensors ``file``, writing through the same inode, then put the
    size and modification time back as they were: what a time-preserving copy or sync tool leaves."""
    import struct

    before = file.stat()
    raw = file.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    start = 8 + header_len + header[tensor]["data_offsets"][0]
    assert header[tensor]["dtype"] == "F32"
    (value,) = struct.unpack("<f", raw[start:start + 4])
    with file.open("r+b") as fh:
        fh.seek(start)
        fh.write(struct.pack("<f", value / 2 if value else 1.0))
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = file.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)


@pytest.mark.parametrize("tensor", ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                                    "model.norm.weight", "model.embed_tokens.weight"])
def test_in_place_edit_with_times_kept_is_never_a_stale_hit(tmp_path, tiny_dir, tensor):
    """The statistics of a checkpoint edited in place (same path, size, modification time and inode) are not
    read from the cache, wherever the edit is (a target, a block's last layer, outside the blocks): the output
    equals a run without the cache on the edited weights."""
    from safetensors.torch import load_file

    work = tmp_path / "model"
    shutil.copytree(tiny_dir, work)
    tokens = tiny_tokens(8)
    config = config_class("svd_llm")(ratio=0.3, allocation="loss")
    compress_checkpoint(work, config, tokens, tmp_path / "first", progress=False, cache=tmp_path / "cache")
    _edit_in_place_keeping_times(work / "model.safetensors", tensor)
    report = compress_checkpoint(work, config, tokens, tmp_path / "cached", progress=False, cache=tmp_path / "cache")
    assert not any("read from the cache" in note for note in report.notes)
    compress_checkpoint(work, config, tokens, tmp_path / "fresh", progress=False)
    cached = load_file(tmp_path / "cached" / "model.safetensors")
    fresh = load_file(tmp_path / "fresh" / "model.safetensors")
    first = load_file(tmp_path / "first" / "model.safetensors")
    assert cached.keys() == fresh.keys()
    assert all(torch.equal(cached[k], fresh[k]) for k in fresh)
    assert not all(torch.equal(first[k], fresh[k]) for k in fresh)  # the edit did change the result
    assert not any(p.name.startswith("weights") for p in (tmp_path / "cache").iterdir())  # nothing kept by file


def test_pack_roundtrip_keeps_shared_groups():
    model = tiny_model("llama")
    stats = collect_stats(model, tiny_tokens(4), find_targets(model), kinds=("xxt", "abs", "fisher", "gout"))
    tensors, meta = pack(stats)
    back = unpack(tensors, meta)
    assert back.keys() == stats.keys()
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert back[q] is back[k] and stats[q] is stats[k]
    for name, s in stats.items():
        b = back[name]
        assert (b.n, b.count, b.grad_out, b.grad_tokens) == (s.n, s.count, s.grad_out, s.grad_tokens)
        assert torch.equal(b.xxt, s.xxt) and torch.equal(b.abs_sum, s.abs_sum)
        assert b.fisher_out.keys() == s.fisher_out.keys()
        assert all(torch.equal(b.fisher_out[n], s.fisher_out[n]) for n in s.fisher_out)


def test_entry_names_differ_by_key(tmp_path):
    cache = StatsCache(tmp_path)
    assert cache.open([], a=1).name != cache.open([], a=2).name
    assert cache.open([], a=1).name == cache.open([], a=1).name
    assert not cache.open([], a=1).hit
