"""Multi-process training throughput on this machine: `dsv3 train` with 1 process (1 and 2 threads) and with
2 processes of 1 thread each (plain FSDP, and FSDP + expert parallelism 2), through the real launcher
(`dsv3 train --nproc N`, gloo). A CPU benchmark: run it without taskset on an otherwise idle machine.

tokens/s is the median of the trainer's own per-step figure (global batch tokens / step wall time on rank 0)
after --warmup steps. Scaling efficiency = tokens/s of N processes / (N x tokens/s of 1 process, 1 thread);
"vs threads" compares with 1 process using the same number of cores as threads. Same global batch, seed and
data in every run, so the runs do the same work.

Usage: python benchmarks/bench_distributed.py [--preset tiny] [--seq-len 256] [--batch-size 16] [--steps 12]
       python benchmarks/bench_distributed.py --quick      # smoke run, tiny sizes, results not saved
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_inference import loadavg  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def train_run(name: str, nproc: int, threads: int, ep: int, flags: list[str], work: Path, warmup: int) -> dict:
    out = work / name
    cmd = [sys.executable, "-m", "dsv3", "train", "--out", str(out), *flags]
    if nproc > 1:
        cmd += ["--nproc", str(nproc), "--ep", str(ep)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode:
        raise SystemExit(f"{name} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r["tokens_per_s"] for r in recs[warmup:]] or [recs[-1]["tokens_per_s"]]
    return {"run": name, "processes": nproc, "threads_per_process": threads, "ep": ep,
            "tokens_per_s": statistics.median(steady), "steps_timed": len(steady), "wall_s": wall,
            "final_loss": recs[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16, help="global batch (sequences)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, nothing written to results/")
    ap.add_argument("--out", default=None, help="results JSON (default results/distributed.json; none with --quick)")
    args = ap.parse_args()
    if args.quick:
        args.seq_len, args.batch_size, args.steps, args.warmup = 32, 4, 3, 1

    from dsv3 import ModelConfig
    from dsv3.data.tokenizer import train_math_tokenizer

    cfg = ModelConfig.preset(args.preset)
    before = loadavg()
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        work = Path(tmp)
        train_math_tokenizer(vocab_size=min(cfg.vocab_size, 1024), n_problems=4000, out_dir=work / "tok")
        flags = ["--preset", args.preset, "--tokenizer", str(work / "tok"), "--seq-len", str(args.seq_len),
                 "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--eval-every", "0",
                 "--eval-problems", "0", "--save-every", "0", "--dtype", args.dtype, "--no-progress"]
        runs = [train_run("1 process, 1 thread", 1, 1, 1, flags, work, args.warmup),
                train_run("1 process, 2 threads", 1, 2, 1, flags, work, args.warmup),
                train_run("2 processes (FSDP)", 2, 1, 1, flags, work, args.warmup),
                train_run("2 processes (FSDP + EP 2)", 2, 1, 2, flags, work, args.warmup)]
    base = runs[0]["tokens_per_s"]
    threads2 = runs[1]["tokens_per_s"]
    for r in runs:
        cores = r["processes"] * r["threads_per_process"]
        r["scaling_efficiency"] = r["tokens_per_s"] / (cores * base)
        r["vs_one_process_same_cores"] = r["tokens_per_s"] / (threads2 if cores == 2 else base)
    lines = [f"| {args.preset}, {args.dtype}, global batch {args.batch_size} x {args.seq_len} | tokens/s | "
             "scaling efficiency | vs 1 process on the same cores |", "|---|---:|---:|---:|"]
    lines += [f"| {r['run']} | {r['tokens_per_s']:,.0f} | {r['scaling_efficiency']:.0%} | "
              f"{r['vs_one_process_same_cores']:.2f}x |" for r in runs]
    table = "\n".join(lines)
    print(table)
    print(f"load {before} -> {loadavg()}")
    res = {"preset": args.preset, "dtype": args.dtype, "seq_len": args.seq_len, "batch_size": args.batch_size,
           "steps": args.steps, "warmup": args.warmup, "cpus": os.cpu_count(), "runs": runs,
           "loadavg_before": before, "loadavg_after": loadavg(), "markdown": table}
    out = args.out or (None if args.quick else RESULTS / "distributed.json")
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        out.with_suffix(".md").write_text(table + "\n")
        print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
