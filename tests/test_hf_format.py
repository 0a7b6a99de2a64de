"""The transformers-native format: plain ``from_pretrained`` after ``import rankwise``, refusal without it,
``save_pretrained`` round trips, bytes (dtype, tied tensors once, shards by size) and CLI/library byte identity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import rankwise
from rankwise.compression import compress_, compress_checkpoint
from rankwise.io import load, save
from rankwise.methods.svd import SVDConfig
from rankwise.methods.svd_llm import SVDLLMConfig
from rankwise.nn import LowRankLinear
from tests.tiny_models import tiny_model, tiny_tokenizer, tiny_tokens

X = tiny_tokens(2, 16, seed=7)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


def _compressed(arch: str = "llama"):
    model = tiny_model(arch)
    report = compress_(model, SVDLLMConfig(ratio=0.3), tiny_tokens(4), progress=False)
    return model, report


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_from_pretrained_equals_rankwise_load(tmp_path, arch):
    model, report = _compressed(arch)
    save(model, tmp_path / "m", report=report)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert sum(isinstance(m, LowRankLinear) for m in plain.modules()) == len(report.layers)
    assert torch.equal(_logits(plain), _logits(load(tmp_path / "m")))
    assert torch.equal(_logits(plain), _logits(model))
    # transformers' own dtype handling applies, and the layers stay ordinary float tensors
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    half.float()


def test_without_rankwise_transformers_refuses_the_directory(tmp_path):
    model, _ = _compressed()
    save(model, tmp_path / "m")
    code = ("from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})\n"
            "print('LOADED')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "sys.modules" not in code and "rankwise" not in run.stdout
    assert run.returncode != 0 and "LOADED" not in run.stdout
    assert "mismatch" in run.stderr


def test_save_pretrained_of_a_loaded_model_loads_again(tmp_path):
    model, _ = _compressed()
    save(model, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    loaded.save_pretrained(tmp_path / "again")
    assert not (tmp_path / "again" / "rankwise.json").exists()
    for again in (AutoModelForCausalLM.from_pretrained(tmp_path / "again"), load(tmp_path / "again")):
        assert torch.equal(_logits(again), _logits(model))


def test_save_pretrained_writes_the_layers_as_they_are_now(tmp_path):
    """A layer whose rank changed after loading (an adapter merged into its factors) is saved with its new rank."""
    model, _ = _compressed()
    save(model, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    name = "model.layers.0.mlp.up_proj"
    old = loaded.get_submodule(name)
    grown = LowRankLinear(old.in_features, old.out_features, old.rank + 2, bias=False)
    with torch.no_grad():
        grown.up.copy_(torch.cat([old.up, torch.zeros(old.out_features, 2)], 1))
        grown.down.copy_(torch.cat([old.down, torch.randn(2, old.in_features)]))
    rankwise.targets.set_submodule(loaded, name, grown)
    loaded.save_pretrained(tmp_path / "grown")
    modules = json.loads((tmp_path / "grown" / "config.json").read_text())["quantization_config"]["modules"]
    assert modules[name]["rank"] == old.rank + 2
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "grown")), _logits(model))


def test_tied_embedding_is_stored_once_and_shards_follow_max_shard_size(tmp_path):
    model, _ = _compressed()
    assert model.config.tie_word_embeddings
    save(model, tmp_path / "one")
    names = set(_tensors(tmp_path / "one"))
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert [p.name for p in (tmp_path / "one").glob("*.safetensors")] == ["model.safetensors"]
    save(model, tmp_path / "many", max_shard_size=40_000)
    shards = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all(p.stat().st_size <= 40_000 + 4096 for p in (tmp_path / "many").glob("*.safetensors")
               if len(safe_open(str(p), framework="pt").keys()) > 1)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == names
    assert torch.equal(_logits(load(tmp_path / "many")), _logits(model))
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "many")), _logits(model))


def _checkpoint(path: Path, declared: str | None = None) -> Path:
    model = tiny_model("llama")
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    if declared is not None:
        config = json.loads((path / "config.json").read_text())
        config["dtype"] = declared
        (path / "config.json").write_text(json.dumps(config))
    return path


def test_output_is_stored_in_the_declared_dtype_and_streamed_equals_in_memory_bytes(tmp_path):
    """A float32 checkpoint declaring bfloat16 (like the cached default model) is computed in float32 and stored in
    bfloat16; the streamed compression and the in-memory one saved with that dtype write identical files."""
    src = _checkpoint(tmp_path / "src", declared="bfloat16")
    calib = tiny_tokens(4)
    report = compress_checkpoint(src, SVDLLMConfig(ratio=0.3), calib, tmp_path / "streamed", progress=False,
                                 cache=None)
    assert {t.dtype for t in _tensors(tmp_path / "streamed").values()} == {torch.bfloat16}
    assert report.storage_dtype == "bfloat16" and report.bits_per_targeted_weight == pytest.approx(
        16 * report.params_targeted_after / report.params_targeted_before)
    assert report.bytes_on_disk == (tmp_path / "streamed" / "model.safetensors").stat().st_size
    assert report.bytes_on_disk < 0.9 * report.bytes_dense

    memory = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    memory_report = compress_(memory, SVDLLMConfig(ratio=0.3), calib, progress=False)
    save(memory, tmp_path / "memory", report=memory_report, dtype="bfloat16")
    for file in ("model.safetensors", "config.json"):
        assert (tmp_path / "streamed" / file).read_bytes() == (tmp_path / "memory" / file).read_bytes(), file


def test_old_format_directories_still_load(tmp_path):
    """Format 1 kept the layers in rankwise.json and stored no load guards."""
    model, report = _compressed()
    save(model, tmp_path / "m", report=report)
    out = tmp_path / "m"
    (out / "SHA256SUMS").unlink()  # format 1 directories had no checksums
    config = json.loads((out / "config.json").read_text())
    modules = config.pop("quantization_config")["modules"]
    (out / "config.json").write_text(json.dumps(config))
    manifest = json.loads((out / "rankwise.json").read_text())
    manifest.update(format_version=1, modules={
        n: {k: v for k, v in spec.items() if k != "kind"} for n, spec in modules.items()})
    (out / "rankwise.json").write_text(json.dumps(manifest))
    from safetensors.torch import save_file

    state = {k: v for k, v in _tensors(out).items() if v.numel() > 0}  # no empty guards in format 1
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    assert torch.equal(_logits(load(out)), _logits(model))


def test_in_memory_model_compressed_with_plain_svd_round_trips_through_save(tmp_path):
    model = tiny_model("llama")
    compress_(model, SVDConfig(ratio=0.5), progress=False)
    save(model, tmp_path / "m")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m")), _logits(model))


def test_plain_transformers_and_peft_after_import_rankwise(tmp_path):
    """The user's next step, in a fresh process: load with transformers, put a LoRA adapter on every linear layer
    with plain PEFT, merge it into the factors, save with save_pretrained, load again."""
    model, report = _compressed()
    save(model, tmp_path / "m", report=report)
    code = f"""
