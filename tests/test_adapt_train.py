"""The fine-tuning loop and healing on a tiny Llama: determinism, resume, refusal, divergence, distillation."""

from __future__ import annotations

import copy
import importlib
import itertools
import math
from dataclasses import replace

import pytest
import torch

from rankwise.adapt import heal as heal_module
from rankwise.adapt.heal import (
    HealConfig,
    _FusedDistillation,
    balance_factors_,
    distillation_loss,
    heal_,
    mark_trainable,
)
from rankwise.adapt.train import (
    CHECKPOINT,
    TrainConfig,
    TrainingDivergedError,
    budget_steps,
    causal_lm_loss,
    train,
)
from rankwise.compression import compress_
from rankwise.eval.measure import count_params
from rankwise.methods.svd_llm import SVDLLMConfig
from rankwise.nn import LowRankLinear
from tests.tiny_models import VOCAB, tiny_model, tiny_tokens

CONFIG = TrainConfig(steps=6, lr=1e-3, batch_size=2, grad_accum=2, eval_every=3, save_every=3)


def _lm(seed: int = 0):
    model = tiny_model("llama", seed=seed)
    model.requires_grad_(False)
    model.model.layers[0].mlp.requires_grad_(True)
    return model


def test_same_seed_same_loss_curve_and_eval_improves():
    ids, held = tiny_tokens(16, 32, seed=1), tiny_tokens(4, 32, seed=2)
    a = train(_lm(), ids, CONFIG, eval_ids=held, progress=False)
    b = train(_lm(), ids, CONFIG, eval_ids=held, progress=False)
    assert a.losses == b.losses and a.evals == b.evals
    assert [s for s, _ in a.evals] == [0, 3, 6]
    c = train(_lm(), ids, TrainConfig(**{**CONFIG.__dict__, "seed": 1}), progress=False)
    assert c.losses != a.losses  # another seed, another window order
    train_loss = train(_lm(), ids, TrainConfig(steps=30, lr=3e-3, batch_size=4), eval_ids=ids, progress=False)
    assert train_loss.evals[-1][1] < train_loss.evals[0][1]  # it learns the windows it sees


