"""Basis Sharing: the joint whitened SVD against its closed form, the group cost, the layer kind and the artifact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import rankwise
from rankwise.compression import compress_
from rankwise.linalg import shared_basis, whitened_svd
from rankwise.methods.basis_sharing import BasisSharingConfig
from rankwise.methods.svd_llm import SVDLLMConfig
from rankwise.nn import SharedBasisLinear, compressed_modules
from tests.tiny_models import tiny_model, tiny_tokens


def _correlated_inputs(n: int, tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    return torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix  # (tokens, n)


def test_shared_basis_is_the_truncated_whitened_svd_of_the_stacked_weights():
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(12, 10, generator=g, dtype=torch.float64) for _ in range(3)]
    X = _correlated_inputs(10, 200, 1)
    C = X.T @ X
    basis, coefficients, _ = shared_basis(weights, C, 6)
    reference = whitened_svd(torch.cat(weights), C, 6).to_dense()  # the closed form on the stack
    torch.testing.assert_close(torch.cat([c @ basis for c in coefficients]), reference)
    # full rank reconstructs every matrix exactly
    basis, coefficients, _ = shared_basis(weights, C, 10)
    for w, c in zip(weights, coefficients, strict=True):
        torch.testing.assert_close(c @ basis, w)


def test_one_matrix_is_svd_llm_and_sharing_costs_less_than_separate_factors():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(16, 12, generator=g, dtype=torch.float64)
    X = _correlated_inputs(12, 300, 3)
    basis, (up,), _ = shared_basis([W], X.T @ X, 5)
    torch.testing.assert_close(up @ basis, whitened_svd(W, X.T @ X, 5).to_dense())
    config = BasisSharingConfig()
    shapes = [(16, 12)] * 4
    assert config.group_cost(shapes, 5, 2).params == 5 * (12 + 4 * 16)
    assert config.group_cost(shapes, 5, 2).params < sum(config.cost(16, 12, 5, 2).params for _ in shapes)


def test_shared_rows_beat_separate_ranks_on_weights_with_a_common_input_subspace():
    """Blocks whose projections read the same directions: at the same stored parameters, one shared basis (of a
    larger rank) has a lower output error than a separate truncation per matrix."""
    g = torch.Generator().manual_seed(4)
    n, m, blocks = 32, 32, 4
    common = torch.randn(8, n, generator=g, dtype=torch.float64)
    weights = [torch.randn(m, 8, generator=g, dtype=torch.float64) @ common
               + 0.05 * torch.randn(m, n, generator=g, dtype=torch.float64) for _ in range(blocks)]
    X = _correlated_inputs(n, 400, 5)
    C = X.T @ X
    separate_rank = 4  # 4 * (m + n) * blocks = 1024 parameters
    shared_rank = 4 * (m + n) * blocks // (n + blocks * m)  # the most the same parameters buy when shared
    basis, coefficients, _ = shared_basis(weights, C, shared_rank)

    def err(approx):
        return sum(float(((w - a) @ X.T).norm() ** 2) for w, a in zip(weights, approx, strict=True))

    shared = err([c @ basis for c in coefficients])
    separate = err([whitened_svd(w, C, separate_rank).to_dense() for w in weights])
    assert shared_rank > separate_rank
    assert shared < separate


def test_compressing_the_tiny_model_stores_each_basis_once_and_reloads(tmp_path):
    tokens = tiny_tokens(8)
    model = tiny_model("llama")
    report = compress_(model, BasisSharingConfig(ratio=0.3), tokens, progress=False)
    assert report.removed_fraction >= 0.3 - 0.02
    layers = compressed_modules(model)
    owners = {n: m for n, m in layers.items() if isinstance(m, SharedBasisLinear) and m.basis_owner is None}
    members = {n: m for n, m in layers.items() if isinstance(m, SharedBasisLinear) and m.basis_owner is not None}
    assert {n.split(".")[2] for n in owners} == {"0"} and {n.split(".")[2] for n in members} == {"1"}
    for name, member in members.items():
        assert member.basis() is layers[member.basis_owner].down
        assert member.basis_owner == name.replace("layers.1.", "layers.0.")
    # o_proj and down_proj are compressed per layer (svd_llm)
    assert all(type(m).__name__ == "LowRankLinear" for n, m in layers.items() if n.endswith(("o_proj", "down_proj")))
    # the report's parameters are what the layers store, each basis once
    assert sum(r.params_after for r in report.layers) == sum(m.num_params for m in layers.values())
    rankwise.io.save(model, tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert all(f"{n}.down" in keys for n in owners) and not any(f"{n}.down" in keys for n in members)
    loaded = rankwise.load(tmp_path / "out").model
    probe = tiny_tokens(2, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe).logits, model(probe).logits)
    # training the reloaded model updates one basis for the whole group
    loaded_layers = compressed_modules(loaded)
    some = next(iter(members))
    assert loaded_layers[some].basis() is loaded_layers[members[some].basis_owner].down


def test_a_manifest_naming_a_missing_basis_is_a_one_line_error(tmp_path):
    model = tiny_model("llama")
    compress_(model, BasisSharingConfig(ratio=0.3), tiny_tokens(8), progress=False)
    rankwise.io.save(model, tmp_path / "out")
    config_file = tmp_path / "out" / "config.json"
    config = json.loads(config_file.read_text())
    modules = config["quantization_config"]["modules"]
    member = next(n for n, s in modules.items() if s.get("basis"))
    modules[member]["basis"] = "model.layers.1.mlp.down_proj"  # a lowrank layer, not a basis
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"config.json: field 'quantization_config.modules.{member}.basis' names "
                       r"'model.layers.1.mlp.down_proj', which is not a layer that stores a shared basis"):
        rankwise.load(tmp_path / "out", verify=False)  # past the checksum: validation alone refuses it


def test_sequential_is_refused_before_any_work():
    with pytest.raises(ValueError, match="sequential and update_u are not supported"):
        compress_(tiny_model("llama"), BasisSharingConfig(ratio=0.3, sequential=True), tiny_tokens(8),
                  progress=False)


def test_group_size_validation():
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        BasisSharingConfig(group_size=1)


def test_sharing_buys_rank_at_the_same_ratio():
    """At the same ratio, every shared projection (q, k, v, gate, up) of the tiny model keeps a higher rank than
    SVD-LLM's per-layer truncation gives it: the basis is paid for once per group."""
    tokens = tiny_tokens(16)
    rows = {}
    for config in (SVDLLMConfig(ratio=0.4), BasisSharingConfig(ratio=0.4)):
        report = compress_(tiny_model("llama"), config, tokens, progress=False)
        rows[config.name] = {r.name: r for r in report.layers}
    shared = [n for n, r in rows["basis_sharing"].items() if r.kind == "shared_basis"]
    assert shared
    assert all(rows["basis_sharing"][n].rank > rows["svd_llm"][n].rank for n in shared)


