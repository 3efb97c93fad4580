"""The routed experts of CPU bf16 training: dsv3's experts kernel (kernels/cpu_experts.cpp) against the per-expert
oneDNN path it replaced (`_CPUExpertsBF16`), forward + backward of one `Experts` layer under bf16 autocast with fp32
master weights, in one process, the two interleaved. Default shapes are the `small` preset's 16 x 512 training
step: 8192 tokens, 4 of 32 experts each, hidden 512, expert width 256, router weights on.

Usage: python benchmarks/bench_experts.py [--tokens 8192] [--experts 32] [--k 4] [--hidden 512] [--inter 256]
[--repeats 15]. Writes benchmarks/results/experts.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_inference import loadavg  # noqa: E402

from dsv3 import kernels  # noqa: E402
from dsv3.model.moe import Experts  # noqa: E402
from dsv3.train.trainer import keep_freed_memory  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    keep_freed_memory()  # as `dsv3 train` does on CPU
    N, E, k, H = args.tokens, args.experts, args.k, args.hidden
    if not kernels.experts_ok(torch.zeros(1, H), torch.zeros(1, 2 * args.inter, H), torch.zeros(1, H, args.inter)):
        sys.exit("the experts kernel does not run here (it needs a CPU with AMX and dsv3's kernels)")
    g = torch.Generator().manual_seed(0)
    experts = Experts(E, H, args.inter)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=0.05, generator=g)
        experts.down_proj.normal_(std=0.05, generator=g)
    x = torch.randn(N, H, generator=g, requires_grad=True)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])  # ~balanced, as the biases keep it
    weights = torch.rand(N, k, generator=g, requires_grad=True)
    dy = torch.randn(N, H, generator=g)
    kernel_ok = kernels.experts_ok

    def step(kernel: bool) -> float:
        kernels.experts_ok = kernel_ok if kernel else (lambda *a: False)
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = experts(x, weights, idx)
        (y.float() * dy).sum().backward()
        dt = time.perf_counter() - t
        x.grad = weights.grad = experts.gate_up_proj.grad = experts.down_proj.grad = None
        return dt

    before = loadavg()
    for kernel in (True, False):  # warm-up (oneDNN and brgemm build their kernels on first use)
        step(kernel), step(kernel)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for kernel in (True, False):
            times[kernel].append(step(kernel))
    kernels.experts_ok = kernel_ok
    flops = 3 * 2 * 3 * N * k * H * args.inter  # forward: 2 x 3 H I per (token, expert) (gate, up, down); backward 2x
    med = {kernel: statistics.median(ts) for kernel, ts in times.items()}
    res = {"tokens": N, "experts": E, "k": k, "hidden": H, "inter": args.inter,
           "kernel_ms": med[True] * 1e3, "onednn_ms": med[False] * 1e3, "speedup": med[False] / med[True],
           "kernel_tflops": flops / med[True] / 1e12, "onednn_tflops": flops / med[False] / 1e12,
           "pair_ratios": [b / a for a, b in zip(times[True], times[False])],
           "loadavg_before": before, "loadavg_after": loadavg(), "torch": torch.__version__,
           "threads": torch.get_num_threads()}
    print(f"| experts fwd + bwd, {N} tokens x {k} of {E}, {H} -> {args.inter} | ms | TFLOP/s |\n|---|---:|---:|")
    print(f"| dsv3 kernel | {res['kernel_ms']:.1f} | {res['kernel_tflops']:.2f} |")
    print(f"| per-expert oneDNN | {res['onednn_ms']:.1f} | {res['onednn_tflops']:.2f} |")
    print(f"kernel / oneDNN: {res['speedup']:.2f}x (median of {args.repeats}, interleaved; median pair ratio "
          f"{statistics.median(res['pair_ratios']):.2f}); load {before} -> {res['loadavg_after']}")
    out = Path(__file__).parent / "results" / "experts.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
