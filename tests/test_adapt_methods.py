"""Every adapter ``rankwise adapt`` offers, on a tiny Llama: built with its pre-pass, output unchanged at init where
the method promises it, trainable, saved and reloaded; bad input refused before any training."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from rankwise.adapt.methods import METHODS, add_adapter
from rankwise.adapt.train import TrainConfig, train
from tests.tiny_models import tiny_model, tiny_tokens

# Methods whose initial adapter leaves the model's function unchanged (the rest rewrite the base weights so the
# sum is unchanged too, up to float error, or start from a non-zero adapter by design: randlora).
UNCHANGED_AT_INIT = set(METHODS) - {"randlora"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_builds_trains_and_reloads(name, tmp_path):
    data = tiny_tokens(8, 32, seed=1)
    base = tiny_model("llama")
    with torch.no_grad():
        before = base(input_ids=data[:2]).logits
    model = add_adapter(base, name, 4, data=data, batch_size=2, prepass_batches=2)
    with torch.no_grad():
        at_init = model(input_ids=data[:2]).logits
    if name in UNCHANGED_AT_INIT:
        torch.testing.assert_close(at_init, before, atol=1e-4, rtol=1e-4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("base_layer" not in n for n in trainable), trainable
    initial = tmp_path / "initial"
    if METHODS[name].changes_base:  # PEFT saves these as plain LoRA relative to the untouched base (rank 2r)
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(initial)
        model.peft_config["default"].init_lora_weights = name
    result = train(model, data, TrainConfig(steps=3, lr=1e-2, batch_size=2), progress=False)
    assert len(result.losses) == 3
    with torch.no_grad():
        trained = model(input_ids=data[:2]).logits
    assert not torch.allclose(trained, at_init)
    model.save_pretrained(tmp_path / "adapter", **({"path_initial_model_for_weight_conversion": str(initial)}
                                                   if METHODS[name].changes_base else {}))
    again = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=data[:2]).logits, trained, atol=1e-4, rtol=1e-4)


def test_same_seed_same_adapter_and_the_callers_random_state_is_kept():
    model = tiny_model("llama")  # (builds with its own seed)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = add_adapter(model, "lora", 4, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = add_adapter(tiny_model("llama"), "lora", 4, seed=3)
    c = add_adapter(tiny_model("llama"), "lora", 4, seed=4)
    sa, sb, sc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "nope"}, "unknown adapter method 'nope'; choose one of lora,"),
    ({"name": "lora", "rank": 64}, "--rank 64 is not below the smallest targeted dimension"),
    ({"name": "eva"}, "eva initialises from the training data"),
    ({"name": "lora_ga"}, "lora_ga initialises from the training data"),
    ({"name": "lora_sb"}, "lora_sb initialises from the training data"),
    ({"name": "lora", "targets": ["nothing_here"]}, "match no linear layer"),
    ({"name": "lora", "targets": ["q_proj", "lm_head"]}, "selects the output layer lm_head"),
    ({"name": "lora", "alpha": -1.0}, "--alpha must be a positive number"),
])
def test_bad_input_before_any_work(kwargs, message):
    kwargs = {"rank": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        add_adapter(tiny_model("llama"), kwargs.pop("name"), kwargs.pop("rank"), **kwargs)
