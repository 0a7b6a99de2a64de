"""compress_ on tiny Llama / GPT-2 / OPT: conformance over every registered method, plus invariants."""

from __future__ import annotations

import pytest
import torch

from rankwise.calibrate import collect_stats
from rankwise.calibrate.stats import input_groups
from rankwise.compression import compress_
from rankwise.methods import CompressConfig, config_class, method_names
from rankwise.methods.svd import SVDConfig
from rankwise.methods.svd_llm import SVDLLMConfig
from rankwise.nn import LowRankLinear, compressed_modules, linear_weight, model_num_params
from rankwise.targets import find_targets
from tests.tiny_models import budget, tiny_model, tiny_tokens

ARCHS = ["llama", "gpt2", "opt"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", method_names())
def test_every_method_conforms(arch, method):
    """Budget met, cost as declared, dtype preserved, finite outputs, deterministic, one layer per target."""
    config = config_class(method)(**budget(method))
    tokens = tiny_tokens()
    if config.structured and arch != "llama":  # structured methods narrow Llama-style modules only
        with pytest.raises(ValueError, match="model type"):
            compress_(tiny_model(arch), config, tokens, progress=False)
        return
    outs = []
    for _ in range(2):
        model = tiny_model(arch)
        targets = find_targets(model)
        dense_targeted = sum(p.numel() for m in targets.values() for p in m.parameters())
        report = compress_(model, config, tokens, progress=False)
        assert len(report.layers) == len(targets)
        assert report.params_targeted_before == dense_targeted
        layers = compressed_modules(model)
        assert len(layers) == len(targets)
        for row in report.layers:
            m, n = row.shape
            layer = layers[row.name]
            bias = m if layer.bias is not None else 0
            if row.kind not in ("shared_basis", "narrow"):  # a shared basis is counted once, by its group
                # (tests/test_basis_sharing); a narrow layer's size is its module's width (tests/test_modegpt)
                cost = config.cost(m, n, row.rank, 4)  # the tiny models are float32
                assert (cost.params + bias, cost.bytes + 4 * bias) == (layer.num_params, layer.stored_bytes(4))
            assert row.params_after == layer.num_params
            assert all(t.dtype == torch.float32 for t in layer.parameters())
        if config.bits is None:
            for row in report.layers:
                m, n = row.shape
                if row.kind not in ("shared_basis", "narrow"):  # a shared basis' layer holds more than its
                    # share; a structured method's budget is per block
                    assert row.params_after <= 0.7 * m * n + m  # at least 30 % of the weight removed (bias kept)
            assert report.removed_fraction >= 0.3 - 0.02
        else:  # the budget in bits is met, biases aside
            biases = sum(layers[row.name].bias.numel() for row in report.layers if layers[row.name].bias is not None)
            assert report.bits_at(4) <= config.bits + 8 * 4 * biases / dense_targeted + 1e-9
        assert report.params_total_after == model_num_params(model)
        with torch.no_grad():
            out = model(tokens).logits
        assert bool(torch.isfinite(out).all())
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_svd_llm_beats_plain_svd_on_calibration_error(arch):
    tokens = tiny_tokens(16)
    errs = {}
    for config in (SVDConfig(ratio=0.4), SVDLLMConfig(ratio=0.4)):
        model = tiny_model(arch)
        report = compress_(model, config, tokens, progress=False)
        errs[config.name] = [layer.rel_error for layer in report.layers]
    assert all(w <= p + 1e-6 for w, p in zip(errs["svd_llm"], errs["svd"], strict=True))


def test_error_decreases_with_lower_ratio():
    tokens = tiny_tokens()
    errors = []
    for ratio in (0.2, 0.5, 0.8):
        model = tiny_model("llama")
        report = compress_(model, SVDLLMConfig(ratio=ratio), tokens, progress=False)
        errors.append(sum(layer.rel_error for layer in report.layers))
    assert errors[0] < errors[1] < errors[2]


def test_stats_shared_between_layers_reading_same_input():
    model = tiny_model("llama")
    stats = collect_stats(model, tiny_tokens(), find_targets(model), kinds=("xxt", "abs"))
    attn = "model.layers.0.self_attn."
    assert stats[attn + "q_proj"] is stats[attn + "k_proj"] is stats[attn + "v_proj"]
    assert stats[attn + "o_proj"] is not stats[attn + "q_proj"]
    assert stats["model.layers.0.mlp.gate_proj"] is stats["model.layers.0.mlp.up_proj"]
    s = stats[attn + "q_proj"]
    assert s.count == 8 * 32
    block = [n for n in stats if n.startswith("model.layers.0.")]
    groups = input_groups([*block, "model.layers.0.extra"], stats)  # a layer without statistics stands alone
    assert [g.names for g in groups] == [(attn + "q_proj", attn + "k_proj", attn + "v_proj"), (attn + "o_proj",),
                                         ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"),
                                         ("model.layers.0.mlp.down_proj",), ("model.layers.0.extra",)]
    assert groups[0].stats is s and groups[-1].stats is None
    torch.testing.assert_close(s.covariance, s.covariance.T)
    assert float(torch.linalg.eigvalsh(s.covariance).min()) > -1e-8


def test_covariance_matches_direct_computation():
    model = tiny_model("llama")
    captured = []
    q = model.model.layers[1].self_attn.q_proj
    handle = q.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().reshape(-1, 64)))
    tokens = tiny_tokens(6)
    stats = collect_stats(model, tokens, {"q": q}, batch_size=4)
    handle.remove()
    X = torch.cat(captured).double()
    ref = X.T @ X  # float32 within a batch: agreement to float32 accuracy
    torch.testing.assert_close(stats["q"].xxt, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert stats["q"].count == X.shape[0]


def test_fisher_collected_for_fwsvd_and_is_nonnegative():
    model = tiny_model("gpt2")
    targets = find_targets(model)
    stats = collect_stats(model, tiny_tokens(4), targets, kinds=("fisher",))
    for name, module in targets.items():
        m, n = linear_weight(module).shape
        rows, cols = stats[name].fisher_out[name], stats[name].fisher_in[name]
        assert rows.shape == (m,) and cols.shape == (n,) and bool((rows >= 0).all()) and float(rows.sum()) > 0
        torch.testing.assert_close(rows.sum(), cols.sum())  # both are the total squared gradient
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_targets_exclude_embeddings_and_head_and_filter():
    for arch in ARCHS:
        model = tiny_model(arch)
        names = list(find_targets(model))
        assert names and not any("lm_head" in n or "embed" in n or "wte" in n for n in names)
    model = tiny_model("llama")
    attn_only = find_targets(model, ("attn",))
    assert set(attn_only) == {n for n in find_targets(model) if "self_attn" in n}
    only_q = find_targets(model, filter_fn=lambda name, _m: name.endswith("q_proj"))
    assert len(only_q) == 2


def test_attention_only_targets_leave_mlp_dense():
    model = tiny_model("llama")
    compress_(model, SVDLLMConfig(ratio=0.3, targets=("attn",)), tiny_tokens(), progress=False)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LowRankLinear)
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)


