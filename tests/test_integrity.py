"""Nothing stale, nothing corrupted: every directory rankwise writes carries ``SHA256SUMS`` and is verified when
read; a Hugging Face cache snapshot is verified against its blob names; NaN or Inf in an input is named with its file
and tensor; a resumed training run refuses another model by content, before any pre-pass."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import rankwise
from rankwise.cli import app
from rankwise.compression import compress_checkpoint
from rankwise.io.integrity import SUMS, content_identity, read_sums, verify_dir, write_sums
from rankwise.io.models import load_model
from rankwise.methods.svd_llm import SVDLLMConfig
from tests.tiny_models import tiny_model, tiny_tokenizer, tiny_tokens

runner = CliRunner()
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def compressed(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "c"
    compress_checkpoint(tiny_dir, SVDLLMConfig(ratio=0.3), tiny_tokens(4), out, tokenizer=tiny_tokenizer(),
                        progress=False)
    return out


def _flip(file: Path, offset_from_end: int = 12) -> None:
    """Flip one bit of a low mantissa byte near the end (the last tensor's data): a finite value still."""
    raw = bytearray(file.read_bytes())
    raw[-offset_from_end] ^= 0x40
    file.write_bytes(bytes(raw))


def test_outputs_list_every_file_in_sha256sum_format(compressed):
    sums = read_sums(compressed)
    files = sorted(p.relative_to(compressed).as_posix() for p in compressed.rglob("*")
                   if p.is_file() and p.name != SUMS)
    assert sorted(sums) == files and WEIGHTS in sums and "config.json" in sums
    if shutil.which("sha256sum"):  # the standard tool reads the same file
        check = subprocess.run(["sha256sum", "--quiet", "-c", SUMS], cwd=compressed, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    result = verify_dir(compressed)
    assert (result.against, result.files, result.unlisted) == (SUMS, len(files), [])


def test_every_writer_checksums_its_output(tiny_dir, tmp_path):
    model = tiny_model("llama")
    rankwise.save(model, tmp_path / "saved", tokenizer=tiny_tokenizer())
    assert verify_dir(tmp_path / "saved").files == len(read_sums(tmp_path / "saved"))
    result = runner.invoke(app, ["compare", str(tiny_dir), "--methods", "svd", "--ratios", "0.3", "--seq-len", "16",
                                 "--calib-samples", "4", "--eval-samples", "2", "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert "comparison.json" in read_sums(tmp_path / "cmp")


def test_damaged_output_is_refused_by_every_loader(compressed, tmp_path):
    work = tmp_path / "c"
    shutil.copytree(compressed, work)
    _flip(work / WEIGHTS)  # one weight's exponent bit: still a valid file, still loads without the check
    message = rf"{work / WEIGHTS} does not match its SHA-256 in SHA256SUMS"
    with pytest.raises(ValueError, match=message):
        rankwise.load(work)
    with pytest.raises(ValueError, match=message):
        load_model(str(work))
    from rankwise.eval.stream import streamed_perplexity

    with pytest.raises(ValueError, match=message):
        streamed_perplexity(work, tiny_tokens(2, 8))
    assert rankwise.load(work, verify=False).model is not None  # those who must can still read it
    result = runner.invoke(app, ["eval", str(work), "--seq-len", "8", "--eval-samples", "2"])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "does not match" in result.output
    (work / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config.json is listed in SHA256SUMS but missing"):
        verify_dir(work)


def test_verify_command(compressed, tmp_path):
    ok = runner.invoke(app, ["verify", str(compressed)])
    assert ok.exit_code == 0 and ok.output.startswith(f"ok: {compressed}:")
    work = tmp_path / "c"
    shutil.copytree(compressed, work)
    (work / "notes.txt").write_text("mine")
    listed = runner.invoke(app, ["verify", str(work), "--json"])
    assert listed.exit_code == 0 and '"unlisted": [\n   "notes.txt"' in listed.output
    _flip(work / "tokenizer.json", 3)
    bad = runner.invoke(app, ["verify", str(compressed), str(work)])
    assert bad.exit_code == 2 and bad.output == (f"error: {work / 'tokenizer.json'} does not match its SHA-256 in "
                                                 "SHA256SUMS: it was changed or damaged after it was written; "
                                                 "restore it, or pass --no-verify (verify=False in Python) to use "
                                                 "it anyway\n")
    (work / SUMS).write_text("not a checksum line\n")
    assert "line 1 is not" in runner.invoke(app, ["verify", str(work)]).output
    (work / SUMS).unlink()
    none = runner.invoke(app, ["verify", str(work)])
    assert none.exit_code == 2 and "nothing to verify against" in none.output


def _hub_snapshot(source: Path, root: Path) -> Path:
    """``source`` laid out as the Hugging Face hub cache does: files in ``blobs/`` named by their SHA-256 and
    links to them from ``snapshots/<revision>/``."""
    import hashlib

    blobs, snapshot = root / "blobs", root / "snapshots" / ("0" * 40)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blobs / digest)
        (snapshot / file.name).symlink_to(os.path.relpath(blobs / digest, snapshot))
    return snapshot


def test_hub_cache_snapshot_is_verified_against_its_blob_names(tiny_dir, tmp_path):
    snapshot = _hub_snapshot(tiny_dir, tmp_path / "models--org--tiny")
    assert verify_dir(snapshot).against == "the Hugging Face cache"
    out = compress_checkpoint(snapshot, SVDLLMConfig(ratio=0.3), tiny_tokens(4), tmp_path / "ok", progress=False)
    assert out.params_total_after > 0
    _flip((snapshot / WEIGHTS).resolve())
    message = "does not match the SHA-256 the Hugging Face cache stores it under"
    with pytest.raises(ValueError, match=message):
        compress_checkpoint(snapshot, SVDLLMConfig(ratio=0.3), tiny_tokens(4), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match=message):
        load_model(str(snapshot))
    compress_checkpoint(snapshot, SVDLLMConfig(ratio=0.3), tiny_tokens(4), tmp_path / "forced", progress=False,
                        verify=False)


def _poison(file: Path, tensor: str, value: float) -> None:
    """Write ``value`` into the middle of ``tensor`` in place (a damaged shard: same header, same size)."""
    raw = bytearray(file.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    entry = json.loads(raw[8:8 + header_len])[tensor]
    start, end = entry["data_offsets"]
    at = 8 + header_len + start + ((end - start) // 8) * 4
    raw[at:at + 4] = struct.pack("<f", value)
    file.write_bytes(bytes(raw))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_is_named_with_file_and_tensor(tiny_dir, tmp_path, value):
    work = tmp_path / "m"
    shutil.copytree(tiny_dir, work)
    tensor = "model.layers.1.input_layernorm.weight"  # not a compression target: only the read check sees it
    _poison(work / WEIGHTS, tensor, value)
    message = rf"tensor '{tensor}' in {work / WEIGHTS} holds 1 NaN or Inf values"
    with pytest.raises(ValueError, match=message):
        compress_checkpoint(work, SVDLLMConfig(ratio=0.3), tiny_tokens(4), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=rf"tensor '{tensor}' holds 1 NaN or Inf"):
        load_model(str(work))


def test_content_identity_reads_bytes_and_checks_sums_in_one_pass(compressed, tmp_path):
    work = tmp_path / "c"
    shutil.copytree(compressed, work)
    digest, verification = content_identity(work)
    assert verification.against == SUMS and verification.files == len(read_sums(work))
    state = load_file(work / WEIGHTS)
    name = sorted(state)[0]
    state[name] = state[name].clone()
    state[name].view(-1)[0] += 1
    save_file(state, work / WEIGHTS, metadata={"format": "pt"})
    write_sums(work)  # a consistent directory with other weights: another identity
    assert content_identity(work)[0] != digest
    with pytest.raises(ValueError, match="holds no safetensors weights"):
        content_identity(tmp_path)


# --- resumed training runs: the model by content, checked before any pre-pass ---------------------------------


TEXT = " ".join(f"word{i % 37} and {i % 11}" for i in range(3000))
COMMON = ["--rank", "4", "--steps", "4", "--seq-len", "16", "--eval-samples", "4", "--batch-size", "2"]


def _interrupted_adapt(model_dir: Path, out: Path, text: Path, method: str, monkeypatch) -> None:
    """An ``adapt`` run killed right after its first training state was saved (step 2 of 4)."""
    train_module = importlib.import_module("rankwise.adapt.train")  # the package exports a function `train`

    save = train_module._save

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    from rankwise.adapt.job import adapt_model
    from rankwise.adapt.train import TrainConfig

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "_save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            adapt_model(str(model_dir), method, out, config=TrainConfig(steps=4, batch_size=2, save_every=2),
                        rank=4, text=str(text), seq_len=16, eval_samples=4, progress=False)
    assert (Path(f"{out}.checkpoint") / train_module.CHECKPOINT).is_file()


def test_resume_refuses_a_swapped_model_before_the_pre_pass(tmp_path, monkeypatch):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    model_dir = tmp_path / "model"
    tiny_model("llama", seed=0).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    _interrupted_adapt(model_dir, tmp_path / "o", text, "pissa", monkeypatch)
    shutil.rmtree(model_dir)  # another model behind the same path
    tiny_model("llama", seed=1).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    import rankwise.adapt.methods as methods

    calls = []
    monkeypatch.setattr(methods, "add_adapter", lambda *a, **k: calls.append(1))
    from rankwise.adapt.job import adapt_model
    from rankwise.adapt.train import TrainConfig

    with pytest.raises(ValueError, match=r"another run \(what differs: the model's weights\)"):
        adapt_model(str(model_dir), "pissa", tmp_path / "o", config=TrainConfig(steps=4, batch_size=2, save_every=2),
                    rank=4, text=str(text), seq_len=16, eval_samples=4, resume=True, progress=False)
    assert calls == []  # refused before PiSSA's SVD of every target
    run = subprocess.run([str(Path(sys.executable).parent / "rankwise"), "adapt", str(model_dir), "--method", "pissa",
                          "--text", str(text), *COMMON, "--dtype", "fp32", "--out", str(tmp_path / "o"), "--resume"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: --resume:")
    assert "(what differs: the model's weights)" in run.stderr


def test_resume_with_the_same_model_at_another_path_continues(tmp_path, monkeypatch):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    _interrupted_adapt(model_dir, tmp_path / "o", text, "lora", monkeypatch)
    moved = tmp_path / "moved"
    model_dir.rename(moved)  # the same weights, elsewhere: content identity, not the path
    from rankwise.adapt.job import adapt_model
    from rankwise.adapt.train import TrainConfig

    result = adapt_model(str(moved), "lora", tmp_path / "o", config=TrainConfig(steps=4, batch_size=2, save_every=2),
                         rank=4, text=str(text), seq_len=16, eval_samples=4, resume=True, progress=False)
    assert result.training.resumed_from == 2 and len(result.training.losses) == 4


def test_heal_resume_refuses_another_teacher(tiny_dir, compressed, tmp_path, monkeypatch):
    train_module = importlib.import_module("rankwise.adapt.train")  # the package exports a function `train`
    from rankwise.adapt.heal import HealConfig, heal_model
    from rankwise.adapt.train import TrainConfig

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_dir, teacher)
    config = TrainConfig(steps=4, batch_size=2, save_every=2)
    save = train_module._save

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    kwargs = dict(config=config, options=HealConfig(distill=0.5), text=str(text), seq_len=16, eval_samples=4,
                  progress=False)
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "_save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            heal_model(compressed, tmp_path / "h", base=str(teacher), **kwargs)
    shutil.rmtree(teacher)
    tiny_model("llama", seed=3).save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    import rankwise.eval.measure as measure

    monkeypatch.setattr(measure, "perplexity", lambda *a, **k: pytest.fail("evaluated before the identity check"))
    with pytest.raises(ValueError, match=r"another run \(what differs: the --base model's weights\)"):
        heal_model(compressed, tmp_path / "h", base=str(teacher), resume=True, **kwargs)


def test_heal_resume_refuses_another_balance_setting(tiny_dir, compressed, tmp_path, monkeypatch):
    """A run started with balanced factors does not resume with --no-balance (and the message names the option)."""
    train_module = importlib.import_module("rankwise.adapt.train")
    from rankwise.adapt.heal import HealConfig, heal_model
    from rankwise.adapt.train import TrainConfig

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    save = train_module._save

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    kwargs = dict(config=TrainConfig(steps=4, batch_size=2, save_every=2), text=str(text), seq_len=16,
                  eval_samples=4, progress=False, base=str(tiny_dir))
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "_save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            heal_model(compressed, tmp_path / "h", options=HealConfig(distill=0.5), **kwargs)
    with pytest.raises(ValueError, match=r"what differs: --balance"):
        heal_model(compressed, tmp_path / "h", options=HealConfig(distill=0.5, balance=False), resume=True, **kwargs)
    result = heal_model(compressed, tmp_path / "h", options=HealConfig(distill=0.5), resume=True, **kwargs)
    assert result.training.resumed_from == 2 and result.provenance["heal"]["balance"] is True


def test_hub_id_is_verified_against_its_cached_blobs(tiny_dir, tmp_path, monkeypatch):
    """A model given as a hub id is checked against the blobs of its snapshot in the Hugging Face cache."""
    import huggingface_hub

    import rankwise.io.models as models

    snapshot = _hub_snapshot(tiny_dir, tmp_path / "models--org--tiny")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name, **_: str(snapshot / name) if repo == "org/tiny" else None)
    real = models._load_dense
    monkeypatch.setattr(models, "_load_dense", lambda path, *a: real(snapshot if path == "org/tiny" else path, *a))
    monkeypatch.setattr(models, "load_tokenizer", lambda path, *a: tiny_tokenizer())
    assert load_model("org/tiny").model is not None
    _flip((snapshot / WEIGHTS).resolve())
    with pytest.raises(ValueError, match="does not match the SHA-256 the Hugging Face cache stores it under"):
        load_model("org/tiny")
    load_model("org/tiny", verify=False)


def test_model_files_missing_from_the_list_are_refused(compressed, tmp_path):
    """A list cut short (or emptied) must not let an unlisted weight or config pass as checked."""
    work = tmp_path / "c"
    shutil.copytree(compressed, work)
    sums = (work / SUMS).read_text().splitlines()
    (work / SUMS).write_text("\n".join(line for line in sums if not line.endswith(f"  {WEIGHTS}")) + "\n")
    with pytest.raises(ValueError, match=rf"{work / WEIGHTS} is not listed in SHA256SUMS"):
        rankwise.load(work)
    (work / SUMS).write_text("")
    with pytest.raises(ValueError, match="is not listed in SHA256SUMS"):
        verify_dir(work)


def test_set_given_twice_is_refused(tiny_dir, tmp_path):
    result = runner.invoke(app, ["compress", str(tiny_dir), "--method", "svd_llm", "--set", "anchor=0.3", "--set",
                                 "anchor=0.6", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output == "error: --set anchor is given twice; give each setting once\n"
