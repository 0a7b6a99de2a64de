"""Hardening against tampering: every damaged manifest or checkpoint either loads to identical logits or is refused
with a one-line ``ValueError``; never randomly initialised weights, never a traceback from deep inside a library.

The property tests mutate a saved tiny model (hypothesis draws the mutation) and load it both whole
(:func:`rankwise.load`) and block by block (:func:`~rankwise.eval.stream.streamed_perplexity`).
``RANKWISE_MUTATIONS`` sets the examples per test (default 60, derandomised so CI always runs the same cases);
``RANKWISE_MUTATION_LOG`` names a JSON file that receives the outcome counts.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from rankwise.compression import compress_
from rankwise.eval.stream import streamed_perplexity
from rankwise.io import load, save
from rankwise.io.integrity import SUMS
from rankwise.io.manifest import MANIFEST
from rankwise.methods.svd_llm import SVDLLMConfig
from rankwise.nn import KINDS
from tests.tiny_models import tiny_model, tiny_tokenizer, tiny_tokens

EXAMPLES = int(os.environ.get("RANKWISE_MUTATIONS", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
OUTCOMES: Counter = Counter()
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A compressed tiny Llama saved by rankwise, its logits on fixed tokens, and its streamed perplexity."""
    root = tmp_path_factory.mktemp("orig")
    model = tiny_model("llama")
    compress_(model, SVDLLMConfig(ratio=0.3), tiny_tokens(), progress=False)
    save(model, root / "m", tokenizer=tiny_tokenizer())
    x = tiny_tokens(2, 16, seed=5)
    with torch.no_grad():
        logits = load(root / "m")(x).logits
    ppl, _ = streamed_perplexity(root / "m", x)
    yield root / "m", x, logits, ppl
    log = os.environ.get("RANKWISE_MUTATION_LOG")
    if log:
        Path(log).write_text(json.dumps(dict(OUTCOMES), indent=1, sort_keys=True))


def _copy(src: Path, dst: Path) -> None:
    """A copy without ``SHA256SUMS``: a directory whose checksums were dropped (an older rankwise wrote it, or it
    was edited on purpose), where validation alone must refuse the damage."""
    shutil.copytree(src, dst)
    (dst / SUMS).unlink()


def _outcome(path: Path, x: torch.Tensor, logits: torch.Tensor, ppl: float, kind: str) -> str:
    """Load ``path`` both ways; each must give the original result or a one-line ValueError."""
    results = []
    for loader in ("load", "streamed"):
        try:
            if loader == "load":
                with torch.no_grad():
                    same = torch.equal(load(path)(x).logits, logits)
            else:
                same = streamed_perplexity(path, x)[0] == ppl
        except ValueError as err:
            message = str(err)
            assert message and "\n" not in message, f"{kind}/{loader}: not a one-line error: {message!r}"
            results.append("error")
            continue
        assert same, f"{kind}/{loader}: loaded without an error but the output differs"
        results.append("identical")
    outcome = "+".join(sorted(set(results)))
    OUTCOMES[f"{kind}: {outcome}"] += 1
    OUTCOMES["total"] += 1
    return outcome


ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**12), st.floats(allow_nan=True),
                      st.text(max_size=12), st.lists(st.integers(0, 9), max_size=3),
                      st.dictionaries(st.text(max_size=4), st.integers(0, 9), max_size=2))
MODULE_NAMES = st.one_of(st.text(max_size=30), st.sampled_from([
    "../../x", "model", "model.layers.0", "model.embed_tokens", "lm_head", "model.norm", "__class__",
    "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj", "model.layers.0.mlp.down_proj",
    "model.layers.7.mlp.up_proj", "model.layers.0.self_attn.rotary_emb", "model..layers", "model.layers.0.",
]))


def _read_layout(path: Path) -> dict:
    """``rankwise.json`` with the layer list of ``config.json``'s ``quantization_config`` as its ``modules``: the
    whole manifest, mutated as one object."""
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["modules"] = json.loads((path / "config.json").read_text())["quantization_config"]["modules"]
    return manifest


