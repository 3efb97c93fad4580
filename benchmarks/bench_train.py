"""Training throughput of dsv3 against `transformers`' DeepseekV3ForCausalLM: same config, weights and batch,
fp32 master weights, bf16 autocast (or --dtype float32), forward + backward + AdamW step, on this CPU.
Each side steps with the optimizer its own trainer uses: dsv3's `build_optimizer` (fused AdamW, decay on
matrices only) and fused AdamW over all parameters for transformers (its Trainer's default, adamw_torch_fused).

Both models train the main next-token loss only (transformers has no MTP), so dsv3 runs `mtp=False`; each side
computes it as its own library does: dsv3's `cross_entropy` (its CPU kernel), and for transformers the fp32 upcast of
the logits and F.cross_entropy that its ForCausalLMLoss runs.
MFU counts 6 x activated parameters (embedding excluded) + attention per token, against the measured dense
matmul peak of the machine in the same dtype (the best reading of those taken before the steps, after each pair
of them and after each alone step: this VM's peak changes from minute to minute). Medians over --repeats steps
after a warm-up step, the two sides' steps interleaved. Like `dsv3 train` on CPU, the process keeps freed memory for
reuse (`keep_freed_memory`), which speeds up both sides.

The default batch, 16 sequences of 512 tokens (8192 tokens per step), is a small training batch; smaller ones
(4 x 256) leave the step dominated by per-operation overhead on both sides.

Then --alone-steps (default 20) more dsv3 steps run back to back, a matmul reading after each: on a machine whose
speed changes between steps (as the dev VM's does, within seconds), the steps whose two adjacent readings are both
>= 90% of the peak give dsv3's MFU while the machine ran at that peak (`dsv3_mfu_at_peak`), which the interleaved
medians can miss when a slow spell falls inside the run. Their readings join the others in the peak.

With --wait-fast T S the timed steps start only once a reading reaches T TFLOP/s (at most S seconds of waiting):
on a shared machine whose speed changes from minute to minute, the run then starts in a fast spell rather than
whenever it was launched. It selects when the steps start, not which steps count: all of them do, and the reading
that ended the wait joins the others in the peak.

--recompute runs both sides with activation checkpointing per block; --optim-state-dtype bfloat16 gives dsv3 its
bf16-moment AdamW (transformers' stays fp32).

Usage: python benchmarks/bench_train.py [--preset small] [--batch 16] [--seq 512] [--repeats 5] [--dtype bfloat16]
       [--alone-steps 20] [--peak-tflops P] [--wait-fast T S] [--recompute] [--optim-state-dtype bfloat16]
Writes benchmarks/results/train_{dtype}_{batch}x{seq}[_recompute][_bf16moments].json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_inference import build_models, loadavg  # noqa: E402

from dsv3 import ModelConfig  # noqa: E402
from dsv3.model.transformer import cross_entropy  # noqa: E402
from dsv3.train.optim import build_optimizer  # noqa: E402
from dsv3.train.trainer import _matmul_peak_flops, flops_per_token, keep_freed_memory  # noqa: E402


def train_step(loss_fn, opt, batch, autocast: bool) -> float:
    """Seconds for one forward + backward + optimizer step."""
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn(batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def token_batch(cfg: ModelConfig, batch: int, seq: int) -> torch.Tensor:
    """The benchmark's batch: [batch, seq + 1] random token ids (inputs and their next-token labels)."""
    return torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1))


def dsv3_loss(model, recompute: bool = False):
    """dsv3's main next-token loss on a token_batch, as the benchmark trains it (its CPU cross-entropy kernel)."""

    def loss(b):
        logits = model.forward_train(b[:, :-1], mtp=False, recompute=recompute).logits
        return cross_entropy(logits, b[:, 1:], overwrite_logits=True)

    return loss


