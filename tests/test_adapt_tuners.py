"""rankwise.adapt tuners in PEFT: one conformance suite over every tuner, then each method against its paper's formula
computed directly here with torch.linalg."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from rankwise.adapt import (
    BlockLoRAConfig,
    LoLDUConfig,
    LoRASBConfig,
    MiLoRAConfig,
    SNELLConfig,
    SVFitConfig,
    TuckerConfig,
    preprocess_lora_sb,
)
from rankwise.adapt._base import SeedLayer
from rankwise.adapt.block_lora import layer_type
from rankwise.adapt.loldu import ldu
from rankwise.adapt.lora_sb import GRAD_ATTR
from tests.tiny_models import tiny_model, tiny_tokens

R = 4
TARGETS = ["q_proj", "v_proj", "down_proj"]  # (64 -> 64), (64 -> 32), (160 -> 64) in each of the two blocks
TOKENS = tiny_tokens(4, 16, seed=1)
CONFIGS = {"svfit": SVFitConfig, "loldu": LoLDUConfig, "lora_sb": LoRASBConfig, "block_lora": BlockLoRAConfig,
           "milora": MiLoRAConfig, "tucker": TuckerConfig, "snell": SNELLConfig}
TUNERS = list(CONFIGS)
PEFT_PREFIX = "base_model.model."


def train_step(model: nn.Module, tokens: torch.Tensor = TOKENS):
    def step() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()

    return step


def build(name: str, model: nn.Module | None = None, **overrides) -> PeftModel:
    model = tiny_model() if model is None else model
    config = CONFIGS[name](r=R, target_modules=TARGETS, **overrides)
    if name == "lora_sb":
        preprocess_lora_sb(model, config, train_step(model))
    return get_peft_model(model, config)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def adapter_layers(model: nn.Module) -> list[tuple[str, SeedLayer]]:
    """(name in the base model, layer) for every adapted layer."""
    return [(name.removeprefix(PEFT_PREFIX), m) for name, m in model.named_modules() if isinstance(m, SeedLayer)]


def targeted_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS]


def perturb(model: nn.Module, seed: int = 0, size: float = 0.05) -> None:
    """Move every trainable tensor away from its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(size * torch.randn(p.shape, generator=g, dtype=p.dtype))


def expected_trainable(name: str) -> int:
    layers = targeted_linears(tiny_model())
    if name == "svfit":
        return R * len(layers)
    if name == "loldu":
        return (R + 1) * len(layers)
    if name == "lora_sb":
        return R * R * len(layers)
    if name in ("milora", "snell"):  # snell: two kernel groups of r/2 columns per factor
        return sum(R * (m.in_features + m.out_features) for _, m in layers)
    if name == "tucker":  # an r x r core and one (size, r) factor per mode
        return sum(R * R + R * (m.in_features + m.out_features) for _, m in layers)
    types = {layer_type(n): m.in_features for n, m in layers}  # block_lora: one A per type, one B per layer
    return sum(R * n_in for n_in in types.values()) + sum(R * m.out_features for _, m in layers)


