"""Sequential compression one input group at a time (issue 21): groups in call order, each calibrated on the
compressed groups before it, and the paired statistics of the anchored fit taken from the dense model's inputs."""

from __future__ import annotations

import copy

import pytest
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


def _block_call(model, tokens):
    """Block 0 of ``model``, its input hidden states and call on ``tokens``, its targets and their input groups."""
    from rankwise.stream import BlockCall

    block = model.model.layers[0]
    captured = {}

    def capture(_m, args, kwargs):
        captured.update(hidden=args[0], call=BlockCall(tuple(args[1:]), dict(kwargs)))

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(tokens)
    handle.remove()
    prefix = "model.layers.0."
    modules = {n: m for n, m in find_targets(model).items() if n.startswith(prefix)}
    groups = [[prefix + n for n in g] for g in (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                                ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"],
                                                ["mlp.down_proj"])]
    return block, captured["hidden"], captured["call"], modules, groups


def _threads() -> int:
    import threading

    return sum(t.name == "rankwise-block-run" for t in threading.enumerate())


def test_resumed_runs_match_runs_restarted_from_the_block_start_bit_for_bit():
    """Each stage's leader sees, and the finished forward returns, exactly what a run restarted from the block's
    start through the modules fitted so far gives: the resumed forward calls the fitted modules."""
    from rankwise.compression.block_runs import BlockRun, pausing_at
    from rankwise.stream import run_block
    from rankwise.targets import set_submodule

    model = tiny_model("llama")
    block, hidden, call, modules, groups = _block_call(model, tiny_tokens(4))
    seen = []
    runs = [BlockRun(block, call, hidden), BlockRun(block, call, hidden * 0.5)]
    with pausing_at(model, groups, modules):
        for k, names in enumerate(groups):
            lead = model.get_submodule(names[0])
            handle = lead.register_forward_pre_hook(lambda _m, a: seen.append(a[0].clone()))
            assert [run.advance() for run in runs] == [k, k]
            handle.remove()
            for name in names:  # "fit" the stage: a changed copy of each layer
                fitted = copy.deepcopy(model.get_submodule(name))
                with torch.no_grad():
                    fitted.weight.mul_(0.9).add_(0.01)
                set_submodule(model, name, fitted)
        assert [run.advance() for run in runs] == [None, None]  # every leader passed: to the end
    assert _threads() == 0
    restarted = copy.deepcopy(model)  # every layer fitted: the reference forward of the finished block
    for b, scale in enumerate((1.0, 0.5)):
        torch.testing.assert_close(runs[b].output, run_block(restarted.model.layers[0], call, hidden * scale),
                                   rtol=0, atol=0)
    # the input each leader saw is the restarted run's through the stages fitted before it (the original layers
    # after it: the reference model has the fitted ones in place up to the stage, the dense ones from it on)
    dense = tiny_model("llama")
    for k, names in enumerate(groups):
        reference = copy.deepcopy(dense)
        for earlier in groups[:k]:
            for name in earlier:
                set_submodule(reference, name, copy.deepcopy(model.get_submodule(name)))
        xs = []
        handle = reference.get_submodule(names[0]).register_forward_pre_hook(lambda _m, a, xs=xs: xs.append(a[0]))
        with torch.no_grad():
            run_block(reference.model.layers[0], call, hidden)
        handle.remove()
        torch.testing.assert_close(seen[2 * k], xs[0], rtol=0, atol=0)


