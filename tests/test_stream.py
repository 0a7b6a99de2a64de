"""Block streaming: a checkpoint compressed block by block from disk equals the in-memory result, for every method
and option; spilling activations changes nothing; bf16 stays bf16; broken checkpoints fail cleanly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import rankwise
from rankwise.calibrate import collect_stats
from rankwise.compression import compress_, compress_checkpoint
from rankwise.methods import config_class
from rankwise.methods.asvd import ASVDConfig
from rankwise.methods.basis_sharing import BasisSharingConfig
from rankwise.methods.fwsvd import FWSVDConfig
from rankwise.methods.svd_llm import SVDLLMConfig
from rankwise.nn import LowRankLinear, linear_weight
from rankwise.targets import find_targets
from tests.tiny_models import budget, structured_methods, svd_family, tiny_model, tiny_tokenizer, tiny_tokens

OPTIONS = [  # (allocation, sequential, update_u)
    ("uniform", False, False), ("loss", False, False), ("welore", True, False), ("loss", True, True),
]


def _checkpoint(path, arch="llama", dtype=torch.float32, shard=None):
    model = tiny_model(arch).to(dtype)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    tiny_tokenizer().save_pretrained(path)
    return path


def _logits(model, dtype=torch.float32):
    with torch.no_grad():
        return model(tiny_tokens(2, seed=5)).logits.to(dtype)


@pytest.mark.parametrize("method,allocation,sequential,update_u",
                         [(m, *o) for m in svd_family() for o in OPTIONS]
                         + [(m, "uniform" if config_class(m).structured else "loss", False, False)
                            for m in structured_methods()])
def test_streamed_checkpoint_equals_in_memory(tmp_path, method, allocation, sequential, update_u):
    config = config_class(method)(**budget(method), allocation=allocation, sequential=sequential, update_u=update_u)
    tokens = tiny_tokens(8)
    memory = tiny_model("llama")
    ref_report = compress_(memory, config, tokens, progress=False)
    src = _checkpoint(tmp_path / "src", shard="60KB")  # several input shards: the index path
    assert (src / "model.safetensors.index.json").exists()
    report = compress_checkpoint(src, config, tokens, tmp_path / "out", progress=False)
    assert [layer.rank for layer in report.layers] == [layer.rank for layer in ref_report.layers]
    assert report.params_total_after == ref_report.params_total_after
    loaded = rankwise.load(tmp_path / "out").model
    torch.testing.assert_close(_logits(loaded), _logits(memory), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sequential", [True, False])
def test_spilling_every_activation_to_disk_changes_nothing(tmp_path, sequential):
    config = SVDLLMConfig(ratio=0.4, allocation="loss", sequential=sequential, update_u=sequential)
    outs = []
    for mb in (1024, 0):  # 0: every block-boundary activation goes through the disk
        model = tiny_model("gpt2")
        compress_(model, config, tiny_tokens(8), progress=False, activation_mb=mb, offload_dir=tmp_path / "spill")
        outs.append(_logits(model))
    assert torch.equal(outs[0], outs[1])
    assert not any((tmp_path / "spill").iterdir())  # the spill files are removed


@pytest.mark.parametrize("config", [
    SVDLLMConfig(ratio=0.4, allocation="loss"), FWSVDConfig(ratio=0.4),
    ASVDConfig(ratio=0.4, allocation="loss"),  # the fits' "abs" statistics kept from the scoring pass too
    SVDLLMConfig(ratio=0.4, allocation="drank"),  # a scoring pass without gradients
    BasisSharingConfig(ratio=0.4, allocation="loss"),  # a cross-block fit
], ids=["svd_llm+loss", "fwsvd", "asvd+loss", "svd_llm+drank", "basis_sharing+loss"])
def test_streamed_gradient_pass_equals_full_model_backward(config):
    """Scores, Fisher and the fits' input statistics from the block-by-block scoring pass equal those of one
    full-model backward (the streamed runs take the fits' statistics from the scoring pass)."""
    tokens = tiny_tokens(8)
    dense = tiny_model("opt")
    stats = collect_stats(dense, tokens, find_targets(dense), kinds=("xxt", "abs", "gout", "fisher"))
    streamed, reference = tiny_model("opt"), tiny_model("opt")
    report = compress_(streamed, config, tokens, progress=False)
    assert any("taken from the scoring pass" in note for note in report.notes)
    compress_(reference, config, tokens, stats=stats, progress=False)  # statistics of the full backward
    torch.testing.assert_close(_logits(streamed), _logits(reference), rtol=1e-4, atol=1e-5)


def test_a_spilled_put_goes_to_disk_whatever_the_budget(tmp_path):
    from rankwise.stream import ActivationStore

    x = torch.randn(8, 8, dtype=torch.float64)
    with ActivationStore(2**20, tmp_path) as store:
        store.put("kept", x, spill=True)
        store.put("hot", x)
        assert store.bytes_in_memory == x.numel() * 8 and store.bytes_spilled == x.numel() * 8
        assert torch.equal(store.get("kept"), x) and torch.equal(store.get("hot"), x)


def test_kept_statistics_give_the_bytes_of_the_fits_own_pass(monkeypatch):
    """The model fitted from the scoring pass's kept statistics equals, bit for bit, the one fitted from the dense
    pass the fits run without them (no free disk)."""
    from rankwise.stream import ActivationStore

    states = []
    for free in (None, 0):
        if free is not None:
            monkeypatch.setattr(ActivationStore, "free_disk_bytes", lambda self: 0)
        model = tiny_model("llama")
        report = compress_(model, SVDLLMConfig(ratio=0.4, allocation="loss", output_weighted=True), tiny_tokens(8),
                           progress=False)
        assert any("taken from the scoring pass" in note for note in report.notes) == (free is None)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("samples,free,calls", [(None, None, 2 * 4), (13, None, 2 * 4), (4, None, 2 * 1 + 4),
                                                (None, 0, 2 * 4 + 4)])
def test_a_non_sequential_fit_reuses_the_scoring_pass_statistics(monkeypatch, samples, free, calls):
    """After a scoring pass over every window, the dense blocks run twice per batch (the pass's forward, then its
    recompute for the backward), not a third time for the fits' statistics (also when ``score_samples`` rounds up to
    every batch); narrowed by ``score_samples`` to 4 of the 16 windows, or without the free disk to keep the
    statistics, the fits collect their own over all 16 and the report says why."""
    from rankwise.stream import ActivationStore

    if free is not None:
        monkeypatch.setattr(ActivationStore, "free_disk_bytes", lambda self: free)
    tokens = tiny_tokens(16)  # 4 batches of 4 windows
    model = tiny_model("llama")
    seen = []
    handle = model.model.layers[1].register_forward_hook(lambda *_: seen.append(1))
    try:
        report = compress_(model, SVDLLMConfig(ratio=0.4, allocation="loss", score_samples=samples), tokens,
                           batch_size=4, progress=False)
    finally:
        handle.remove()
    assert len(seen) == calls
    assert any("needs twice that free on the offload disk" in note for note in report.notes) == (free == 0)


def test_bfloat16_checkpoint_stays_bfloat16(tmp_path):
    src = _checkpoint(tmp_path / "src", dtype=torch.bfloat16)
    report = compress_checkpoint(src, SVDLLMConfig(ratio=0.3), tiny_tokens(8), tmp_path / "out", progress=False)
    shards = [load_file(p) for p in sorted((tmp_path / "out").glob("*.safetensors"))]
    assert {t.dtype for s in shards for t in s.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "rankwise.json").read_text())["dtype"] == "bfloat16"
    loaded = rankwise.load(tmp_path / "out").model
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    memory = tiny_model("llama").to(torch.bfloat16)
    ref = compress_(memory, SVDLLMConfig(ratio=0.3), tiny_tokens(8), progress=False)
    assert [layer.rank for layer in report.layers] == [layer.rank for layer in ref.layers]
    torch.testing.assert_close(_logits(loaded), _logits(memory), rtol=0.05, atol=0.05)