def _write_layout(path: Path, manifest: dict) -> None:
    manifest = dict(manifest)
    config = json.loads((path / "config.json").read_text())
    if "modules" in manifest:
        config["quantization_config"]["modules"] = manifest.pop("modules")
    else:
        del config["quantization_config"]["modules"]
    (path / "config.json").write_text(json.dumps(config))
    (path / MANIFEST).write_text(json.dumps(manifest))


def _mutate_manifest(data, manifest: dict) -> tuple[str, dict | bytes]:
    m = copy.deepcopy(manifest)
    names = sorted(m["modules"])
    kind = data.draw(st.sampled_from(["drop", "retype", "rename", "rank", "swap", "extra", "model_class", "dtype",
                                      "garbage"]), label="manifest mutation")
    name = data.draw(st.sampled_from(names), label="module")
    field = data.draw(st.sampled_from(["in_features", "out_features", "rank", "bias"]), label="field")
    top = data.draw(st.sampled_from(["format_version", "model_class", "dtype", "modules", "report"]), label="top")
    if kind == "drop":
        if data.draw(st.booleans(), label="top-level"):
            del m[top]
        else:
            del m["modules"][name][field]
    elif kind == "retype":
        value = data.draw(ANY_VALUE, label="value")
        if data.draw(st.booleans(), label="top-level"):
            m[top] = value
        else:
            m["modules"][name][field] = value
    elif kind == "rename":
        m["modules"][data.draw(MODULE_NAMES, label="new name")] = m["modules"].pop(name)
    elif kind == "rank":
        m["modules"][name]["rank"] += data.draw(st.integers(-40, 200).filter(bool), label="rank change")
    elif kind == "swap":
        other = data.draw(st.sampled_from(names), label="other")
        m["modules"][name], m["modules"][other] = m["modules"][other], m["modules"][name]
    elif kind == "extra":
        where = m if data.draw(st.booleans(), label="top-level") else m["modules"][name]
        where[data.draw(st.text(min_size=1, max_size=8), label="key")] = data.draw(ANY_VALUE, label="value")
    elif kind == "model_class":
        m["model_class"] = data.draw(st.one_of(st.sampled_from(
            ["GPT2LMHeadModel", "OPTForCausalLM", "LlamaModel", "AutoModel", "pipeline", "LlamaForCausalLM"]),
            st.text(max_size=20)), label="class")
    elif kind == "dtype":
        m["dtype"] = data.draw(st.one_of(st.sampled_from(["float16", "bfloat16", "float64", "int8", "float32"]),
                                         st.text(max_size=8)), label="dtype")
    else:
        raw = json.dumps(manifest).encode()
        cut = data.draw(st.integers(0, len(raw)), label="cut")
        return kind, raw[:cut] + data.draw(st.binary(max_size=16), label="tail")
    return kind, m


@SETTINGS
@given(data=st.data())
def test_mutated_manifest_loads_identically_or_fails_in_one_line(original, data):
    path, x, logits, ppl = original
    kind, mutated = _mutate_manifest(data, _read_layout(path))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "m"
        _copy(path, work)
        if isinstance(mutated, bytes):
            (work / (MANIFEST if data.draw(st.booleans(), label="garbled file") else "config.json")
             ).write_bytes(mutated)
        else:
            _write_layout(work, mutated)
        _outcome(work, x, logits, ppl, f"manifest {kind}")