def test_resume_gives_the_uninterrupted_curve(tmp_path):
    ids, held = tiny_tokens(16, 32, seed=1), tiny_tokens(4, 32, seed=2)
    (tmp_path / "a").mkdir()
    straight = _lm()
    whole = train(straight, ids, CONFIG, eval_ids=held, checkpoint_dir=tmp_path / "a", progress=False)
    calls = {"n": 0}

    def dies_during_step_5(model, batch, mask):
        calls["n"] += 1
        if calls["n"] > 4 * CONFIG.grad_accum:
            raise KeyboardInterrupt
        return causal_lm_loss(model, batch, mask)

    (tmp_path / "b").mkdir()
    with pytest.raises(KeyboardInterrupt):  # the last state written is step 3's
        train(_lm(), ids, CONFIG, eval_ids=held, loss_fn=dies_during_step_5, checkpoint_dir=tmp_path / "b",
              progress=False)
    again = _lm()
    resumed = train(again, ids, CONFIG, eval_ids=held, checkpoint_dir=tmp_path / "b", resume=True, progress=False)
    assert resumed.resumed_from == 3
    assert resumed.losses == whole.losses and resumed.evals == whole.evals
    for (name, a), b in zip(straight.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_resume_refuses_another_model_or_other_settings(tmp_path):
    ids = tiny_tokens(16, 32, seed=1)
    train(_lm(), ids, CONFIG, checkpoint_dir=tmp_path, progress=False)
    other = tiny_model("llama")
    other.requires_grad_(False)
    other.model.layers[1].self_attn.requires_grad_(True)
    with pytest.raises(ValueError, match="another model"):
        train(other, ids, CONFIG, checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match=r"different settings.*lr"):
        train(_lm(), ids, TrainConfig(**{**CONFIG.__dict__, "lr": 5e-4}), checkpoint_dir=tmp_path, resume=True,
              progress=False)
    with pytest.raises(ValueError, match=r"bf16: checkpoint False, now True\); .*pass --dtype bf16 or --dtype fp32"):
        train(_lm(), ids, TrainConfig(**{**CONFIG.__dict__, "bf16": True}), checkpoint_dir=tmp_path, resume=True,
              progress=False)  # --dtype auto decided otherwise on this machine: the refusal says what to pass
    train(_lm(), ids, CONFIG, checkpoint_dir=tmp_path, progress=False, identity={"method": "pissa"})
    with pytest.raises(ValueError, match=r"another run \(what differs: method\)"):
        train(_lm(), ids, CONFIG, checkpoint_dir=tmp_path, resume=True, progress=False, identity={"method": "lora"})
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        train(_lm(), ids, CONFIG, checkpoint_dir=tmp_path, resume=True, progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    ids = tiny_tokens(16, 32, seed=1)
    calls = {"n": 0}

    def nan_at_step_5(model, batch, mask):
        calls["n"] += 1
        loss = causal_lm_loss(model, batch, mask)
        return loss * float("nan") if calls["n"] > 4 * CONFIG.grad_accum else loss

    model = _lm()
    with pytest.raises(TrainingDivergedError, match=r"at step 5.*last good checkpoint \(step 3\)"):
        train(model, ids, CONFIG, loss_fn=nan_at_step_5, checkpoint_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["step"] == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_non_finite_gradient_is_never_applied(clip):
    ids = tiny_tokens(16, 32, seed=1)
    calls = {"n": 0}

    def inf_gradient_at_step_2(model, batch, mask):
        calls["n"] += 1
        loss = causal_lm_loss(model, batch, mask)
        if calls["n"] > CONFIG.grad_accum:  # from step 2: a finite loss with an infinite gradient
            loss = loss + _InfGrad.apply(model.model.layers[0].mlp.up_proj.weight)
        return loss

    model = _lm()
    config = TrainConfig(**{**CONFIG.__dict__, "max_grad_norm": clip, "save_every": 0})
    after_step_1 = {}

    with pytest.raises(TrainingDivergedError, match=r"gradient norm became .* at step 2"):
        train(model, ids, config, loss_fn=_remember(inf_gradient_at_step_2, model, after_step_1), progress=False)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, after_step_1[name]), name


class _InfGrad(torch.autograd.Function):
    """Adds 0 to the loss and an infinite gradient to its input."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("inf"))


def _remember(loss_fn, model, store):
    """Wrap ``loss_fn`` to snapshot the parameters when step 2's first micro-batch starts."""
    calls = {"n": 0}

    def wrapped(m, batch, mask):
        calls["n"] += 1
        if calls["n"] == CONFIG.grad_accum + 1:
            store.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return loss_fn(m, batch, mask)

    return wrapped


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"lr": float("nan")}, "lr must be a positive"),
    ({"warmup": 1.0}, "warmup"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_bad_data_and_nothing_to_train():
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(_lm(), tiny_tokens(1, 32), TrainConfig(batch_size=2), progress=False)
    frozen = tiny_model("llama").requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        train(frozen, tiny_tokens(4, 32), TrainConfig(), progress=False)


def test_distillation_loss_is_the_kl_to_the_teacher():
    teacher, student = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = tiny_tokens(2, 16)
    for temperature, distill in ((1.0, 1.0), (2.0, 1.0), (2.0, 0.25), (0.5, 0.0)):
        got = distillation_loss(teacher, distill, temperature)(student, ids, None)
        with torch.no_grad():
            p = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB).float() / temperature, -1)
            logits = student(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB).float()
            q = torch.log_softmax(logits / temperature, -1)
        want = torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean") * temperature**2
        want = distill * want + (1 - distill) * torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1))
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    assert float(distillation_loss(teacher, 1.0, 1.0)(teacher, ids, None).detach()) == pytest.approx(0.0, abs=1e-5)
    mixed = distillation_loss(teacher, 0.25, 1.0)(student, ids, None)
    kl = distillation_loss(teacher, 1.0, 1.0)(student, ids, None)
    ce = causal_lm_loss(student, ids)
    torch.testing.assert_close(mixed, 0.75 * ce + 0.25 * kl)


