"""Tiny randomly initialised causal LMs built in memory (Llama, GPT-2, OPT), a tiny BERT encoder, and a tiny offline
tokenizer."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

VOCAB = 256


def tiny_config(arch: str):
    if arch == "llama":
        return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=True)
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0,
                          eos_token_id=0)
    if arch == "opt":
        return OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=64)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    return model.eval()


def tiny_encoder(seed: int = 0) -> BertModel:
    """A tiny BERT encoder (``BertModel``, with its pooler, as sentence-transformers checkpoints hold it)."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=256, architectures=["BertModel"])
    return BertModel(config).eval()


def tiny_tokens(samples: int = 8, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (samples, seq_len), generator=g)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with exactly 256 tokens (one per byte, no merges), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


def svd_family() -> list[str]:
    """Registered methods that return truncated factorisations (a :class:`~rankwise.methods.LowRankConfig`), one
    block at a time (the SVD family): the full option matrix runs over these, one representative option over the
    structured methods."""
    from rankwise.methods import CompressConfig, LowRankConfig, config_class, method_names

    return [m for m in method_names() if issubclass(config_class(m), LowRankConfig)
            and config_class(m).block_groups is CompressConfig.block_groups]


def structured_methods() -> list[str]:
    """Registered methods with their own representation (a cost of their own): the complement of
    :func:`svd_family`."""
    from rankwise.methods import method_names

    return [m for m in method_names() if m not in svd_family()]


def budget(method: str, ratio: float = 0.3) -> dict:
    """Keyword arguments of a budget ``method`` accepts: ``ratio`` or, for methods that take bits only, the bits
    that keep the same share of bf16 weights."""
    from rankwise.methods import config_class

    if "params" in config_class(method).units:
        return {"ratio": ratio}
    return {"bits": 16 * (1 - ratio)}