def wait_for_peak(dtype: torch.dtype, tflops: float, seconds: float, peaks: list[float]) -> float:
    """Read the matmul peak every 2 s until a reading reaches `tflops` or `seconds` have passed; the last reading
    joins `peaks`. Returns the seconds waited."""
    start = time.perf_counter()
    while True:
        reading = _matmul_peak_flops.__wrapped__(dtype)
        waited = time.perf_counter() - start
        if reading >= tflops * 1e12 or waited >= seconds:
            peaks.append(reading)
            return waited
        time.sleep(2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--wait-fast", type=float, nargs=2, metavar=("TFLOPS", "SECONDS"), default=None,
                    help="after the warm-up, start the timed steps only once a matmul reading reaches TFLOPS (read "
                         "every 2 s, for at most SECONDS; then they start anyway): for a shared machine whose speed "
                         "changes from minute to minute. The reading that ends the wait counts towards the peak")
    ap.add_argument("--alone-steps", type=int, default=20,
                    help="then this many dsv3 steps back to back, a matmul reading after each, for the MFU of the "
                         "steps whose two adjacent readings are both >= 90%% of the peak (0: none)")
    ap.add_argument("--recompute", action="store_true",
                    help="activation checkpointing per decoder block on both sides (dsv3's --recompute, "
                         "transformers' activation_checkpointing_enable)")
    ap.add_argument("--optim-state-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="dsv3's AdamW moments (`dsv3 train --optim-state-dtype`); transformers keeps fp32")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="MFU against this matmul peak (TFLOP/s, all threads) instead of the best reading of the run; "
                         "the readings are still taken and recorded")
    args = ap.parse_args()
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        ap.error(f"--peak-tflops must be positive, got {args.peak_tflops}")
    if args.alone_steps < 0:
        ap.error(f"--alone-steps must be >= 0, got {args.alone_steps}")
    if args.wait_fast is not None and not (args.wait_fast[0] > 0 and args.wait_fast[1] >= 0):
        ap.error(f"--wait-fast needs a positive TFLOPS and SECONDS >= 0, got {args.wait_fast}")
    keep_freed_memory()  # as `dsv3 train` does on CPU; process-wide, so transformers' steps get it too
    autocast = args.dtype == "bfloat16"
    mm_dtype = torch.bfloat16 if autocast else torch.float32
    _matmul_peak_flops(mm_dtype)  # before the steps (cached)
    cfg = ModelConfig.preset(args.preset)
    ours, hf = build_models(cfg, seed=0)
    ours.train()
    hf.train()
    if args.recompute:
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    batch = token_batch(cfg, args.batch, args.seq)
    before = loadavg()
    ours_loss = dsv3_loss(ours, args.recompute)

    def hf_loss(b):  # transformers' ForCausalLMLoss: upcast the logits, then F.cross_entropy
        logits = hf(b[:, :-1]).logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))

    ours_opt = build_optimizer(ours, lr=1e-4, weight_decay=0.1, state_dtype=args.optim_state_dtype)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    sides = [(ours_loss, ours_opt), (hf_loss, hf_opt)]
    for loss_fn, opt in sides:  # warm-up
        train_step(loss_fn, opt, batch, autocast)
    peaks = [_matmul_peak_flops(mm_dtype)]
    waited = wait_for_peak(mm_dtype, *args.wait_fast, peaks) if args.wait_fast else None
    times = [[], []]
    for _ in range(args.repeats):  # interleaved, so both sides see the same background load
        for t, (loss_fn, opt) in zip(times, sides):
            t.append(train_step(loss_fn, opt, batch, autocast))
        peaks.append(_matmul_peak_flops.__wrapped__(mm_dtype))
    alone = []  # (seconds, reading before, reading after)
    for _ in range(args.alone_steps):
        seconds = train_step(ours_loss, ours_opt, batch, autocast)
        peaks.append(_matmul_peak_flops.__wrapped__(mm_dtype))
        alone.append((seconds, peaks[-2], peaks[-1]))
    t_ours, t_hf = statistics.median(times[0]), statistics.median(times[1])
    tokens = args.batch * args.seq
    # the largest of the readings (before the steps, after each pair and each alone step): this VM's bf16 matmul
    # peak reads either ~0.7 or ~2.0 TFLOP/s from one minute to the next, and MFU is against what the machine can do
    peak = args.peak_tflops * 1e12 if args.peak_tflops else max(peaks)
    at_peak = [t for t, r0, r1 in alone if min(r0, r1) >= 0.9 * peak]  # steps while the machine read near it
    fpt = flops_per_token(cfg, args.seq)
    res = {"preset": args.preset, "dtype": args.dtype, "batch": args.batch, "seq": args.seq,
           "recompute": args.recompute, "optim_state_dtype": args.optim_state_dtype,
           "dsv3_tok_s": tokens / t_ours, "hf_tok_s": tokens / t_hf, "ratio": t_hf / t_ours,
           "dsv3_mfu": tokens * fpt / t_ours / peak, "hf_mfu": tokens * fpt / t_hf / peak,
           "matmul_peak_tflops": peak / 1e12, "peak_source": "given" if args.peak_tflops else "measured",
           "peak_readings_tflops": [p / 1e12 for p in peaks],
           "waited_s": waited,
           "alone_steps": [{"s": t, "reading_before_tflops": r0 / 1e12, "reading_after_tflops": r1 / 1e12}
                           for t, r0, r1 in alone],
           "alone_steps_at_peak": len(at_peak),
           "dsv3_mfu_at_peak": tokens * fpt / statistics.median(at_peak) / peak if at_peak else None,
           "dsv3_step_s": times[0], "hf_step_s": times[1],
           "loadavg_before": before, "loadavg_after": loadavg(),
           "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"| {args.preset} train step, {args.dtype}, {args.batch}x{args.seq} | tokens/s | MFU |\n|---|---:|---:|")
    print(f"| dsv3 | {res['dsv3_tok_s']:.0f} | {res['dsv3_mfu']:.1%} |")
    print(f"| transformers | {res['hf_tok_s']:.0f} | {res['hf_mfu']:.1%} |")
    print(f"dsv3 / transformers: {res['ratio']:.2f}x; {res['peak_source']} matmul peak "
          f"{res['matmul_peak_tflops']:.2f} TFLOP/s (readings {' '.join(f'{p / 1e12:.2f}' for p in peaks)}); "
          f"load {before} -> {res['loadavg_after']}"
          + (f"; waited {waited:.0f} s for a fast reading" if waited is not None else ""))
    print("step seconds: " + "; ".join(f"{name} {' '.join(f'{t:.2f}' for t in ts)}"
                                       for name, ts in zip(("dsv3", "transformers"), times)))
    if alone:
        print(f"dsv3 alone, {len(alone)} steps back to back: {len(at_peak)} between two readings >= 90% of the peak"
              + (f", median {statistics.median(at_peak):.3f} s: MFU {res['dsv3_mfu_at_peak']:.1%}" if at_peak else "")
              + f" (all: median {statistics.median(t for t, _, _ in alone):.3f} s)")
    variant = "_recompute" * args.recompute + "_bf16moments" * (args.optim_state_dtype == "bfloat16")
    out = Path(__file__).parent / "results" / f"train_{args.dtype}_{args.batch}x{args.seq}{variant}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
