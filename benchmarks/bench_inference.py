"""Inference throughput of dsv3 against `transformers`' DeepseekV3ForCausalLM, same weights, same machine.

Measures in one run:
  (a) prefill tokens/s on a batch (default 4 x 256): dsv3 `model(ids)` vs transformers `hf(ids).logits`;
  (b) batch-1 greedy decode tokens/s (default prompt 32, 64 new tokens): `dsv3.generate` vs `hf.generate`,
      and `dsv3.generate` on a copy of the model with `compile_decode()` (torch.compile; its warm-up, the
      first generation, is timed separately and excluded from the medians; --no-compile skips it).
      Decode time is measured from the first decode forward (dsv3: the first `forward_cached` call;
      transformers: the first logits-processor call, which happens right after its prefill forward) to the
      end of generation, so prefill is excluded and both sides do N-1 decode forwards + N-1 greedy picks.
      End-to-end time (prefill + decode) is reported too.
Each timing is the median of --repeats runs after a warm-up, dsv3 and transformers interleaved so both see
the same background load (printed as /proc/loadavg before and after). Also checks that the greedy tokens of
both agree: the number of leading tokens equal, in the benchmark dtype (random weights give near-tied logits,
so bf16 rounding flips the argmax after a while) and in fp32 (where all should agree).

Usage: python benchmarks/bench_inference.py [--preset small] [--new-tokens 64] [--repeats 5] [--dtype bfloat16]
                                            [--threads N (default: all cores)] [--no-compile]
Writes benchmarks/results/inference.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from dsv3 import DeepseekV3, ModelConfig, generate

ROOT = Path(__file__).resolve().parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def save_result(out: Path, result: dict, argv: list[str] | None) -> dict:
    """Write `result` (plus the command line that produced it) as JSON to `out`; returns it."""
    result["command"] = " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def build_models(cfg: ModelConfig, seed: int):
    """fp32 dsv3 model with random weights (std initializer_range, small random router correction bias) and
    transformers' DeepseekV3ForCausalLM holding the same weights (MTP layers are dsv3's own)."""
    from dsv3.checkpoint.adapter import to_transformers

    torch.manual_seed(seed)
    model = DeepseekV3(cfg).float()  # random init, std = initializer_range
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.01 * torch.randn_like(b))
    return model.eval(), to_transformers(model)


def cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy in `dtype`, except the router weight and correction bias, which stay fp32 (as transformers and
    dsv3.checkpoint keep them when loading a checkpoint)."""
    m = copy.deepcopy(model).to(dtype)
    for name, t in list(m.named_parameters()) + list(m.named_buffers()):
        if name.endswith("e_score_correction_bias") or name.endswith("mlp.gate.weight"):
            t.data = t.data.float()
    return m


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class _DecodeClock:
    """Records the wall time of the first decode forward; `elapsed()` is the time from then on."""

    def __init__(self):
        self.t0 = None

    def mark(self):
        if self.t0 is None:
            self.t0 = time.perf_counter()


def dsv3_generate_timed(model, prompt: list[int], n: int) -> tuple[list[int], float, float]:
    clock = _DecodeClock()
    inner = type(model).forward_cached.__get__(model)

    def forward_cached(*a, **k):
        clock.mark()
        return inner(*a, **k)

    model.forward_cached = forward_cached  # instance attribute shadows the method for this call only
    try:
        t0 = time.perf_counter()
        out = generate(model, [prompt], max_new_tokens=n, eos_token_id=None)[0]
        t1 = time.perf_counter()
    finally:
        del model.forward_cached
    return out, t1 - t0, t1 - clock.t0


def hf_generate_timed(hf, prompt: list[int], n: int) -> tuple[list[int], float, float]:
    from transformers import LogitsProcessor, LogitsProcessorList

    clock = _DecodeClock()

    class Mark(LogitsProcessor):
        def __call__(self, input_ids, scores):
            clock.mark()
            return scores

    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, logits_processor=LogitsProcessorList([Mark()]), pad_token_id=0)
    t1 = time.perf_counter()
    return out[0, len(prompt):].tolist(), t1 - t0, t1 - clock.t0