def _mutate_weights(data, file: Path) -> str:
    kind = data.draw(st.sampled_from(["drop", "rename", "retype", "reshape", "extra", "truncate", "append",
                                      "header"]), label="checkpoint mutation")
    if kind in ("truncate", "append", "header"):
        raw = file.read_bytes()
        if kind == "truncate":
            raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="cut")]
        elif kind == "append":
            raw = raw + data.draw(st.binary(min_size=1, max_size=64), label="tail")
        else:  # overwrite bytes inside the JSON header (length prefix excluded)
            (header_len,) = struct.unpack("<Q", raw[:8])
            at = data.draw(st.integers(8, 8 + header_len - 1), label="offset")
            patch = data.draw(st.binary(min_size=1, max_size=8), label="patch")
            raw = raw[:at] + patch + raw[at + len(patch):]
        file.write_bytes(raw)
        return kind
    state = load_file(str(file))
    names = sorted(state)
    name = data.draw(st.sampled_from(names), label="tensor")
    if kind == "drop":
        del state[name]
    elif kind == "rename":
        state[data.draw(st.one_of(st.sampled_from(names), st.text(min_size=1, max_size=20)), label="to")] = \
            state.pop(name)
    elif kind == "retype":
        state[name] = state[name].to(data.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64,
                                                                torch.int32]), label="dtype"))
    elif kind == "reshape":
        t = state[name]
        how = data.draw(st.sampled_from(["narrow", "grow", "transpose", "flatten"]), label="reshape")
        if how == "narrow" and t.shape[0] > 1:
            t = t[:-1]
        elif how == "grow":
            t = torch.cat([t, t[:1]])
        elif how == "transpose" and t.ndim == 2:
            t = t.T
        else:
            t = t.reshape(-1)
        state[name] = t.contiguous()
    else:
        state[data.draw(st.text(min_size=1, max_size=20), label="new")] = torch.zeros(3)
    save_file(state, str(file), metadata={"format": "pt"})
    return kind


@SETTINGS
@given(data=st.data())
def test_mutated_checkpoint_loads_identically_or_fails_in_one_line(original, data):
    path, x, logits, ppl = original
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "m"
        _copy(path, work)
        kind = _mutate_weights(data, work / WEIGHTS)
        _outcome(work, x, logits, ppl, f"checkpoint {kind}")


