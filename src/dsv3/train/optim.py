"""AdamW with decoupled decay on matrices only, and the schedules of the DeepSeek-V3 recipe."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """Decay on matrices (embeddings, projections, stacked experts, router); none on norms and biases (1-D).

    Fused AdamW (one kernel per parameter group; also transformers' Trainer default): on the 2-core CPU its
    step takes 0.12 s for the small preset's 106M parameters against 0.43 s for the foreach version, and sharded
    (DTensor) parameters need it to avoid foreach's per-tensor sharding propagation (seconds at the first step).
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


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
