"""Multi-head Latent Attention (MLA).

Full path (training, prefill): expand the latent into per-head keys/values and run SDPA.
Absorbed path (decoding): cache only norm(c_kv) [kv_lora_rank] and the rotated shared key k_pe [qk_rope]
per token; fold W_UK into the query and apply W_UV after attention, so keys/values are never expanded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import ModelConfig
from .layers import Linear, RMSNorm, apply_rotary, fused_linear, trains_with_kernels


class _CPUAttention(torch.autograd.Function):
    """Causal (mask None) or masked attention for CPU training in bf16 through dsv3's AMX kernels
    (kernels/cpu_attention.cpp): q [B, H, T, Dq], kv [B, H, T, Dk + Dv] (keys then values per head, as MLA's
    kv_b_proj makes them); with k_pe [B, T, Dq - Dk] the keys' rope dims shared by the heads, and the last
    Dq - Dk dims of q and of the keys rotated by the kernels (cos, sin as for `apply_rotary`). Tiles outside the
    mask are skipped; the output is laid out as the output projection reads it. ATen's flash-attention backward
    takes 5-14x as long at training shapes."""

    @staticmethod
    def forward(ctx, q, kv, k_pe, cos, sin, mask, scale: float, k_dim: int, interleave: bool = True):
        k, v = kv[..., :k_dim], kv[..., k_dim:]
        rope = None if k_pe is None else (k_pe, cos, sin, interleave)
        out, lse = kernels.attention_forward(q, k, v, mask, scale, rope)
        ctx.save_for_backward(q, kv, k_pe, cos, sin, out, lse, mask)
        ctx.scale, ctx.k_dim, ctx.interleave = scale, k_dim, interleave
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, kv, k_pe, cos, sin, out, lse, mask = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        k, v = kv[..., :ctx.k_dim], kv[..., ctx.k_dim:]
        rope = None if k_pe is None else (k_pe, cos, sin, ctx.interleave)
        dq, dkv, dk_pe = kernels.attention_backward(grad, q, k, v, out, lse, mask, ctx.scale, rope)
        return dq, dkv.transpose(1, 2), None if k_pe is None else dk_pe, None, None, None, None, None, None


class _TrainLatents(torch.autograd.Function):
    """MLA's q_a and kv_a projections as one product (as `fused_linear` runs them) and the norms of q_a's output and
    of c_kv (as RMSNorm runs them in training: bf16 outputs) for CPU bf16 training -> (norm(q_lat), norm(c_kv),
    k_pe), the same numbers. The backward writes the norms' input gradients and k_pe's straight into the columns of
    the product's output gradient, which autograd's path concatenated twice (c_kv's with k_pe's, then q_lat's with
    those) before the product's own backward."""

    @staticmethod
    def runs(x, layers, norms) -> bool:
        """Whether this training path takes the layers (q_a, kv_a; no biases) and their norms."""
        return (layers[0].bias is None and layers[1].bias is None
                and all(trains_with_kernels(x, m.weight) for m in layers)
                and all(kernels.rms_norm_ok(x, m.weight) and m.weight.shape[0] % 16 == 0 for m in norms))

    @staticmethod
    def forward(ctx, x, w_q, w_kv, norm_q, norm_kv, eps_q: float, eps_kv: float):
        xb = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if xb.stride(-1) != 1:  # the weight-gradient kernel reads rows
            xb = xb.contiguous()
        wb = torch.cat((w_q, w_kv)).to(torch.bfloat16)
        y = F.linear(xb, wb)  # [T, q_rank + rank + rope]
        nq, rank = w_q.shape[0], norm_kv.shape[0]
        q, rstd_q = kernels.rms_norm_forward(y[:, :nq], norm_q, eps_q, True)
        c, rstd_c = kernels.rms_norm_forward(y[:, nq:nq + rank], norm_kv, eps_kv, True)
        ctx.save_for_backward(xb, wb, y, norm_q, norm_kv, rstd_q, rstd_c)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        lead = x.shape[:-1]
        return q.view(*lead, nq), c.view(*lead, rank), y[:, nq + rank:].view(*lead, -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dq, dc, dk_pe):
        xb, wb, y, norm_q, norm_kv, rstd_q, rstd_c = ctx.saved_tensors
        nq, rank = norm_q.shape[0], norm_kv.shape[0]
        dy = torch.empty_like(y)
        _, dnorm_q = kernels.rms_norm_backward(dq.reshape(-1, nq).contiguous(), y[:, :nq], norm_q, rstd_q,
                                               out=dy[:, :nq])
        _, dnorm_kv = kernels.rms_norm_backward(dc.reshape(-1, rank).contiguous(), y[:, nq:nq + rank], norm_kv, rstd_c,
                                                out=dy[:, nq:nq + rank])
        dy[:, nq + rank:] = dk_pe.reshape(dy.shape[0], -1)
        dx = (dy @ wb).view(ctx.x_shape).to(ctx.x_dtype)
        dw = kernels.linear_weight_grad(dy, xb)
        return dx, dw[:nq], dw[nq:], dnorm_q, dnorm_kv, None, None


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
            self.q_proj = Linear(H, nh * qk, bias=False)
        else:
            self.q_a_proj = Linear(H, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, feeds_matmuls=True)
            self.q_b_proj = Linear(cfg.q_lora_rank, nh * qk, bias=False)
        self.kv_a_proj_with_mqa = Linear(H, self.rank + self.rope, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps, feeds_matmuls=True)
        self.kv_b_proj = Linear(self.rank, nh * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(nh * self.v_dim, H, bias=cfg.attention_bias)

    def _q(self, x):
        """Queries before rotation, [B, T, nh, qk]."""
        q = self.q_proj(x) if self.cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(*x.shape[:2], self.n_heads, -1)

    def _project(self, x):
        """Queries before rotation [B, T, nh, qk], norm(c_kv) [B, T, rank] and k_pe before rotation [B, T, rope]. In
        CPU bf16 training q_a and kv_a run as one product (`fused_linear`), with their norms in `_TrainLatents`."""
        if self.cfg.q_lora_rank is None:
            c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
            return self._q(x), self.kv_a_layernorm(c_kv), k_pe
        layers, norms = (self.q_a_proj, self.kv_a_proj_with_mqa), (self.q_a_layernorm, self.kv_a_layernorm)
        if _TrainLatents.runs(x, layers, norms):
            q_lat, c_kv, k_pe = _TrainLatents.apply(x, *(m.weight for m in layers + norms), norms[0].eps, norms[1].eps)
        else:
            q_lat, kv_a = fused_linear(x, *layers)
            c_kv, k_pe = kv_a.split([self.rank, self.rope], dim=-1)
            q_lat, c_kv = self.q_a_layernorm(q_lat), self.kv_a_layernorm(c_kv)
        return self.q_b_proj(q_lat).view(*x.shape[:2], self.n_heads, -1), c_kv, k_pe

    def latent(self, x, cos, sin):
        """The per-token values the decode cache holds: norm(c_kv) [B, T, rank] and rotated k_pe [B, T, rope]."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        k_pe = apply_rotary(k_pe.unsqueeze(2), cos, sin, self.interleave).squeeze(2)
        return self.kv_a_layernorm(c_kv), k_pe

    def store_latent(self, x, cos, sin, cache, positions: torch.Tensor) -> None:
        """Only store the latents of x [B, S, H] at `positions` [B, S] (no attention): what a layer whose
        outputs are not needed contributes to later decoding (the MTP module over a prefix)."""
        c_kv, k_pe = self.latent(x, cos, sin)
        new = torch.cat((c_kv, k_pe), dim=-1).to(cache.dtype)
        if isinstance(cache, torch.Tensor):
            cache.index_put_((torch.arange(x.shape[0], device=x.device)[:, None], positions), new)
        else:
            cache.write(new)

    def forward(self, x, cos, sin, mask: torch.Tensor | None = None, cache: torch.Tensor | None = None):
        """Full attention over x [B, T, H]; causal, or `mask` [B, 1, T, T] (True = may attend).

        With a latent cache buffer [B, L, rank + rope] (`LatentCache.latent[i]`), the latents of positions
        0..T-1 are stored in it for later decoding; a paged cache layer (`dsv3.infer.cache.PagedLayer`)
        stores them in its blocks instead.
        """
        B, T, _ = x.shape
        q, c_kv, k_pe = self._project(x)
        if cache is None and torch.is_grad_enabled() and q.requires_grad and kernels.attention_ok(
                q, q[..., : self.v_dim], self.rope, self.interleave):
            # training on CPU: the kernels rotate q and k themselves and read k_pe once for all heads
            kv = self.kv_b_proj(c_kv).view(B, T, self.n_heads, -1)
            o = _CPUAttention.apply(q.transpose(1, 2), kv.transpose(1, 2), k_pe, cos, sin, mask, self.scale, self.nope,
                                    self.interleave)
            return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rotary(q_pe, cos, sin, self.interleave)
        k_pe = apply_rotary(k_pe.unsqueeze(2), cos, sin, self.interleave).squeeze(2)
        if isinstance(cache, torch.Tensor):
            cache[:, :T, : self.rank] = c_kv
            cache[:, :T, self.rank:] = k_pe
        elif cache is not None:
            cache.write(torch.cat((c_kv, k_pe), dim=-1))
        k_nope, v = self.kv_b_proj(c_kv).view(B, T, self.n_heads, -1).split([self.nope, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)  # [B, nh, T, qk]
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(-1, -1, self.n_heads, -1)), dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        o = self._sdpa(q, k, v, mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))

    def _sdpa(self, q, k, v, mask):
        qk = q.shape[-1]
        if self.v_dim < qk:  # equal head dims let SDPA take its fused (flash) kernel: ~2.5x faster on CPU
            v = F.pad(v, (0, qk - self.v_dim))
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return o[..., : self.v_dim]

    def absorbed_weights(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [nh, nope, rank] and W_UV transposed [nh, rank, v], split out of kv_b_proj.

        Without a dtype: differentiable views of the live weight. With one (as `DeepseekV3.new_cache` asks,
        once per cache): detached, and as contiguous copies when the dtype differs from the weight's.
        """
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        w_uk, w_uv_t = w[:, : self.nope], w[:, self.nope:].transpose(1, 2)
        if dtype is None:
            return w_uk, w_uv_t
        if dtype == w.dtype:
            return w_uk.detach(), w_uv_t.detach()
        return w_uk.detach().to(dtype).contiguous(), w_uv_t.detach().to(dtype).contiguous()

    def forward_absorbed(self, x, cos, sin, cache: torch.Tensor, positions: torch.Tensor,
                         mask: torch.Tensor | int, absorbed: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Attend from new tokens x [B, S, H] at `positions` [B, S] over the latent cache [B, max_len, rank + rope].

        The new tokens' latents [norm(c_kv) | k_pe] are written into the cache at their positions first.
        mask [B, S, L] (True = may attend) covers the first L cache slots; an int L instead means every query
        attends to all of the first L slots and every new token sits at position L - 1 (one per sequence).
        Keys and values are never expanded: W_UK is folded into the query, which is scored against the latent
        rows directly, and W_UV is applied after attention. The attention core runs in the cache's dtype;
        `absorbed` = (W_UK, W_UV^T) in that dtype, as absorbed_weights(cache.dtype) makes them.
        `cache` may also be a paged cache layer (`dsv3.infer.cache.PagedLayer`): `cache.update(new)` stores
        the new rows in their blocks and returns the first L positions of each sequence, [B, L, rank + rope].
        """
        B, S, _ = x.shape
        nh, r, rope = self.n_heads, self.rank, self.rope
        q = self.q_proj(x) if self.cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(B, S, nh, -1).split([self.nope, rope], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([r, rope], dim=-1)
        # rotate the query heads and the shared key together: [B, S, nh + 1, rope]
        pe = apply_rotary(torch.cat((q_pe, k_pe[:, :, None]), dim=2), cos, sin, self.interleave)
        new = torch.cat((self.kv_a_layernorm(c_kv), pe[:, :, nh]), dim=-1).to(cache.dtype)  # [B, S, rank + rope]
        if isinstance(mask, int):
            L, mask = mask, None
        else:
            L = mask.shape[-1]
        if not isinstance(cache, torch.Tensor):
            kv = cache.update(new)  # paged: [B, L, rank + rope]
        elif mask is None:
            cache[:, L - 1: L] = new
            kv = cache[:, :L]  # [B, L, rank + rope]
        else:
            cache.index_put_((torch.arange(B, device=x.device)[:, None], positions), new)
            kv = cache[:, :L]
        ct = cache.dtype  # compute dtype of the attention core
        w_uk, w_uv_t = absorbed if absorbed is not None else (w.to(ct) for w in self.absorbed_weights())
        q_lat = torch.bmm(q_nope.reshape(B * S, nh, self.nope).transpose(0, 1).to(ct), w_uk)  # [nh, B*S, rank]
        q_abs = torch.cat((q_lat.transpose(0, 1), pe[:, :, :nh].reshape(B * S, nh, rope).to(ct)), dim=-1)
        scores = torch.bmm(q_abs.view(B, S * nh, r + rope), kv.transpose(1, 2))  # [B, S*nh, L], rows (s, h)
        scores = scores.float() * self.scale
        if mask is not None:
            scores = scores.view(B, S, nh, L).masked_fill(~mask[:, :, None, :], float("-inf")).view(B, S * nh, L)
        o_lat = torch.bmm(scores.softmax(dim=-1).to(ct), kv[..., :r])  # [B, S*nh, rank]
        o = torch.bmm(o_lat.view(B * S, nh, r).transpose(0, 1), w_uv_t)  # [nh, B*S, v]
        return self.o_proj(o.transpose(0, 1).reshape(B, S, nh * self.v_dim).to(x.dtype))