class _Stale(torch.nn.Module):
    """A block that takes references to its layers before calling any of them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.fail = False

    def forward(self, x):
        layers = (self.a, self.b)
        h = layers[0](x)
        if self.fail:
            raise ValueError("the block failed after its first stage")
        return layers[1](h)


def test_a_resumed_run_calls_the_fitted_layer_through_a_stale_reference():
    from rankwise.compression.block_runs import BlockRun, pausing_at
    from rankwise.stream import BlockCall

    torch.manual_seed(0)
    root = torch.nn.Sequential(_Stale())
    block = root[0]
    old = {"0.a": block.a, "0.b": block.b}
    x = torch.randn(3, 8)
    run = BlockRun(block, BlockCall((), {}), x)
    new = {name: torch.nn.Linear(8, 8) for name in old}
    with pausing_at(root, [["0.a"], ["0.b"]], old):
        assert run.advance() == 0
        block.a = new["0.a"]
        assert run.advance() == 1
        block.b = new["0.b"]
        assert run.advance() is None
    with torch.no_grad():
        expected = new["0.b"](new["0.a"](x))
        assert torch.equal(run.output, expected)
        assert not torch.equal(run.output, old["0.b"](old["0.a"](x)))
    assert "forward" not in old["0.a"].__dict__  # the redirection is removed on leaving


def test_block_runs_unwind_on_abort_and_hand_failures_to_the_caller():
    import pytest

    from rankwise.compression.block_runs import BlockRun, pausing_at
    from rankwise.stream import BlockCall

    root = torch.nn.Sequential(_Stale())
    block = root[0]
    modules = {"0.a": block.a, "0.b": block.b}
    runs = [BlockRun(block, BlockCall((), {}), torch.randn(2, 8)) for _ in range(3)]
    with pausing_at(root, [["0.a"], ["0.b"]], modules):
        assert runs[0].advance() == 0 and runs[1].advance() == 0
        assert _threads() == 2
        for run in runs:  # paused, paused and never started
            run.abort()
        assert _threads() == 0
        block.fail = True
        failing = BlockRun(block, BlockCall((), {}), torch.randn(2, 8))
        assert failing.advance() == 0
        with pytest.raises(ValueError, match="failed after its first stage"):
            failing.advance()
        assert _threads() == 0


@pytest.mark.parametrize("allowance", [1 << 40, 0], ids=["kept", "restarted"])
def test_a_failed_stage_leaves_no_paused_runs(monkeypatch, allowance):
    import rankwise.compression.layer as layer
    import rankwise.compression.staged as staged

    monkeypatch.setattr(staged, "pause_allowance", lambda _store, _device, _n: allowance)
    calls = []
    real = layer.factorise_group

    def fail_second(work, **kwargs):
        calls.append(work)
        if len(calls) == 2:
            raise RuntimeError("the second stage's fit failed")
        return real(work, **kwargs)

    monkeypatch.setattr(layer, "factorise_group", fail_second)
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="second stage"):
        compress_(model, SVDLLMConfig(ratio=0.3, sequential=True, anchored=True), tiny_tokens(16), progress=False)
    assert _threads() == 0
    assert not [name for name, m in model.named_modules() if "forward" in m.__dict__]  # no redirection left


def test_the_fits_see_their_layers_without_the_redirection():
    """A Ray mapper pickles a stage's layers: during the fits they carry no redirected forward (a closure)."""
    import pickle
    import unittest.mock

    import rankwise.compression.layer as layer

    pickled = []
    real = layer.factorise_group

    def pickling(work, **kwargs):
        pickled.append(len(pickle.dumps([(name, module) for name, module, _stats, _rank in work])))
        return real(work, **kwargs)

    with unittest.mock.patch.object(layer, "factorise_group", pickling):
        compress_(tiny_model("llama"), SVDLLMConfig(ratio=0.3, sequential=True, anchored=True), tiny_tokens(8),
                  progress=False)
    assert len(pickled) == 8  # 4 stages x 2 blocks


def test_stages_restarted_from_the_block_start_give_the_same_bytes_as_resumed_runs(monkeypatch):
    """Above the pause allowance each stage runs the block afresh (one paused run at a time): the same model."""
    import threading

    import rankwise.compression.staged as staged
    from rankwise.compression.block_runs import BlockRun

    states = []
    real = BlockRun.advance
    for allowance in (1 << 40, 0):
        monkeypatch.setattr(staged, "pause_allowance", lambda _store, _device, _n, a=allowance: a)
        most = [0]

        def advance(run, real=real, most=most):
            most[0] = max(most[0], sum(t.name == "rankwise-block-run" for t in threading.enumerate()))
            return real(run)

        monkeypatch.setattr(BlockRun, "advance", advance)
        model = tiny_model("llama")
        compress_(model, SVDLLMConfig(ratio=0.4, sequential=True, anchored=True), tiny_tokens(24), progress=False)
        states.append(model.state_dict())
        assert most[0] == (6 if allowance else 0)  # 6 batches kept paused, or each unwound before the next starts
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_paused_bytes_estimate_covers_what_a_paused_llama_forward_holds():
    """Twice the tensors the paused forward's frames hold, at every stage, on the tiny Llama's block."""
    import sys

    from rankwise.compression.block_runs import BlockRun, paused_bytes, pausing_at

    model = tiny_model("llama")
    block, hidden, call, modules, groups = _block_call(model, tiny_tokens(4))
    run = BlockRun(block, call, hidden)
    held = []
    with pausing_at(model, groups, modules):
        for _ in groups:
            run.advance()
            frame, storages = sys._current_frames()[run._thread.ident], {}
            while frame is not None:
                for value in frame.f_locals.values():
                    for t in value if isinstance(value, tuple | list) else (value,):
                        if isinstance(t, torch.Tensor):
                            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                frame = frame.f_back
            held.append(sum(storages.values()))
        run.advance()
    assert min(held) > 0
    assert 2 * max(held) <= paused_bytes(hidden, modules.values(), 1) <= 4 * max(held)