def test_dtype_option_converts_a_float32_checkpoint(tmp_path):
    src = _checkpoint(tmp_path / "src")
    compress_checkpoint(src, SVDLLMConfig(ratio=0.3), tiny_tokens(4), tmp_path / "out", dtype="bfloat16",
                        progress=False)
    assert {p.dtype for p in rankwise.load(tmp_path / "out").model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16, fp32, bf16, fp16, "
                                         "half, got 'int8'"):
        compress_checkpoint(src, SVDLLMConfig(ratio=0.3), tiny_tokens(4), tmp_path / "o2", dtype="int8")


def test_streamed_dense_export_is_a_plain_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    src = _checkpoint(tmp_path / "src", arch="gpt2")
    compress_checkpoint(src, SVDLLMConfig(ratio=0.3), tiny_tokens(4), tmp_path / "f", progress=False)
    compress_checkpoint(src, SVDLLMConfig(ratio=0.3), tiny_tokens(4), tmp_path / "d", export="dense",
                        progress=False)
    assert not (tmp_path / "d" / "rankwise.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    torch.testing.assert_close(_logits(plain), _logits(rankwise.load(tmp_path / "f").model), rtol=1e-4, atol=1e-5)


def test_streaming_holds_one_block_at_a_time(tmp_path, monkeypatch):
    """While a block is worked on, every other block's parameters are on the meta device (not in memory)."""
    from rankwise.stream import source as source_module

    seen = []
    original = source_module.CheckpointSource.load

    def spy(self, i):
        block = original(self, i)
        real = [j for j, b in enumerate(self.blocks) if any(p.device.type != "meta" for p in b.parameters())]
        seen.append(real)
        return block

    monkeypatch.setattr(source_module.CheckpointSource, "load", spy)
    compress_checkpoint(_checkpoint(tmp_path / "src"), SVDLLMConfig(ratio=0.3, allocation="loss"), tiny_tokens(4),
                        tmp_path / "out", progress=False)
    assert seen and all(len(real) == 1 for real in seen)


def _break(path, how):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    if how == "missing":
        (path / shard).unlink()
    elif how == "truncated":
        data = (path / shard).read_bytes()
        (path / shard).write_bytes(data[: len(data) // 2])
    elif how == "index":
        index["weight_map"][next(iter(index["weight_map"]))] = "nowhere.safetensors"
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
        shard = "nowhere.safetensors"
    elif how == "garbage":
        (path / shard).write_bytes(b"\x00" * 7)
    return shard


@pytest.mark.parametrize("how,message", [
    ("missing", "is missing"), ("truncated", "is truncated"), ("index", "nowhere.safetensors is missing"),
    ("garbage", "truncated or not a safetensors file"),
])
def test_broken_checkpoint_is_a_one_line_error_and_writes_nothing(tmp_path, how, message):
    src = _checkpoint(tmp_path / "src", shard="60KB")
    shard = _break(src, how)
    with pytest.raises(ValueError, match=message) as info:
        compress_checkpoint(src, SVDLLMConfig(ratio=0.3), tiny_tokens(4), tmp_path / "out", progress=False)
    assert shard in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_unwritable_offload_dir(tmp_path):
    (tmp_path / "file").write_text("not a directory")  # unwritable as a directory, even for root
    with pytest.raises(ValueError, match=r"offload directory .* is not writable"):
        compress_checkpoint(_checkpoint(tmp_path / "src"), SVDLLMConfig(ratio=0.3), tiny_tokens(4), tmp_path / "o",
                            offload_dir=tmp_path / "file" / "x", progress=False)
    assert not (tmp_path / "o").exists()


def test_full_disk_while_spilling_is_a_clean_error(tmp_path, monkeypatch):
    import errno

    from rankwise.stream import store

    def full(path, _tensor):
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "write_raw", full)
    with pytest.raises(ValueError, match=r"cannot spill activations to .*: the disk is full"):
        compress_checkpoint(_checkpoint(tmp_path / "src"), SVDLLMConfig(ratio=0.3, sequential=True), tiny_tokens(4),
                            tmp_path / "out", activation_mb=0, offload_dir=tmp_path / "spill", progress=False)
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_lowrank_layers_in_streamed_output_match_manifest(tmp_path):
    compress_checkpoint(_checkpoint(tmp_path / "src"), SVDLLMConfig(ratio=0.3), tiny_tokens(4), tmp_path / "out",
                        progress=False)
    modules = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["modules"]
    loaded = rankwise.load(tmp_path / "out").model
    lowrank = {n: m.rank for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    assert lowrank == {n: spec["rank"] for n, spec in modules.items()} and len(lowrank) == 14
    assert all(linear_weight(m).shape for m in find_targets(loaded).values())


@pytest.mark.parametrize("export", ["factored", "dense"])
def test_streamed_perplexity_equals_in_memory(tmp_path, export):
    from rankwise.eval import perplexity
    from rankwise.eval.stream import streamed_perplexity

    src = _checkpoint(tmp_path / "src", arch="opt")
    compress_checkpoint(src, SVDLLMConfig(ratio=0.3), tiny_tokens(4), tmp_path / "out", export=export,
                        progress=False)
    windows = tiny_tokens(6, seed=3)
    loaded = rankwise.load_model(tmp_path / "out").model
    ppl, source = streamed_perplexity(tmp_path / "out", windows, batch_size=4, activation_mb=0)
    assert ppl == pytest.approx(perplexity(loaded, windows, batch_size=4), rel=1e-5)
    assert sum(p.numel() for p in source.model.parameters()) == sum(p.numel() for p in loaded.parameters())


def test_cli_eval_stream_matches_plain_eval(tmp_path):
    from typer.testing import CliRunner

    from rankwise.cli import app

    compress_checkpoint(_checkpoint(tmp_path / "src"), SVDLLMConfig(ratio=0.3), tiny_tokens(4), tmp_path / "out",
                        tokenizer=tiny_tokenizer(), progress=False)
    results = {}
    for flag in ("--stream", "--no-stream"):
        res = CliRunner().invoke(app, ["eval", str(tmp_path / "out"), "--json", "--seq-len", "16", "--eval-samples",
                                       "4", flag])
        assert res.exit_code == 0, res.output
        results[flag] = json.loads(res.output.strip().splitlines()[-1])
    assert results["--stream"]["perplexity"] == pytest.approx(results["--no-stream"]["perplexity"], rel=1e-5)
    assert results["--stream"]["params_total"] == results["--no-stream"]["params_total"]
    assert results["--stream"]["tokens_per_s"] is None
