"""PEFT LoRA (and rankwise's tuners) on compressed models: ``LowRankLinear`` layers as first-class targets.

Invariants: the adapter starts as the identity on the model; training moves adapter parameters only; ``all-linear``
takes every compressed layer and never the output head; merging keeps layers factorised (rank ``k + r``), equals
the adapted model and unmerges exactly; a merge that would outgrow the dense layer is refused; a saved adapter
reloads on a freshly loaded compressed model; ``rankwise adapt`` trains on and merges into a compressed directory.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from typer.testing import CliRunner

import rankwise
from rankwise.adapt import (
    BlockLoRAConfig,
    CompressedLoraLinear,
    LoLDUConfig,
    LoRASBConfig,
    MiLoRAConfig,
    SVFitConfig,
    check_mergeable,
)
from rankwise.adapt.methods import add_adapter
from rankwise.nn import CompressedLinear, LowRankLinear
from tests.tiny_models import tiny_model, tiny_tokenizer, tiny_tokens

IDS = tiny_tokens(2, 16)


def _compressed(groups: tuple[str, ...] = ("attn", "mlp")) -> torch.nn.Module:
    """The tiny Llama with the ``groups`` projections factorised by plain SVD at ratio 0.3 (ranks 14 to 32)."""
    model = tiny_model("llama")
    rankwise.compress_(model, rankwise.SVDConfig(ratio=0.3, targets=groups), progress=False)
    return model


def _lowrank(model: torch.nn.Module) -> dict[str, LowRankLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _randomise_lora_b(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every LoRA ``B`` (zero at init) random values, so the adapter changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_named_targets_adapt_compressed_layers_and_start_unchanged():
    model = _compressed()
    ranks = {name: m.rank for name, m in _lowrank(model).items()}
    before = _logits(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapted = {name for name, m in peft_model.base_model.model.named_modules() if isinstance(m, CompressedLoraLinear)}
    assert adapted == {name for name in ranks if name.endswith(("q_proj", "v_proj"))}
    assert torch.equal(_logits(peft_model), before)  # B = 0: exactly the base model


def test_all_linear_takes_dense_and_compressed_layers_but_not_the_head():
    model = _compressed(groups=("mlp",))  # attention stays dense, the MLP is factorised
    compressed = set(_lowrank(model))
    dense = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    assert compressed and dense
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert peft_model.peft_config["default"].target_modules == compressed | dense
    wrapped = peft_model.base_model.model
    assert all(isinstance(wrapped.get_submodule(name), CompressedLoraLinear) for name in compressed)
    assert isinstance(wrapped.lm_head, torch.nn.Linear)  # the output head is left alone


def test_dense_models_are_adapted_as_before():
    config = LoraConfig(r=4, target_modules="all-linear")
    peft_model = get_peft_model(tiny_model("llama"), config)
    assert not any(isinstance(m, CompressedLoraLinear) for m in peft_model.modules())
    assert len(peft_model.peft_config["default"].target_modules) == 14  # 7 projections x 2 blocks, no lm_head


def test_training_moves_only_the_adapter():
    peft_model = get_peft_model(_compressed(), LoraConfig(r=4, target_modules="all-linear"))
    before = {name: p.detach().clone() for name, p in peft_model.named_parameters()}
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        peft_model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
    changed = {name for name, p in peft_model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= trainable
    assert any(".lora_B." in name for name in changed)


def test_merge_keeps_layers_factorised_and_equals_the_adapted_model():
    model = _compressed()
    ranks = {name: m.rank for name, m in _lowrank(model).items()}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
    _randomise_lora_b(peft_model)
    peft_model.eval()
    adapted = _logits(peft_model)
    assert not torch.allclose(adapted, _logits(_compressed()), atol=1e-3)  # the adapter does something

    inner = peft_model.base_model.model
    factors = {name: (m.up.detach().clone(), m.down.detach().clone()) for name, m in _lowrank(inner).items()}
    peft_model.merge_adapter()
    assert {name.removesuffix(".base_layer"): m.rank for name, m in _lowrank(inner).items()} == {
        name: rank + 4 for name, rank in ranks.items()}
    torch.testing.assert_close(_logits(peft_model), adapted, atol=1e-5, rtol=0)
    peft_model.unmerge_adapter()  # exact: the appended factors are dropped
    for name, m in _lowrank(inner).items():
        assert torch.equal(m.up, factors[name][0]) and torch.equal(m.down, factors[name][1]), name

    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, CompressedLoraLinear) for m in merged.modules())
    assert {name: m.rank for name, m in _lowrank(merged).items()} == {name: rank + 4 for name, rank in ranks.items()}
    torch.testing.assert_close(_logits(merged), adapted, atol=1e-5, rtol=0)
    layer = merged.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.up[:, :ranks["model.layers.0.self_attn.q_proj"]],
                               factors["model.layers.0.self_attn.q_proj.base_layer"][0])


def test_merge_that_would_outgrow_the_dense_layer_is_refused():
    # q_proj is 64 x 64 at rank 22: rank 32 = 64 * 64 / 128 stores as much as the dense matrix
    peft_model = get_peft_model(_compressed(), LoraConfig(r=10, target_modules=["q_proj"]))
    message = (r"model\.layers\.0\.self_attn\.q_proj would make it rank 22 \+ 10 = 32, not smaller than the dense "
               r"64 x 64 layer \(rank >= 32\); keep the adapter unmerged")
    with pytest.raises(ValueError, match=message):
        check_mergeable(peft_model)
    with pytest.raises(ValueError, match=message):
        peft_model.merge_and_unload()
    check_mergeable(get_peft_model(_compressed(), LoraConfig(r=9, target_modules=["q_proj"])))  # 31: allowed


class _ScaledIdentity(CompressedLinear):
    """A toy compressed kind (``y = a x``), unregistered: LoRA adapts it, nothing can be merged into it exactly."""

    def __init__(self, features: int) -> None:
        super().__init__(features, features)
        self.a = torch.nn.Parameter(torch.tensor(0.5))

    def dense_weight(self) -> torch.Tensor:
        return self.a * torch.eye(self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * x


def test_other_compressed_kinds_train_but_refuse_to_merge():
    model = _compressed()
    model.model.layers[0].self_attn.o_proj = _ScaledIdentity(64)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    layer = peft_model.base_model.model.model.layers[0].self_attn.o_proj
    assert isinstance(layer, CompressedLoraLinear) and isinstance(layer.base_layer, _ScaledIdentity)
    message = r"model\.layers\.0\.self_attn\.o_proj is a _ScaledIdentity layer, which an adapter cannot be merged"
    with pytest.raises(ValueError, match=message):
        check_mergeable(peft_model)


@pytest.mark.parametrize(("config", "message"), [
    (LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "the Dora variant of LoRA is not supported"),
    (LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"), "init_lora_weights='pissa' needs its"),
    (MiLoRAConfig(r=4, target_modules=["q_proj"]), "milora cannot adapt a compressed layer"),
    (LoRASBConfig(r=4, target_modules=["q_proj"]), "lora_sb cannot adapt a compressed layer"),
])
def test_methods_that_need_the_dense_weight_are_refused(config, message):
    with pytest.raises(ValueError, match=message) as err:
        get_peft_model(_compressed(), config)
    assert "q_proj" in str(err.value) and "\n" not in str(err.value)


def test_saved_adapter_reloads_on_a_freshly_loaded_compressed_model(tmp_path):
    rankwise.save(_compressed(), tmp_path / "c")
    peft_model = get_peft_model(rankwise.load(tmp_path / "c").model, LoraConfig(r=4, target_modules="all-linear"))
    _randomise_lora_b(peft_model)
    adapted = _logits(peft_model)
    peft_model.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and "model.layers.0.mlp.down_proj" in saved["target_modules"]
    reloaded = PeftModel.from_pretrained(rankwise.load(tmp_path / "c").model, tmp_path / "a")
    assert isinstance(reloaded.base_model.model.model.layers[1].mlp.up_proj, CompressedLoraLinear)
    torch.testing.assert_close(_logits(reloaded), adapted, atol=1e-6, rtol=0)
    # a plain LoRA adapter: it also applies to the dense export of the same model, with plain transformers + PEFT
    from transformers import AutoModelForCausalLM

    rankwise.save(rankwise.load(tmp_path / "c").model, tmp_path / "d", export="dense")
    on_dense = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "d"), tmp_path / "a")
    torch.testing.assert_close(_logits(on_dense), adapted, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config_cls", [SVFitConfig, LoLDUConfig, BlockLoRAConfig])
def test_rankwise_tuners_adapt_compressed_layers_and_merge_into_factors(config_cls):
    model = _compressed()
    ranks = {name: m.rank for name, m in _lowrank(model).items()}
    before = _logits(model)
    peft_model = get_peft_model(model, config_cls(r=3, target_modules="all-linear"))  # svfit: from dense_weight()
    torch.testing.assert_close(_logits(peft_model), before, atol=1e-5, rtol=0)  # starts as the base model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    adapted = _logits(peft_model)
    assert not torch.allclose(adapted, before, atol=1e-4)
    check_mergeable(peft_model)
    merged = peft_model.merge_and_unload()
    assert {name: m.rank for name, m in _lowrank(merged).items()} == {name: rank + 3 for name, rank in ranks.items()}
    torch.testing.assert_close(_logits(merged), adapted, atol=1e-5, rtol=0)


def test_add_adapter_targets_compressed_layers_or_names_the_methods_that_can():
    peft_model = add_adapter(_compressed(), "lora", 4)
    assert sum(isinstance(m, CompressedLoraLinear) for m in peft_model.modules()) == 14
    with pytest.raises(ValueError, match=r"pissa cannot adapt compressed layers \(model\.layers\.0\.self_attn\.q_proj "
                                         r"is one\); use lora, svfit, loldu, block_lora"):
        add_adapter(_compressed(), "pissa", 4)


@pytest.mark.parametrize("method", ["lora", "svfit"])
def test_cli_adapt_trains_and_merges_a_compressed_directory(tmp_path, method):
    from rankwise.cli import app

    runner = CliRunner()
    compressed = tmp_path / "c"
    rankwise.save(_compressed(), compressed, tokenizer=tiny_tokenizer())
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and {i % 11}" for i in range(3000)))
    common = ["--method", method, "--rank", "4", "--text", text, "--steps", "3", "--seq-len", "16",
              "--eval-samples", "4", "--batch-size", "2", "--lr", "1e-2"]
    for out, extra in (("a", []), ("m", ["--merge"])):
        result = runner.invoke(app, ["adapt", str(compressed), *map(str, common), "--out", str(tmp_path / out),
                                     *extra])
        assert result.exit_code == 0, result.output
    merged = rankwise.load(tmp_path / "m").model  # a compressed directory, every rank grown by 4
    ranks = {name: m.rank for name, m in _lowrank(rankwise.load(compressed).model).items()}
    assert {name: m.rank for name, m in _lowrank(merged).items()} == {name: r + 4 for name, r in ranks.items()}
    adapter = PeftModel.from_pretrained(rankwise.load(compressed).model, tmp_path / "a")
    torch.testing.assert_close(_logits(adapter), _logits(merged), atol=1e-4, rtol=1e-4)  # same seed, same training
    assert not torch.allclose(_logits(merged), _logits(rankwise.load(compressed).model), atol=1e-4)  # it trained
    summary = json.loads((tmp_path / "m" / "rankwise_adapt.json").read_text())
    assert summary["merged"] and summary["load_with"].startswith("rankwise.load")

    too_big = runner.invoke(app, ["adapt", str(compressed), *map(str, common[:2]), "--rank", "12",
                                  *map(str, common[4:]), "--merge", "--out", str(tmp_path / "x")])
    assert too_big.exit_code == 2 and "not smaller than the dense" in too_big.output, too_big.output
    assert not (tmp_path / "x").exists()