class _Branching(torch.nn.Module):
    """Calls ``b`` only on batches whose input sums above zero (a data-dependent call, as an MoE expert)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        if float(x.sum()) > 0:
            h = self.b(h)
        return self.c(h)


@pytest.mark.parametrize("paired", [False, True], ids=["plain", "paired"])
def test_a_batch_that_skips_a_leader_adds_nothing_to_its_stage_kept_or_restarted(paired):
    """Batch 1 never calls ``b``: its kept run pauses at ``c`` during ``b``'s stage, so the stages restart from
    there; every stage's statistics are those of restarted runs throughout, and ``c`` sees every batch."""
    from rankwise.compression.block_runs import StageRuns, pausing_at
    from rankwise.stream import BlockCall

    torch.manual_seed(0)
    root = torch.nn.Sequential(_Branching())
    block = root[0]
    modules = {"0.a": block.a, "0.b": block.b, "0.c": block.c}
    xs = [torch.ones(3, 4), -torch.ones(3, 4), 2 * torch.ones(3, 4)]
    original = (lambda b: torch.full((3, 4), float(b + 1))) if paired else None
    seen = {}
    for keep in (True, False):
        runs = StageRuns(block, 3, 3, lambda b: (BlockCall((), {}), xs[b]), keep=keep)
        with pausing_at(root, [["0.a"], ["0.b"], ["0.c"]], modules):
            stats = [runs.observe(k, {name: modules[name]}, frozenset({"xxt"}), original)
                     for k, name in enumerate(modules)]
            assert runs.finish() is None  # restarted (from the second stage when kept): the caller runs the block
            runs.close()
        assert [s[name].count for s, name in zip(stats, modules, strict=True)] == [9, 6, 9]
        seen[keep] = [(s[name].xxt, s[name].cross) for s, name in zip(stats, modules, strict=True)]
        assert _threads() == 0
    for (xxt, cross), (ref_xxt, ref_cross) in zip(seen[True], seen[False], strict=True):
        assert torch.equal(xxt, ref_xxt)
        assert (cross is None) == (not paired) and (cross is None or torch.equal(cross, ref_cross))


def test_a_stage_whose_leader_no_batch_calls_is_refused():
    from rankwise.compression.block_runs import StageRuns, pausing_at
    from rankwise.stream import BlockCall

    root = torch.nn.Sequential(_Branching())
    block = root[0]
    modules = {"0.a": block.a, "0.b": block.b, "0.c": block.c}
    for keep in (True, False):
        negative = StageRuns(block, 3, 2, lambda _b: (BlockCall((), {}), -torch.ones(2, 4)), keep=keep)
        with pausing_at(root, [["0.a"], ["0.b"], ["0.c"]], modules):
            negative.observe(0, {"0.a": block.a}, frozenset({"xxt"}), None)
            with pytest.raises(ValueError, match=r"0\.b never ran"):
                negative.observe(1, {"0.b": block.b}, frozenset({"xxt"}), None)
            negative.close()
        positive = StageRuns(block, 3, 2, lambda _b: (BlockCall((), {}), torch.ones(2, 4)), keep=keep)
        with pausing_at(root, [["0.a"], ["0.b"], ["0.c"]], modules):
            for k, name in enumerate(modules):
                assert positive.observe(k, {name: modules[name]}, frozenset({"xxt"}), None)[name].count == 4
            outputs = positive.finish()
            positive.close()
        assert (outputs is not None) == keep
        if keep:
            with torch.no_grad():
                assert torch.equal(outputs[0], block(torch.ones(2, 4)))
        assert _threads() == 0


def test_a_run_computes_under_the_callers_autocast():
    from rankwise.compression.block_runs import BlockRun
    from rankwise.stream import BlockCall

    block = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run = BlockRun(block, BlockCall((), {}), torch.randn(2, 4))
    run.advance()
    assert run.done and run.output.dtype == torch.bfloat16 and not run.output.requires_grad


class _Swallowing(torch.nn.Module):
    """A forward that catches every exception of its first layer and goes on to the next."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        try:
            h = self.a(x)
        except BaseException:  # what the test is about
            h = x
        return self.b(h)


def test_abort_unwinds_a_forward_that_swallows_the_unwinding():
    import threading

    from rankwise.compression.block_runs import BlockRun, pausing_at
    from rankwise.stream import BlockCall

    root = torch.nn.Sequential(_Swallowing())
    block = root[0]
    with pausing_at(root, [["0.a"], ["0.b"]], {"0.a": block.a, "0.b": block.b}):
        run = BlockRun(block, BlockCall((), {}), torch.randn(2, 4))
        assert run.advance() == 0
        stopper = threading.Thread(target=run.abort)
        stopper.start()
        stopper.join(30)
        assert not stopper.is_alive() and _threads() == 0


def test_the_redirection_gives_back_a_forward_set_on_the_instance_before():
    """A layer whose instance already had a ``forward`` (as accelerate's hooks set) gets it back, after a fit's
    suspension and on leaving."""
    from rankwise.compression.block_runs import pausing_at

    root = torch.nn.Sequential(torch.nn.Linear(4, 4))
    layer = root[0]
    own = layer.forward  # a bound method, set on the instance as a wrapper would be
    layer.forward = own
    with pausing_at(root, [["0"]], {"0": layer}) as redirects:
        assert layer.__dict__["forward"] is not own
        with redirects.suspended():
            assert layer.__dict__["forward"] is own
        assert layer.__dict__["forward"] is not own
    assert layer.__dict__["forward"] is own