@settings(max_examples=max(10, EXAMPLES // 2), deadline=None, derandomize=EXAMPLES <= 100, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_any_byte_flip_in_a_checksummed_directory_is_refused(original, data):
    """With ``SHA256SUMS`` in place, one flipped bit anywhere in any file (weights, config, manifest, tokenizer) is
    refused by both loaders, even where the result would still parse (a weight 0.0718 read as 0.0359)."""
    path, x, logits, ppl = original
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "m"
        shutil.copytree(path, work)
        files = sorted(p for p in work.rglob("*") if p.is_file() and p.name != SUMS)
        file = data.draw(st.sampled_from(files), label="file")
        raw = bytearray(file.read_bytes())
        at = data.draw(st.integers(0, len(raw) - 1), label="offset")
        raw[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        file.write_bytes(bytes(raw))
        assert _outcome(work, x, logits, ppl, f"bit flip in {file.name}") == "error"


def test_checksum_error_names_the_file(original, tmp_path):
    work = tmp_path / "m"
    shutil.copytree(original[0], work)
    (work / "config.json").write_text((work / "config.json").read_text() + " ")
    with pytest.raises(ValueError, match=rf"{work / 'config.json'} does not match its SHA-256 in SHA256SUMS"):
        load(work)
    with torch.no_grad():  # validation alone accepts the harmless edit
        assert torch.equal(load(work, verify=False)(original[1]).logits, original[2])


@pytest.mark.parametrize("edit,message,file", [
    (lambda m: m.update(model_class="pipeline"), "field 'model_class' is 'pipeline': not a causal-LM or encoder",
     MANIFEST),
    (lambda m: m.update(dtype="int4"), "field 'dtype' is 'int4'; allowed: float32", MANIFEST),
    (lambda m: m.update(model_class="GPT2LMHeadModel"), "needs a GPT2Config", MANIFEST),
    (lambda m: m["modules"].update({"../../x": m["modules"].popitem()[1]}), "is not a dotted module name",
     "config.json"),
    (lambda m: next(iter(m["modules"].values())).update(rank=10**9), "rank' must be an integer in", "config.json"),
    (lambda m: next(iter(m["modules"].values())).update(rank=1.5), "rank' must be an integer", "config.json"),
    (lambda m: next(iter(m["modules"].values())).update(rank="8"), "rank' must be an integer", "config.json"),
    (lambda m: next(iter(m["modules"].values())).update(rank=65), "above min(out_features, in_features)",
     "config.json"),
    (lambda m: next(iter(m["modules"].values())).update(kind="tucker"), "unknown layer kind 'tucker'; "
     f"this rankwise knows {', '.join(sorted(KINDS))}", "config.json"),
    (lambda m: next(iter(m["modules"].values())).update(atoms=4), "a lowrank layer's spec is exactly {rank}",
     "config.json"),
    (lambda m: m["modules"].update({"model.embed_tokens": m["modules"].popitem()[1]}), "not a linear layer",
     "config.json"),
    (lambda m: m["modules"].update({"model.layers.9.mlp.up_proj": m["modules"].popitem()[1]}), "does not exist",
     "config.json"),
    (lambda m: m.pop("modules"), "field 'quantization_config.modules' must be an object", "config.json"),
])
def test_manifest_errors_name_file_and_field(original, tmp_path, edit, message, file):
    path = original[0]
    work = tmp_path / "m"
    _copy(path, work)
    manifest = _read_layout(work)
    edit(manifest)
    _write_layout(work, manifest)
    with pytest.raises(ValueError) as info:
        load(work)
    assert message in str(info.value) and str(work / file) in str(info.value)


@pytest.mark.parametrize("edit,message", [
    (lambda q: q.update(format_version=3), "format_version' is 3; this rankwise reads version 2"),
    (lambda q: q.update(group_size=64), "quantization_config.group_size' is not a field"),
])
def test_quantization_config_version_and_fields_are_checked(original, tmp_path, edit, message):
    work = tmp_path / "m"
    _copy(original[0], work)
    config = json.loads((work / "config.json").read_text())
    edit(config["quantization_config"])
    (work / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load(work)


def test_unmutated_copy_loads_identically(original, tmp_path):
    """The control for the property tests: an intact copy must load to the same output through both loaders."""
    _copy(original[0], tmp_path / "m")
    assert _outcome(tmp_path / "m", *original[1:], "control") == "identical"


@pytest.mark.parametrize("edit", [
    lambda c: c.update(hidden_size=63), lambda c: c.update(num_hidden_layers=-1), lambda c: c.update(vocab_size="x"),
    lambda c: c.update(model_type="gpt2"), lambda c: c.pop("hidden_size"),
])
def test_tampered_config_is_refused_in_one_line(original, tmp_path, edit):
    _copy(original[0], tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    edit(config)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert _outcome(tmp_path / "m", *original[1:], "config") in ("error", "identical")


def test_factorised_tensors_without_manifest_are_refused(original, tmp_path):
    from rankwise.io.models import load_model

    work = tmp_path / "m"
    _copy(original[0], work)
    (work / MANIFEST).unlink()  # the layer list in config.json is enough (save_pretrained writes no rankwise.json)
    with torch.no_grad():
        assert torch.equal(load(work)(original[1]).logits, original[2])
    config = json.loads((work / "config.json").read_text())
    del config["quantization_config"]
    (work / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"holds factorised tensors .* but no rankwise\.json"):
        load_model(str(work))
    with pytest.raises(ValueError, match="holds factorised tensors"):
        streamed_perplexity(work, original[1])


def test_plain_checkpoint_with_missing_tensor_is_refused(tmp_path):
    from rankwise.io.models import load_model

    tiny_model("llama").save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    state = load_file(str(tmp_path / "hf" / WEIGHTS))
    state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, str(tmp_path / "hf" / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors .*down_proj"):
        load_model(str(tmp_path / "hf"))
