"""Tucker (FLoRA) and SNELL adapters beyond the conformance suite (tests/test_adapt_tuners.py): the Tucker update
against tensorly's reconstruction and an explicit einsum, conv layers (both forward paths, merge, save/reload),
the rank rules; SNELL's kernel against its formula entry by entry, its competition keeping exactly the requested
fraction of largest entries, and its refusal of compressed layers."""

from __future__ import annotations

import pytest
import tensorly as tl
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import rankwise
from rankwise.adapt import SNELLConfig, TuckerConfig
from rankwise.adapt.methods import add_adapter
from rankwise.adapt.snell import SNELLLayer, kernel_matrix
from rankwise.adapt.tucker import TuckerLayer, mode_ranks
from rankwise.nn import LowRankLinear
from tests.tiny_models import tiny_model, tiny_tokens

IMAGES = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(0))


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 24, 3, stride=2, padding=1, padding_mode="reflect")
        self.grouped = nn.Conv2d(24, 24, 3, padding=1, groups=4)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(torch.relu(self.grouped(h)).mean(dim=(-2, -1)))


CNN_TARGETS = ["conv1", "conv2", "grouped", "head"]


def cnn_outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IMAGES)


def perturb(model: nn.Module, seed: int = 0, size: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(size * torch.randn(p.shape, generator=g, dtype=p.dtype))


def layers(model: nn.Module, cls: type) -> dict[str, nn.Module]:
    return {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules() if isinstance(m, cls)}


CONFIGS = {"tucker": lambda: TuckerConfig(r=4, target_modules=CNN_TARGETS),
           "snell": lambda: SNELLConfig(r=4, sparsity=0.7, target_modules=CNN_TARGETS)}


# -- both, on a CNN -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cnn_starts_equal_merges_and_reloads(name, tmp_path):
    reference = cnn_outputs(TinyCNN())
    model = get_peft_model(TinyCNN(), CONFIGS[name]())
    torch.testing.assert_close(cnn_outputs(model), reference, atol=0, rtol=0)  # ΔW = 0 exactly at init
    perturb(model)
    adapted = cnn_outputs(model)
    assert (adapted - reference).abs().max() > 1e-2
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(TinyCNN(), tmp_path)
    torch.testing.assert_close(cnn_outputs(loaded), adapted, atol=0, rtol=0)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert type(merged.conv2) is nn.Conv2d
    torch.testing.assert_close(cnn_outputs(merged), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_conv_delta_is_a_conv_with_the_delta_weight(name):
    model = get_peft_model(TinyCNN(), CONFIGS[name]())
    perturb(model)
    x = torch.randn(2, 16, 9, 9, generator=torch.Generator().manual_seed(1))
    layer = layers(model, BaseTunerLayer)["conv2"]
    expected = layer.get_base_layer()._conv_forward(x, layer.get_delta_weight("default"), None)
    torch.testing.assert_close(layer.delta("default", x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_seed_same_adapter_other_seed_other(name):
    def state(seed: int) -> dict[str, torch.Tensor]:
        config = CONFIGS[name]()
        config.seed = seed
        return {k: v for k, v in get_peft_model(TinyCNN(), config).state_dict().items() if name in k}

    first, second, other = state(0), state(0), state(1)
    assert first and all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


# -- Tucker ---------------------------------------------------------------------------------------------------------
def test_tucker_delta_matches_tensorly_and_einsum():
    model = get_peft_model(TinyCNN(), TuckerConfig(r=4, lora_alpha=6.0, target_modules=CNN_TARGETS))
    perturb(model)
    found = layers(model, TuckerLayer)
    conv, head = found["conv2"], found["head"]
    G, (A, B, C, D) = conv.tucker_core["default"].detach(), [f.detach() for f in conv.factors("default")]
    assert G.shape == (4, 4, 3, 3)  # r = 4 clamped to the 3 x 3 kernel's modes
    with tl.backend_context("pytorch"):
        reference = tl.tucker_to_tensor((G, [A, B, C, D]))
    delta = conv.get_delta_weight("default").detach()
    torch.testing.assert_close(delta, 1.5 * reference, atol=1e-6, rtol=1e-5)  # lora_alpha / r = 6 / 4
    torch.testing.assert_close(delta, 1.5 * torch.einsum("abcd,ia,jb,kc,ld->ijkl", G, A, B, C, D), atol=1e-6, rtol=1e-5)
    G2, (U, V) = head.tucker_core["default"].detach(), [f.detach() for f in head.factors("default")]
    torch.testing.assert_close(head.get_delta_weight("default").detach(), 1.5 * U @ G2 @ V.T, atol=1e-6, rtol=1e-5)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(head.delta("default", x), x @ (1.5 * U @ G2 @ V.T).T, atol=1e-6, rtol=1e-5)


def test_tucker_factors_are_orthonormal_and_core_zero_at_init():
    for layer in layers(get_peft_model(TinyCNN(), TuckerConfig(r=4, target_modules=CNN_TARGETS)), TuckerLayer).values():
        assert torch.count_nonzero(layer.tucker_core["default"]) == 0
        for U in layer.factors("default"):
            torch.testing.assert_close(U.T @ U, torch.eye(U.shape[1]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("path", ["dense", "factorised"])
def test_tucker_conv_paths_agree_batched_and_unbatched(path):
    model = get_peft_model(TinyCNN(), TuckerConfig(r=4, target_modules=CNN_TARGETS, conv_path=path))
    perturb(model)
    for name in ("conv1", "conv2"):  # zero padding, then stride 2 with reflect padding
        layer = layers(model, TuckerLayer)[name]
        assert layer.conv_path("default", IMAGES) == path
        x = torch.randn(2, layer.in_features, 11, 11, generator=torch.Generator().manual_seed(3))
        expected = layer.get_base_layer()._conv_forward(x, layer.get_delta_weight("default"), None)
        torch.testing.assert_close(layer.delta("default", x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.delta("default", x[0]), expected[0], atol=1e-5, rtol=1e-5)
    assert layers(model, TuckerLayer)["grouped"].conv_path("default", IMAGES) == "dense"  # groups=4: never factorised


def test_tucker_auto_path_picks_fewer_multiply_adds():
    big = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))
    model = get_peft_model(big, TuckerConfig(r=4, target_modules=["0", "1"]))
    found = layers(model, TuckerLayer)
    assert found["0"].conv_path("default", IMAGES) == "factorised"  # 64*4 + 16*9 + 64*4 < 64*64*9
    assert found["1"].conv_path("default", IMAGES) == "dense"  # 4*4*9 = 144 < 4*4 + 16*9 + 4*4


def test_tucker_ranks_clamp_r_and_check_explicit_ranks():
    assert mode_ranks((16, 3, 3, 3), 8) == (8, 3, 3, 3)
    assert mode_ranks((16, 3, 3, 3), 2, [4, 3, 2, 1]) == (4, 3, 2, 1)
    with pytest.raises(ValueError, match=r"ranks\[2\] = 4 exceeds mode 2 of the weight \(16, 3, 3, 3\) \(size 3\)"):
        mode_ranks((16, 3, 3, 3), 2, [4, 3, 4, 1])
    with pytest.raises(ValueError, match=r"conv1: ranks .* give 2 modes but the weight .* has 4"):
        get_peft_model(TinyCNN(), TuckerConfig(r=4, ranks=[2, 2], target_modules=["conv1"]))
    with pytest.raises(ValueError, match=r"TuckerConfig.ranks must be 2 to 5 integers >= 1"):
        TuckerConfig(r=4, ranks=[2, 0])
    model = get_peft_model(TinyCNN(), TuckerConfig(r=4, ranks=[5, 2, 3, 1], target_modules=["conv2"]))
    layer = layers(model, TuckerLayer)["conv2"]
    assert layer.tucker_core["default"].shape == (5, 2, 3, 1)
    assert [tuple(U.shape) for U in layer.factors("default")] == [(24, 5), (16, 2), (3, 3), (3, 1)]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 5 * 2 * 3 + 24 * 5 + 16 * 2 + 9 + 3


def test_tucker_adapts_compressed_layers_and_merges_into_factors():
    model = tiny_model("llama")
    rankwise.compress_(model, rankwise.SVDConfig(ratio=0.3, targets=("attn",)), progress=False)
    ids = tiny_tokens(2, 16)
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    peft_model = get_peft_model(model, TuckerConfig(r=3, target_modules=["q_proj", "o_proj"]))
    perturb(peft_model, size=0.05)
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
    merged = peft_model.merge_and_unload()
    grown = {n: m.rank for n, m in merged.named_modules() if isinstance(m, LowRankLinear)}
    assert {n for n in grown if grown[n] != ranks[n]} == {n for n in ranks if n.endswith(("q_proj", "o_proj"))}
    assert all(grown[n] == ranks[n] + 3 for n in grown if n.endswith(("q_proj", "o_proj")))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-5, rtol=0)


# -- SNELL ----------------------------------------------------------------------------------------------------------
def test_snell_kernel_matches_the_formula_entry_by_entry():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 3, 2, generator=g, dtype=torch.float64)  # (groups, out, r/2)
    B = torch.randn(2, 4, 2, generator=g, dtype=torch.float64)  # (groups, in, r/2)
    for p in (1.0, 2.0):
        K = kernel_matrix(A, B, 0.1, p)
        for o in range(3):
            for i in range(4):
                expected = 0.1 * (torch.linalg.vector_norm(A[0, o] - B[0, i], ord=p)
                                  - torch.linalg.vector_norm(A[1, o] - B[1, i], ord=p))
                torch.testing.assert_close(K[o, i], expected)


def test_snell_keeps_exactly_the_largest_fraction_and_equals_the_masked_kernel():
    model = get_peft_model(tiny_model(), SNELLConfig(r=4, sparsity=0.9, target_modules=["q_proj", "down_proj"]))
    perturb(model, size=0.05)
    for layer in layers(model, SNELLLayer).values():
        K = layer.kernel("default").detach()
        delta = layer.get_delta_weight("default").detach()
        keep = round(0.1 * K.numel())
        assert torch.count_nonzero(delta) == keep
        kept = delta != 0
        torch.testing.assert_close(delta[kept], K[kept], atol=0, rtol=0)
        assert K[kept].abs().min() >= K[~kept].abs().max()  # the competition: largest magnitudes survive
        assert torch.linalg.matrix_rank(K.double()) > 4  # the kernel merge is not rank-r like A Bᵀ


def test_snell_starts_at_exactly_zero_and_learns_from_there():
    model = get_peft_model(tiny_model(), SNELLConfig(r=4, target_modules=["q_proj"]))
    ids = tiny_tokens(2, 16)
    for layer in layers(model, SNELLLayer).values():
        assert torch.count_nonzero(layer.get_delta_weight("default")) == 0
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.abs().max() > 0 for g in grads)


def test_snell_bad_settings_and_compressed_layers_are_refused():
    with pytest.raises(ValueError, match=r"SNELLConfig\.r must be even"):
        SNELLConfig(r=3)
    with pytest.raises(ValueError, match=r"SNELLConfig.sparsity must be in \[0, 1\)"):
        SNELLConfig(r=4, sparsity=1.0)
    with pytest.raises(ValueError, match=r"SNELLConfig\.scaling must be finite"):
        SNELLConfig(r=4, scaling=float("nan"))
    with pytest.raises(ValueError, match=r"sparsity 0\.9999 keeps no entry of a 16 x 27 update"):
        get_peft_model(TinyCNN(), SNELLConfig(r=4, sparsity=0.9999, target_modules=["conv1"]))
    model = tiny_model("llama")
    rankwise.compress_(model, rankwise.SVDConfig(ratio=0.3, targets=("attn",)), progress=False)
    with pytest.raises(ValueError, match=r"snell cannot adapt compressed layers .*; use lora, svfit, loldu, "
                                         r"block_lora, tucker"):
        add_adapter(model, "snell", 4)
    with pytest.raises(ValueError, match="q_proj: snell cannot adapt a compressed layer: its update is a sparse"):
        get_peft_model(model, SNELLConfig(r=4, target_modules=["q_proj"]))
