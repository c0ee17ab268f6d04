"""Hugging Face transformers models built from small configs with random weights (nothing is downloaded).

Each factory returns (model, loss_fn) where loss_fn(model, input_ids, labels) is what a training script writes:
the token-mean cross entropy of the logits against labels padded with -100. Dropout is 0, so zb's gradients can
be compared with eager's exactly (zb draws its own dropout masks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers as T

VOCAB = 64
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)


def _decoder(config_class, model_class, attention="sdpa", **extra):
    def build():
        config = config_class(**{**SIZES, **extra})
        config._attn_implementation = attention
        config.use_cache = False
        return model_class(config).train()
    return build


FAMILIES = {
    "llama": _decoder(T.LlamaConfig, T.LlamaForCausalLM, num_key_value_heads=2),
    "qwen2": _decoder(T.Qwen2Config, T.Qwen2ForCausalLM, num_key_value_heads=2),
    "mistral": _decoder(T.MistralConfig, T.MistralForCausalLM, num_key_value_heads=2, sliding_window=None),
    "gemma2": _decoder(T.Gemma2Config, T.Gemma2ForCausalLM, attention="eager", num_key_value_heads=2, head_dim=8),
    "phi3": _decoder(T.Phi3Config, T.Phi3ForCausalLM, num_key_value_heads=2, pad_token_id=0),
    "opt": lambda: _configured(T.OPTForCausalLM, T.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0)),
    "bert": lambda: _configured(T.BertForMaskedLM, T.BertConfig(
        **SIZES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
}


def _configured(model_class, config):
    config._attn_implementation = "sdpa"
    config.use_cache = False
    return model_class(config).train()


def loss_fn(model, input_ids, labels):
    logits = model(input_ids=input_ids).logits
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def batch(rows: int = 8, length: int = 12):
    """Token ids and labels with -100 padding, so microbatches hold different numbers of tokens."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (rows, length), generator=generator)
    labels = input_ids.clone()
    labels[0, :] = -100
    labels[3, 5:] = -100
    labels[6, 9:] = -100
    return input_ids, labels
