"""`dsv3 train`, `dsv3 eval` and `dsv3 plot` subcommands."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

from ..data.math import WORKED_STYLES
from .trainer import TrainArgs, TrainError


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (from scratch, or continue from a checkpoint)")
    defaults = TrainArgs()
    flags = {  # name -> (type, help)
        "out": (str, "run directory (metrics, checkpoints, latest model)"),
        "preset": (str, "model preset (tiny, small, deepseek-v3, deepseek-v2-lite)"),
        "config": (str, "model config.json instead of a preset"),
        "init_from": (str, "start from this checkpoint's weights (continued training)"),
        "tokenizer": (str, "an existing Hugging Face tokenizer directory"),
        "seq_len": (int, "tokens per training sequence"),
        "batch_size": (int, "global batch in sequences (all processes together)"),
        "micro_batch_size": (int, "sequences per forward, all processes together (gradient accumulation)"),
        "max_steps": (int, "optimizer steps the schedule is planned for"),
        "max_minutes": (float, "wall-clock budget including evaluation"),
        "stop_at": (int, "stop after this step with a checkpoint (resume later with --resume)"),
        "lr": (float, "peak learning rate"),
        "min_lr_ratio": (float, "final LR as a fraction of the peak"),
        "warmup_steps": (int, "linear warm-up steps"),
        "decay_start": (float, "fraction of max-steps where cosine decay starts"),
        "weight_decay": (float, "AdamW weight decay (matrices only)"),
        "grad_clip": (float, "gradient-norm clip"),
        "mtp_lambda": (float, "MTP loss weight early in training (0 disables MTP)"),
        "mtp_lambda_late": (float, "MTP loss weight late in training"),
        "mtp_lambda_switch": (float, "fraction of max-steps where the MTP weight drops"),
        "balance_alpha": (float, "sequence-wise balance loss weight (0 disables)"),
        "bias_gamma": (float, "auxiliary-loss-free bias update speed (0 disables)"),
        "bias_gamma_off": (float, "fraction of max-steps after which the bias freezes"),
        "dtype": (str, "bfloat16 (autocast over fp32 master weights), float32 (exact) or auto (bfloat16 on "
                  "GPUs and on CPUs with AMX, where the bf16 kernels run; else float32)"),
        "seed": (int, "random seed"),
        "eval_every": (int, "evaluate every N steps (0: only at the end)"),
        "eval_problems": (int, "held-out math problems per evaluation"),
        "save_every": (int, "checkpoint every N steps"),
        "keep_last": (int, "checkpoints to keep"),
        "max_bad_steps": (int, "non-finite steps in a row before stopping"),
        "device": (str, "one process: auto (cuda when available), cpu, cuda or cuda:N; under torchrun each rank "
                        "uses its own GPU, or the CPU"),
        "ep": (int, "expert parallelism: processes that split each MoE layer's routed experts (divides the "
                    "process count)"),
        "dist_timeout": (float, "seconds a collective waits for a peer before the job fails"),
        "peak_tflops": (float, "the logged MFU's denominator, TFLOP/s per device (a datasheet's dense bf16 or "
                               "fp32 peak); unset: measured with a square matmul now and then"),
        "optim_state_dtype": (str, "AdamW's two moments: float32 (fused AdamW) or bfloat16 (the DeepSeek-V3 "
                                   "report's choice: half the optimizer memory; computed in fp32, stored in bf16)"),
    }
    for name, (typ, hlp) in flags.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=getattr(defaults, name),
                       help=f"{hlp} (default: {getattr(defaults, name)})")
    p.add_argument("--data", nargs="+", default=[], help="text/JSONL files or hf:NAME[:split] (default: built-in math)")
    p.add_argument("--step-weights", type=float, nargs=4, default=None,
                   help="built-in corpus mix of 1..4-step problems")
    p.add_argument("--loss-on", choices=["all", "answers"], default="all",
                   help="built-in corpus: train on every token, or only on the worked solutions (SFT-style)")
    p.add_argument("--worked", choices=list(WORKED_STYLES), default="columns",
                   help="built-in corpus: write each equation with its digit-by-digit work (columns) or as a bare "
                        "equation (plain)")
    p.add_argument("--no-doc-mask", dest="doc_mask", action="store_false",
                   help="let attention cross document boundaries in packed rows (default: each document, which "
                        "starts with BOS, attends only to itself, as prompts do at inference)")
    p.add_argument("--fit-budget", action="store_true",
                   help="with --max-minutes: run the LR, MTP and bias schedules on the steps or the elapsed share of "
                        "the time budget, whichever is further along, so a run the budget stops early has still "
                        "finished its LR decay (the steps then depend on the machine's speed)")
    p.add_argument("--recompute", action="store_true",
                   help="activation checkpointing per decoder block: each block keeps only its inputs and runs "
                        "again in the backward (~1/3 more compute, a fraction of the activation memory; "
                        "`dsv3 plan --recompute` shows the saving)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh run in an --out that holds an earlier one (its metrics and checkpoints are "
                        "deleted; without this flag that is an error)")
    p.add_argument("--tensorboard", action="store_true")
    p.add_argument("--wandb", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--nproc", type=int, default=None,
                   help="run on N processes of this machine (re-launches itself through torch.distributed.run; "
                        "for several machines use torchrun directly, see the README)")
    p.set_defaults(func=cmd_train, _parser=p)


def train_argv(args) -> list[str]:
    """The command line that parses back to `args` (train flags only, without --nproc)."""
    argv: list[str] = []
    for action in args._parser._actions:
        if not action.option_strings or action.dest in ("help", "nproc"):
            continue
        value, flag = getattr(args, action.dest), action.option_strings[0]
        if value == action.default:
            continue
        if action.nargs == 0:  # store_true / store_false
            argv += [flag] if value == action.const else []
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def _launch(args) -> int:
    """`dsv3 train --nproc N ...` = `python -m torch.distributed.run --standalone --nproc_per_node N -m dsv3 train
    ...`: torchrun starts the workers, and ends them all when one fails."""
    if args.nproc < 1:
        print(f"dsv3 train: error: --nproc must be >= 1, got {args.nproc}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "dsv3", "train", *train_argv(args)]
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the workers got the same Ctrl-C; let torchrun shut them down
        return proc.wait()


def cmd_train(args) -> int:
    from .trainer import train

    if args.nproc is not None:
        return _launch(args)
    fields = {f.name for f in dataclasses.fields(TrainArgs)}
    targs = TrainArgs(**{k: v for k, v in vars(args).items() if k in fields})
    rank = int(os.environ.get("RANK", "0"))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        from torch.distributed.elastic.multiprocessing.errors import record

        train = record(train)  # torchrun's failure summary then shows this rank's traceback
    where = f" (rank {rank})" if distributed else ""
    try:
        res = train(targs)
    except TrainError as e:
        print(f"dsv3 train: error{where}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        saved = "resume from the last checkpoint" if distributed else "checkpoint saved, continue"
        print(f"dsv3 train: interrupted; {saved} with --resume", file=sys.stderr)
        return 130
    if rank == 0:
        print(json.dumps(res))
    return 0


def cmd_eval(args) -> int:
    import torch

    from ..data.math import generate_problems, load_gsm8k_jsonl
    from ..data.tokenizer import Tokenizer
    from ..eval.math_eval import evaluate_math
    from ..model import DeepseekV3

    torch.manual_seed(0)
    model = DeepseekV3.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    tok = Tokenizer.load(args.checkpoint)
    if args.data:
        problems = load_gsm8k_jsonl(args.data)
    else:
        problems = generate_problems(args.n, seed=args.seed, split="test")
    res = evaluate_math(model, tok, problems, return_completions=args.show > 0)
    shown = []
    if args.show:
        shown = [(p, c, ok) for p, c, ok in zip(problems, res.pop("completions"), res.pop("correct"))][: args.show]
    if args.json:
        print(json.dumps(res))
    else:
        print(f"math accuracy on {res['n']} held-out problems: {res['accuracy']:.1%}")
        print("| steps | accuracy |\n|---|---|")
        for k, v in res["by_steps"].items():
            print(f"| {k} | {v:.1%} |")
    for p, c, ok in shown:
        print(f"\n[{'correct' if ok else 'wrong'}] Question: {p.question}\nModel: {c.strip()}\n(answer {p.answer})")
    return 0


def cmd_plot(args) -> int:
    from ..eval.plots import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def register(sub) -> None:
    _add_train(sub)
    ev = sub.add_parser("eval", help="evaluate a checkpoint")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--task", choices=["math"], default="math")
    ev.add_argument("--data", help="a GSM8K-format JSONL file (default: the built-in held-out split)")
    ev.add_argument("--n", type=int, default=400, help="held-out problems to generate")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--show", type=int, default=0, help="print this many problems with the model's solutions")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)
    pl = sub.add_parser("plot", help="write PNG plots of a run directory")
    pl.add_argument("run_dir")
    pl.set_defaults(func=cmd_plot)
