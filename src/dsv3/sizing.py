"""Parameter and cache sizes of a config, computed on the meta device (no memory, seconds for 671B)."""

from __future__ import annotations

import torch

from .config import ModelConfig


def count_parameters(cfg: ModelConfig) -> dict:
    from .model import DeepseekV3

    with torch.device("meta"):
        model = DeepseekV3(cfg)
    n = cfg.num_hidden_layers
    main = mtp = 0
    for name, p in model.named_parameters():
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= n:
            mtp += p.numel()
        else:
            main += p.numel()
    buffers = sum(b.numel() for name, b in model.named_buffers()
                  if "e_score_correction_bias" in name and int(name.split(".")[2]) < n)
    inactive = 0
    if cfg.n_routed_experts:
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        inactive = cfg.num_moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    full_kv = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return {
        "params_total": main + mtp,
        "params_main": main,
        "params_mtp": mtp,  # the MTP modules' own weights; they share the main embedding and output head
        "router_bias_buffers": buffers,  # main model; fp32 buffers, not parameters
        "params_activated_per_token": main - inactive,
        "kv_cache_values_per_token_per_layer": latent,
        "kv_cache_bytes_per_token": n * latent * 2,  # bf16
        "full_kv_values_per_token_per_layer": full_kv,
        "full_kv_bytes_per_token": n * full_kv * 2,
    }
