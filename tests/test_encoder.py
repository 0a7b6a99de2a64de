"""Encoders (BERT family, sentence-transformers layout): targets, whole-model and streamed compression, the
contrastive calibration loss and its Fisher, the embedding and retrieval metrics, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertLMHeadModel
from typer.testing import CliRunner

import rankwise
from rankwise.arch import is_encoder, is_encoder_config
from rankwise.calibrate import collect_stats, default_text
from rankwise.calibrate.objective import check_pair_batch, contrastive_loss, pool
from rankwise.cli import app
from rankwise.compression import compress_, compress_checkpoint
from rankwise.compression.passes import capture, gradient_pass
from rankwise.eval.embedding import _split_topic, evaluate_encoder, held_out_pairs, retrieval, topic_pairs
from rankwise.io.sentence import copy_sentence_files, read_pooling, transformer_dir
from rankwise.methods import config_class, method_names
from rankwise.methods.fwsvd import FWSVDConfig
from rankwise.methods.svd_llm import SVDLLMConfig
from rankwise.stream import ActivationStore, ModelSource
from rankwise.targets import find_targets
from tests.tiny_models import budget, tiny_encoder, tiny_model, tiny_tokenizer, tiny_tokens

PAIRS = [("the while statement repeats a suite", "while True: pass"),
         ("the with statement wraps a block", "with open(f) as g: pass"),
         ("assert statements insert debugging checks", "assert x > 0, 'x must be positive'")]


def _hidden(model, tokens=None):
    with torch.no_grad():
        return model(input_ids=tiny_tokens(2, seed=5) if tokens is None else tokens).last_hidden_state


def _sentence_dir(path, pooling="mean"):
    """A tiny encoder saved in the sentence-transformers layout (model at the root, pooling in 1_Pooling)."""
    tiny_encoder().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    flags = {"pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_cls_token": pooling == "cls",
             "pooling_mode_max_tokens": pooling == "max"}
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **flags}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    return path


def test_encoder_kind_is_read_from_the_config():
    assert is_encoder(tiny_encoder())
    for arch in ("llama", "gpt2", "opt"):
        assert not is_encoder(tiny_model(arch))
    decoder = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, is_decoder=True)
    assert not is_encoder_config(decoder) and not is_encoder(BertLMHeadModel(decoder))


def test_targets_are_the_encoder_layers_projections_never_embeddings_or_pooler():
    model = tiny_encoder()
    names = list(find_targets(model))
    suffixes = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense", "output.dense"]
    assert names == [f"encoder.layer.{i}.{s}" for i in range(2) for s in suffixes]
    assert isinstance(model.pooler.dense, torch.nn.Linear)  # present, but never a target
    assert list(find_targets(model, ("attn",))) == [n for n in names if "attention" in n]
    assert ModelSource(model).blocks_name == "encoder.layer"


@pytest.mark.parametrize("method", method_names())
def test_streamed_checkpoint_equals_in_memory(tmp_path, method):
    config = config_class(method)(**budget(method))
    tokens = tiny_tokens(8)
    memory = tiny_encoder()
    if config.structured:  # narrows Llama-style decoders only
        with pytest.raises(ValueError, match="model type 'bert'"):
            compress_checkpoint(_sentence_dir(tmp_path / "src"), config, tokens, tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()
        return
    ref_report = compress_(memory, config, tokens, progress=False)
    src = _sentence_dir(tmp_path / "src")
    report = compress_checkpoint(src, config, tokens, tmp_path / "out", progress=False)
    assert [(layer.name, layer.rank) for layer in report.layers] == \
        [(layer.name, layer.rank) for layer in ref_report.layers]
    assert all(layer.name.startswith("encoder.layer.") for layer in report.layers)
    assert report.params_total_after == ref_report.params_total_after
    loaded = rankwise.load(tmp_path / "out").model
    assert type(loaded).__name__ == "BertModel"
    torch.testing.assert_close(_hidden(loaded), _hidden(memory), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_hidden(memory), _hidden(tiny_encoder()), atol=1e-3)  # it did compress


def test_streamed_loss_allocation_and_sequential_equal_in_memory():
    """The block-by-block gradient pass (contrastive loss) and sequential calibration on an encoder equal the
    whole-model statistics and the in-memory path."""
    tokens = tiny_tokens(8)
    dense = tiny_encoder()
    stats = collect_stats(dense, tokens, find_targets(dense), kinds=("xxt", "gout", "fisher"))
    for config in (SVDLLMConfig(ratio=0.4, allocation="loss"), FWSVDConfig(ratio=0.4)):
        streamed, reference = tiny_encoder(), tiny_encoder()
        compress_(streamed, config, tokens, progress=False)
        compress_(reference, config, tokens, stats=stats, progress=False)
        torch.testing.assert_close(_hidden(streamed), _hidden(reference), rtol=1e-4, atol=1e-5)
    seq = SVDLLMConfig(ratio=0.4, sequential=True, update_u=True)
    a, b = tiny_encoder(), tiny_encoder()
    compress_(a, seq, tokens, progress=False)
    compress_(b, seq, tokens, progress=False, activation_mb=0)
    assert torch.equal(_hidden(a), _hidden(b))


def _reference_fisher(model, tokens, batch_size=4):
    """The Fisher row sums of the contrastive loss, straight from autograd (written out independently)."""
    targets = find_targets(model)
    sums = {name: torch.zeros(m.weight.shape[0], dtype=torch.float64) for name, m in targets.items()}
    for batch in tokens.split(batch_size):
        model.zero_grad(set_to_none=True)
        hidden = model(input_ids=batch).last_hidden_state  # (b, L, d)
        e = F.normalize(hidden.mean(1), dim=-1)  # mean pooling, every token real
        logits = 20.0 * e @ e.T
        logits = logits - torch.diag(torch.full((len(e),), float("inf")))
        loss = F.cross_entropy(logits, torch.tensor([1, 0, 3, 2])[: len(e)])
        loss.backward()
        for name, m in targets.items():
            sums[name] += m.weight.grad.double().pow(2).sum(1)
    model.zero_grad(set_to_none=True)
    return sums


def test_fisher_of_the_encoder_loss_matches_autograd():
    tokens = tiny_tokens(8)
    model = tiny_encoder()
    reference = _reference_fisher(model, tokens)
    assert all(float(v.sum()) > 0 for v in reference.values())  # a non-degenerate loss at the dense model
    whole = collect_stats(model, tokens, find_targets(model), kinds=("fisher",))
    source = ModelSource(model)
    by_block = {i: [n for n in reference if n.startswith(f"encoder.layer.{i}.")] for i in range(2)}
    with ActivationStore(2**30) as store:
        streams = capture(source, list(tokens.split(4)), store, ("scoring",))
        _, streamed = gradient_pass(source, by_block, streams, frozenset({"fisher"}), FWSVDConfig(ratio=0.3).policy,
                                    progress=False)
    for name, want in reference.items():
        torch.testing.assert_close(whole[name].fisher_out[name], want, rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(streamed[name].fisher_out[name], want, rtol=1e-4, atol=1e-12)


def test_contrastive_loss_by_hand_and_bad_batches():
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    # each row: its partner at cosine 1, the two others at 0 -> -log(e^s / (e^s + 2))
    assert math.isclose(float(contrastive_loss(e, scale=1.0)), math.log1p(2 * math.exp(-1.0)), rel_tol=1e-6)
    assert math.isclose(float(contrastive_loss(e * 3)), 0.0, abs_tol=1e-6)  # scale 20: near-certain, and pooled
    #                                                                          magnitudes do not matter
    for size in (1, 2, 3, 5):
        with pytest.raises(ValueError, match="even number >= 4"):
            check_pair_batch(size)
    hidden = torch.arange(24.0).reshape(1, 4, 6)
    mask = torch.tensor([[1, 1, 0, 0]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), hidden[:, :2].mean(1))
    torch.testing.assert_close(pool(hidden, mask, "max"), hidden[:, 1])
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])


def test_retrieval_against_a_hand_computed_reference():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 2.0]])
    d = torch.tensor([[1.0, 0.1], [1.0, 0.0], [-1.0, 1.0]])
    # cosines to d0, d1, d2: q0 -> (0.995, 1.0, -0.707): own doc 2nd; q1 -> (0.0995, 0, 0.707): own 3rd;
    # q2 -> (-0.36, -0.447, 0.949): own 1st. top-1 = 1/3, MRR = (1/2 + 1/3 + 1) / 3
    top1, mrr = retrieval(q, d)
    assert math.isclose(top1, 1 / 3) and math.isclose(mrr, (1 / 2 + 1 / 3 + 1) / 3)
    assert retrieval(d, d) == (1.0, 1.0)
    tie = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert retrieval(tie, tie) == (0.0, 0.5)  # a tie counts against the query
    with pytest.raises(ValueError, match="as many queries as documents"):
        retrieval(q, d[:2])


def test_embedding_cosine_is_one_for_the_dense_model_and_below_after_compression():
    tokenizer = tiny_tokenizer()
    dense = tiny_encoder()
    result, reference = evaluate_encoder(dense, tokenizer, PAIRS)
    again, _ = evaluate_encoder(dense, tokenizer, PAIRS, reference=reference)
    assert math.isclose(again.cosine, 1.0, abs_tol=1e-12) and reference.shape == (6, 64)
    top1, mrr = retrieval(reference[:3], reference[3:])
    assert (result.top1, result.mrr) == (top1, mrr) and result.candidates == 3
    compressed = tiny_encoder()
    compress_(compressed, SVDLLMConfig(ratio=0.5), tiny_tokens(8), progress=False)
    lower, _ = evaluate_encoder(compressed, tokenizer, PAIRS, reference=reference)
    assert lower.cosine < 1.0 - 1e-6 and lower.params_targeted < result.params_targeted


def test_held_out_pairs_never_overlap_the_calibration_text():
    tokenizer = tiny_tokenizer()  # one token per byte
    raw = default_text()
    calibration_tokens = 20_000
    calibrated = tokenizer.decode(tokenizer(raw, add_special_tokens=False).input_ids[:calibration_tokens])
    pairs = held_out_pairs(tokenizer, raw, calibration_tokens, 1000)
    everything = topic_pairs()
    assert 2 <= len(pairs) < len(everything) and pairs == everything[-len(pairs):]
    from pydoc_data.topics import topics

    starts, at = {}, 0
    for key in sorted(topics):  # where each topic starts in the text calibration windows are cut from
        starts[key], at = at, at + len(topics[key]) + 2
    assert raw.startswith(calibrated)
    for query, document in pairs:
        key = next(k for k in topics if _split_topic(topics[k]) == (query, document))
        assert starts[key] >= len(calibrated)  # the whole topic lies after the calibration text
        assert len(query.split()) >= 5 and "****" not in query and not document.startswith(query)
    assert len(held_out_pairs(tokenizer, "other text", calibration_tokens, 1000)) == len(everything)
    assert held_out_pairs(tokenizer, raw, calibration_tokens, 5) == pairs[-5:]
    with pytest.raises(ValueError, match="at least 2"):
        held_out_pairs(tokenizer, raw, 0, 1)


def test_sentence_transformers_layout(tmp_path):
    root = _sentence_dir(tmp_path / "st", pooling="cls")
    assert read_pooling(root) == "cls" and transformer_dir(root) == root
    assert read_pooling(tmp_path) is None
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True,
                                                                "pooling_mode_cls_token": True}))
    with pytest.raises(ValueError, match="exactly one pooling mode"):
        read_pooling(root)
    out = tmp_path / "out"
    out.mkdir()
    assert set(copy_sentence_files(root, out)) == {"modules.json", "sentence_bert_config.json", "1_Pooling"}
    assert json.loads((out / "modules.json").read_text())[0]["path"] == ""
    nested = tmp_path / "nested"  # the Hugging Face model in the Transformer module's own folder
    nested.mkdir()
    (nested / "modules.json").write_text(json.dumps([{"path": "0_Transformer",
                                                      "type": "sentence_transformers.models.Transformer"}]))
    assert transformer_dir(nested) == nested / "0_Transformer"


def test_load_model_builds_the_bare_encoder_with_its_pooling(tmp_path):
    from rankwise.io.models import load_model

    loaded = load_model(str(_sentence_dir(tmp_path / "st", pooling="max")))
    assert type(loaded.model).__name__ == "BertModel" and loaded.model.config.rankwise_pooling == "max"
    torch.testing.assert_close(_hidden(loaded.model), _hidden(tiny_encoder()))
    nested = tmp_path / "nested"  # the Hugging Face model in the Transformer module's folder, pooling beside it
    _sentence_dir(nested / "0_Transformer", pooling="cls")
    (nested / "0_Transformer" / "1_Pooling").rename(nested / "1_Pooling")
    (nested / "modules.json").write_text(json.dumps([
        {"path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (nested / "0_Transformer" / "modules.json").unlink()
    loaded = load_model(str(nested))
    assert type(loaded.model).__name__ == "BertModel" and loaded.model.config.rankwise_pooling == "cls"
    assert read_pooling(nested / "0_Transformer") == "cls" and read_pooling(tmp_path / "st" / "1_Pooling") is None


runner = CliRunner()
SMALL = ["--seq-len", "16", "--calib-samples", "8", "--batch-size", "4"]


def test_cli_compress_eval_compare_generate(tmp_path):
    src = _sentence_dir(tmp_path / "st")
    text = tmp_path / "text.txt"  # a short calibration text (not the pydoc topics: every topic is held out)
    text.write_text(default_text()[:3000])
    small = [*SMALL, "--text", str(text)]
    out = tmp_path / "c"
    result = runner.invoke(app, ["compress", str(src), "--method", "fwsvd", "--ratio", "0.3", "--out", str(out),
                                 *small])
    assert result.exit_code == 0, result.output
    assert (out / "modules.json").is_file() and read_pooling(out) == "mean"
    result = runner.invoke(app, ["eval", str(out), "--json", "--reference", str(src), "--eval-samples", "6",
                                 "--seq-len", "16", "--calib-samples", "8", "--text", str(text)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["candidates"] == 6 and 0 < data["cosine"] < 1 and 0 <= data["top1"] <= 1
    result = runner.invoke(app, ["compare", str(src), "--methods", "svd,fwsvd", "--ratios", "0.3", "--out",
                                 str(tmp_path / "cmp"), "--eval-samples", "6", *small])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["dense"]["cosine"] == pytest.approx(1.0) and [r["method"] for r in saved["rows"]] == ["svd", "fwsvd"]
    assert all(r["cosine"] < 1 for r in saved["rows"])
    result = runner.invoke(app, ["generate", str(src), "--prompt", "hello"])
    assert result.exit_code == 2 and "needs a causal LM" in result.output
    result = runner.invoke(app, ["compress", str(src), "--method", "fwsvd", "--out", str(tmp_path / "odd"),
                                 "--seq-len", "16", "--calib-samples", "6", "--batch-size", "3", "--text", str(text)])
    assert result.exit_code == 2 and "even number >= 4" in result.output