@pytest.mark.parametrize("kwargs,match", [
    ({"ratio": 0.0}, r"ratio must be a fraction of parameters removed in \(0, 1\)"),
    ({"ratio": 1.0}, r"ratio must be a fraction"),
    ({"ratio": -0.5}, r"ratio must be a fraction"),
    ({"targets": ("embed.tokens",)}, r"targets must be groups \(attn, mlp\) and/or layer names"),
    ({"targets": ()}, r"targets must be groups \(attn, mlp\) and/or layer names"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressConfig(**kwargs)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown method 'foo'; valid methods: asvd, basis_sharing, .*svd_llm"):
        config_class("foo")


def test_non_finite_weight_names_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer model\.layers\.1\.mlp\.down_proj has non-finite weights"):
        compress_(model, SVDConfig(ratio=0.2), progress=False)


def test_data_aware_method_without_data_fails_clearly():
    with pytest.raises(ValueError, match="method 'svd_llm' needs calibration data"):
        compress_(tiny_model("llama"), SVDLLMConfig(ratio=0.2), progress=False)


def test_singular_covariance_falls_back_and_is_reported():
    model = tiny_model("llama")
    tokens = torch.full((2, 4), 7)  # one repeated token: rank-deficient inputs everywhere
    report = compress_(model, SVDLLMConfig(ratio=0.3), tokens, progress=False)
    assert any("eigen-decomposition" in layer.notes for layer in report.layers)
    with torch.no_grad():
        assert bool(torch.isfinite(model(tiny_tokens()).logits).all())


def test_relative_output_error_is_the_output_error_on_the_calibration_inputs():
    from rankwise.calibrate import LayerStats
    from rankwise.compression import relative_output_error

    g = torch.Generator().manual_seed(0)
    W, Wa = torch.randn(40, 24, generator=g), torch.randn(40, 24, generator=g) * 0.1
    X = torch.randn(500, 24, generator=g) * 30.0  # (tokens, n)
    stats = LayerStats(n=24)
    stats.add(X, frozenset({"xxt"}))
    expected = float(torch.linalg.norm(X.double() @ (W - (W + Wa)).double().T) / torch.linalg.norm(
        X.double() @ W.double().T))
    assert relative_output_error(W, W + Wa, stats) == pytest.approx(expected, rel=1e-4)
    assert relative_output_error(W, W, stats) == 0.0
    assert relative_output_error(W, W, None) is None
