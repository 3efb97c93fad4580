"""The serving engine (dsv3.infer.Engine) on this machine: against transformers, against the memory-bandwidth
roofline, batched against one by one, and MTP speculative against plain decoding.

Measures in one run (CPU, medians over --repeats after a warm-up, the compared sides interleaved so both see
the same background load):
  (1) batch-1 greedy decode tokens/s of the engine (plain decoding: random weights make MTP drafts useless)
      against transformers' generate, same random weights of the --preset in --dtype, prefill excluded on both
      sides (engine: from the end of the step that prefilled; transformers: from its first logits-processor
      call). The engine's rate is also given as a fraction of the roofline: the bandwidth this machine
      measures (the larger of a big tensor sum and a big tensor copy, read + write) over the bytes a decode
      step must read (the active weights: attention, dense or shared + top-k routed experts, router, norms,
      head, the cache's fp32 copies of W_UK / W_UV; plus the latent cache rows of the average context).
      The same for an engine with compile=True (torch.compile'd decode step; its warm-up, the first request,
      is timed separately and excluded; --no-compile skips it).
      The roofline again on --roofline-preset (default `medium`: 2.7 GB of bf16 weights, ~0.42 GB read per
      token), eager and compiled engines: the small preset's 0.24 GB of weights can stay in a large L3 cache
      between tokens and its step is mostly fixed per-operation cost, so it says little about how close the
      engine comes to the memory bandwidth; `medium` streams its weights from memory. The bandwidth is
      measured before and after its decoding, and the larger of the two is used.
  (2) aggregate throughput: --concurrency requests (random prompts of --prompt-len, --new-tokens each) added
      at once, against the same requests served one after another; end-to-end time, prefill included.
  (3) speculative decoding on --checkpoint (default runs/demo, `make demo`): held-out math prompts from the
      built-in corpus, greedy until EOS or --spec-max-tokens, batch 1, one prompt after another; tokens/s
      with MTP drafting (k = 1, and k = --extra-drafts when > 1) against plain decoding, the acceptance rate,
      and whether the greedy outputs are identical.

Usage: python benchmarks/bench_engine.py [--preset small] [--dtype bfloat16] [--repeats 3] [--threads N]
       python benchmarks/bench_engine.py --quick     # smoke run: tiny sizes, numbers meaningless
Writes benchmarks/results/engine.json (--quick: a file in the temp directory unless --out is given).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_inference import build_models, cast, cpu_model, hf_generate_timed, leading_equal, loadavg, save_result

from dsv3 import DeepseekV3, ModelConfig
from dsv3.infer import Engine, SamplingParams
from dsv3.model.moe import MoE

ROOT = Path(__file__).resolve().parent


# ---- the machine's bandwidth and the decode step's bytes ------------------------------------------------
def measure_bandwidth(mbytes: int, repeats: int) -> dict:
    """GB/s of a sum over a large fp32 tensor (read) and of a copy (read + write), best of `repeats`."""
    n = mbytes * 2**20 // 4
    src, dst = torch.ones(n), torch.empty(n)
    src.sum(), dst.copy_(src)  # touch the pages first
    reads, copies = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        src.sum()
        t1 = time.perf_counter()
        dst.copy_(src)
        t2 = time.perf_counter()
        reads.append(4 * n / (t1 - t0) / 1e9)
        copies.append(8 * n / (t2 - t1) / 1e9)
    return {"sum_read_gb_s": max(reads), "copy_read_write_gb_s": max(copies), "mbytes": mbytes,
            "roofline_gb_s": max(max(reads), max(copies))}


def decode_bytes(engine: Engine, context: float) -> dict:
    """Bytes one batch-1 decode step reads: weights that take part in it, and the latent cache rows."""
    model = engine.model
    cfg = model.config

    def size(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    weights = size(model.lm_head.weight) + size(model.model.norm.weight)
    weights += model.model.embed_tokens.weight[0].numel() * model.model.embed_tokens.weight.element_size()
    for i, layer in enumerate(model.layers):
        for name, p in layer.named_parameters():
            if name.startswith("self_attn.kv_b_proj"):
                continue  # decoding reads the cache's copies of W_UK / W_UV instead (below)
            if name.startswith("mlp.experts."):
                continue  # only the routed experts' slices (below)
            weights += size(p)
        w_uk, w_uv = engine.cache.absorbed[i]
        weights += size(w_uk) + size(w_uv)
        if isinstance(layer.mlp, MoE):
            ex = layer.mlp.experts
            weights += cfg.num_experts_per_tok * (size(ex.gate_up_proj[0]) + size(ex.down_proj[0]))
            bias = layer.mlp.gate.e_score_correction_bias  # a buffer, not a parameter
            weights += 0 if bias is None else size(bias)
    cache = int(context * cfg.num_hidden_layers * engine.cache.width * engine.cache.pools[0].element_size())
    return {"weights": weights, "cache": cache, "total": weights + cache, "context": context}


# ---- timed runs ---------------------------------------------------------------------------------------
def engine_decode_timed(engine: Engine, prompt: list[int], n: int) -> tuple[list[int], float]:
    """Greedy batch-1 generation of n tokens; the time of the n-1 decode steps after the prefill step."""
    engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    out = engine.step()  # prefill + the first token
    t0 = time.perf_counter()
    while engine.has_unfinished():
        out = engine.step() or out
    t1 = time.perf_counter()
    return out[0].outputs[0].token_ids, t1 - t0


def serve_timed(engine: Engine, prompts: list[list[int]], params: SamplingParams, together: bool):
    """(token count, seconds) for all prompts: added at once, or each after the previous one finished."""
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params) if together else [engine.generate([p], params)[0] for p in prompts]
    dt = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs), dt, [o.outputs[0].token_ids for o in outs]


def median(xs):
    return statistics.median(xs)


# ---- the three measurements ---------------------------------------------------------------------------
def bench_decode(args, model, hf, engine, g, compiled: Engine | None = None) -> dict:
    V = model.config.vocab_size
    N = args.new_tokens
    prompt = torch.randint(2, V, (args.prompt_len,), generator=g).tolist()
    with torch.inference_mode():
        engine_decode_timed(engine, prompt, N)  # warm-up
        hf_generate_timed(hf, prompt, N)
        if compiled is not None:
            t0 = time.perf_counter()
            engine_decode_timed(compiled, prompt, N)  # warm-up: torch.compile of the decode step
            warmup = time.perf_counter() - t0
            print(f"compiled engine warm-up (torch.compile): {warmup:.1f} s")
        ours, theirs, comp = [], [], []
        for _ in range(args.repeats):
            ours.append(engine_decode_timed(engine, prompt, N))
            if compiled is not None:
                comp.append(engine_decode_timed(compiled, prompt, N))
            theirs.append(hf_generate_timed(hf, prompt, N))
    t_ours, t_hf = median(r[1] for r in ours), median(r[2] for r in theirs)
    bw = measure_bandwidth(args.bandwidth_mb, 5)
    nbytes = decode_bytes(engine, args.prompt_len + N / 2)
    roofline = bw["roofline_gb_s"] * 1e9 / nbytes["total"]
    tok_s = (N - 1) / t_ours
    res = {"prompt_len": args.prompt_len, "new_tokens": N, "decode_steps_timed": N - 1,
           "engine_tok_s": tok_s, "hf_tok_s": (N - 1) / t_hf, "ratio": t_hf / t_ours,
           "engine_times_s": [r[1] for r in ours], "hf_decode_times_s": [r[2] for r in theirs],
           "leading_tokens_equal": leading_equal(ours[0][0], theirs[0][0]),
           "bandwidth": bw, "bytes_per_token": nbytes, "roofline_tok_s": roofline,
           "roofline_fraction": tok_s / roofline}
    if compiled is not None:
        t_comp = median(r[1] for r in comp)
        res["compiled"] = {"engine_tok_s": (N - 1) / t_comp, "ratio": t_hf / t_comp, "vs_eager": t_ours / t_comp,
                           "roofline_fraction": (N - 1) / t_comp / roofline, "warmup_s": warmup,
                           "engine_times_s": [r[1] for r in comp],
                           "leading_tokens_equal_eager": leading_equal(comp[0][0], ours[0][0])}
    return res


def bench_roofline(args, dtype: torch.dtype) -> dict:
    """Batch-1 decode of --roofline-preset (random weights) against the memory-bandwidth roofline."""
    cfg = ModelConfig.preset(args.roofline_preset)
    torch.manual_seed(args.seed)
    model = cast(DeepseekV3(cfg).eval(), dtype)
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(2, cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
    N = args.new_tokens
    bw_before = measure_bandwidth(args.bandwidth_mb, 5)
    res: dict = {"preset": args.roofline_preset, "params": sum(p.numel() for p in model.parameters()),
                 "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    for name, compile in (("eager", False), ("compiled", True)):
        if compile and not args.compile:
            continue
        engine = Engine(model, speculative=False, max_batch=1, compile=compile)
        with torch.inference_mode():
            t0 = time.perf_counter()
            engine_decode_timed(engine, prompt, N)  # warm-up (compiled: torch.compile)
            warmup = time.perf_counter() - t0
            times = [engine_decode_timed(engine, prompt, N)[1] for _ in range(args.repeats)]
        res[name] = {"engine_tok_s": (N - 1) / median(times), "engine_times_s": times, "warmup_s": warmup}
    bw_after = measure_bandwidth(args.bandwidth_mb, 5)
    bw = max(bw_before, bw_after, key=lambda b: b["roofline_gb_s"])
    res["bandwidth"], res["bandwidth_before_after_gb_s"] = bw, [bw_before["roofline_gb_s"], bw_after["roofline_gb_s"]]
    res["bytes_per_token"] = decode_bytes(engine, args.prompt_len + N / 2)
    res["roofline_tok_s"] = bw["roofline_gb_s"] * 1e9 / res["bytes_per_token"]["total"]
    for name in ("eager", "compiled"):
        if name in res:
            res[name]["roofline_fraction"] = res[name]["engine_tok_s"] / res["roofline_tok_s"]
    return res


def bench_concurrency(args, engine, g) -> dict:
    V = engine.config.vocab_size
    prompts = [torch.randint(2, V, (args.prompt_len,), generator=g).tolist() for _ in range(args.concurrency)]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    serve_timed(engine, prompts[:2], params, True)  # warm-up
    together, alone = [], []
    for _ in range(args.repeats):
        together.append(serve_timed(engine, prompts, params, True))
        alone.append(serve_timed(engine, prompts, params, False))
    n_tok = together[0][0]
    t_together, t_alone = median(r[1] for r in together), median(r[1] for r in alone)
    return {"requests": args.concurrency, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "tokens": n_tok, "together_tok_s": n_tok / t_together, "one_by_one_tok_s": n_tok / t_alone,
            "ratio": t_alone / t_together, "together_times_s": [r[1] for r in together],
            "one_by_one_times_s": [r[1] for r in alone], "same_tokens": together[0][2] == alone[0][2]}


def bench_speculative(args) -> dict | None:
    ckpt = Path(args.checkpoint)
    if not (ckpt / "config.json").is_file():
        print(f"(3) skipped: no checkpoint at {ckpt} (run `make demo`, or pass --checkpoint)")
        return None
    from dsv3.data.math import format_prompt, generate_problems

    kinds = {"plain": dict(speculative=False), "mtp k=1": dict(speculative=True, num_draft_tokens=1)}
    if args.extra_drafts > 1:
        kinds[f"mtp k={args.extra_drafts}"] = dict(speculative=True, num_draft_tokens=args.extra_drafts)
    if args.spec_compile:  # the same kinds again with torch.compile'd decode steps (each its own model copy)
        kinds.update({f"{name} compiled": dict(kw, compile=True) for name, kw in kinds.items()})
    engines = {name: Engine.from_checkpoint(ckpt, max_batch=1, **kw) for name, kw in kinds.items()}
    tok = engines["plain"].tokenizer
    if tok is None:
        raise SystemExit(f"{ckpt} has no tokenizer.json: speculative benchmark needs text prompts")
    problems = generate_problems(args.spec_prompts, seed=args.seed, split="test")
    prompts = [tok.encode(format_prompt(p.question), add_bos=True) for p in problems]
    params = SamplingParams(max_tokens=args.spec_max_tokens, temperature=0.0)
    for e in engines.values():
        serve_timed(e, prompts[:1], params, False)  # warm-up
    runs: dict[str, list] = {name: [] for name in engines}
    stats0 = {name: dict(e.stats) for name, e in engines.items()}
    for _ in range(args.repeats):
        for name, e in engines.items():  # interleaved
            runs[name].append(serve_timed(e, prompts, params, False))
    res: dict = {"checkpoint": str(ckpt), "prompts": len(prompts), "max_tokens": args.spec_max_tokens}
    for name, e in engines.items():
        base = median(r[1] for r in runs["plain compiled" if name.endswith("compiled") else "plain"])
        st = e.stats
        drafted = st["spec_drafted"] - stats0[name]["spec_drafted"]
        accepted = st["spec_accepted"] - stats0[name]["spec_accepted"]
        t = median(r[1] for r in runs[name])
        res[name] = {"tok_s": runs[name][0][0] / t, "ratio": base / t, "times_s": [r[1] for r in runs[name]],
                     "tokens": runs[name][0][0], "acceptance_rate": accepted / drafted if drafted else None,
                     "tokens_per_step": None if not drafted else 1 + accepted / (drafted / e.k),
                     "same_tokens_as_plain": runs[name][0][2] == runs["plain"][0][2]}
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint", default="runs/demo")
    ap.add_argument("--spec-prompts", type=int, default=16)
    ap.add_argument("--spec-max-tokens", type=int, default=128)
    ap.add_argument("--extra-drafts", type=int, default=2, help="also time MTP with this many drafts (<= 1: no)")
    ap.add_argument("--spec-compile", action="store_true",
                    help="(3) also with compiled engines (compile=True), plain and speculative, each against compiled "
                         "plain decoding")
    ap.add_argument("--bandwidth-mb", type=int, default=1024, help="size of the bandwidth test tensor")
    ap.add_argument("--roofline-preset", default="medium",
                    help="preset whose batch-1 decode is also measured against the roofline ('none': skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    ap.add_argument("--quick", action="store_true", help="smoke run with tiny sizes (numbers meaningless)")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="skip the compiled engine in (1) (torch.compile warm-up takes a minute or more)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.new_tokens, args.prompt_len, args.concurrency, args.repeats = "tiny", 6, 8, 3, 1
        args.spec_prompts, args.spec_max_tokens, args.bandwidth_mb, args.roofline_preset = 2, 12, 64, "tiny"
    if args.repeats < 1 or args.new_tokens < 2 or args.concurrency < 1:
        ap.error("--repeats and --concurrency must be >= 1 and --new-tokens >= 2")
    out = Path(args.out or (Path(tempfile.gettempdir()) / "engine_quick.json" if args.quick
                            else ROOT / "results" / "engine.json"))

    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    load_before = loadavg()
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "transformers": transformers.__version__,
               "python": platform.python_version()}
    print(f"machine: {machine['cpu']}, {machine['cores']} cores (torch threads {machine['torch_threads']}), "
          f"torch {machine['torch']}, transformers {machine['transformers']}; loadavg {load_before}")
    g = torch.Generator().manual_seed(args.seed + 1)
    cfg = ModelConfig.preset(args.preset)
    model32, hf32 = build_models(cfg, args.seed)
    dtype = getattr(torch, args.dtype)
    model, hf = cast(model32, dtype), cast(hf32, dtype)
    del model32, hf32
    engine = Engine(model, speculative=False, max_batch=max(16, args.concurrency))
    compiled = (Engine(copy.deepcopy(model), speculative=False, max_batch=1, compile=True) if args.compile
                else None)

    decode = bench_decode(args, model, hf, engine, g, compiled)
    del compiled
    del hf
    conc = bench_concurrency(args, engine, g)
    del engine, model
    roof = None if args.roofline_preset == "none" else bench_roofline(args, dtype)
    spec = bench_speculative(args)
    load_after = loadavg()

    print(f"\n| engine, {args.preset} {args.dtype} unless noted | engine | reference | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| (1) decode b=1, tok/s, vs transformers generate ({args.new_tokens - 1} steps after a "
          f"{args.prompt_len}-token prompt) | {decode['engine_tok_s']:.1f} | {decode['hf_tok_s']:.1f} | "
          f"{decode['ratio']:.2f}x |")
    print(f"| (1) decode b=1, tok/s, vs roofline ({decode['bytes_per_token']['total'] / 1e6:.1f} MB/token at "
          f"{decode['bandwidth']['roofline_gb_s']:.1f} GB/s) | {decode['engine_tok_s']:.1f} | "
          f"{decode['roofline_tok_s']:.1f} | {100 * decode['roofline_fraction']:.0f}% |")
    comp = decode.get("compiled")
    if comp:
        print(f"| (1) compiled engine (compile=True; warm-up {comp['warmup_s']:.0f} s excluded) vs transformers, "
              f"tok/s | {comp['engine_tok_s']:.1f} | {decode['hf_tok_s']:.1f} | {comp['ratio']:.2f}x |")
        print(f"| (1) compiled engine vs roofline | {comp['engine_tok_s']:.1f} | {decode['roofline_tok_s']:.1f} | "
              f"{100 * comp['roofline_fraction']:.0f}% |")
    if roof:
        for name in ("eager", "compiled"):
            if name in roof:
                mb, gb_s = roof["bytes_per_token"]["total"] / 1e6, roof["bandwidth"]["roofline_gb_s"]
                print(f"| (1) {name} engine on {roof['preset']} ({roof['params'] / 1e9:.2f}B parameters) vs roofline "
                      f"({mb:.1f} MB/token at {gb_s:.1f} GB/s) | {roof[name]['engine_tok_s']:.1f} | "
                      f"{roof['roofline_tok_s']:.1f} | "
                      f"{100 * roof[name]['roofline_fraction']:.0f}% |")
    print(f"| (2) {conc['requests']} concurrent requests vs one by one, tok/s ({conc['new_tokens']} tokens "
          f"each) | {conc['together_tok_s']:.1f} | {conc['one_by_one_tok_s']:.1f} | {conc['ratio']:.2f}x |")
    if spec:
        for name in [k for k in spec if k.startswith("mtp")]:
            s = spec[name]
            print(f"| (3) {name} vs plain on {Path(spec['checkpoint']).name}, tok/s (acceptance "
                  f"{100 * s['acceptance_rate']:.0f}%, {s['tokens_per_step']:.2f} tokens/step) | {s['tok_s']:.1f} | "
                  f"{spec['plain compiled' if name.endswith('compiled') else 'plain']['tok_s']:.1f} | "
                  f"{s['ratio']:.2f}x |")
    print(f"\nmedians of {args.repeats} repeats after a warm-up; greedy tokens equal to transformers for the "
          f"first {decode['leading_tokens_equal']}/{args.new_tokens} (random {args.dtype} weights give near-tied "
          f"logits); batched == one by one: {conc['same_tokens']}"
          + (f"; speculative == plain: {all(spec[k]['same_tokens_as_plain'] for k in spec if k.startswith('mtp'))}"
             if spec else ""))
    print(f"loadavg before: {load_before}   after: {load_after}")

    result = {"preset": args.preset, "dtype": args.dtype, "machine": machine, "loadavg_before": load_before,
              "loadavg_after": load_after, "repeats": args.repeats, "quick": args.quick, "decode": decode,
              "concurrency": conc, "speculative": spec, "roofline": roof}
    return save_result(out, result, argv)


if __name__ == "__main__":
    main()