def leading_equal(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--prefill-batch", type=int, default=4)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="skip the compiled-decode row (torch.compile warm-up takes a minute or more)")
    ap.add_argument("--out", default=str(ROOT / "results" / "inference.json"))
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.new_tokens < 2:
        ap.error("--repeats must be >= 1 and --new-tokens >= 2")

    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cfg = ModelConfig.preset(args.preset)
    load_before = loadavg()
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "transformers": transformers.__version__,
               "python": platform.python_version()}
    print(f"machine: {machine['cpu']}, {machine['cores']} cores (torch threads {machine['torch_threads']}), "
          f"torch {machine['torch']}, transformers {machine['transformers']}, python {machine['python']}")
    print(f"loadavg before: {load_before}")

    model32, hf32 = build_models(cfg, args.seed)
    model, hf = cast(model32, dtype), cast(hf32, dtype)
    n_params = sum(p.numel() for n, p in model.named_parameters()
                   if not (n.startswith("model.layers.") and int(n.split(".")[2]) >= cfg.num_hidden_layers))
    print(f"preset {args.preset}: {n_params / 1e6:.1f}M params (without MTP), dtype {args.dtype}; "
          f"transformers attention={hf.config._attn_implementation}, "
          f"experts={getattr(hf.config, '_experts_implementation', 'n/a')}")

    g = torch.Generator().manual_seed(args.seed + 1)
    V = cfg.vocab_size
    # ---- (a) prefill ----
    ids = torch.randint(2, V, (args.prefill_batch, args.prefill_len), generator=g)
    n_tok = ids.numel()
    with torch.inference_mode():
        diff = (model(ids).float() - hf(ids).logits.float()).abs().max().item()  # also the warm-up
        ours_times, hf_times = [], []
        for _ in range(args.repeats):  # interleaved so both see the same background load
            ours_times.append(timed(lambda: model(ids)))
            hf_times.append(timed(lambda: hf(ids).logits))
    t_ours, t_hf = statistics.median(ours_times), statistics.median(hf_times)
    prefill = {"batch": args.prefill_batch, "len": args.prefill_len,
               "dsv3_tok_s": n_tok / t_ours, "hf_tok_s": n_tok / t_hf, "ratio": t_hf / t_ours,
               "dsv3_times_s": ours_times, "hf_times_s": hf_times, "max_abs_logit_diff": diff}

    # ---- (b) batch-1 decode ----
    N = args.new_tokens
    prompt = torch.randint(2, V, (args.prompt_len,), generator=g).tolist()
    compiled = copy.deepcopy(model).compile_decode() if args.compile else None
    with torch.inference_mode():
        dsv3_generate_timed(model, prompt, N)  # warm-up
        hf_generate_timed(hf, prompt, N)
        if compiled is not None:  # warm-up: compiles the decode step (prefill stays eager)
            warmup_compiled = timed(lambda: dsv3_generate_timed(compiled, prompt, N))
            print(f"compiled decode warm-up (torch.compile): {warmup_compiled:.1f} s")
        runs_ours, runs_hf, runs_comp = [], [], []
        for _ in range(args.repeats):  # interleaved so all see the same background load
            runs_ours.append(dsv3_generate_timed(model, prompt, N))
            if compiled is not None:
                runs_comp.append(dsv3_generate_timed(compiled, prompt, N))
            runs_hf.append(hf_generate_timed(hf, prompt, N))
    toks_ours, toks_hf = runs_ours[0][0], runs_hf[0][0]
    assert all(r[0] == toks_ours for r in runs_ours) and all(r[0] == toks_hf for r in runs_hf)
    dec_ours = statistics.median(r[2] for r in runs_ours)
    dec_hf = statistics.median(r[2] for r in runs_hf)
    e2e_ours = statistics.median(r[1] for r in runs_ours)
    e2e_hf = statistics.median(r[1] for r in runs_hf)
    agree = leading_equal(toks_ours, toks_hf)
    decode = {"prompt_len": args.prompt_len, "new_tokens": N, "decode_steps_timed": N - 1,
              "dsv3_tok_s": (N - 1) / dec_ours, "hf_tok_s": (N - 1) / dec_hf, "ratio": dec_hf / dec_ours,
              "dsv3_e2e_tok_s": N / e2e_ours, "hf_e2e_tok_s": N / e2e_hf, "e2e_ratio": e2e_hf / e2e_ours,
              "dsv3_decode_times_s": [r[2] for r in runs_ours], "hf_decode_times_s": [r[2] for r in runs_hf],
              "leading_tokens_equal": agree, "dsv3_tokens": toks_ours, "hf_tokens": toks_hf}
    if compiled is not None:
        toks_comp = runs_comp[0][0]
        assert all(r[0] == toks_comp for r in runs_comp)
        dec_comp = statistics.median(r[2] for r in runs_comp)
        e2e_comp = statistics.median(r[1] for r in runs_comp)
        decode["compiled"] = {
            "dsv3_tok_s": (N - 1) / dec_comp, "ratio": dec_hf / dec_comp, "vs_eager": dec_ours / dec_comp,
            "dsv3_e2e_tok_s": N / e2e_comp, "e2e_ratio": e2e_hf / e2e_comp, "warmup_s": warmup_compiled,
            "dsv3_decode_times_s": [r[2] for r in runs_comp], "dsv3_tokens": toks_comp,
            "leading_tokens_equal_eager": leading_equal(toks_comp, toks_ours),
            "leading_tokens_equal_hf": leading_equal(toks_comp, toks_hf)}
    load_after = loadavg()
    # the same check in fp32, where the two implementations should agree on every token
    if dtype == torch.float32:
        agree32 = agree
    else:
        with torch.inference_mode():
            t32 = generate(model32, [prompt], max_new_tokens=N, eos_token_id=None)[0]
            h32 = hf_generate_timed(hf32, prompt, N)[0]
        agree32 = leading_equal(t32, h32)
    decode["leading_tokens_equal_fp32"] = agree32

    print(f"\n| {args.preset} {args.dtype} | dsv3 tok/s | transformers tok/s | dsv3 / transformers |")
    print("|---|---:|---:|---:|")
    print(f"| prefill {args.prefill_batch}x{args.prefill_len} | {prefill['dsv3_tok_s']:.0f} | "
          f"{prefill['hf_tok_s']:.0f} | {prefill['ratio']:.2f}x |")
    print(f"| decode b=1, {N - 1} steps after a {args.prompt_len}-token prompt (prefill excluded) | "
          f"{decode['dsv3_tok_s']:.1f} | {decode['hf_tok_s']:.1f} | {decode['ratio']:.2f}x |")
    print(f"| generate b=1, {N} tokens end-to-end (prefill included) | {decode['dsv3_e2e_tok_s']:.1f} | "
          f"{decode['hf_e2e_tok_s']:.1f} | {decode['e2e_ratio']:.2f}x |")
    comp = decode.get("compiled")
    if comp:
        print(f"| decode b=1, compiled (`compile_decode()`; warm-up {comp['warmup_s']:.0f} s excluded) | "
              f"{comp['dsv3_tok_s']:.1f} | {decode['hf_tok_s']:.1f} | {comp['ratio']:.2f}x |")
        print(f"| generate b=1 end-to-end, compiled decode | {comp['dsv3_e2e_tok_s']:.1f} | "
              f"{decode['hf_e2e_tok_s']:.1f} | {comp['e2e_ratio']:.2f}x |")
    print(f"\nmedian of {args.repeats} repeats after a warm-up; prefill max |logit diff| = {diff:.3g}")
    ms = lambda ts: "/".join(f"{1e3 * t / (N - 1):.1f}" for t in (min(ts), statistics.median(ts), max(ts)))  # noqa: E731
    print(f"decode ms/token min/median/max: dsv3 {ms(decode['dsv3_decode_times_s'])}, "
          + (f"dsv3 compiled {ms(comp['dsv3_decode_times_s'])}, " if comp else "")
          + f"transformers {ms(decode['hf_decode_times_s'])}")
    if comp:
        print(f"compiled vs eager dsv3 decode: {comp['vs_eager']:.2f}x; greedy tokens equal to eager for the first "
              f"{comp['leading_tokens_equal_eager']}/{N} (summation order differs)")
    print(f"greedy agreement ({args.dtype}): {agree}/{N} leading tokens equal"
          + ("" if agree == N else f" (first difference at new token {agree}; random weights give near-tied "
                                   "logits, so rounding differences flip the argmax)"))
    print(f"greedy agreement (float32, same weights): {agree32}/{N} leading tokens equal")
    print(f"loadavg before: {load_before}   after: {load_after}")

    result = {"preset": args.preset, "dtype": args.dtype, "params_without_mtp": n_params, "machine": machine,
              "loadavg_before": load_before, "loadavg_after": load_after, "repeats": args.repeats,
              "prefill": prefill, "decode": decode}
    return save_result(Path(args.out), result, argv)


if __name__ == "__main__":
    main()