def test_distillation_gradient_is_the_kl_gradient(monkeypatch):
    # the fused loss's gradient buffer starts as NaN: every row it does not write (a skipped chunk) fails the test
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda x, **kw: empty_like(x, **kw).fill_(float("nan")))
    teacher, student = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = tiny_tokens(2, 16)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 5:] = True
    late = torch.zeros_like(ids, dtype=torch.bool)
    late[:, 12:] = True  # the first rows of each window score nothing: whole chunks of the fused loss are skipped
    for temperature, distill, m in ((1.0, 1.0, None), (2.0, 1.0, mask), (1.0, 0.5, mask), (2.0, 0.25, late),
                                    (0.5, 0.0, None)):
        student.zero_grad()
        distillation_loss(teacher, distill, temperature)(student, ids, m).backward()
        got = {n: p.grad.clone() for n, p in student.named_parameters()}
        student.zero_grad()
        keep = slice(None) if m is None else m[:, 1:].reshape(-1)
        logits = student(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB)[keep]
        with torch.no_grad():
            p = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB)[keep] / temperature, -1)
        q = torch.log_softmax(logits / temperature, -1)
        want = torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean") * temperature**2
        want = distill * want + (1 - distill) * torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1)[keep])
        want.backward()
        for name, param in student.named_parameters():
            torch.testing.assert_close(got[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_fused_distillation_scales_its_gradient_runs_under_bfloat16_and_scores_no_token_as_zero():
    teacher, student = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = tiny_tokens(2, 16)
    loss_fn = distillation_loss(teacher, 0.5, 2.0)
    student.zero_grad()
    loss_fn(student, ids, None).backward()
    once = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    (loss_fn(student, ids, None) * -3.0).backward()  # the upstream gradient scales the saved one
    for name, param in student.named_parameters():
        torch.testing.assert_close(param.grad, -3.0 * once[name], rtol=1e-5, atol=1e-6)
    with_grad = loss_fn(student, ids, None).detach()
    with torch.no_grad():  # no gradient buffer without grad mode: the same value
        torch.testing.assert_close(loss_fn(student, ids, None), with_grad)
    student.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # heal's --bf16: bfloat16 logits, float32 loss
        mixed = loss_fn(student, ids, None)
    mixed.backward()
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed.detach(), loss_fn(student, ids, None).detach(), rtol=0.05, atol=0.05)
    for name, param in student.named_parameters():  # the bfloat16 gradient points where the float32 one does
        assert torch.nn.functional.cosine_similarity(param.grad.flatten(), once[name].flatten(), dim=0) > 0.98, name
    student.zero_grad()
    nothing = loss_fn(student, ids, torch.zeros_like(ids, dtype=torch.bool))
    nothing.backward()
    assert float(nothing) == 0.0
    assert all(not p.grad.any() for p in student.parameters() if p.grad is not None)


def test_fused_distillation_in_float64_and_with_non_finite_unscored_rows(monkeypatch):
    monkeypatch.setattr(heal_module, "FUSED_ROWS", 8)  # chunks of rows 0-7, 8-15 and 16-19
    gen = torch.Generator().manual_seed(0)
    rows, vocab = 20, 50
    z = (torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    t = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 3
    y = torch.randint(0, vocab, (rows,), generator=gen)
    w = torch.rand(rows, generator=gen, dtype=torch.float64)
    w[[0, 9, 10, 19]] = 0  # an unscored row in each chunk: the first's first, two inside the second, the last's last
    w /= w.sum()
    got = _FusedDistillation.apply(z, t, y, w, 0.4, 1.5, True)
    (gz,) = torch.autograd.grad(got, z)
    kl = (torch.log_softmax(t / 1.5, -1).exp() * (torch.log_softmax(t / 1.5, -1) - torch.log_softmax(z / 1.5, -1)))
    ce = torch.nn.functional.cross_entropy(z, y, reduction="none")
    want = (w * (0.4 * 1.5**2 * kl.sum(-1) + 0.6 * ce)).sum()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gz, torch.autograd.grad(want, z)[0], rtol=1e-10, atol=1e-12)
    bad = z.detach().clone()
    bad[0, 3], bad[10, :] = float("inf"), float("nan")  # what an overflowing model may put in a row nothing scores
    bad.requires_grad_()
    loss = _FusedDistillation.apply(bad, t, y, w, 0.4, 1.5, True)
    (gbad,) = torch.autograd.grad(loss, bad)
    torch.testing.assert_close(loss, got.detach())
    torch.testing.assert_close(gbad, gz)


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16-autocast"])
def test_heal_trains_factors_only_keeps_size_and_moves_toward_the_teacher(bf16):
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    compress_(student, SVDLLMConfig(ratio=0.5), tiny_tokens(8, 32), progress=False)
    twin = copy.deepcopy(student)
    before_params = count_params(student)
    factors = {id(p) for m in student.modules() if isinstance(m, LowRankLinear) for p in m.parameters()}
    frozen = {n: p.clone() for n, p in student.named_parameters() if id(p) not in factors}
    ids, held = tiny_tokens(16, 32, seed=1), tiny_tokens(4, 32, seed=3)
    kl = distillation_loss(teacher, 1.0, 1.0)
    start = float(kl(student, held, None))
    config = TrainConfig(steps=20, lr=3e-3, batch_size=4, bf16=bf16)  # bf16: what --dtype auto picks on fast CPUs
    result = heal_(student, ids, config, HealConfig(), teacher=teacher, progress=False)
    assert float(kl(student, held, None)) < start  # measured in float32 either way
    heal_(twin, ids, config, HealConfig(), teacher=teacher, progress=False)  # same seed, same weights
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), twin.parameters(), strict=True))
    assert count_params(student) == before_params
    assert result.trainable == sum(m.num_params for m in student.modules() if isinstance(m, LowRankLinear))
    for name, p in student.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert not any(p.requires_grad for p in student.parameters())
    assert math.isfinite(result.losses[-1])