def test_streamed_evaluation_of_a_shared_model_is_refused_with_a_reason(tmp_path):
    from rankwise.stream import CheckpointSource

    model = tiny_model("llama")
    compress_(model, BasisSharingConfig(ratio=0.3), tiny_tokens(8), progress=False)
    rankwise.io.save(model, tmp_path / "out")
    with pytest.raises(ValueError, match=r"share tensors across blocks .* load the model whole"):
        CheckpointSource(tmp_path / "out")


def test_streamed_dense_export_equals_the_in_memory_model(tmp_path):
    from rankwise.compression import compress_checkpoint
    from tests.tiny_models import tiny_tokenizer

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    memory = tiny_model("llama")
    config = BasisSharingConfig(ratio=0.3)
    compress_(memory, config, tiny_tokens(8), progress=False)
    compress_checkpoint(src, config, tiny_tokens(8), tmp_path / "dense", export="dense", progress=False)
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    probe = tiny_tokens(2, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(dense(probe).logits, memory(probe).logits, rtol=1e-4, atol=1e-4)


def test_a_basis_may_hold_more_vectors_than_one_layer_has_outputs():
    """A group of small projections (grouped K/V: 192 outputs over 576 inputs) shares a basis of rank up to the
    inputs, above one layer's outputs; the spec allows that and refuses a rank above the inputs."""
    assert SharedBasisLinear.check_spec(576, 192, {"rank": 198, "basis": None}) is None
    assert "rank: must be an integer in [1, in_features]" in SharedBasisLinear.check_spec(
        576, 192, {"rank": 577, "basis": None})
    layer = SharedBasisLinear(8, 4, 6, bias=False)
    rebuilt = SharedBasisLinear.from_spec(8, 4, False, layer.spec())
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(rebuilt(x), x @ layer.dense_weight().T)
