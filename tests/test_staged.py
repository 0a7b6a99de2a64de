"""Sequential compression one input group at a time (issue 21): groups in call order, each calibrated on the
compressed groups before it, and the paired statistics of the anchored fit taken from the dense model's inputs."""

from __future__ import annotations

import copy

import torch

from rankwise.compression import compress_
from rankwise.compression.staged import call_order_groups
from rankwise.linalg import anchored_svd, whitened_svd
from rankwise.methods.svd_llm import SVDLLMConfig
from rankwise.targets import find_targets
from tests.tiny_models import tiny_model, tiny_tokens


def test_staged_groups_follow_the_call_order():
    model = tiny_model("llama")
    block = model.model.layers[0]
    modules = {n: m for n, m in find_targets(model).items() if n.startswith("model.layers.0.")}
    captured = {}

    def capture(_m, args, kwargs):
        captured.update(args=args, kwargs=kwargs)

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(tiny_tokens(1))
    handle.remove()
    groups = call_order_groups(block, dict(reversed(list(modules.items()))),
                               lambda: block(*captured["args"], **captured["kwargs"]))
    short = [[n.split(".")[-1] for n in g] for g in groups]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def test_sequential_calibrates_each_group_on_the_compressed_groups_before_it():
    """The output projection of block 0 is fitted to the attention output of the *compressed* q/k/v: its whitened
    truncation on those inputs is what the staged pipeline wrote."""
    tokens = tiny_tokens(32)
    model = tiny_model("llama")
    compress_(model, SVDLLMConfig(ratio=0.4, sequential=True), tokens, progress=False)
    reference = tiny_model("llama")
    attn = reference.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attn, name, copy.deepcopy(getattr(model.model.layers[0].self_attn, name)))
    xs = []
    handle = attn.o_proj.register_forward_pre_hook(lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for batch in tokens.split(4):
            reference.model(batch)
    handle.remove()
    X = torch.cat(xs).double()
    o = model.model.layers[0].self_attn.o_proj
    expected = whitened_svd(attn.o_proj.weight.detach(), X.T @ X / X.shape[0], o.rank).to_dense()
    torch.testing.assert_close(o.dense_weight().detach(), expected.float(), atol=2e-4, rtol=1e-3)


def test_anchored_pairs_each_group_with_the_dense_models_input_to_it():
    """Block 1's o_proj and down_proj (the second and last input groups) are the anchored optimum for the dense
    model's inputs to them paired with the compressed model's, token by token."""
    tokens = tiny_tokens(32)
    model = tiny_model("llama")
    report = compress_(model, SVDLLMConfig(ratio=0.4, sequential=True, anchored=True, anchor=1.0), tokens,
                       progress=False)
    dense = tiny_model("llama")
    notes = {layer.name: layer.notes for layer in report.layers}
    assert "anchored on the 43 directions the compressed inputs span" in notes["model.layers.1.self_attn.o_proj"]
    assert not any(layer.refused_fits for layer in report.layers)  # singular: regressed on its span, not refused

    def inputs(m, name: str) -> torch.Tensor:
        xs = []
        handle = m.get_submodule(name).register_forward_pre_hook(
            lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            for batch in tokens.split(4):
                m.model(batch)
        handle.remove()
        return torch.cat(xs).double()  # (tokens, n)

    for name in ("model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"):
        X, Xh = inputs(dense, name), inputs(model, name)
        assert not torch.allclose(X, Xh)  # the compressed groups before it moved its inputs
        fitted = model.get_submodule(name)
        expected = anchored_svd(dense.get_submodule(name).weight.detach().double(), Xh.T @ Xh, X.T @ Xh, fitted.rank)
        W = dense.get_submodule(name).weight.detach().double()
        errors = [float((X @ W.T - Xh @ Wp.T).norm()) for Wp in (fitted.dense_weight().detach().double(),
                                                                 expected.to_dense())]
        assert errors[0] <= errors[1] * (1 + 1e-4)
        # the same outputs on the compressed inputs (block 1's o_proj inputs span 43 of 64 directions, some barely:
        # there the weights are free to differ with the statistics' rounding, the outputs are not)
        torch.testing.assert_close(Xh @ fitted.dense_weight().detach().double().T, Xh @ expected.to_dense().T,
                                   atol=1e-3, rtol=1e-2)
        evals, Q = torch.linalg.eigh(Xh.T @ Xh)
        null = Q[:, evals < 1e-12 * evals.max()]  # directions the compressed inputs do not span (o_proj: 16)
        Wfit = fitted.dense_weight().detach().double()
        assert float((Wfit @ null).norm()) <= 1e-2 * float(Wfit.norm())  # anchor 1: next to nothing along them


def test_staged_sequential_with_eager_attention_and_full_batches():
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="eager").eval()
    report = compress_(model, SVDLLMConfig(ratio=0.3, sequential=True, anchored=True), tiny_tokens(16),
                       batch_size=4, progress=False)
    assert 0.3 <= report.removed_fraction <= 0.31


def test_original_stream_crosses_a_block_without_targets():
    """Block 0 kept dense: block 1's original and compressed inputs are the same, so its first group's anchored fit
    is the plain one (were the original stream not advanced through block 0, they would differ)."""
    tokens = tiny_tokens(48)
    skip0 = lambda name, _m: ".layers.0." not in name  # noqa: E731
    fits = []
    for anchored in (False, True):
        model = tiny_model("llama")
        compress_(model, SVDLLMConfig(ratio=0.3, sequential=True, anchored=anchored, anchor=1.0), tokens,
                  filter_fn=skip0, progress=False)
        fits.append(model.model.layers[1].self_attn.q_proj.dense_weight().detach())
        assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    torch.testing.assert_close(fits[0], fits[1], atol=1e-5, rtol=1e-4)
