"""ONNX export with a KV cache (``rankwise export --format onnx``): onnxruntime reproduces torch's logits and greedy
generation, factorised layers stay two matmuls (the file shrinks by exactly the removed parameters), and an
unsupported model is a one-line error with nothing written."""

from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'rankwise[onnx]'")
pytest.importorskip("onnxscript", reason="needs the onnx extra: pip install 'rankwise[onnx]'")
onnx = pytest.importorskip("onnx", reason="needs the onnx extra: pip install 'rankwise[onnx]'")

import rankwise  # noqa: E402
from rankwise.cli import app  # noqa: E402
from rankwise.export import OnnxCausalLM, export_onnx, max_logit_diff  # noqa: E402
from rankwise.export.onnx import ONNX_FILE  # noqa: E402
from rankwise.io.integrity import verify_dir  # noqa: E402
from rankwise.nn import LowRankLinear  # noqa: E402
from tests.tiny_models import VOCAB, tiny_model, tiny_tokenizer, tiny_tokens  # noqa: E402

runner = CliRunner()
TOL = 1e-4  # float32 logits, torch vs onnxruntime


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A tiny Llama compressed with SVD at ratio 0.3 and saved: ``(dir, in-memory model, dense original)``."""
    root = tmp_path_factory.mktemp("onnx")
    dense = tiny_model("llama")
    model = tiny_model("llama")
    rankwise.compress_(model, rankwise.SVDConfig(ratio=0.3))
    rankwise.save(model, root / "compressed", tokenizer=tiny_tokenizer())
    text = root / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return root, model, dense


@pytest.fixture(scope="module")
def exported(compressed):
    """``rankwise export`` of the compressed directory, with ``--check``: ``(out dir, CLI output)``."""
    root, _, _ = compressed
    out = root / "onnx"
    result = run("export", root / "compressed", "--format", "onnx", "--out", out, "--check", "--check-samples", "2",
                 "--seq-len", "24", "--text", root / "text.txt")
    assert result.exit_code == 0, result.output
    return out, result.output


def test_cli_prints_sizes_and_check(exported):
    out, output = exported
    size = (out / ONNX_FILE).stat().st_size
    assert f"{ONNX_FILE} {size / 1e6:,.1f} MB" in output
    assert (verify_dir(out).against, verify_dir(out).unlisted) == ("SHA256SUMS", [])  # every file checksummed
    diff = float(re.search(r"max \|logit difference\| .*: (\S+)", output).group(1))
    assert 0 <= diff < TOL


def test_logits_match_torch_with_and_without_cache(compressed, exported):
    root, _, _ = compressed
    reloaded = rankwise.load(root / "compressed").model
    ort_model = OnnxCausalLM(exported[0])
    held_out = tiny_tokens(4, 32, seed=7)
    assert max_logit_diff(reloaded, ort_model, held_out, batch_size=2) < TOL
    with torch.no_grad():
        full = reloaded(held_out).logits.numpy()
    # the same windows in two steps: 20 tokens, then 12 more on top of the returned cache
    ids = held_out.numpy()
    first, past = ort_model.step(ids[:, :20], (ids[:, :20] >= 0).astype(ids.dtype), ort_model.empty_cache(4))
    second, present = ort_model.step(ids[:, 20:], (ids >= 0).astype(ids.dtype), past)
    assert abs(first - full[:, :20]).max() < TOL and abs(second - full[:, 20:]).max() < TOL
    assert present[0].shape == (4, reloaded.config.num_key_value_heads, 32, ort_model.layout.head_dim)


def test_greedy_generation_identical(compressed, exported):
    root, _, _ = compressed
    reloaded = rankwise.load(root / "compressed").model
    prompts = tiny_tokens(2, 6, seed=3)
    eos = reloaded.generation_config.eos_token_id
    with torch.no_grad():
        reference = reloaded.generate(prompts, max_new_tokens=24, do_sample=False, pad_token_id=eos)
    got = OnnxCausalLM(exported[0]).generate(prompts, 24, eos_token_id=eos).tokens
    assert torch.equal(got, reference)
    assert got.shape[1] > prompts.shape[1] + 8  # really generated (not stopped at once)


def test_factors_stay_factorised_and_file_shrinks_by_the_compression(compressed, exported, tmp_path):
    _, model, dense = compressed
    graph = onnx.load(str(exported[0] / ONNX_FILE), load_external_data=False).graph
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    lowrank = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert lowrank
    for name, m in lowrank.items():
        assert shapes[f"{name}.down"] == (m.rank, m.in_features)
        assert shapes[f"{name}.up"] == (m.out_features, m.rank)
        assert f"{name}.weight" not in shapes
    dense_export = export_onnx(dense, tmp_path / "dense")
    ours = OnnxCausalLM(exported[0])
    removed_bytes = 4 * (sum(p.numel() for p in dense.parameters()) - sum(p.numel() for p in model.parameters()))
    compressed_weight_bytes = sum(len(init.raw_data) for init in graph.initializer)
    assert dense_export.weight_bytes - compressed_weight_bytes == removed_bytes
    assert dense_export.dense_weight_bytes == dense_export.weight_bytes
    share = compressed_weight_bytes / dense_export.weight_bytes
    assert f"the weights are {share:.3f} of a dense export's {dense_export.weight_bytes / 1e6:,.1f} MB" in exported[1]
    file_saving = dense_export.nbytes - sum((exported[0] / f).stat().st_size for f in ours.layout.files)
    assert 0.9 * removed_bytes < file_saving <= removed_bytes


def test_dense_format_reloads_with_transformers(compressed, tmp_path):
    from transformers import AutoModelForCausalLM

    root, model, _ = compressed
    out = tmp_path / "dense"
    result = run("export", root / "compressed", "--format", "dense", "--out", out)
    assert result.exit_code == 0, result.output
    assert "dense safetensors" in result.output
    assert (verify_dir(out).against, verify_dir(out).unlisted) == ("SHA256SUMS", [])
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tiny_tokens(2, 16)
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-5)


def test_unsupported_model_is_one_line_error_and_nothing_written(tmp_path):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    src = tmp_path / "neox"
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    out = tmp_path / "out"
    result = run("export", src, "--format", "onnx", "--out", out)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ONNX export supports model types llama, ")
    assert "'gpt_neox'" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neox"]


def test_library_refuses_unsupported_model_before_writing(tmp_path):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    model = AutoModelForCausalLM.from_config(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                           num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(ValueError, match="ONNX export supports model types"):
        export_onnx(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,message", [
    (["--format", "tflite"], "'tflite' is not one of 'onnx', 'dense'"),
    ([], "Missing option '--out'"),
    (["--out", "{tmp}"], "exists; pass --overwrite"),
])
def test_bad_options_are_one_line_errors(compressed, tmp_path, args, message):
    root, _, _ = compressed
    result = run("export", root / "compressed", *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
