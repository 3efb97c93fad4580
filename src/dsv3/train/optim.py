"""AdamW with decoupled decay on matrices only, and the schedules of the DeepSeek-V3 recipe."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .. import kernels


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                    eps: float = 1e-8, state_dtype: str = "float32") -> torch.optim.Optimizer:
    """Decay on matrices (embeddings, projections, stacked experts, router); none on norms and biases (1-D).

    state_dtype "float32": fused AdamW (one kernel per parameter group; also transformers' Trainer default): on
    the 2-core CPU its step takes 0.12 s for the small preset's 106M parameters against 0.43 s for the foreach
    version, and sharded (DTensor) parameters need it to avoid foreach's per-tensor sharding propagation (seconds
    at the first step). "bfloat16": `BF16MomentsAdamW`, the report's low-precision optimizer state.
    """
    if state_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"optimizer state dtype must be float32 or bfloat16, got {state_dtype!r}")
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if state_dtype == "bfloat16":
        return BF16MomentsAdamW(groups, lr=lr, betas=betas, eps=eps)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


class BF16MomentsAdamW(torch.optim.Optimizer):
    """AdamW that keeps its two moments in bf16 (DeepSeek-V3 report, section 3.3.3: BF16 instead of FP32 for
    AdamW's first and second moments, "without incurring observable performance degradation"): 4 bytes of
    optimizer state per parameter instead of 8. The fp32 master weights stay fp32. Each step reads the moments
    into fp32 and runs torch.optim.AdamW's arithmetic, in its order, then rounds the moments back to bf16.

    On CPU the step is one kernel pass per parameter (`kernels.adamw_bf16_moments_`, 20 bytes of traffic per
    parameter against fused fp32 AdamW's 28). Elsewhere (GPUs, no kernels) it runs in tensor ops, which with
    `moment_dtype=torch.float32` are bit-identical to `torch.optim.AdamW(foreach=False)`. FSDP2's sharded (DTensor)
    parameters are stepped shard by shard: the update is elementwise, and the moments share the parameter's
    sharding."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 moment_dtype: torch.dtype = torch.bfloat16, use_kernel: bool = True):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.moment_dtype = moment_dtype
        self.use_kernel = use_kernel and moment_dtype == torch.bfloat16

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype, memory_format=torch.contiguous_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype,
                                                        memory_format=torch.contiguous_format)
                st["step"] = st["step"] + 1  # a new tensor: a loaded state dict may share the old one
                step = int(st["step"].item())
                param, grad, exp_avg, exp_avg_sq = map(_local, (p, p.grad, st["exp_avg"], st["exp_avg_sq"]))
                if self.use_kernel and kernels.adamw_bf16_moments_ok(param, grad, exp_avg, exp_avg_sq):
                    kernels.adamw_bf16_moments_(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, wd, step)
                    continue
                m = exp_avg.to(torch.float32, copy=True).lerp_(grad, 1 - beta1)
                v = exp_avg_sq.to(torch.float32, copy=True).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                param.mul_(1 - lr * wd)
                denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                param.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
                exp_avg.copy_(m)  # rounds to the moments' dtype
                exp_avg_sq.copy_(v)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for st in self.state.values():  # Optimizer.load_state_dict casts them to the parameters' dtype
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key] = st[key].to(self.moment_dtype)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's own shard (FSDP2's parameters, their gradients and moments share one sharding); else t."""
    return t.to_local() if isinstance(t, DTensor) else t


def lr_at(step: int, max_steps: int, peak: float, warmup: int, decay_start: float, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, constant until `decay_start` x max_steps, then cosine down to
    min_ratio x peak at max_steps. `step` counts from 0 (the LR for the step about to run)."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    start = int(decay_start * max_steps)
    if step < start or max_steps <= start:
        return peak
    t = min(1.0, (step - start) / max(1, max_steps - start))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def mtp_lambda_at(step: int, max_steps: int, early: float, late: float, switch: float) -> float:
    """MTP loss weight: `early` for the first `switch` fraction of training, `late` after (report: 0.3 -> 0.1)."""
    return early if step < switch * max_steps else late


def bias_gamma_at(step: int, max_steps: int, gamma: float, off_at: float) -> float:
    """Bias update speed: `gamma` until `off_at` x max_steps, then 0 (the report freezes it near the end)."""
    return gamma if step < off_at * max_steps else 0.0
