"""DeepSeekMoE: router (sigmoid or softmax scores, group-limited top-k, correction bias), routed experts as
grouped GEMMs over tokens sorted by expert, shared experts, and the load statistics training needs."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import ModelConfig
from .layers import MLP, linear, train_mlp_backward, train_mlp_forward


@dataclass
class RoutingStats:
    """One MoE layer's routing in one forward: expert load (tokens per expert) and the balance-loss term."""

    load: torch.Tensor  # [E] tokens routed to each expert (no grad)
    balance: torch.Tensor  # scalar sum_i f_i P_i, averaged over sequences (differentiable)


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E = cfg.n_routed_experts
        self.cfg = cfg
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group or 1
        self.topk_group = cfg.topk_group or self.n_group
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size))
        # Auxiliary-loss-free balancing: added to the scores for the choice only; a buffer, never optimised.
        # V2-style (softmax) routers have none.
        bias = torch.zeros(E, dtype=torch.float32) if self.uses_bias(cfg) else None
        self.register_buffer("e_score_correction_bias", bias)

    @staticmethod
    def uses_bias(cfg: ModelConfig) -> bool:
        return cfg.scoring_func == "sigmoid" or cfg.topk_method == "noaux_tc"

    def forward(self, x: torch.Tensor):
        """x [N, H] -> weights [N, k] (fp32), expert indices [N, k], scores [N, E] (fp32)."""
        # in fp32, unless autocast runs the product in its own dtype anyway (then x may arrive in it: no round trip)
        logits = linear(x if torch.is_autocast_enabled(x.device.type) else x.float(), self.weight.float())
        sigmoid = self.cfg.scoring_func == "sigmoid"
        scores = logits.sigmoid() if sigmoid else logits.softmax(dim=-1)
        bias = self.e_score_correction_bias
        choice = scores if bias is None else scores + bias
        if kernels.route_topk_ok(choice, self.top_k, self.n_group):  # one pass over each token's scores
            idx = kernels.route_topk(choice, self.top_k, self.n_group, self.topk_group, sigmoid)
        else:
            idx = self._choose(choice, sigmoid)
        weights = scores.gather(1, idx)  # the unbiased scores of the chosen experts
        if self.cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.cfg.routed_scaling_factor, idx, scores

    def _choose(self, choice: torch.Tensor, sigmoid: bool) -> torch.Tensor:
        """route_topk's choice in ATen ops (any device, torch.compile)."""
        if self.n_group > 1 and self.topk_group < self.n_group:
            N, E = choice.shape
            grouped = choice.view(N, self.n_group, E // self.n_group)
            group_scores = grouped.topk(2, dim=-1)[0].sum(-1) if sigmoid else grouped.amax(-1)  # [N, G]
            drop = torch.ones_like(group_scores, dtype=torch.bool)
            drop.scatter_(1, group_scores.topk(self.topk_group, dim=-1, sorted=False)[1], False)
            choice = grouped.masked_fill(drop[..., None], float("-inf")).view(N, E)  # experts of kept groups only
        return choice.topk(self.top_k, dim=-1, sorted=False)[1]


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    return hasattr(torch, "_grouped_mm") and (x.device.type == "cpu" or x.dtype == torch.bfloat16)


def _few_rows(rows: int, x: torch.Tensor, gate_up: torch.Tensor) -> bool:
    """Whether `rows` (token, expert) rows of x go to kernels.grouped_gemv: bf16 on CPU with at most 4 rows per
    expert on average (decode batches); more rows are compute, not bandwidth, and oneDNN's grouped GEMM wins."""
    return rows <= 4 * gate_up.shape[0] and kernels.gemv_ok(x, gate_up)


def _cpu_bf16_training(x: torch.Tensor, gate_up: torch.Tensor) -> bool:
    """CPU training under bf16 autocast with fp32 master weights: the experts go through _CPUExpertsBF16."""
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.is_grad_enabled()
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and gate_up.dtype == torch.float32)


