"""Where dsv3's training step goes: `torch.profiler` over a few steps of bench_train.py's step (same model, batch,
optimizer and autocast), self CPU time per op grouped into the parts of the README's "where a step goes" table,
per step. The profiler slows the step (~12% on the dev VM) and some ops more than others, so read the shares,
not the absolute figures; the unprofiled steps before it give the step's real time.

Usage: python benchmarks/profile_train.py [--preset small] [--batch 16] [--seq 512] [--steps 6]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from bench_inference import build_models  # noqa: E402
from bench_train import dsv3_loss, token_batch, train_step  # noqa: E402

from dsv3 import ModelConfig  # noqa: E402
from dsv3.train.optim import build_optimizer  # noqa: E402
from dsv3.train.trainer import _matmul_peak_flops, keep_freed_memory  # noqa: E402


def part(name: str, shapes: list[list[int]], hidden: int, vocab: int) -> str:
    """The table row an op's self time counts towards."""
    if name in ("aten::mm", "dsv3::linear_weight_grad"):
        # the head's products: its forward reads the [hidden, vocab] weight view, its input and weight gradients read
        # the [tokens, vocab] logits' gradient first
        head = [hidden, vocab] in shapes or (shapes and shapes[0][-1] == vocab)
        return "output head products" if head else "other products"
    for key, row in (("dsv3::experts", "routed experts"), ("dsv3::attention", "attention"),
                     ("rms_norm", "RMSNorm"), ("cross_entropy", "cross-entropy"), ("adamw", "AdamW"),
                     ("swiglu", "SwiGLU, router"), ("route_topk", "SwiGLU, router")):
        if key in name:
            return row
    return "the rest (casts, copies, autograd's gradient sums, allocation)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    keep_freed_memory()
    cfg = ModelConfig.preset(args.preset)
    model, _ = build_models(cfg, seed=0)
    model.train()
    batch = token_batch(cfg, args.batch, args.seq)
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.1)
    loss_fn = dsv3_loss(model)
    for _ in range(2):  # warm-up: kernel builds, allocator
        train_step(loss_fn, opt, batch, True)
    plain = [train_step(loss_fn, opt, batch, True) for _ in range(args.steps)]
    reading = _matmul_peak_flops.__wrapped__(torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        profiled = [train_step(loss_fn, opt, batch, True) for _ in range(args.steps)]
    ms = collections.Counter()
    for e in prof.key_averages(group_by_input_shape=True):
        shapes = [list(shape) for shape in e.input_shapes if shape]
        ms[part(e.key, shapes, cfg.hidden_size, cfg.vocab_size)] += e.self_cpu_time_total / 1e3 / args.steps
    total = sum(ms.values())
    print(f"{args.preset}, {args.batch} x {args.seq}, bf16 autocast, {torch.get_num_threads()} threads: step "
          f"{statistics.median(plain):.3f} s unprofiled, {statistics.median(profiled):.3f} s profiled (medians of "
          f"{args.steps}); bf16 matmul reading {reading / 1e12:.2f} TFLOP/s")
    print("| part | ms per step | share |\n|---|---:|---:|")
    for row, t in ms.most_common():
        print(f"| {row} | {t:.0f} | {t / total:.1%} |")


if __name__ == "__main__":
    main()
