"""Auxiliary-loss-free load balancing: the correction-bias update and the MaxVio statistic."""

from __future__ import annotations

import torch

from ..model.moe import Router


def routers(model: torch.nn.Module) -> list[Router]:
    """All routers in forward order (main layers first, then MTP layers)."""
    return [m for m in model.modules() if isinstance(m, Router)]


@torch.no_grad()
def update_biases(model: torch.nn.Module, loads: list[torch.Tensor], gamma: float) -> None:
    """b_i += gamma * sign(mean(c) - c_i) per router, from that step's whole-batch load c (tokens per expert).

    Overloaded experts get less likely to be chosen, underloaded ones more; the weights of chosen experts
    never see the bias. `loads` follows `routers(model)` order (main layers, then MTP layers).
    """
    rs = routers(model)
    if len(loads) > len(rs):
        raise ValueError(f"got loads for {len(loads)} routers, the model has {len(rs)}")
    # Fewer loads than routers: the MTP layers (last in order) did not run this step; their biases stay.
    if gamma == 0:
        return
    for r, c in zip(rs, loads):
        c = c.to(r.e_score_correction_bias)
        r.e_score_correction_bias += gamma * torch.sign(c.mean() - c)


def max_vio(load: torch.Tensor) -> float:
    """MaxVio = (max_i c_i - mean c) / mean c (DeepSeek-V3 report, Section 4.5.2)."""
    mean = load.float().mean()
    return float((load.float().max() - mean) / mean) if mean > 0 else 0.0
