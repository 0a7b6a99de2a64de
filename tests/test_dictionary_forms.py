"""The dictionary's byte-sized and cross-block forms: int8 values with packed indices (``value_bits=8``, kind
``"dictionary_int8"``) and one dictionary shared across blocks (``group_size > 1``, kind ``"shared_dictionary"``)."""

from __future__ import annotations

import pytest
import torch

from rankwise.linalg import whitened_dictionary
from rankwise.methods import config_class
from rankwise.nn import kind_class
from tests.test_dictionary import F64, _correlated, _gen, _method, _stats

# --- 8-bit values and packed indices (value_bits=8, kind "dictionary_int8") ----------------------------------------


def test_int8_layer_stores_its_cost_and_stays_close_to_the_float_layer():
    from rankwise.nn import Int8DictionaryLinear
    from rankwise.nn.dictionary_q import index_bits

    assert [index_bits(k) for k in (1, 2, 3, 8, 9, 512, 513)] == [1, 1, 2, 3, 4, 9, 10]
    config, fn = _method(ratio=0.2, value_bits=8)
    X = _correlated(48, 400, seed=22)
    W = torch.randn(80, 48, generator=_gen(22))
    for dtype, size in [(torch.float32, 4), (torch.bfloat16, 2)]:
        for knob in (1, 9, 30):
            layer = fn(W.to(dtype), _stats(X), knob, config, "layer")
            assert isinstance(layer, Int8DictionaryLinear) and layer.dictionary_scale.dtype == dtype
            cost = config.cost(80, 48, knob, size)
            assert (cost.params, cost.bytes) == (layer.num_params, layer.stored_bytes(size))
            assert cost.bytes == knob * 48 + 80 * config.nonzeros(knob) + (knob + 80) * size + \
                -(-80 * config.nonzeros(knob) // 8) * index_bits(knob)
    floats = _method(ratio=0.2)[1](W, _stats(X), 30, _method(ratio=0.2)[0], "layer")
    layer = fn(W, _stats(X), 30, config, "layer")
    assert torch.equal(layer.atom_indices(), floats.indices.long())
    with torch.no_grad():
        gap = float(torch.linalg.norm(layer.dense_weight() - floats.dense_weight()) / torch.linalg.norm(W))
    assert gap < 0.02  # int8 per row: about 1 % of the weight
    x = torch.randn(5, 48, generator=_gen(23))
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().T, atol=1e-5, rtol=1e-5)
    fresh = kind_class("dictionary_int8").from_spec(48, 80, False, layer.spec())
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))
    state = layer.state_dict()
    state["indices"] = state["indices"].float()
    with pytest.raises(ValueError, match=r"^dictionary_int8 layer \(root\): indices: must be packed uint8 codes"):
        fresh.load_state_dict(state)
    state["indices"] = torch.full_like(layer.indices, 255)  # every 5-bit index 31, beyond 30 atoms
    with pytest.raises(ValueError, match=r"^dictionary_int8 layer \(root\): indices: must lie in \[0, atoms = 30\)"):
        fresh.load_state_dict(state)


def test_int8_values_buy_more_atoms_and_less_error_at_the_same_bits(tmp_path):
    from transformers import AutoModelForCausalLM

    from rankwise.compression import compress_
    from rankwise.io.save import save
    from tests.tiny_models import tiny_model, tiny_tokens

    tokens, reports, models = tiny_tokens(), {}, {}
    for value_bits in (None, 8):
        models[value_bits] = tiny_model("llama")
        config = config_class("dictionary")(bits=12.0, value_bits=value_bits)
        reports[value_bits] = compress_(models[value_bits], config, tokens, progress=False)
    floats, int8 = reports[None], reports[8]
    assert int8.bits_at(4) <= 12.0 and floats.bits_at(4) <= 12.0
    assert {row.kind for row in int8.layers} == {"dictionary_int8"}
    assert all(b.rank > a.rank for a, b in zip(floats.layers, int8.layers, strict=True))
    assert sum(r.rel_error for r in int8.layers) < sum(r.rel_error for r in floats.layers)
    save(models[8], tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, models[8](tokens).logits)