# -- conformance: every tuner ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TUNERS)
def test_outputs_unchanged_at_init(name):
    reference = logits(tiny_model())
    assert (logits(build(name)) - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("name", TUNERS)
def test_trainable_parameters_match_formula(name):
    model = build(name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected_trainable(name)
    assert model.get_nb_trainable_parameters()[0] == expected_trainable(name)


@pytest.mark.parametrize("name", TUNERS)
def test_forward_agrees_with_delta_weight(name):
    model = build(name)
    perturb(model)
    layers = adapter_layers(model)
    x = torch.randn(3, 5, max(layer.in_features for _, layer in layers), generator=torch.Generator().manual_seed(1))
    for _, layer in layers:
        xi = x[..., : layer.in_features]
        expected = xi @ layer.get_delta_weight("default").T
        torch.testing.assert_close(layer.delta("default", xi), expected, atol=1e-6, rtol=1e-5)
        assert expected.abs().max() > 1e-4  # the perturbation reached this layer


@pytest.mark.parametrize("name", TUNERS)
def test_save_load_gives_identical_logits(name, tmp_path):
    model = build(name)
    perturb(model)
    trained = logits(model)
    assert (trained - logits(tiny_model())).abs().max() > 1e-3  # the adapter changes the function
    model.save_pretrained(tmp_path)
    for is_trainable in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = PeftModel.from_pretrained(tiny_model(), tmp_path, is_trainable=is_trainable)
        assert not [w for w in caught if "missing adapter keys" in str(w.message)]
        torch.testing.assert_close(logits(loaded), trained, atol=1e-6, rtol=0)
        n_trainable = sum(p.numel() for p in loaded.parameters() if p.requires_grad)
        assert n_trainable == (expected_trainable(name) if is_trainable else 0)


@pytest.mark.parametrize("name", TUNERS)
def test_merge_and_unload_gives_plain_linears_and_same_logits(name):
    model = build(name)
    perturb(model)
    trained = logits(model)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert all(type(m) is nn.Linear for _, m in targeted_linears(merged))
    torch.testing.assert_close(logits(merged), trained, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", TUNERS)
def test_gradient_step_changes_only_trainable_tensors(name):
    model = build(name)
    perturb(model)  # away from the init, where some factors (block_lora's B = 0) block others' gradients
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p -= 0.1 * p.grad
    after = model.state_dict()
    assert trainable and set(before) == set(after)
    for key in before:
        changed = not torch.equal(before[key], after[key])
        assert changed == (key in trainable), key


@pytest.mark.parametrize("name", TUNERS)
def test_same_seed_and_data_give_identical_adapters(name):
    first, second = (get_peft_model_state_dict(build(name)) for _ in range(2))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("name", TUNERS)
def test_half_precision_model_keeps_its_dtype(name):
    model = build(name, tiny_model().to(torch.bfloat16))
    assert logits(model).dtype == torch.bfloat16
    assert all(layer.get_base_layer().weight.dtype == torch.bfloat16 for _, layer in adapter_layers(model))


def test_rank_above_smallest_dimension_names_allowed_range():
    with pytest.raises(ValueError, match=r"q_proj: rank 65 .* 1 <= r <= 64"):
        get_peft_model(tiny_model(), SVFitConfig(r=65, target_modules=["q_proj"]))


# -- SVFit ----------------------------------------------------------------------------------------------------------
def test_svfit_effective_weight_is_trained_top_values_plus_residual():
    model = build("svfit")
    perturb(model)
    base = tiny_model()
    for name, layer in adapter_layers(model):
        W = base.get_submodule(name).weight.detach().double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :R], S[:R], Vh[:R]
        s = layer.svfit_s["default"].detach().double()
        expected = U @ torch.diag(s) @ Vh + (W - U @ torch.diag(S) @ Vh)
        torch.testing.assert_close(W + layer.get_delta_weight("default").double(), expected, atol=1e-5, rtol=0)


# -- LoLDU ----------------------------------------------------------------------------------------------------------
def test_ldu_reconstructs_the_weight():
    W = torch.randn(12, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    PL, d, U = ldu(W)
    torch.testing.assert_close(PL @ torch.diag(d) @ U, W)
    assert torch.equal(U.diagonal(), torch.ones(7, dtype=torch.float64))


def test_loldu_effective_weight_follows_the_paper():
    model = build("loldu")
    perturb(model)
    base = tiny_model()
    for name, layer in adapter_layers(model):
        W = base.get_submodule(name).weight.detach().double()
        P, L, U = torch.linalg.lu(W)
        d = U.diagonal()
        Lr, Ur = (P @ L)[:, :R], (U / d[:, None])[:R]
        sigma0, z0 = 1.0 / R, d[:R]  # lora_alpha / r and the top-r pivots
        z = layer.loldu_z["default"].detach().double()
        sigma = layer.loldu_sigma["default"].detach().double()
        expected = W - sigma0 * Lr @ torch.diag(z0) @ Ur + sigma * Lr @ torch.diag(z) @ Ur
        torch.testing.assert_close(W + layer.get_delta_weight("default").double(), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.loldu_z0["default"].double(), z0, atol=1e-6, rtol=1e-6)


# -- LoRA-SB --------------------------------------------------------------------------------------------------------
def direct_update(config: LoRASBConfig) -> dict[str, torch.Tensor]:
    """ΔW_avg = -η sign(G) from gradients computed here, without preprocess_lora_sb."""
    model = tiny_model().train()
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    return {name: -config.init_lr * torch.sign(m.weight.grad.double()) for name, m in targeted_linears(model)}


def test_lora_sb_factors_are_top_singular_vectors_of_the_update():
    config = LoRASBConfig(r=R, target_modules=TARGETS, scaling=2.0)
    updates = direct_update(config)
    model = tiny_model()
    preprocess_lora_sb(model, config, train_step(model))
    model = get_peft_model(model, config)
    perturb(model, size=1e-4)
    for name, layer in adapter_layers(model):
        U, S, Vh = torch.linalg.svd(updates[name], full_matrices=False)
        best = U[:, :R] @ torch.diag(S[:R]) @ Vh[:R]  # Eckart-Young: the best rank-r approximation of ΔW_avg
        B, A = layer.lora_sb_B["default"].double(), layer.lora_sb_A["default"].double()
        R0, Rt = layer.lora_sb_R0["default"].double(), layer.lora_sb_R["default"].detach().double()
        eye = torch.eye(R, dtype=torch.float64)
        torch.testing.assert_close(B.T @ B, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(A @ A.T, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(config.scaling * B @ R0 @ A, best, atol=1e-8, rtol=1e-4)
        torch.testing.assert_close(layer.get_delta_weight("default").double(), config.scaling * B @ (Rt - R0) @ A,
                                   atol=1e-9, rtol=1e-5)


def test_lora_sb_start_at_first_step_adds_the_approximate_update():
    config = LoRASBConfig(r=R, target_modules=TARGETS, start_at_first_step=True)
    updates = direct_update(config)
    model = build("lora_sb", start_at_first_step=True)
    for name, layer in adapter_layers(model):
        U, S, Vh = torch.linalg.svd(updates[name], full_matrices=False)
        best = U[:, :R] @ torch.diag(S[:R]) @ Vh[:R]
        torch.testing.assert_close(layer.get_delta_weight("default").double(), best, atol=1e-8, rtol=1e-4)


def test_lora_sb_without_gradients_is_an_error_but_loading_needs_none(tmp_path):
    with pytest.raises(ValueError, match="preprocess_lora_sb"):
        get_peft_model(tiny_model(), LoRASBConfig(r=R, target_modules=TARGETS))
    model = build("lora_sb")
    assert not [n for n, m in model.named_modules() if hasattr(m, GRAD_ATTR)]  # consumed by the layers
    model.save_pretrained(tmp_path)
    assert not model.peft_config["default"].from_saved
    assert LoRASBConfig.from_pretrained(tmp_path).from_saved


def test_preprocess_lora_sb_restores_the_model():
    model = tiny_model()
    model.lm_head.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    preprocess_lora_sb(model, LoRASBConfig(r=R, target_modules=TARGETS), train_step(model))
    assert not model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    attached = {n for n, m in model.named_modules() if hasattr(m, GRAD_ATTR)}
    assert attached == {n for n, _ in targeted_linears(model)}


def test_preprocess_lora_sb_all_linear_covers_what_peft_targets():
    model = tiny_model()
    config = LoRASBConfig(r=R, target_modules="all-linear")
    preprocess_lora_sb(model, config, train_step(model))
    adapted = get_peft_model(model, config)  # raises if a layer PEFT targets has no gradient
    assert len(adapter_layers(adapted)) == 14  # 7 linear layers per block, the output layer left out


# -- block-shared LoRA ----------------------------------------------------------------------------------------------
def test_layer_type_replaces_block_indices():
    assert layer_type("model.layers.3.self_attn.q_proj") == "model.layers.*.self_attn.q_proj"
    assert layer_type("encoder.block.0.layer.1.DenseReluDense.wi") == "encoder.block.*.layer.*.DenseReluDense.wi"
    assert layer_type("lm_head") == "lm_head"


def test_block_lora_shares_one_down_projection_per_type():
    model = build("block_lora")
    perturb(model)
    layers = adapter_layers(model)
    by_type: dict[str, list[SeedLayer]] = {}
    for name, layer in layers:
        by_type.setdefault(layer_type(name), []).append(layer)
    assert len(by_type) == 3 and all(len(group) == 2 for group in by_type.values())
    downs = {t: group[0].shared_down("default") for t, group in by_type.items()}
    for t, group in by_type.items():
        assert all(layer.shared_down("default") is downs[t] for layer in group)
    assert downs["model.layers.*.self_attn.q_proj"].shape == (R, 64)
    assert not torch.equal(downs["model.layers.*.self_attn.q_proj"], downs["model.layers.*.self_attn.v_proj"])
    for name, layer in layers:
        B, A = layer.block_lora_B["default"], downs[layer_type(name)]
        expected = (8.0 / R) * B @ A  # lora_alpha / r
        torch.testing.assert_close(layer.get_delta_weight("default"), expected)


def test_block_lora_saves_each_shared_projection_once(tmp_path):
    model = build("block_lora")
    perturb(model)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert len([k for k in saved if "block_lora_A" in k]) == 3  # one per layer type
    assert len([k for k in saved if "block_lora_B" in k]) == 6  # one per layer
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path, is_trainable=True)
    layers = [layer for name, layer in adapter_layers(loaded) if name.endswith("q_proj")]
    assert layers[0].shared_down("default") is layers[1].shared_down("default")


def test_block_lora_half_precision_keeps_the_projection_shared():
    model = build("block_lora", tiny_model().to(torch.bfloat16))  # PEFT re-creates adapter tensors in float32
    layers = [layer for name, layer in adapter_layers(model) if name.endswith("down_proj")]
    assert layers[0].shared_down("default") is layers[1].shared_down("default")
    assert layers[1].shared_down("default").dtype == torch.float32


def test_block_lora_rejects_unequal_inputs_within_a_type():
    class Block(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.proj = nn.Linear(width, 8)

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block(8), Block(12)])

    with pytest.raises(ValueError, match=r"layers\.1\.proj has in_features 12 but layers\.0\.proj has 8"):
        get_peft_model(Stack(), BlockLoRAConfig(r=2, target_modules=["proj"]))


# -- MiLoRA ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora_alpha", [None, 2.0 * R])
def test_milora_starts_at_the_minor_components(lora_alpha):
    model = build("milora", lora_alpha=lora_alpha)
    perturb(model)
    scale = 1.0 if lora_alpha is None else lora_alpha / R
    base = tiny_model()
    for name, layer in adapter_layers(model):
        W = base.get_submodule(name).weight.detach().double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        minor = U[:, -R:] @ torch.diag(S[-R:]) @ Vh[-R:]
        B0, A0 = layer.milora_B0["default"].double(), layer.milora_A0["default"].double()
        torch.testing.assert_close(scale * B0 @ A0, minor, atol=1e-5, rtol=0)
        torch.testing.assert_close(B0.T @ U[:, :-R], torch.zeros(R, U.shape[1] - R, dtype=torch.float64),
                                   atol=1e-5, rtol=0)  # orthogonal to the principal subspace
        B, A = layer.milora_B["default"].detach().double(), layer.milora_A["default"].detach().double()
        expected = (W - minor) + scale * B @ A
        torch.testing.assert_close(W + layer.get_delta_weight("default").double(), expected, atol=1e-5, rtol=0)