def test_balance_factors_keeps_each_product_and_equalises_each_pair():
    torch.manual_seed(0)
    layer = LowRankLinear(12, 20, 4, bias=False)
    with torch.no_grad():
        layer.up.copy_(torch.randn(20, 4) * torch.tensor([0.01, 1.0, 5.0, 0.0]))
        layer.down.copy_(torch.randn(4, 12) * torch.tensor([3.0, 0.1, 1.0, 2.0])[:, None])
    up, down = layer.up.detach().clone(), layer.down.detach().clone()
    assert balance_factors_(torch.nn.Sequential(layer, torch.nn.Linear(3, 3))) == 1
    torch.testing.assert_close(layer.up @ layer.down, up @ down, rtol=1e-5, atol=1e-6)
    up_rms, down_rms = layer.up.pow(2).mean(0).sqrt(), layer.down.pow(2).mean(1).sqrt()
    torch.testing.assert_close(up_rms[:3], down_rms[:3])
    assert not torch.allclose(up_rms[:3], up.pow(2).mean(0).sqrt()[:3])  # it did rescale
    assert torch.equal(layer.up[:, 3], up[:, 3]) and torch.equal(layer.down[3], down[3])  # a zero side: left alone


@pytest.mark.parametrize("balance", [True, False])
def test_heal_balances_the_factors_before_training_unless_told_not_to(monkeypatch, balance):
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    compress_(student, SVDLLMConfig(ratio=0.5), tiny_tokens(8, 32), progress=False)
    seen = []

    def spy(model):
        seen.append([p.requires_grad for p in model.parameters()])  # called once the factors are trainable
        return balance_factors_(model)

    monkeypatch.setattr(heal_module, "balance_factors_", spy)
    heal_(student, tiny_tokens(8, 32, seed=1), TrainConfig(steps=1, lr=1e-3, batch_size=4),
          HealConfig(balance=balance), teacher=teacher, progress=False)
    assert len(seen) == int(balance)
    if balance:
        assert any(seen[0]) and not all(seen[0])