# --- one dictionary shared across blocks (group_size > 1, kind "shared_dictionary") ---------------------------------


def test_group_fit_is_the_whitened_dictionary_of_the_stacked_weights():
    from rankwise.methods.base import group_method_for
    from rankwise.nn import SharedDictionaryLinear

    config = config_class("dictionary")(ratio=0.3, group_size=2)
    weights = [torch.randn(20, 16, generator=_gen(30 + k), dtype=F64) for k in range(3)]
    X = _correlated(16, 300, seed=31)
    stats = [_stats(X[:, 100 * k:100 * (k + 1)]) for k in range(3)]
    layers = group_method_for(config)(["a", "b", "c"], weights, stats, 12, config)
    C = sum(s.xxt for s in stats) / sum(s.count for s in stats)
    reference = whitened_dictionary(torch.cat(weights), C, 12, config.nonzeros(12), sweeps=config.sweeps,
                                    steps=config.omp_steps, iterations=config.iterations, generator=config.seed)
    torch.testing.assert_close(torch.cat([layer.dense_weight().detach() for layer in layers]), reference.to_dense())
    assert all(isinstance(layer, SharedDictionaryLinear) for layer in layers)
    assert layers[0].owner_name is None and [layer.owner_name for layer in layers[1:]] == ["a", "a"]
    assert layers[2].shared() is layers[0].dictionary and layers[1].dictionary is None
    cost = config.group_cost([(20, 16)] * 3, 12, 8)
    assert cost.params == sum(layer.num_params for layer in layers) == 12 * 16 + 60 * config.nonzeros(12)
    assert cost.bytes == sum(layer.nbytes for layer in layers)


def test_sharing_across_blocks_stores_each_dictionary_once_buys_atoms_and_reloads(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    import rankwise
    from rankwise.compression import compress_
    from rankwise.io.save import save
    from rankwise.nn import SharedDictionaryLinear, compressed_modules
    from tests.tiny_models import tiny_model, tiny_tokens

    tokens = tiny_tokens()
    reports = {}
    for group_size in (1, 2):
        model = tiny_model("llama")
        reports[group_size] = compress_(model, config_class("dictionary")(ratio=0.3, group_size=group_size), tokens,
                                        progress=False)
    report = reports[2]
    assert report.removed_fraction >= 0.3 - 0.02
    layers = compressed_modules(model)
    shared = {n: m for n, m in layers.items() if isinstance(m, SharedDictionaryLinear)}
    assert {n.rsplit(".", 1)[-1] for n in shared} == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    assert all(m.owner_name == (None if ".layers.0." in n else n.replace(".layers.1.", ".layers.0."))
               for n, m in shared.items())
    assert sum(r.params_after for r in report.layers) == sum(m.num_params for m in layers.values())
    alone = {r.name: r.rank for r in reports[1].layers}
    assert all(r.rank >= alone[r.name] for r in report.layers if r.name in shared)
    assert any(r.rank > alone[r.name] for r in report.layers if r.name in shared)  # sharing buys atoms
    save(model, tmp_path / "m")
    x = tiny_tokens(2, 16, seed=5)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)
    member = next(n for n, m in shared.items() if m.owner_name)
    config_file = tmp_path / "m" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"]["modules"][member]["dictionary"] = "model.layers.1.mlp.down_proj"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"config.json: field 'quantization_config.modules.{member}.dictionary' "
                       r"names 'model.layers.1.mlp.down_proj', which is not a layer that stores a shared dictionary"):
        rankwise.load(tmp_path / "m", verify=False)  # past the checksum: validation alone refuses it
    with pytest.raises(ValueError, match="value_bits=8 with group_size > 1 is not implemented"):
        config_class("dictionary")(group_size=2, value_bits=8)
