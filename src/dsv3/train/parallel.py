"""Multi-process training on torch.distributed: process group, device mesh, FSDP2 and expert parallelism.

Launched by torchrun (`torchrun --nproc_per_node N -m dsv3 train ...`, or `dsv3 train --nproc N`), every
process runs the same trainer on its slice of each global batch. The W processes form a 2-D mesh
("dp", "ep") of shape (W / ep, ep), laid out as in torchtitan:

  - attention, dense MLPs, shared experts, routers, norms, embedding and heads: FSDP2 (`fully_shard`) over all
    W ranks, one group per decoder block plus the root (parameters, gradients and AdamW state sharded W ways);
  - routed experts: partitioned over "ep" (each rank owns n_routed_experts / ep of them; tokens travel to
    their experts and back by all-to-all), and FSDP-sharded over "dp" (the W / ep ranks owning the same slice).

"ep" is the inner dimension: an ep group is ep neighbouring ranks, so with ep = GPUs per node the all-to-all
stays inside a node. Every rank reads different data, so expert parallelism costs no data parallelism.
Gradients are SUMMED over ranks (not averaged): the trainer gives each rank its share of the global-batch
loss, so the sum is the gradient of the global loss whatever the process count or mesh. Expert weights are
DTensors on the mesh, so `torch.distributed.checkpoint` can reshard them to any other mesh (dsv3.checkpoint.dcp).
Nothing here changes the model's code: the wrappers are applied from outside (`parallelize`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ..model.moe import Experts, MoE, expert_ffn
from ..model.transformer import DeepseekV3, MTPLayer

DEFAULT_TIMEOUT_S = 900  # a collective waiting longer than this ends the job (a peer hangs, not dies)


class ParallelError(ValueError):
    """A distributed set-up that cannot work (the message says what to change)."""


@dataclass
class Parallel:
    """This process's place in the job. `mesh` is ("dp", "ep"); `flat` is the same ranks as one dimension."""

    rank: int
    world_size: int
    ep: int
    device: torch.device
    mesh: DeviceMesh
    flat: DeviceMesh

    @property
    def dp(self) -> int:
        return self.world_size // self.ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place sum (or `op`) over all ranks; returns `t`."""
        dist.all_reduce(t, op=op)
        return t

    def agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any (decisions that must not diverge, e.g. out of time)."""
        return bool(self.all_reduce(torch.tensor([float(flag)], device=self.device), dist.ReduceOp.MAX).item())

    def barrier(self) -> None:
        dist.barrier()


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_parallel(ep: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S) -> Parallel | None:
    """Join the job torchrun started (gloo on CPU, NCCL when CUDA is available); None in a lone process."""
    world = world_size_from_env()
    if ep < 1:
        raise ParallelError(f"--ep must be >= 1, got {ep}")
    if world == 1:
        if ep > 1:
            raise ParallelError(f"--ep {ep} needs at least {ep} processes: add --nproc {ep} (or launch with "
                                f"torchrun --nproc_per_node {ep})")
        return None
    if world % ep:
        raise ParallelError(f"--ep {ep} must divide the number of processes ({world})")
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=device if cuda else None)
    mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    flat = mesh._flatten("dp_ep")  # the same ranks as one dimension, for FSDP over everything but experts
    return Parallel(rank=dist.get_rank(), world_size=world, ep=ep, device=device, mesh=mesh, flat=flat)


# ---- expert parallelism ------------------------------------------------------------------------------
class ExpertParallelExperts(nn.Module):
    """One MoE layer's routed experts split over the "ep" ranks; called like `Experts`.

    Holds `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] as DTensors sharded on dim 0 over "ep" (this rank
    owns experts ep_rank * E/ep ... + E/ep - 1), so state-dict names and global shapes match the plain model.
    Forward: sort the (token, expert) slots by expert, which also sorts them by owning rank; exchange per-expert
    counts; send the rows with `all_to_all_single`; run the local experts as one grouped GEMM; send the results
    back the same way and add them to their tokens with the router weights. Autograd flows through both
    all-to-alls, so each expert's gradient holds the contributions of every rank's tokens.
    """

    def __init__(self, experts: Experts, ep_mesh: DeviceMesh):
        super().__init__()
        ep = ep_mesh.size()
        if experts.n % ep:
            raise ParallelError(f"--ep {ep} must divide the number of routed experts ({experts.n})")
        self.n, self.ep, self.n_local = experts.n, ep, experts.n // ep
        self.group = ep_mesh.get_group()
        # src_data_rank=None: every rank already holds the same full tensor, so each keeps its slice, no traffic
        self.gate_up_proj = nn.Parameter(distribute_tensor(experts.gate_up_proj.detach(), ep_mesh, [Shard(0)],
                                                           src_data_rank=None))
        self.down_proj = nn.Parameter(distribute_tensor(experts.down_proj.detach(), ep_mesh, [Shard(0)],
                                                        src_data_rank=None))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [N, H]; weights, idx [N, k] (global expert ids) -> sum_k weights * expert_idx(x), [N, H]."""
        N, k = idx.shape
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)  # slots sorted by expert, hence by owning rank
        token = order // k
        counts = torch.bincount(flat, minlength=self.n)  # [E] slots this rank sends to each expert
        # recv[s, j]: slots rank s sends to my local expert j
        recv = all_to_all_single(counts, None, None, self.group).view(self.ep, self.n_local)
        send_splits = counts.view(self.ep, self.n_local).sum(1).tolist()
        recv_splits = recv.sum(1).tolist()
        xs = x.index_select(0, token)  # (backward: index_add, much faster than x[token]'s index_put)
        if torch.is_autocast_enabled(x.device.type):  # send in the compute dtype: half the bytes under bf16
            xs = xs.to(torch.get_autocast_dtype(x.device.type))
        xs = all_to_all_single_autograd(xs, recv_splits, send_splits, self.group)  # [M, H] by (source, expert)
        gate_up, down = self.gate_up_proj.to_local(), self.down_proj.to_local()
        if xs.shape[0]:
            # regroup the received rows by local expert for one grouped GEMM, then restore (source, expert) order
            local = torch.arange(self.n_local, device=x.device).repeat(self.ep).repeat_interleave(recv.reshape(-1))
            by_expert = local.argsort(stable=True)
            y = expert_ffn(xs[by_expert], recv.sum(0), gate_up, down)[by_expert.argsort()]
        else:
            # No rows for this rank's experts. Autograd must still reach the experts (FSDP reduces their
            # gradients together with the other ranks) and `xs` (its backward is an all-to-all the others wait
            # in): one dummy row through expert 0, dropped, plus the empty xs.
            one = torch.zeros(self.n_local, dtype=recv.dtype, device=x.device)
            one[0] = 1
            y = expert_ffn(xs.new_zeros(1, xs.shape[1]), one, gate_up, down)[:0] + xs
        out = all_to_all_single_autograd(y, send_splits, recv_splits, self.group)  # [N*k, H] in `order`
        out = out * weights.reshape(-1)[order, None].to(out.dtype)
        return torch.zeros(N, x.shape[1], dtype=out.dtype, device=x.device).index_add_(0, token, out)


# ---- FSDP2 -------------------------------------------------------------------------------------------
def _shard(modules, mesh: DeviceMesh, **kw) -> None:
    fully_shard(modules, mesh=mesh, **kw)
    state = modules[0] if isinstance(modules, list) else modules
    # Sum, not average: each rank's loss already is its share of the global loss (see the module docstring).
    # Sum-only collectives also work on gloo, which has no AVG / PREMUL_SUM.
    state.set_gradient_divide_factor(1.0)
    state.set_force_sum_reduction_for_comms(True)


def _block_modules(layer, experts_apart: bool) -> list[nn.Module]:
    """The modules of one decoder block (or MTP module) whose forwards are called with tensors only.

    FSDP's pre-forward hook rebuilds the argument containers it is given, so the block itself (called with the
    routing-statistics list it appends to) cannot carry the hook; its parts, sharded as one group, can.
    """
    mods = [layer.input_layernorm, layer.self_attn, layer.post_attention_layernorm]
    if isinstance(layer.mlp, MoE):
        mods += [layer.mlp.gate] + ([layer.mlp.shared_experts] if layer.mlp.shared_experts is not None else [])
        mods += [] if experts_apart else [layer.mlp.experts]
    else:
        mods.append(layer.mlp)
    if isinstance(layer, MTPLayer):  # called around the block: combine() before it, shared_head.norm after it
        mods += [layer.enorm, layer.hnorm, layer.eh_proj, layer.shared_head.norm]
    return mods


def parallelize(model: DeepseekV3, par: Parallel) -> DeepseekV3:
    """Apply expert parallelism (ep > 1) and FSDP2 to `model` in place (every rank holds the same full
    weights on entry); returns it. The model keeps its API: `model(ids)` and `model.forward_train(ids)`."""
    cfg = model.config
    model.to(par.device)
    if par.ep > 1:
        if not cfg.n_routed_experts:
            raise ParallelError(f"--ep {par.ep} needs a model with routed experts; this config has none")
        for layer in model.model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.experts = ExpertParallelExperts(layer.mlp.experts, par.mesh["ep"])
    for layer in model.model.layers:
        experts_apart = par.ep > 1 and isinstance(layer.mlp, MoE)
        if experts_apart:
            # dim 1 (2I or H), not dim 0: a rank may own fewer experts than there are "dp" ranks
            _shard(layer.mlp.experts, par.mesh["dp"], shard_placement_fn=lambda p: Shard(1))
        _shard(_block_modules(layer, experts_apart), par.flat)
        left = [n for n, p in layer.named_parameters() if not isinstance(p, DTensor)]
        if left:  # would silently fall into the root group, unsharded for the whole step
            raise RuntimeError(f"parallelize: parameters of {type(layer).__name__} left unsharded: {left}")
    _shard(model, par.flat)  # the root: embedding, final norm, output head
    register_fsdp_forward_method(model, "forward_train")  # training calls forward_train, not __call__
    return model


# ---- gradient clipping -------------------------------------------------------------------------------
@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, par: Parallel) -> float:
    """torch.nn.utils.clip_grad_norm_ for sharded gradients: every rank holds a disjoint piece of every
    gradient (FSDP shards, expert slices), so the global norm is sqrt(all-reduce of local sums of squares).
    Returns the norm before clipping (the same on every rank)."""
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    sq = torch.zeros((), dtype=torch.float32, device=par.device)
    for g in local:
        if g.numel():
            sq += g.detach().float().pow(2).sum()
    total = math.sqrt(float(par.all_reduce(sq)))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        torch._foreach_mul_([g for g in local if g.numel()], coef)
    return total
