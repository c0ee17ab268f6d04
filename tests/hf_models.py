"""Hugging Face transformers models built from small configs with random weights (nothing is downloaded).

Each factory returns a model in training mode; loss_fn(model, input_ids, labels) is what a training script writes:
the token-mean cross entropy of the logits against labels padded with -100. Dropout is 0, so zb's gradients can
be compared with eager's exactly (zb draws its own dropout masks).

MOE_FAMILIES are mixture-of-experts decoders (4 experts, top-2 unless noted) on transformers' default experts
implementation ("grouped_mm": tokens sorted by expert, histc group sizes, cumsum offsets, a grouped matmul, the
inverse permutation), which zb proves per token. Their router aux loss is off (router_aux_loss_coef=0 and
output_router_logits=False): eager's aux loss is a statistic of the whole batch (see options["aux_loss"]).
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


K = dict(num_key_value_heads=2)
NO_AUX = dict(router_aux_loss_coef=0.0, output_router_logits=False)

MOE_FAMILIES = {
    "mixtral": _decoder(T.MixtralConfig, T.MixtralForCausalLM, **K, **NO_AUX, num_local_experts=4,
                        num_experts_per_tok=2),
    "qwen2_moe": _decoder(T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM, **K, **NO_AUX, num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "qwen3_moe": _decoder(T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, **K, **NO_AUX, num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=32, head_dim=8),
    "olmoe": _decoder(T.OlmoeConfig, T.OlmoeForCausalLM, **K, **NO_AUX, num_experts=4, num_experts_per_tok=2,
                      pad_token_id=0, eos_token_id=1),
    "granitemoe": _decoder(T.GraniteMoeConfig, T.GraniteMoeForCausalLM, **K, **NO_AUX, num_local_experts=4,
                           num_experts_per_tok=2),
    "minimax": _decoder(T.MiniMaxConfig, T.MiniMaxForCausalLM, **K, **NO_AUX, num_local_experts=4,
                        num_experts_per_tok=2, head_dim=8, block_size=4),  # lightning + softmax attention layers
    "hunyuan_v1_moe": _decoder(T.HunYuanMoEV1Config, T.HunYuanMoEV1ForCausalLM, **K, output_router_logits=False,
                               num_experts=4, moe_topk=2, head_dim=8),
    "ernie4_5_moe": _decoder(T.Ernie4_5_MoeConfig, T.Ernie4_5_MoeForCausalLM, **K, **NO_AUX, moe_num_experts=4, moe_k=2,
                             moe_intermediate_size=32, moe_num_shared_experts=1, moe_layer_start_index=0),
    # The next four hold in-place steps whose results nobody reads, which zb once erased as dead code (silently
    # wrong): deepseek_v3 and glm4_moe the group-limited routing's group_mask.scatter_(1, group_idx, 1) (and
    # deepseek_v3 expand_kv's key_states[...].copy_ into a new_empty tensor), phimoe an autograd.Function
    # backward's grad.scatter_add_, gpt_oss the experts' out.add_(bias[expert_ids]).
    "deepseek_v3": _decoder(T.DeepseekV3Config, T.DeepseekV3ForCausalLM, num_key_value_heads=4, n_routed_experts=4,
                             num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1, n_group=2,
                             topk_group=1, first_k_dense_replace=0, qk_rope_head_dim=4, qk_nope_head_dim=4,
                             v_head_dim=8, kv_lora_rank=16, q_lora_rank=None, head_dim=4,
                             output_router_logits=False),
    "glm4_moe": _decoder(T.Glm4MoeConfig, T.Glm4MoeForCausalLM, **K, n_routed_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=0, head_dim=8,
                          output_router_logits=False),
    # jitter 0 makes sparsemixer's (Gumbel-sampled) routing deterministic
    "phimoe": _decoder(T.PhimoeConfig, T.PhimoeForCausalLM, **K, **NO_AUX, num_local_experts=4, num_experts_per_tok=2,
                        router_jitter_noise=0.0, input_jitter_noise=0.0),
    "gpt_oss": _decoder(T.GptOssConfig, T.GptOssForCausalLM, attention="eager", **K, **NO_AUX, num_local_experts=4,
                         num_experts_per_tok=2, head_dim=8, sliding_window=8,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # rotary embedding as complex numbers: torch.polar, view_as_complex / view_as_real
    "llama4": _decoder(T.Llama4TextConfig, T.Llama4ForCausalLM, **K, **NO_AUX, num_local_experts=4,
                       num_experts_per_tok=1, intermediate_size_mlp=64, head_dim=8),
}

# Not run (transformers 5.24, torch 2.13):
#   jetmoe: Dynamo breaks the graph at `expert_size = expert_size.tolist()` (modeling_jetmoe.py:195); zb refuses
#     (ZbUnsupportedError: zb needs the whole model in one graph). JetMoE does not use transformers' experts
#     implementations.
#   dbrx: its own expert loop over `expert_mask.sum(...).nonzero()` breaks the graph (modeling_dbrx.py:293), same
#     refusal; building it also needs attn_config rope_theta and clip_qkv set (transformers bugs).


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
