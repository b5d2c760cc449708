"""Small transformers models of every family rope_jit.integrations.transformers patches,
built from configs with random weights (no download). Shared by the CPU tests of the patch
mechanics and the GPU tests of the patched models.

Every model has 2 layers and heads of 32 (DeepSeek-V3: a rope part of 16), so most
families share their kernel specializations; what differs is what each family's RoPE does
differently: partial rotary (Phi, Phi-3, GPT-NeoX), q/k norms (Qwen3, Gemma 3), sliding
layers with their own rope (Gemma 3), MLA with interleaved pairs (DeepSeek-V3), mRoPE
(Qwen2-VL).
"""

from __future__ import annotations

import torch
import transformers

VOCAB = 256
_COMMON = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _llama_like(config_cls, model_cls, **extra):
    return lambda: model_cls(config_cls(**{**_COMMON, **extra}))


def _deepseek_v3():
    cfg = transformers.DeepseekV3Config(
        **{**_COMMON, "num_key_value_heads": 4},  # MLA: one latent for every head
        q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=16, rope_interleave=True,
        # dense layers only: MoE routing would turn a rounding difference into another
        # expert, which is not what the tests compare
        first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, moe_intermediate_size=64)
    return transformers.DeepseekV3ForCausalLM(cfg)


def _qwen2_vl():
    text = {**_COMMON, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                           "mrope_section": [4, 6, 6]}}
    vision = dict(depth=1, embed_dim=64, hidden_size=128, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    cfg = transformers.Qwen2VLConfig(text_config=text, vision_config=vision)
    return transformers.Qwen2VLForConditionalGeneration(cfg)


# family -> a function building a small model of it (fp32, CPU, random weights)
MODELS = {
    "llama": _llama_like(transformers.LlamaConfig, transformers.LlamaForCausalLM,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 5e5,
                                          "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64}),
    "mistral": _llama_like(transformers.MistralConfig, transformers.MistralForCausalLM,
                           sliding_window=None),
    "qwen2": _llama_like(transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": _llama_like(transformers.Qwen3Config, transformers.Qwen3ForCausalLM, head_dim=32),
    "gemma": _llama_like(transformers.GemmaConfig, transformers.GemmaForCausalLM, head_dim=32),
    "gemma3": _llama_like(transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                          head_dim=32, sliding_window=8,
                          layer_types=["sliding_attention", "full_attention"]),
    "phi": _llama_like(transformers.PhiConfig, transformers.PhiForCausalLM,
                       partial_rotary_factor=0.5),
    "phi3": _llama_like(transformers.Phi3Config, transformers.Phi3ForCausalLM,
                        rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                         "partial_rotary_factor": 0.75}),
    "gpt_neox": _llama_like(transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM,
                            rotary_pct=0.25),
    "deepseek_v3": _deepseek_v3,
    "qwen2_vl": _qwen2_vl,
}


def multimodal_rotary_pos_emb_v4(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
    """transformers 4's Qwen2-VL ``apply_multimodal_rotary_pos_emb``, as it was (transformers
    5 folds the section selection into the rotary embedding): the oracle of rope_jit's
    replacement for it."""
    mrope_section = mrope_section * 2
    cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(mrope_section, dim=-1))],
                    dim=-1).unsqueeze(unsqueeze_dim)
    sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(mrope_section, dim=-1))],
                    dim=-1).unsqueeze(unsqueeze_dim)

    def rotate_half(x):
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