def test_heal_needs_a_compressed_model_and_a_teacher_to_distill():
    with pytest.raises(ValueError, match="no LowRankLinear"):
        heal_(tiny_model("llama"), tiny_tokens(8, 32), TrainConfig(steps=1), HealConfig(distill=0.0), progress=False)
    with pytest.raises(ValueError, match="needs the dense teacher"):
        heal_(tiny_model("llama"), tiny_tokens(8, 32), TrainConfig(steps=1), HealConfig(), progress=False)
    with pytest.raises(ValueError, match="distill is a weight"):
        HealConfig(distill=1.5)


def test_heal_trains_a_bfloat16_model_in_float32_and_returns_it_in_bfloat16():
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    compress_(student, SVDLLMConfig(ratio=0.5), tiny_tokens(8, 32), progress=False)
    student.to(torch.bfloat16)
    before = {n: p.clone() for n, p in student.named_parameters()}
    heal_(student, tiny_tokens(16, 32, seed=1), TrainConfig(steps=3, lr=1e-3, batch_size=4), HealConfig(),
          teacher=teacher, progress=False)
    assert all(p.dtype == torch.bfloat16 for p in student.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in student.named_parameters())


def test_distillation_scores_only_masked_tokens():
    teacher, student = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = tiny_tokens(2, 16)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 10:] = True
    got = distillation_loss(teacher, 0.5, 1.0)(student, ids, mask)
    with torch.no_grad():
        keep = mask[:, 1:].reshape(-1)
        p = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB), -1)[keep]
        q = torch.log_softmax(student(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB), -1)[keep]
        kl = torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean")
        ce = torch.nn.functional.nll_loss(q, ids[:, 1:].reshape(-1)[keep])
    torch.testing.assert_close(got.detach(), 0.5 * ce + 0.5 * kl, rtol=1e-5, atol=1e-6)