def expert_ffn(xs: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SwiGLU of rows sorted by expert: xs [M, H], counts [E] rows per expert (sum M), gate_up [E, 2I, H],
    down [E, H, I] -> [M, H]. One grouped GEMM per projection; shared with the expert-parallel wrapper."""
    if torch.is_autocast_enabled(xs.device.type) and xs.device.type != "cpu":
        dt = torch.get_autocast_dtype(xs.device.type)
        xs, gate_up, down = xs.to(dt), gate_up.to(dt), down.to(dt)
    elif _cpu_bf16_training(xs, gate_up):
        if kernels.experts_ok(xs, gate_up, down):
            return _CPUExpertsKernel.apply(xs, None, None, 1, counts.tolist(), gate_up, down)
        return _CPUExpertsBF16.apply(xs, None, 1, counts.tolist(), gate_up, down)
    else:
        xs = xs.to(gate_up.dtype)  # no autocast, or CPU autocast without gradients: the weights' dtype
    if _few_rows(xs.shape[0], xs, gate_up):  # decoding: each chosen expert's weights streamed once by the CPU kernel
        offs = counts.cumsum(0)
        g, u = kernels.grouped_gemv(xs, gate_up, offs).chunk(2, dim=-1)
        return kernels.grouped_gemv(F.silu(g) * u, down, offs)
    if _grouped_mm_ok(xs):
        offs = counts.cumsum(0).to(torch.int32)
        h = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)
        g, u = h.chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(g) * u, down.transpose(1, 2), offs=offs)
    out = torch.empty_like(xs)  # fallback: one matmul per expert that received tokens
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            g, u = F.linear(xs[start:start + c], gate_up[e]).chunk(2, dim=-1)
            out[start:start + c] = F.linear(F.silu(g) * u, down[e])
        start += c
    return out


class _CPUExpertsBF16(torch.autograd.Function):
    """The experts under CPU bf16 autocast with fp32 master weights, as autocast treats a linear layer (bf16
    operands, fp32 accumulation, bf16 results, fp32 weight gradients): one oneDNN bf16 GEMM per expert and
    projection. ATen's CPU grouped GEMM is no faster in bf16 than in fp32. Each expert's rows are padded with
    zero rows to a multiple of 64: oneDNN builds (JIT-compiles) a primitive per new matrix shape, ~5 ms each, and
    rows per expert change every step; with the padding a few shapes recur and stay cached (a 600-row GEMM: 6 ms
    at a new size, 0.8 ms cached). Small preset, 4 x 256, 2 cores: +8-10% tokens/s for the whole training step
    against fp32 grouped GEMMs (in-process A/B), though padding adds ~25% rows.

    Rows move between layouts once each way: x [R, H] is gathered straight into the padded per-expert layout
    and the results straight out of it. With `order` (the (token, choice) slots sorted by expert, k choices per
    token) x holds the tokens and the output the slots in token order, and the backward sums each token's k
    slot gradients in fp32; without, x holds rows already sorted by expert (expert parallelism) and the output
    keeps that order."""

    PAD = 64

    @staticmethod
    def forward(ctx, x, order, k: int, counts: list[int], gate_up, down):
        bf16, pad, R = torch.bfloat16, _CPUExpertsBF16.PAD, x.shape[0]
        M = sum(counts)
        padded = [-(-c // pad) * pad for c in counts]
        starts, firsts = list(accumulate(padded, initial=0)), accumulate(counts, initial=0)
        # sorted row i (expert e's rows start at firsts[e]) sits at padded row dest[i]
        shift = torch.tensor([st - first for st, first in zip(starts, firsts)][:-1])
        dest = torch.arange(M) + torch.repeat_interleave(shift, torch.tensor(counts), output_size=M)
        if order is None:
            rows, source = dest, torch.arange(M)  # output row i: padded row dest[i]; it reads x[i]
        else:
            rows, source = torch.empty_like(dest).scatter_(0, order, dest), order // k  # slot s: padded row rows[s]
        src = torch.full((starts[-1],), R).index_copy_(0, dest, source)  # padded row -> row of x (R: zeros)
        xp = torch.cat([x.to(bf16), x.new_zeros(1, x.shape[1], dtype=bf16)]).index_select(0, src)
        gub, dnb = gate_up.to(bf16), down.to(bf16)
        segs = [(e, slice(st, st + p)) for e, (st, p) in enumerate(zip(starts, padded)) if p]
        h = xp.new_empty(xp.shape[0], gate_up.shape[1])
        for e, r in segs:
            torch.mm(xp[r], gub[e].t(), out=h[r])
        g, u = h.chunk(2, dim=-1)
        a = F.silu(g) * u  # zero on the padding rows
        y = xp.new_empty(xp.shape[0], down.shape[1])
        for e, r in segs:
            torch.mm(a[r], dnb[e].t(), out=y[r])
        ctx.save_for_backward(xp, gub, dnb, h, a, rows)
        ctx.segs, ctx.x_dtype, ctx.k = segs, x.dtype, k
        ctx.idle = [e for e, c in enumerate(counts) if not c]  # experts without rows: zero weight gradients
        return y.index_select(0, rows)

    @staticmethod
    def backward(ctx, dy):
        xp, gub, dnb, h, a, rows = ctx.saved_tensors
        dyp = xp.new_zeros(xp.shape[0], dy.shape[1]).index_copy_(0, rows, dy.to(torch.bfloat16))
        # weight gradients: written whole for experts with rows, zeroed only for the others (zero-filling the
        # stacked fp32 gradients cost ~10% of a step)
        da, ddown = torch.empty_like(a), torch.empty(dnb.shape, dtype=torch.float32)
        for e in ctx.idle:
            ddown[e].zero_()
        for e, r in ctx.segs:  # padding rows of dyp are zero: no weight gradient from them
            torch.mm(dyp[r], dnb[e], out=da[r])
            ddown[e] = dyp[r].t() @ a[r]
        g, u = h.chunk(2, dim=-1)
        dh = torch.cat([torch.ops.aten.silu_backward(da * u, g), da * F.silu(g)], dim=-1)
        dxp, dgate_up = torch.empty_like(xp), torch.empty(gub.shape, dtype=torch.float32)
        for e in ctx.idle:
            dgate_up[e].zero_()
        for e, r in ctx.segs:
            torch.mm(dh[r], gub[e], out=dxp[r])
            dgate_up[e] = dh[r].t() @ xp[r]
        dx = dxp.index_select(0, rows)
        if ctx.k > 1:  # each token's k slots, summed in fp32 (added in place: ~30% faster than sum(dtype=fp32))
            slots = dx.view(-1, ctx.k, dx.shape[1])
            dx = slots[:, 0].float()
            for j in range(1, ctx.k):
                dx += slots[:, j]
        return dx.to(ctx.x_dtype), None, None, None, dgate_up, ddown


class _CPUExpertsKernel(torch.autograd.Function):
    """_CPUExpertsBF16's products and rounding in two calls of the CPU kernel (kernels/cpu_experts.cpp): per expert,
    weights cast and packed once, rows gathered straight from the tokens, every product a brgemm micro-kernel, SwiGLU
    and its gradient fused. With router weights (routed tokens) it returns the weighted sum over each token's k
    experts in fp32, and its backward the router weights' gradient and each token's k slot gradients summed in
    fp32: the [tokens, k, hidden] multiply, sum and their gradients never run as separate passes. With the shared
    experts' weights (gate, up, down: an MLP over the same tokens, run as `_TrainMLP` runs it) their bf16 output is
    added to that sum in the same pass, and their input gradient to the k slots' sum: no separate add, cast of the
    sum's gradient, or sum of the two input gradients."""

    @staticmethod
    def forward(ctx, x, weights, order, k: int, counts: list[int], gate_up, down, s_gate=None, s_up=None, s_down=None):
        x = x.contiguous()
        xb = x.to(torch.bfloat16)  # the backward gathers x's rows again (CPU training's norm hands x over in bf16)
        shared, saved_shared = (None, ()) if s_gate is None else train_mlp_forward(xb, s_gate, s_up, s_down)
        y, h, out = kernels.experts_forward(x, order, k, counts, gate_up, down, weights, shared)
        ctx.save_for_backward(order, xb, h, gate_up, down, weights, *saved_shared)
        ctx.k, ctx.counts, ctx.x_dtype = k, counts, x.dtype
        return out if weights is not None else y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        order, x, h, gate_up, down, weights, *saved_shared = ctx.saved_tensors
        # the kernel rounds each row of dy to bf16 as it gathers it, once per slot: rounded once here instead, the
        # k gathers per token read half the bytes (and the shared experts take the same copy)
        dy = dy.to(torch.bfloat16).contiguous()
        dx_shared, *dshared = train_mlp_backward(dy, saved_shared) if saved_shared else (None, None, None, None)
        dx, dgate_up, ddown, dweights = kernels.experts_backward(dy, order, ctx.k, ctx.counts, x, h,
                                                                 gate_up, down, weights, ctx.x_dtype == torch.bfloat16,
                                                                 dx_shared)
        dweights = dweights if weights is not None else None
        return (dx.to(ctx.x_dtype), dweights, None, None, None, dgate_up, ddown, *dshared)


class Experts(nn.Module):
    """E SwiGLU experts stored stacked ([E, out, in], nn.Linear orientation) for grouped GEMMs.

    Checkpoints hold them per expert (`experts.{e}.gate_proj.weight`, ...); dsv3.checkpoint maps the names.
    """

    def __init__(self, n: int, hidden: int, inter: int):
        super().__init__()
        self.n = n
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inter))

    def folds(self, x: torch.Tensor, shared: MLP | None) -> bool:
        """Whether forward(x, ..., shared) adds the shared experts itself (CPU bf16 training through the kernel)."""
        return (shared is not None and not torch.compiler.is_compiling() and _cpu_bf16_training(x, self.gate_up_proj)
                and kernels.experts_ok(x, self.gate_up_proj, self.down_proj) and shared.trains_fused(x))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, shared: MLP | None = None):
        """x [N, H]; weights, idx [N, k] -> sum_k weights * expert_idx(x), [N, H]; + shared(x) with `shared`,
        which only a `folds` call may pass."""
        N, k = idx.shape
        if not _few_rows(N * k, x, self.gate_up_proj):  # (else the sorted path below, with the CPU kernel)
            if torch.compiler.is_compiling() and (N * k <= 256 or not _grouped_mm_ok(x)):
                return self._gathered(x, weights, idx)  # compiled decoding: few tokens, no host reads
            if N == 1 and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
                return self._one_token(x, weights, idx)
        flat = idx.reshape(-1)
        if kernels.sort_by_expert_ok(flat):  # the same order and counts from a counting sort
            order, counts = kernels.sort_by_expert(flat, self.n)
        else:
            order = flat.argsort(stable=True)  # token slots sorted by expert
            # tokens per expert; a scatter-add rather than bincount, whose output size depends on the data (which
            # would break a torch.compile graph)
            counts = torch.zeros(self.n, dtype=flat.dtype, device=flat.device).scatter_add_(0, flat,
                                                                                             torch.ones_like(flat))
        if _cpu_bf16_training(x, self.gate_up_proj):
            if kernels.experts_ok(x, self.gate_up_proj, self.down_proj):  # the weighted sum inside too
                w = weights.float().contiguous()  # fp32 already (the router's)
                mlp = () if shared is None else (shared.gate_proj.weight, shared.up_proj.weight,
                                                 shared.down_proj.weight)
                return _CPUExpertsKernel.apply(x, w, order, k, counts.tolist(), self.gate_up_proj, self.down_proj,
                                               *mlp)
            # the gathers and scatters inside, fused with the padding
            out = _CPUExpertsBF16.apply(x, order, k, counts.tolist(), self.gate_up_proj, self.down_proj)
        else:
            # index_select, not x[token]: its backward is an index_add, ~15x faster on CPU than indexing's index_put
            out = expert_ffn(x.index_select(0, order // k), counts, self.gate_up_proj, self.down_proj)  # [N*k, H]
            unsort = torch.empty_like(order).scatter_(0, order, torch.arange(N * k, device=order.device))
            out = out.index_select(0, unsort)  # back in (token, choice) order: a sum over k, no scatter
        out = out.view(N, k, -1)
        return (out * weights.to(out.dtype)[..., None]).sum(1)

    def _one_token(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Batch-1 decoding on CPU: k matrix-vector products per projection, no sort, grouping or scatter
        (CPU grouped_mm would walk all E groups for k rows). Reading idx to the host costs nothing on CPU."""
        ids, xv = idx[0].tolist(), x[0]
        h = torch.stack([torch.mv(self.gate_up_proj[e], xv) for e in ids])  # [k, 2 * inter]
        g, u = h.chunk(2, dim=-1)
        a = (F.silu(g) * u).unbind(0)  # k x [inter]
        y = torch.stack([torch.mv(self.down_proj[e], a_e) for e, a_e in zip(ids, a)])  # [k, H]
        return torch.mm(weights, y.float())  # [1, H]: the weighted sum, in fp32 (router weights are fp32)

    def _gathered(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The path torch.compile'd decoding takes (few tokens): gather the chosen experts' matrices for every
        (token, choice) and run each projection as one batched matrix-vector product; no host read of idx (as
        `_one_token` does) and no data-dependent shapes (as the grouped GEMM's offsets are). For one token this
        compiled as fast as or faster than the alternatives measured (k index_select + mv calls; a fused gathered
        multiply-and-sum, which Inductor turns into one horizontal reduction per output row): 175 vs 172 vs
        195 us for the `small` preset's bf16 experts on 2 threads (eager `_one_token`: 272 us). Copies N*k
        expert matrices, so it is no path for prefill-sized N. Returns [N, H] in fp32."""
        N, k = idx.shape
        ids = idx.reshape(-1)  # [N*k]
        xs = x.to(self.gate_up_proj.dtype)[:, None, :].expand(N, k, -1).reshape(N * k, -1, 1)  # [N*k, H, 1]
        h = torch.bmm(self.gate_up_proj[ids], xs).squeeze(-1)  # [N*k, 2 * inter]
        g, u = h.chunk(2, dim=-1)
        y = torch.bmm(self.down_proj[ids], (F.silu(g) * u)[:, :, None])  # [N*k, H, 1]
        return torch.bmm(weights[:, None, :], y.view(N, k, -1).float()).squeeze(1)  # [N, H]: weighted sum, fp32


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor, stats: list[RoutingStats] | None = None) -> torch.Tensor:
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        weights, idx, scores = self.gate(flat)
        # the kernel adds the shared experts in its own pass (not the expert-parallel wrapper's experts)
        fold = isinstance(self.experts, Experts) and self.experts.folds(flat, self.shared_experts)
        y = self.experts(flat, weights, idx, self.shared_experts) if fold else self.experts(flat, weights, idx)
        # x's dtype; under autocast the wider of the two (CPU training's norm hands x over in bf16, and the
        # experts' fp32 weighted sum stays fp32, as before)
        y = y.to(torch.promote_types(y.dtype, x.dtype) if torch.is_autocast_enabled(x.device.type) else x.dtype)
        y = y.view(B, T, H)
        if self.shared_experts is not None and not fold:
            y = y + self.shared_experts(x)
        if stats is not None:
            stats.append(self.routing_stats(idx, scores, B, T))
        return y

    def routing_stats(self, idx: torch.Tensor, scores: torch.Tensor, B: int, T: int) -> RoutingStats:
        """Load per expert and the sequence-wise balance term sum_i f_i P_i (DeepSeek-V3 eq. 17-20)."""
        E, k = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        chosen = torch.zeros(B * T, E, device=idx.device).scatter_(1, idx, 1.0).view(B, T, E)
        f = chosen.sum(1) * (E / (k * T))  # [B, E]
        p = (scores / scores.sum(-1, keepdim=True)).view(B, T, E).mean(1)  # [B, E]
        return RoutingStats(load=chosen.sum((0, 1)).detach(), balance=(f * p).sum(-1).mean())
