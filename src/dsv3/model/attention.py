"""Multi-head Latent Attention (MLA).

Full path (training, prefill): expand the latent into per-head keys/values and run SDPA.
Absorbed path (decoding): cache only norm(c_kv) [kv_lora_rank] and the rotated shared key k_pe [qk_rope]
per token; fold W_UK into the query and apply W_UV after attention, so keys/values are never expanded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm, apply_rotary


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, nh = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads = nh
        self.nope, self.rope, self.v_dim, self.rank = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                                       cfg.v_head_dim, cfg.kv_lora_rank)
        self.scale = cfg.softmax_scale
        self.interleave = cfg.rope_interleave
        qk = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(H, nh * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, nh * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.rank + self.rope, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.rank, nh * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(nh * self.v_dim, H, bias=cfg.attention_bias)

    def _queries(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x) if self.cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(B, T, self.n_heads, -1).split([self.nope, self.rope], dim=-1)
        return q_nope, apply_rotary(q_pe, cos, sin, self.interleave)  # [B, T, nh, nope], [B, T, nh, rope]

    def latent(self, x, cos, sin):
        """The per-token values the decode cache holds: norm(c_kv) [B, T, rank] and rotated k_pe [B, T, rope]."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        k_pe = apply_rotary(k_pe.unsqueeze(2), cos, sin, self.interleave).squeeze(2)
        return self.kv_a_layernorm(c_kv), k_pe

    def forward(self, x, cos, sin, mask: torch.Tensor | None = None, cache: tuple | None = None):
        """Full attention over x [B, T, H]; causal, or `mask` [B, 1, T, T] (True = may attend).

        With cache=(kv_cache, pe_cache), the latents of positions 0..T-1 are stored for later decoding.
        """
        B, T, _ = x.shape
        q_nope, q_pe = self._queries(x, cos, sin)
        c_kv, k_pe = self.latent(x, cos, sin)
        if cache is not None:
            cache[0][:, :T] = c_kv
            cache[1][:, :T] = k_pe
        k_nope, v = self.kv_b_proj(c_kv).view(B, T, self.n_heads, -1).split([self.nope, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)  # [B, nh, T, qk]
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(-1, -1, self.n_heads, -1)), dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))

    def forward_absorbed(self, x, cos, sin, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                         positions: torch.Tensor, mask: torch.Tensor):
        """Attend from new tokens x [B, S, H] at `positions` [B, S] over the latent cache.

        The new tokens' latents are written into kv_cache [B, L, rank] / pe_cache [B, L, rope] at their
        positions first; mask [B, S, L'] (True = may attend) covers the first L' cache slots.
        """
        B, S, _ = x.shape
        q_nope, q_pe = self._queries(x, cos, sin)
        c_kv, k_pe = self.latent(x, cos, sin)
        idx = positions[..., None]
        kv_cache.scatter_(1, idx.expand(-1, -1, self.rank), c_kv.to(kv_cache.dtype))
        pe_cache.scatter_(1, idx.expand(-1, -1, self.rope), k_pe.to(pe_cache.dtype))
        L = mask.shape[-1]
        kv, pe = kv_cache[:, :L], pe_cache[:, :L]
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]  # [nh, nope, rank], [nh, v, rank]
        q_lat = torch.einsum("bshd,hdr->bshr", q_nope, w_uk)  # W_UK folded into the query
        scores = (torch.einsum("bshr,blr->bshl", q_lat, kv) + torch.einsum("bshd,bld->bshl", q_pe, pe)).float()
        scores = scores * self.scale
        scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
        p = scores.softmax(dim=-1).to(kv.dtype)
        o_lat = torch.einsum("bshl,blr->bshr", p, kv)  # [B, S, nh, rank]
        o = torch.einsum("bshr,hvr->bshv", o_lat, w_uv)  # W_UV applied after attention
        return self.o_proj(o.reshape(B, S, -1))