class _Clock:
    """A stand-in for ``time.perf_counter`` that advances ``tick`` seconds per call."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_time_budget_counts_the_steps_that_fit_and_changes_nothing(monkeypatch):
    train_module = importlib.import_module("rankwise.adapt.train")  # the package exports a function of that name
    model, ids = _lm(), tiny_tokens(16, 32, seed=1)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    monkeypatch.setattr(train_module.time, "perf_counter", _Clock(1.5))  # each trial step "takes" 1.5 s
    config, seconds = budget_steps(model, ids, TrainConfig(steps=100, batch_size=2, grad_accum=2), 0.5)
    assert seconds == 1.5 and config.steps == 20  # 30 s / 1.5 s
    slowing = iter([0.0, 9.0, 9.0, 4.0, 4.0, 1.5])  # trial steps of 9, 4 and 1.5 s: the last, warm one counts
    clock = itertools.accumulate(slowing)
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: next(clock))
    warm, seconds = budget_steps(model, ids, TrainConfig(steps=100, batch_size=2, grad_accum=2), 0.5)
    assert train_module.TRIAL_STEPS == 3 and seconds == 1.5 and warm.steps == 20
    monkeypatch.setattr(train_module.time, "perf_counter", _Clock(1.5))
    assert (config.batch_size, config.grad_accum) == (2, 2)
    capped, _ = budget_steps(model, ids, TrainConfig(steps=7, batch_size=2), 60.0)
    assert capped.steps == 7  # never more than --steps
    floor, _ = budget_steps(model, ids, TrainConfig(steps=7, batch_size=2), 0.001)
    assert floor.steps == 1  # at least one step
    seen, stale = [], []

    def loss_fn(m, b, k):
        seen.append(b.shape[0])
        stale.append(any(p.grad is not None for p in m.parameters()))
        return causal_lm_loss(m, b, k)

    short = budget_steps(model, ids[:3], TrainConfig(steps=100, batch_size=2, grad_accum=3), 10.0, loss_fn=loss_fn)
    assert sum(seen) == 3 * 6 and short[0].steps == 100  # a whole step of 6 windows from 3, three times
    assert stale == [False, True, True] * 3  # each trial step from cleared gradients, as a training step
    assert all(torch.equal(p, weights[n]) and p.grad is None for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="positive number of minutes"):
        budget_steps(model, ids, TrainConfig(steps=7), 0.0)


def test_heal_with_a_time_budget_is_the_run_its_step_count_gives(monkeypatch):
    train_module = importlib.import_module("rankwise.adapt.train")  # the package exports a function of that name
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    compress_(student, SVDLLMConfig(ratio=0.5), tiny_tokens(8, 32), progress=False)
    twin = copy.deepcopy(student)
    ids, said = tiny_tokens(16, 32, seed=1), []
    monkeypatch.setattr(train_module.time, "perf_counter", _Clock(2.0))
    budgeted = heal_(student, ids, TrainConfig(steps=50, lr=3e-3, batch_size=4), HealConfig(), teacher=teacher,
                     progress=False, minutes=0.1, say=said.append)  # 6 s at 2 s per step: 3 steps
    assert len(budgeted.losses) == 3 and "3 steps" in said[0] and "--steps 3" in said[0]
    fixed = heal_(twin, ids, TrainConfig(steps=3, lr=3e-3, batch_size=4), HealConfig(), teacher=teacher,
                  progress=False)
    assert budgeted.losses == fixed.losses
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), twin.state_dict().values(),
                                                   strict=True))
    with pytest.raises(ValueError, match="cannot resume"):
        heal_(student, ids, TrainConfig(steps=3), HealConfig(), teacher=teacher, progress=False, minutes=1.0,
              resume=True)


def test_a_budgeted_heal_checkpoints_each_quarter_and_resumes_with_its_count(monkeypatch, tmp_path):
    train_module = importlib.import_module("rankwise.adapt.train")
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    compress_(student, SVDLLMConfig(ratio=0.5), tiny_tokens(8, 32), progress=False)
    ids, saved = tiny_tokens(16, 32, seed=1), []
    real_save = train_module._save
    monkeypatch.setattr(train_module, "_save", lambda path, model, opt, sched, config, step, *rest: (
        saved.append(step), real_save(path, model, opt, sched, config, step, *rest)))
    monkeypatch.setattr(train_module.time, "perf_counter", _Clock(2.0))
    config = TrainConfig(steps=50, lr=3e-3, batch_size=4, save_every=50)
    result = heal_(student, ids, config, HealConfig(), teacher=teacher, progress=False, minutes=16 / 60,
                   checkpoint_dir=tmp_path)  # 16 s at 2 s per step: 8 steps
    assert len(result.losses) == 8 and saved == [2, 4, 6, 8]
    assert train_module.saved_steps(tmp_path) == 8
    mark_trainable(student, "factors")  # heal_ hands the model back frozen
    again = train(student, ids, replace(config, steps=8, save_every=2), resume=True, checkpoint_dir=tmp_path,
                  progress=False, loss_fn=causal_lm_loss)  # the saved settings are those of --steps 8
    assert again.resumed_from == 8 and again.losses == result.losses
    with pytest.raises(ValueError, match="steps: checkpoint 8, now 9"):
        train(student, ids, replace(config, steps=9), resume=True, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="no training state"):
        train_module.saved_steps(tmp_path / "nowhere")
