"""Helpers that build `transformers`' DeepseekV3ForCausalLM (the oracle) beside a dsv3 model."""

from __future__ import annotations

import torch

from dsv3 import DeepseekV3, ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
        n_shared_experts=1, routed_scaling_factor=2.5, num_nextn_predict_layers=1, max_position_embeddings=256,
        initializer_range=0.1, eos_token_id=None, bos_token_id=None,
    )
    base.update(overrides)
    return ModelConfig.from_dict(base)


def random_model(cfg: ModelConfig, seed: int = 0) -> DeepseekV3:
    torch.manual_seed(seed)
    model = DeepseekV3(cfg).float().eval()
    with torch.no_grad():  # non-trivial norms and a non-zero correction bias
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model


def hf_model(model: DeepseekV3):
    """transformers' DeepseekV3ForCausalLM with the same config and weights (fp32, eager attention)."""
    from dsv3.checkpoint.adapter import to_transformers

    return to_transformers(model.float(), attn_implementation="eager")