import torch, rankwise
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})
torch.manual_seed(0)  # PEFT draws the random adapter from the global generator: the merge error varies with it
peft_model = get_peft_model(model, LoraConfig(target_modules="all-linear", r=2, init_lora_weights=False))
assert sum("lora_A" in n for n, _ in peft_model.named_parameters()) == {len(report.layers)}
x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    adapted = peft_model(x).logits
    merged = peft_model.merge_and_unload()
    assert (merged(x).logits - adapted).abs().max() < 1e-5
    merged.save_pretrained({str(tmp_path / 'merged')!r})
    again = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r})
    assert torch.equal(again(x).logits, merged(x).logits)
print("OK", again.model.layers[0].mlp.up_proj.rank)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["OK", str(model.model.layers[0].mlp.up_proj.rank + 2)]


def test_cli_reports_bytes_in_compress_info_and_eval(tiny_dir, tmp_path):
    from tests.test_cli import SMALL, run

    out = tmp_path / "c"
    result = run("compress", tiny_dir, "--ratio", "0.4", "--out", out, "--text", _text(tmp_path), *SMALL)
    assert result.exit_code == 0, result.output
    on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert f"weights on disk {on_disk / 1e6:,.1f} MB (float32)" in result.output  # tiny_dir is stored float32
    info = json.loads(run("info", out, "--json").output)
    assert info["bytes_on_disk"] == on_disk and info["kinds"] == {"lowrank": 14}
    report = json.loads((out / "rankwise.json").read_text())["report"]
    assert info["bits_per_targeted_weight"] == pytest.approx(
        32 * report["params_targeted_after"] / report["params_targeted_before"])
    assert info["bytes_dense"] == 4 * report["params_total_before"] > on_disk
    evaluated = run("eval", out, "--json", "--text", _text(tmp_path), "--seq-len", "16", "--eval-samples", "4")
    assert evaluated.exit_code == 0, evaluated.output
    storage = json.loads(evaluated.output.strip().splitlines()[-1])["storage"]
    assert storage == {"bytes_on_disk": on_disk, "bytes_dense": info["bytes_dense"],
                       "bits_per_targeted_weight": info["bits_per_targeted_weight"]}


def _text(tmp_path: Path) -> Path:
    from rankwise.calibrate import load_text

    path = tmp_path / "text.txt"
    if not path.exists():
        path.write_text(load_text()[:200_000])
    return path


def test_save_pretrained_of_a_model_compressed_in_memory_loads(tmp_path):
    model, _ = _compressed()
    model.save_pretrained(tmp_path / "sp")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "sp")), _logits(model))
    assert torch.equal(_logits(load(tmp_path / "sp")), _logits(model))


def test_peft_hook_fires_when_peft_is_looked_up_before_it_is_imported(tmp_path):
    """transformers looks PEFT up (``find_spec``) during ``from_pretrained``; the import that follows must still
    install rankwise's PEFT hooks."""
    model, _ = _compressed()
    save(model, tmp_path / "m")
    code = f"""
import importlib.util, rankwise
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})
importlib.util.find_spec("peft")
from peft import LoraConfig, get_peft_model
peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
print("OK", sum("lora_A" in n for n, _ in peft_model.named_parameters()))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["OK", "4"]
