"""RMSNorm, linear layers, SwiGLU MLP and the (YaRN) rotary embedding."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import ModelConfig


class RMSNorm(nn.Module):
    """feeds_matmuls: every consumer of the output is a linear layer (or the experts), so under CPU bf16 autocast
    the fused training kernel may write it in bf16: the values autocast would cast it to anyway, one write of half
    the size instead of an fp32 output cast again by each consumer (and their gradients cast back and summed in
    fp32). The forward's numbers are unchanged; the consumers' input gradients are summed in bf16."""

    def __init__(self, dim: int, eps: float = 1e-6, feeds_matmuls: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.feeds_matmuls = feeds_matmuls

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """RMSNorm(x); with `residual`, (x + residual, RMSNorm(x + residual)): the residual stream's add and the
        norm after it, one pass in CPU training."""
        if torch.is_grad_enabled() and self.weight.requires_grad and kernels.rms_norm_ok(x, self.weight):
            bf16 = (self.feeds_matmuls and torch.is_autocast_enabled("cpu")
                    and torch.get_autocast_dtype("cpu") == torch.bfloat16)
            if residual is None:
                return _FusedRMSNorm.apply(x, self.weight, self.eps, bf16)  # CPU training: the same numbers, one pass
            if x.dtype == torch.float32 and residual.dtype in (torch.float32, torch.bfloat16):
                return _FusedAddRMSNorm.apply(x, residual, self.weight, self.eps, bf16)
        if residual is not None:
            x = x + residual
            return x, self(x)
        # Normalise in fp32 (ATen's rms_norm upcasts: x * rsqrt(mean(x^2) + eps)), cast back to x's dtype,
        # then scale: the order transformers and the official code use.
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


class _FusedRMSNorm(torch.autograd.Function):
    """RMSNorm.forward's formula through dsv3's CPU kernel (kernels/cpu_rmsnorm.cpp): fp32 or bf16 x, fp32 weight,
    fp32 result, as the mul of the fp32 weight with the normalised x promotes it (rounded to bf16 when `bf16`)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, bf16: bool):
        rows = x.reshape(-1, x.shape[-1])
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        y, rstd = kernels.rms_norm_forward(rows, weight, eps, bf16)
        ctx.save_for_backward(rows, weight, rstd)
        ctx.shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        rows, weight, rstd = ctx.saved_tensors
        # dy arrives in the output's dtype, fp32 or bf16: the kernel reads both
        dx, dw = kernels.rms_norm_backward(dy.reshape(rows.shape).contiguous(), rows, weight, rstd)
        return dx.view(ctx.shape), dw, None, None


class _FusedAddRMSNorm(torch.autograd.Function):
    """(h + r, RMSNorm(h + r)) through the kernel for fp32 h (the residual stream) and fp32 or bf16 r (a block's
    output): the same numbers as the add and _FusedRMSNorm, and the backward adds the sum's own gradient (the
    residual path) to the norm's in the same pass, as autograd would add them."""

    @staticmethod
    def forward(ctx, h, r, weight, eps: float, bf16: bool):
        D = h.shape[-1]
        s, y, rstd = kernels.add_rms_norm_forward(h.reshape(-1, D).contiguous(), r.reshape(-1, D).contiguous(), weight,
                                                  eps, bf16)
        ctx.save_for_backward(s, weight, rstd)
        ctx.set_materialize_grads(False)  # the sum's gradient is None where only the norm is used (the last one)
        ctx.r_bf16 = r.dtype == torch.bfloat16
        return s.view(h.shape), y.view(h.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, ds, dy):
        s, weight, rstd = ctx.saved_tensors
        if dy is None:
            return ds, ds, None, None, None
        dres = None if ds is None else ds.reshape(s.shape).contiguous()
        # a bf16 r (a block's output) takes the same gradient rounded, written in the same pass
        dx, dw, *dr = kernels.rms_norm_backward(dy.reshape(s.shape).contiguous(), s, weight, rstd, dres, ctx.r_bf16)
        shape = ds.shape if ds is not None else dy.shape
        return dx.view(shape), (dr[0] if dr else dx).view(shape), dw, None, None


