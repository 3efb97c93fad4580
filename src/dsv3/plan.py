"""`dsv3 plan`: per-GPU memory of a training mesh, to choose gpus x ep (x dp) before renting them.

It follows what `dsv3 train` does on several processes (dsv3.train.parallel): FSDP2 over all G GPUs for every
parameter except the routed experts, which are split over "ep" and FSDP-sharded over "dp" (G = dp x ep); fp32
parameters (they are AdamW's master weights), bf16 autocast compute, activation recomputation per block with
--recompute (as `dsv3 train --recompute`).

Per GPU, with P parameters in all (sizes from the config on the meta device; no memory is used):
  parameters       4 B x P / G    fp32 shards, the AdamW master weights (FSDP and expert sharding together)
  gradients        4 B x P / G    fp32 shards after the reduce-scatter
  optimizer state  8 B x P / G    AdamW exp_avg and exp_avg_sq, fp32 (4 B x P / G in bf16: --optim-state-dtype)
  FSDP working set 8 B x root + 12 B x block
                   root: embedding + output head + final norm, gathered (params + grads) for the whole step;
                   block: the largest decoder block gathered, its routed experts counted / ep; two blocks'
                   parameters live at once (prefetch) and one block's unsharded gradients
  activations      saved for backward at micro-batch b x seq-len s on this GPU (estimate, see below)
Sharding pads each tensor to a multiple of the shard count and routing is never perfectly balanced: both
are ignored. Leave headroom (the CUDA caching allocator, NCCL buffers, temporaries).

Activations, values saved per token (measured against autograd's saved tensors of the tiny preset, within ~5%):
  two RMSNorms    4 H                           fp32 (input and normalised input of each)
  attention (MLA) H + 2 q_lora + 2 kv_lora + 4 n_heads max(qk, v) + n_heads v + (n_heads + 1) rope
  dense MLP       H + 4 F
  MoE             H + k (3 H + 4 I) + 4 I_shared, + 2 E fp32 (router scores)
  output head     2 H fp32 (final norm) + V bf16 logits + V fp32 log-softmax, per head (main and each MTP)
  MTP module      a MoE block, plus 4 H fp32 (enorm, hnorm) + 2 H (their concatenation)
Everything not marked fp32 is bf16 (2 bytes).
With --recompute every decoder block (MTP blocks too) keeps only its two inputs, 8 H bytes per token (the residual
stream and the previous block's output, fp32 at most), and one block's activations at a time are rebuilt in the
backward; the MTP combination and the output heads are kept as above.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from .config import ModelConfig

GIB = 1024**3
MOMENT_BYTES = {"float32": 4, "bfloat16": 2}  # per AdamW moment and parameter (`dsv3 train --optim-state-dtype`)


class PlanError(ValueError):
    """A mesh that cannot be built (the message says what to change)."""


@dataclass
class Plan:
    gpus: int
    ep: int
    dp: int
    micro_batch: int
    seq_len: int
    params_total: int
    params_per_gpu: float
    experts_per_gpu: int  # routed experts held per MoE layer
    parameters: float  # bytes per GPU, as in the module docstring
    gradients: float
    optimizer: float
    fsdp_working_set: float
    activations: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.fsdp_working_set + self.activations

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _param_groups(cfg: ModelConfig) -> tuple[int, int, list[tuple[int, int]]]:
    """(all parameters, root parameters, per block [(non-expert, routed-expert) parameters])."""
    import torch

    from .model import DeepseekV3

    with torch.device("meta"):
        model = DeepseekV3(cfg)
    total = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    root = sum(p.numel() for m in (model.model.embed_tokens, model.model.norm, model.lm_head)
               for p in m.parameters())
    if cfg.tie_word_embeddings:
        root -= model.lm_head.weight.numel()
    blocks = []
    for layer in model.model.layers:
        experts = sum(p.numel() for n, p in layer.named_parameters() if n.startswith("mlp.experts."))
        blocks.append((sum(p.numel() for p in layer.parameters()) - experts, experts))
    return total, root, blocks


def activation_values_per_token(cfg: ModelConfig) -> dict[str, int]:
    """Saved-for-backward values per token, per part (the module docstring's table; fp32 parts separate)."""
    H, nh, V = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    attn = (H + 2 * (cfg.q_lora_rank or 0) + 2 * cfg.kv_lora_rank + 4 * nh * max(cfg.qk_head_dim, cfg.v_head_dim)
            + nh * cfg.v_head_dim + (nh + 1) * cfg.qk_rope_head_dim)
    moe = 0
    if cfg.n_routed_experts:
        shared = cfg.moe_intermediate_size * (cfg.n_shared_experts or 0)
        moe = H + cfg.num_experts_per_tok * (3 * H + 4 * cfg.moe_intermediate_size) + 4 * shared
    return {
        "norms_fp32": 4 * H,  # per decoder block
        "attention": attn,
        "dense_mlp": H + 4 * cfg.intermediate_size,
        "moe": moe,
        "router_fp32": 2 * (cfg.n_routed_experts or 0),
        "head_bf16": V,  # per output head
        "head_fp32": 2 * H + V,
        "mtp_combine_fp32": 4 * H,  # per MTP module
        "mtp_combine": 2 * H,
    }


def activation_bytes(cfg: ModelConfig, tokens: int, recompute: bool = False) -> float:
    """Bytes of saved activations for `tokens` tokens through the whole model, MTP modules included; with
    recompute, as `forward_train(recompute=True)` keeps them (per-block inputs, one block rebuilt at a time)."""
    a = activation_values_per_token(cfg)
    n_moe = cfg.num_moe_layers
    n_dense = cfg.num_hidden_layers - n_moe
    n_mtp = cfg.num_nextn_predict_layers
    mtp_ffn = (a["moe"], a["router_fp32"]) if cfg.n_routed_experts else (a["dense_mlp"], 0)
    block = 4 * a["norms_fp32"] + 2 * a["attention"]  # bytes per token of a block, before its MLP or MoE
    kinds = [(n_dense, block + 2 * a["dense_mlp"]), (n_moe, block + 2 * a["moe"] + 4 * a["router_fp32"]),
             (n_mtp, block + 2 * mtp_ffn[0] + 4 * mtp_ffn[1])]  # (how many, bytes per token each)
    if recompute:
        blocks = (cfg.num_hidden_layers + n_mtp) * 8 * cfg.hidden_size + max(b for n, b in kinds if n)
    else:
        blocks = sum(n * b for n, b in kinds)
    per_token = (blocks + n_mtp * (4 * a["mtp_combine_fp32"] + 2 * a["mtp_combine"])
                 + (1 + n_mtp) * (2 * a["head_bf16"] + 4 * a["head_fp32"]))
    return float(per_token * tokens)


def plan(cfg: ModelConfig, gpus: int, ep: int = 1, dp: int | None = None, micro_batch: int = 1,
         seq_len: int = 4096, optim_state_dtype: str = "float32", recompute: bool = False) -> Plan:
    if optim_state_dtype not in MOMENT_BYTES:
        raise PlanError(f"--optim-state-dtype must be float32 or bfloat16, got {optim_state_dtype!r}")
    if gpus < 1 or ep < 1 or micro_batch < 1 or seq_len < 1:
        raise PlanError("--gpus, --ep, --micro-batch and --seq-len must be >= 1")
    if gpus % ep:
        raise PlanError(f"--ep {ep} must divide --gpus {gpus}")
    dp = gpus // ep if dp is None else dp
    if dp * ep != gpus:
        raise PlanError(f"--dp {dp} x --ep {ep} = {dp * ep}, but --gpus is {gpus}: the mesh must use every GPU")
    E = cfg.n_routed_experts or 0
    if ep > 1 and (not E or E % ep):
        raise PlanError(f"--ep {ep} must divide the number of routed experts ({E})")
    total, root, blocks = _param_groups(cfg)
    block = max(dense + experts / ep for dense, experts in blocks)
    return Plan(
        gpus=gpus, ep=ep, dp=dp, micro_batch=micro_batch, seq_len=seq_len, params_total=total,
        params_per_gpu=total / gpus, experts_per_gpu=E // ep,
        parameters=4.0 * total / gpus, gradients=4.0 * total / gpus,
        optimizer=2.0 * MOMENT_BYTES[optim_state_dtype] * total / gpus,
        fsdp_working_set=8.0 * root + 12.0 * block,
        activations=activation_bytes(cfg, micro_batch * seq_len, recompute),
    )


def valid_eps(cfg: ModelConfig, gpus: int) -> list[int]:
    E = cfg.n_routed_experts or 0
    return [e for e in range(1, gpus + 1) if gpus % e == 0 and (e == 1 or (E and E % e == 0))]


def format_plan(p: Plan, gpu_memory_gib: float | None = None) -> str:
    rows = [
        ("parameters (fp32 shards = AdamW master weights)", p.parameters),
        ("gradients (fp32 shards)", p.gradients),
        (f"optimizer state (AdamW's two moments, {p.optimizer / p.params_per_gpu:g} B per parameter)", p.optimizer),
        ("FSDP working set (gathered root + blocks)", p.fsdp_working_set),
        (f"activations (micro-batch {p.micro_batch} x {p.seq_len} tokens)", p.activations),
        ("total", p.total),
    ]
    lines = [f"mesh: {p.gpus} GPUs = dp {p.dp} x ep {p.ep}; {p.experts_per_gpu} routed experts per GPU per MoE "
             f"layer; {p.params_per_gpu / 1e9:.3g}B of {p.params_total / 1e9:.4g}B parameters per GPU",
             "", "| per GPU | GiB |", "|---|---:|"]
    lines += [f"| {name} | {v / GIB:,.2f} |" for name, v in rows]
    if gpu_memory_gib:
        verdict = "fits" if p.total <= 0.9 * gpu_memory_gib * GIB else "does NOT fit"
        lines.append(f"\n{verdict} in {gpu_memory_gib:g} GiB per GPU (keeping 10% headroom)")
    return "\n".join(lines)


def format_meshes(plans: list[Plan], gpu_memory_gib: float | None = None) -> str:
    lines = ["| ep | dp | experts/GPU | params+grads+optimizer GiB | FSDP working set GiB | activations GiB "
             "| total GiB |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for p in plans:
        state = (p.parameters + p.gradients + p.optimizer) / GIB
        lines.append(f"| {p.ep} | {p.dp} | {p.experts_per_gpu} | {state:,.2f} | {p.fsdp_working_set / GIB:,.2f} | "
                     f"{p.activations / GIB:,.2f} | {p.total / GIB:,.2f} |")
    if gpu_memory_gib:
        ok = [p.ep for p in plans if p.total <= 0.9 * gpu_memory_gib * GIB]
        lines.append(f"\nfits in {gpu_memory_gib:g} GiB per GPU (10% headroom): "
                     + (f"ep in {ok}" if ok else "none; lower --micro-batch / --seq-len or add GPUs"))
    return "\n".join(lines)


def cmd_plan(args) -> int:
    cfg = ModelConfig.from_json(args.config) if args.config else ModelConfig.preset(args.preset)
    if args.ep is None:
        plans = [plan(cfg, args.gpus, e, None, args.micro_batch, args.seq_len, args.optim_state_dtype, args.recompute)
                 for e in valid_eps(cfg, args.gpus)]
        if args.json:
            print(json.dumps([p.to_dict() for p in plans], indent=2))
        else:
            print(format_meshes(plans, args.gpu_memory))
        return 0
    p = plan(cfg, args.gpus, args.ep, args.dp, args.micro_batch, args.seq_len, args.optim_state_dtype,
             args.recompute)
    print(json.dumps(p.to_dict(), indent=2) if args.json else format_plan(p, args.gpu_memory))
    return 0


def register(sub) -> None:
    from .config import PRESETS

    p = sub.add_parser("plan", help="per-GPU memory of a distributed training mesh (gpus = dp x ep)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=list(PRESETS))
    src.add_argument("--config", help="a config.json file")
    p.add_argument("--gpus", type=int, required=True, help="GPUs (processes) in the job")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel degree (default: compare every valid one)")
    p.add_argument("--dp", type=int, default=None, help="data-parallel degree of the experts (default gpus / ep)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per forward on each GPU")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--optim-state-dtype", choices=list(MOMENT_BYTES), default="float32",
                   help="AdamW's moments, as `dsv3 train --optim-state-dtype` (bfloat16: half the optimizer state)")
    p.add_argument("--recompute", action="store_true",
                   help="activation checkpointing per block, as `dsv3 train --recompute`")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU, for the fits/does-not-fit line")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
