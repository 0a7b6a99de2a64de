"""MoDeGPT: the closed forms of each module against their definitions, the ``narrow`` layer kind, the narrowed
attention against the zero-padded dense model, and what a user does next with the output (reload, plain
transformers, generate, PEFT LoRA)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

import rankwise
from rankwise.compression import compress_
from rankwise.io.save import densify_
from rankwise.linalg import nystrom_columns, ridge_leverage_scores, rope_pair_selection, whitened_value_output
from rankwise.methods import config_class
from rankwise.methods.modegpt import ModeGPTConfig
from rankwise.nn import NarrowLinear, compressed_modules, kind_class, model_num_params
from rankwise.nn.narrow import is_narrowed
from tests.tiny_models import tiny_model, tiny_tokens


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


# -- the closed forms ------------------------------------------------------------------------------------------------

def test_ridge_leverage_scores_are_the_diagonal_of_the_ridge_projection():
    X = torch.randn(12, 200, generator=_gen(), dtype=torch.float64)
    X[3] *= 0.01  # a nearly dead neuron: low leverage
    C = X @ X.T
    lam = 0.1 * float(C.diagonal().mean())
    expected = torch.diagonal(C @ torch.linalg.inv(C + lam * torch.eye(12, dtype=torch.float64)))
    scores = ridge_leverage_scores(C.float(), ridge=0.1)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert int(scores.argmin()) == 3 and bool((scores >= 0).all() & (scores < 1).all())
    with pytest.raises(ValueError, match="ridge must be > 0"):
        ridge_leverage_scores(C, ridge=0.0)


def test_nystrom_columns_is_the_least_squares_refit_on_the_kept_inputs():
    X = torch.randn(10, 300, generator=_gen(1), dtype=torch.float64)  # inputs x tokens
    W = torch.randn(6, 10, generator=_gen(2), dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 7, 9])
    got = nystrom_columns(W, X @ X.T, keep, damp=0.0)
    expected = torch.linalg.lstsq(X[keep].T, (W @ X).T).solution.T  # argmin ||W X - W' X_S||
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(nystrom_columns(W, X @ X.T, torch.arange(10), damp=0.0), W)  # all kept: W itself
    with pytest.raises(ValueError, match="C must be"):
        nystrom_columns(W, torch.eye(4), keep)


def test_rope_pair_selection_keeps_the_best_pairs_shared_by_all_heads():
    heads, kv_heads, d = 4, 2, 8
    q = torch.rand(heads, d, generator=_gen(3))
    k = torch.rand(kv_heads, d, generator=_gen(4))
    index = rope_pair_selection(q, k, 4)
    first = index[:2]
    assert torch.equal(index[2:], first + d // 2) and torch.equal(first, first.sort().values)
    score = (q * k.repeat_interleave(2, 0)).sqrt()  # CR score ||C_q^1/2 e_j|| ||C_k^1/2 e_j|| per head and position

    def kept(pairs):
        return float(sum(score[:, p].sum() + score[:, p + d // 2].sum() for p in pairs))

    best = max(itertools.combinations(range(d // 2), 2), key=kept)  # brute force over every choice of two pairs
    assert kept(first.tolist()) == pytest.approx(kept(best))
    for width in (3, 0, 10):
        with pytest.raises(ValueError, match="width must be even"):
            rope_pair_selection(q, k, width)


def test_whitened_value_output_is_the_eckart_young_optimum_of_the_stacked_products():
    n, d, heads, kv_heads, width = 12, 4, 4, 2, 2
    X = torch.randn(n, 400, generator=_gen(5), dtype=torch.float64)
    V = torch.randn(kv_heads * d, n, generator=_gen(6), dtype=torch.float64)
    O = torch.randn(n, heads * d, generator=_gen(7), dtype=torch.float64)  # noqa: E741 (the paper's name)
    V2, O2 = whitened_value_output(V, O, X @ X.T, heads, kv_heads, width)
    assert V2.shape == (kv_heads * width, n) and O2.shape == (n, heads * width)
    group = heads // kv_heads
    for g in range(kv_heads):
        hs = range(g * group, (g + 1) * group)
        stacked = torch.cat([X.T @ V[g * d:(g + 1) * d].T @ O[:, h * d:(h + 1) * d].T for h in hs], dim=1)
        approx = torch.cat([X.T @ V2[g * width:(g + 1) * width].T @ O2[:, h * width:(h + 1) * width].T
                            for h in hs], dim=1)
        tail = torch.linalg.svdvals(stacked)[width:]
        assert float((stacked - approx).norm() ** 2) == pytest.approx(float((tail ** 2).sum()), rel=1e-6)
    full_v, full_o = whitened_value_output(V, O, X @ X.T, heads, kv_heads, d)  # full width: the same map
    for h in range(heads):
        g = h // group
        torch.testing.assert_close(full_o[:, h * d:(h + 1) * d] @ full_v[g * d:(g + 1) * d],
                                   O[:, h * d:(h + 1) * d] @ V[g * d:(g + 1) * d])


# -- the narrow layer kind -------------------------------------------------------------------------------------------

def test_narrow_layer_places_its_rows_and_columns_in_the_dense_slot():
    M = torch.randn(3, 5, generator=_gen(8))
    rows = NarrowLinear.from_matrix(M, 5, 8, out_index=torch.tensor([6, 1, 4]))
    W = rows.dense_weight().detach()
    assert W.shape == (8, 5) and torch.equal(W[[6, 1, 4]], M) and float(W.abs().sum()) == pytest.approx(
        float(M.abs().sum()))
    cols = NarrowLinear.from_matrix(M, 9, 3, in_index=torch.tensor([0, 2, 4, 6, 8]))
    x = torch.randn(2, 9, generator=_gen(9))
    torch.testing.assert_close(cols(x[:, [0, 2, 4, 6, 8]]), x @ cols.dense_weight().T)
    assert rows.num_params == 15 and rows.fixed_nbytes == 3 * 4  # int32 positions: bytes, not parameters
    assert rows.io_shape == (5, 3) and (rows.in_features, rows.out_features) == (5, 8)
    assert kind_class("narrow") is NarrowLinear
    assert NarrowLinear.check_spec(5, 8, {"rows": 3, "cols": 5}) is None
    assert "rows" in NarrowLinear.check_spec(5, 8, {"rows": 9, "cols": 5})
    assert NarrowLinear.check_spec(5, 8, {"rows": 8, "cols": 5}) is not None  # not narrower than its slot
    with pytest.raises(ValueError, match="distinct positions"):
        NarrowLinear.from_matrix(M, 5, 8, out_index=torch.tensor([1, 1, 4]))


# -- the method on a tiny Llama --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def narrowed():
    model, tokens = tiny_model("llama"), tiny_tokens(8)
    report = compress_(model, ModeGPTConfig(ratio=0.3), tokens, progress=False)
    return model, report


def test_budget_is_met_with_smaller_dense_layers(narrowed):
    model, report = narrowed
    assert report.removed_fraction == pytest.approx(0.3, abs=0.01)
    assert report.params_total_after == model_num_params(model)
    layers = compressed_modules(model)
    assert {layer.kind for layer in layers.values()} == {"narrow"}
    attn = model.model.layers[0].self_attn
    assert is_narrowed(attn) and attn.head_dim < 16 and attn.head_dim % 2 == 0
    assert attn.q_proj.matrix.shape == (4 * attn.head_dim, 64) and attn.k_proj.matrix.shape == (2 * attn.head_dim, 64)
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.matrix.shape[0] == mlp.up_proj.matrix.shape[0] == mlp.down_proj.matrix.shape[1] < 160
    assert any("kept per block" in note for note in report.notes)


def test_narrowed_model_equals_its_zero_padded_dense_model(narrowed):
    """The smaller head dimension with sliced rotary tables computes exactly what the dense architecture computes
    with the removed rows and columns set to zero: RoPE, GQA and the head layout are right."""
    model, _ = narrowed
    tokens = tiny_tokens(2, seed=3)
    dense = densify_(copy.deepcopy(model))
    assert not compressed_modules(dense) and not is_narrowed(dense.model.layers[0].self_attn)
    torch.testing.assert_close(_logits(dense, tokens), _logits(model, tokens), rtol=1e-5, atol=1e-5)
    prompt = tokens[:1, :6]
    assert torch.equal(model.generate(prompt, max_new_tokens=10, do_sample=False),  # KV cache of narrow heads
                       dense.generate(prompt, max_new_tokens=10, do_sample=False))
    assert not torch.allclose(_logits(tiny_model("llama"), tokens), _logits(model, tokens), atol=1e-3)


def test_saved_model_reloads_in_rankwise_and_plain_transformers(narrowed, tmp_path):
    model, _ = narrowed
    tokens = tiny_tokens(2, seed=4)
    rankwise.save(model, tmp_path / "out")
    for loaded in (rankwise.load(tmp_path / "out").model, AutoModelForCausalLM.from_pretrained(tmp_path / "out")):
        assert is_narrowed(loaded.model.layers[1].self_attn)
        torch.testing.assert_close(_logits(loaded, tokens), _logits(model, tokens), rtol=0, atol=0)


def test_peft_lora_trains_on_narrow_layers_and_merging_is_refused(narrowed):
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(narrowed[0])
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  init_lora_weights=True))
    tokens = tiny_tokens(2, seed=5)
    before = _logits(peft_model, tokens)
    torch.testing.assert_close(before, _logits(narrowed[0], tokens))  # LoRA starts at zero
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    peft_model(tokens, labels=tokens).loss.backward()
    optimizer.step()
    assert not torch.allclose(_logits(peft_model, tokens), before)
    with pytest.raises(ValueError, match="narrow"):
        peft_model.merge_and_unload()


def test_uniform_budgets_and_sequential_mode():
    tokens = tiny_tokens(8)
    model = tiny_model("llama")
    report = compress_(model, ModeGPTConfig(ratio=0.4, layer_budgets="uniform", sequential=True), tokens,
                       progress=False)
    assert report.removed_fraction == pytest.approx(0.4, abs=0.01)
    widths = {row.rank for row in report.layers if row.name.endswith("q_proj")}
    assert len(widths) == 1  # the same width in every block


def test_block_keeps_meet_the_budget_cap_and_favour_influential_blocks():
    config = ModeGPTConfig(ratio=0.3, temperature=0.05, max_removed=0.5)
    keeps = config.block_keeps([0.01, 0.2, 0.05, 0.3], 4)
    assert sum(1 - k for k in keeps) == pytest.approx(4 * 0.3)
    assert min(keeps) >= 0.5 - 1e-12
    assert keeps[0] <= keeps[2] <= keeps[1] <= keeps[3]  # the least influential block loses the most
    assert config.block_keeps(None, 3) == pytest.approx([0.7] * 3)


@pytest.mark.parametrize("fields,message", [
    ({"allocation": "loss"}, "allocation must stay 'uniform'"),
    ({"update_u": True}, "update_u is not supported"),
    ({"bits": 8.0}, "takes a ratio of parameters"),
    ({"layer_budgets": "energy"}, "layer_budgets must be one of"),
    ({"temperature": 0.0}, "temperature must be"),
    ({"max_removed": 0.1}, "max_removed must be"),
])
def test_bad_settings_are_one_line_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        compress_(tiny_model("llama"), config_class("modegpt")(**fields), tiny_tokens(4), progress=False)


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_other_architectures_are_refused_before_any_work(arch):
    with pytest.raises(ValueError, match="modegpt narrows Llama-style decoders"):
        compress_(tiny_model(arch), ModeGPTConfig(), tiny_tokens(4), progress=False)


def test_partial_modules_and_missing_data_are_refused():
    with pytest.raises(ValueError, match="narrows whole modules"):
        compress_(tiny_model("llama"), ModeGPTConfig(), tiny_tokens(4), progress=False,
                  filter_fn=lambda name, _module: not name.endswith("k_proj"))
    with pytest.raises(ValueError, match="needs calibration data"):
        compress_(tiny_model("llama"), ModeGPTConfig(), None, progress=False)


def test_compare_row_runs_the_influence_pass_on_shared_statistics():
    """compare shares one dense calibration among its rows; a modegpt row still gets its per-block budgets."""
    from rankwise.eval.compare import compare

    model = tiny_model("llama")
    result = compare(model, tiny_tokens(8), tiny_tokens(4, seed=9), [ModeGPTConfig(ratio=0.3)], progress=False,
                     speed_repeats=1)
    row = next(r for r in result.rows if r.method.startswith("modegpt"))
    direct = tiny_model("llama")
    report = compress_(direct, ModeGPTConfig(ratio=0.3), tiny_tokens(8), progress=False)
    assert row.params_total == model_num_params(direct)
    kept = {layer.name: layer.params_after / layer.params_before for layer in report.layers}
    assert row.kept == pytest.approx(kept)  # the same per-block widths as a run with the influence pass
    assert len({round(v, 6) for v in kept.values()}) > 2  # blocks differ: not uniform budgets


def test_onnx_export_of_a_narrowed_model_matches_torch(narrowed, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from rankwise.export import OnnxCausalLM, export_onnx, max_logit_diff

    model, _ = narrowed
    export = export_onnx(model, tmp_path / "onnx")
    widths = [layer.self_attn.head_dim for layer in model.model.layers]
    assert len(set(widths)) > 1 and export.layout.head_dims == tuple(widths)  # one cache width per layer
    runtime = OnnxCausalLM(tmp_path / "onnx")
    assert max_logit_diff(model, runtime, tiny_tokens(2, seed=6)) < 1e-4
    prompts = tiny_tokens(2, 6, seed=3)
    with torch.no_grad():
        reference = model.generate(prompts, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(runtime.generate(prompts, 12, eos_token_id=None).tokens, reference)


def test_eora_compensation_of_narrow_layers_is_refused(narrowed):
    from rankwise.compensate import compensate

    with pytest.raises(ValueError, match=r"narrowed to 40 x 64 \(structured compression"):
        compensate(tiny_model("llama"), narrowed[0], tiny_tokens(4), rank=2, progress=False)


def test_streamed_evaluation_of_a_narrowed_directory_is_refused_in_one_line(narrowed, tmp_path):
    from rankwise.eval.stream import streamed_perplexity

    model, _ = narrowed
    rankwise.save(model, tmp_path / "out")
    with pytest.raises(ValueError, match=r"narrow layers, which the streamed reader cannot load .* whole instead"):
        streamed_perplexity(tmp_path / "out", tiny_tokens(4, seed=8), batch_size=2, activation_mb=0)


def test_healing_trains_the_narrow_matrices_and_other_tuners_refuse_them(narrowed):
    from rankwise.adapt.heal import mark_trainable

    model = copy.deepcopy(narrowed[0])
    names = mark_trainable(model, "factors")
    assert set(names) == set(compressed_modules(model)) and model.model.layers[0].mlp.down_proj.matrix.requires_grad
    from peft import get_peft_model

    from rankwise.adapt import SVFitConfig

    with pytest.raises(ValueError, match="narrowed by structured compression"):
        get_peft_model(copy.deepcopy(narrowed[0]), SVFitConfig(r=2, target_modules=["q_proj"]))


def test_mistral_narrows_like_llama():
    from transformers import MistralConfig

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config).eval()
    report = compress_(model, ModeGPTConfig(ratio=0.3), tiny_tokens(8), progress=False)
    assert report.removed_fraction == pytest.approx(0.3, abs=0.01)
    tokens = tiny_tokens(2, seed=3)
    torch.testing.assert_close(_logits(densify_(copy.deepcopy(model)), tokens), _logits(model, tokens),
                               rtol=1e-5, atol=1e-5)