@contextmanager
def native_cpu_gemv(active: bool = True):
    """While active, bf16/fp16 matmuls on CPU use ATen's own kernels rather than oneDNN.

    For single-token decoding every matmul is a matrix-vector product. oneDNN's bf16 path costs ~25-40 us per
    call before any arithmetic (measured on a 2-core Sapphire Rapids VM, torch 2.13), more than the product
    itself for the small matrices of a decode step; ATen's GEMV kernel has no such fixed cost. Measured on
    the `small` preset's decode-step matrices with 2 threads: 5.7 ms native vs 8.8 ms oneDNN in total; only
    the 8192x512 output head was faster on oneDNN (0.65 vs 0.80 ms), so `forward_cached` keeps it outside.
    This flips the process-wide `torch.backends.mkldnn.enabled` switch for the duration (other threads
    running matmuls meanwhile would see it too); the results are the same products, accumulated in fp32.
    """
    if not active or not torch.backends.mkldnn.enabled:
        yield
        return
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = True


class Linear(nn.Linear):
    """nn.Linear whose products with at most 4 rows (decoding) run dsv3's CPU kernel in bf16.

    ATen's bf16 matrix-vector product reads the weights at ~12 GB/s per core on the dev VM even from cache and
    oneDNN pays ~25-40 us per call; the kernel runs the `small` preset's decode matrices 2-2.5x faster than
    either (README, "CPU kernels"). Anything else is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= 4 * self.in_features and kernels.gemv_ok(x, self.weight):
            y = kernels.gemv(x.reshape(-1, self.in_features), self.weight).view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; in bf16 autocast training on CPU (fp32 weight with a gradient) through `_TrainLinear`."""
    if trains_with_kernels(x, weight):
        return _TrainLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def fused_linear(x: torch.Tensor, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
    """(layer(x) for each layer), in CPU bf16 training as one product over the concatenated weights, split: one
    input-gradient and one weight-gradient product instead of one per layer, and the layers' input gradients are
    never summed in a separate pass (MLA's q_a and kv_a, which read the same normed x)."""
    if not all(trains_with_kernels(x, layer.weight) for layer in layers):
        return tuple(layer(x) for layer in layers)
    biases = [layer.bias for layer in layers]
    bias = None if biases[0] is None else torch.cat(biases)
    y = _TrainLinear.apply(x, torch.cat([layer.weight for layer in layers]), bias)
    return y.split([layer.out_features for layer in layers], dim=-1)


def trains_with_kernels(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Training under CPU bf16 autocast (an fp32 weight with a gradient, an fp32 or bf16 input) at shapes the
    weight-gradient kernel takes: the linear layers' training path (`_TrainLinear` and the fused functions)."""
    return (weight.requires_grad and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and weight.dtype == torch.float32
            and x.dtype in (torch.float32, torch.bfloat16) and kernels.linear_weight_grad_ok(x, weight))


class _TrainLinear(torch.autograd.Function):
    """F.linear under bf16 autocast (x and the fp32 weight cast to bf16, products summed in fp32) whose weight
    gradient dY^T X comes from `kernels.linear_weight_grad` in fp32: ATen's transposed-A matmul for it ran at
    about half the speed of the layer's other products, and rounded dW to bf16 before its cast back to fp32."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        xb, wb = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        if xb.stride(-1) != 1:  # the kernel reads rows
            xb = xb.contiguous()
        ctx.save_for_backward(xb, wb)
        ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
        return F.linear(xb, wb, None if bias is None else bias.to(torch.bfloat16))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        xb, wb = ctx.saved_tensors
        rows = dy.reshape(-1, dy.shape[-1])
        if rows.stride(-1) != 1 or rows.dtype != torch.bfloat16:
            rows = rows.to(torch.bfloat16).contiguous()
        dx = (rows @ wb).view(xb.shape).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dw = kernels.linear_weight_grad(rows, xb.reshape(-1, xb.shape[-1])) if ctx.needs_input_grad[1] else None
        db = rows.float().sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used for dense layers and the shared experts."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, bias=False)
        self.up_proj = Linear(hidden, inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)

    def trains_fused(self, x: torch.Tensor) -> bool:
        """Whether training on x runs as `_TrainMLP` (CPU bf16 autocast, kernel-sized weights)."""
        gate = self.gate_proj.weight  # its shape is down's, transposed
        return trains_with_kernels(x, gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.trains_fused(x):
            return _TrainMLP.apply(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _TrainMLP(torch.autograd.Function):
    """MLP.forward under CPU bf16 autocast training with the gate and up projections as one product [T, 2I], SwiGLU
    in one pass each way (`kernels.swiglu_forward` / `swiglu_backward`, autocast's roundings) and the weight
    gradients from `kernels.linear_weight_grad` (as `_TrainLinear`): autograd's path ran five elementwise passes
    and summed the two input gradients of gate and up."""

    @staticmethod
    def forward(ctx, x, gate, up, down):
        xb = x.to(torch.bfloat16)
        if xb.stride(-1) != 1:  # the kernel reads rows
            xb = xb.contiguous()
        y, saved = train_mlp_forward(xb, gate, up, down)
        ctx.save_for_backward(*saved)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        dx, dgate, dup, ddown = train_mlp_backward(dy, ctx.saved_tensors, any(ctx.needs_input_grad[1:3]),
                                                   ctx.needs_input_grad[3])
        return dx.view(dy.shape[:-1] + dx.shape[-1:]).to(ctx.x_dtype), dgate, dup, ddown


def train_mlp_forward(xb, gate, up, down):
    """_TrainMLP's forward of bf16 x (rows contiguous): (the output, bf16; what `train_mlp_backward` takes)."""
    gate_up, downb = torch.cat([gate.to(torch.bfloat16), up.to(torch.bfloat16)]), down.to(torch.bfloat16)
    gu = F.linear(xb, gate_up)
    a = kernels.swiglu_forward(gu.view(-1, gu.shape[-1])).view(*gu.shape[:-1], -1)
    return F.linear(a, downb), (xb, gate_up, downb, gu, a)


def train_mlp_backward(dy, saved, gate_up_grads: bool = True, down_grad: bool = True):
    """_TrainMLP's backward from dy (the output's gradient, any float dtype, rounded to bf16 first): (dx [T, H] bf16,
    its gate's, up's and down's fp32 weight gradients, or None where not asked for)."""
    xb, gate_up, downb, gu, a = saved
    dy = dy.reshape(-1, dy.shape[-1]).to(torch.bfloat16).contiguous()
    x2 = xb.reshape(-1, xb.shape[-1])
    dgu = kernels.swiglu_backward(dy @ downb, gu.view(-1, gu.shape[-1]))
    dx = dgu @ gate_up
    dgate, dup = kernels.linear_weight_grad(dgu, x2).chunk(2) if gate_up_grads else (None, None)
    ddown = kernels.linear_weight_grad(dy, a.view(-1, a.shape[-1])) if down_grad else None
    return dx, dgate, dup, ddown


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for the rope dims (YaRN-corrected when configured) and the cos/sin scale."""
    rope = cfg.rope
    dim, base = cfg.qk_rope_head_dim, float(rope["rope_theta"])
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if rope["rope_type"] != "yarn":
        return freqs, 1.0
    factor = float(rope["factor"])
    orig = rope["original_max_position_embeddings"]
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    freqs = freqs / factor * ramp + freqs * (1 - ramp)  # interpolate low frequencies, keep high ones
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        from ..config import yarn_mscale

        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention_factor = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)
    return freqs, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Gives cos/sin per (position, rotary pair); `apply_rotary` rotates the pairs."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", torch.empty(cfg.qk_rope_head_dim // 2), persistent=False)
        self.scale = 1.0
        self.reset_parameters()

    def reset_parameters(self):
        if self.inv_freq.is_meta:
            return
        freqs, self.scale = rope_inv_freq(self.cfg)
        with torch.no_grad():
            self.inv_freq.copy_(freqs)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[..., None] * self.inv_freq  # [..., T, rope/2]
        if self.scale == 1.0:
            return angles.cos(), angles.sin()
        return angles.cos() * self.scale, angles.sin() * self.scale


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [B, T, H, d] by per-token angles cos/sin [B or 1, T, d/2] (in fp32, result in x's dtype).

    interleave=True rotates adjacent pairs (x0, x1), (x2, x3), ... (the official DeepSeek layout) and keeps
    that layout; interleave=False rotates (x_i, x_{i+d/2}) (the rotate-half layout).
    """
    dtype = x.dtype
    if interleave and not torch.compiler.is_compiling():
        # eager: (x0 + i x1) * (cos + i sin) per pair, the same products and sums as below in fewer kernels
        # (one-token decode step, 2 cores: ~40 vs ~80 us per call); Inductor has no complex kernels, so a
        # compiled graph takes the real form below, which it fuses into one kernel (equal up to rounding)
        xc = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))
        return torch.view_as_real(xc * torch.complex(cos, sin)[:, :, None, :]).flatten(-2).to(dtype)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if interleave:
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2).to(dtype)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(dtype)
