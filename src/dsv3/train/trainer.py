"""The training loop: next-token CE + MTP + sequence-wise balance loss, auxiliary-loss-free bias updates,
AdamW with warm-up/constant/cosine, bf16 autocast over fp32 master weights, checkpoints and resume.

Started by torchrun (WORLD_SIZE > 1), the same loop runs in every process on its slice of each global batch,
with FSDP2 and expert parallelism applied from outside the model (train/parallel.py). Each rank's loss is its
share of the global micro-batch loss (its summed token losses over the global count of trained tokens; its
sequences' balance term over the process count) and gradients are summed over ranks, so a step computes the
same thing in any number of processes. Rank 0 alone logs, evaluates and writes files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ModelConfig
from ..data.math import WORKED_STYLES
from ..data.packing import document_ids, split_loss_mask
from ..model import DeepseekV3
from ..model.transformer import cross_entropy
from .balance import max_vio, update_biases
from .optim import bias_gamma_at, build_optimizer, lr_at, mtp_lambda_at
from .state import latest_checkpoint, load_training_state, save_checkpoint


class TrainError(ValueError):
    """Bad training input or a run that cannot continue (the message says what to fix)."""


@dataclass
class TrainArgs:
    out: str = "runs/default"
    preset: str | None = "tiny"
    config: str | None = None  # a config.json (overrides --preset)
    init_from: str | None = None  # continue training from a checkpoint directory's weights
    data: list[str] = field(default_factory=list)  # empty: the built-in math corpus
    tokenizer: str | None = None  # an existing Hugging Face tokenizer directory
    seq_len: int = 256
    batch_size: int = 32  # global batch, in sequences
    micro_batch_size: int | None = None  # per forward; batch_size / micro_batch_size accumulation steps
    max_steps: int = 1000
    max_minutes: float | None = None
    fit_budget: bool = False  # with max_minutes: schedules run on steps or time, whichever is further along
    stop_at: int | None = None
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    decay_start: float = 0.6  # fraction of max_steps where the cosine decay begins
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3
    mtp_lambda_late: float = 0.1
    mtp_lambda_switch: float = 0.7
    balance_alpha: float = 1e-4
    bias_gamma: float = 1e-3
    bias_gamma_off: float = 0.95  # fraction of max_steps after which the bias stops moving
    dtype: str = "bfloat16"  # autocast dtype; "float32" for exact runs; "auto": the faster here (train_dtype)
    seed: int = 0
    eval_every: int = 200
    eval_problems: int = 200
    save_every: int = 200
    keep_last: int = 3
    resume: bool = False
    overwrite: bool = False  # a fresh run may replace the metrics and checkpoints of an earlier run in `out`
    max_bad_steps: int = 5
    step_weights: list[float] | None = None  # built-in corpus mix over 1..4-step problems
    loss_on: str = "all"  # "answers": built-in corpus only, no loss on the question tokens (SFT-style)
    worked: str = "columns"  # built-in corpus: how solutions write each equation (dsv3.data.math.equation)
    doc_mask: bool = True  # attention stays inside each packed document (documents start with BOS)
    recompute: bool = False  # activation checkpointing per decoder block (model.forward_train's recompute)
    tensorboard: bool = False
    wandb: bool = False
    progress: bool = True
    device: str = "auto"  # one process: auto = cuda when available, else cpu (torchrun: each rank's own GPU)
    ep: int = 1  # expert-parallel degree (processes sharing one copy of the routed experts); needs torchrun
    dist_timeout: float = 900.0  # seconds a collective may wait for a peer before the job fails
    peak_tflops: float | None = None  # MFU denominator per device (TFLOP/s); None: measured (see PeakMeter)
    optim_state_dtype: str = "float32"  # AdamW's moments; "bfloat16" as in the report (half the optimizer memory)

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise TrainError(msg)

        need(self.seq_len >= 8, f"--seq-len must be >= 8, got {self.seq_len}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        mb = self.micro_batch_size or self.batch_size
        need(1 <= mb <= self.batch_size and self.batch_size % mb == 0,
             f"--micro-batch-size ({mb}) must divide --batch-size ({self.batch_size})")
        need(self.max_steps >= 1, f"--max-steps must be >= 1, got {self.max_steps}")
        need(self.lr > 0 and math.isfinite(self.lr), f"--lr must be positive, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]")
        need(0 <= self.decay_start <= 1, "--decay-start must be in [0, 1]")
        need(self.warmup_steps >= 0, "--warmup-steps must be >= 0")
        need(self.grad_clip > 0, "--grad-clip must be positive")
        need(self.balance_alpha >= 0 and self.bias_gamma >= 0 and self.mtp_lambda >= 0,
             "--balance-alpha, --bias-gamma and --mtp-lambda must be >= 0")
        need(self.dtype in ("bfloat16", "float32", "auto"),
             f"--dtype must be bfloat16, float32 or auto, got {self.dtype}")
        need(self.loss_on in ("all", "answers"), f"--loss-on must be 'all' or 'answers', got {self.loss_on!r}")
        need(self.loss_on == "all" or not self.data, "--loss-on answers applies to the built-in math corpus only")
        need(self.worked in WORKED_STYLES, f"--worked must be one of {WORKED_STYLES}, got {self.worked!r}")
        need(self.stop_at is None or self.stop_at >= 1, "--stop-at must be >= 1")
        need(self.max_minutes is None or self.max_minutes > 0, "--max-minutes must be positive")
        need(not self.fit_budget or self.max_minutes, "--fit-budget needs --max-minutes")
        need(self.ep >= 1, f"--ep must be >= 1, got {self.ep}")
        need(self.device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", self.device) is not None,
             f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        need(not self.device.startswith("cuda") or torch.cuda.is_available(),
             f"--device {self.device}: this machine has no CUDA device (torch {torch.__version__}); use --device cpu")
        need(self.dist_timeout > 0, "--dist-timeout must be positive")
        need(self.optim_state_dtype in ("float32", "bfloat16"),
             f"--optim-state-dtype must be float32 or bfloat16, got {self.optim_state_dtype!r}")
        need(self.peak_tflops is None or (self.peak_tflops > 0 and math.isfinite(self.peak_tflops)),
             f"--peak-tflops must be positive, got {self.peak_tflops}")
        for p in self.data:
            if not p.startswith("hf:") and not Path(p).exists():
                raise TrainError(f"data path not found: {p}")


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse (no mmap for large blocks, no trimming of the heap).

    PyTorch's CPU allocator is malloc, and every activation and gradient of a training step is a fresh large
    block that glibc maps and unmaps again, so each step pays a page fault for every 4 KB it touches first (a
    32 MB multiply ran at ~2 GB/s on the dev VM, against ~15 GB/s in memory already mapped). Reusing the heap:
    +6-23% tokens/s on the `small` training step (pairs of one-thread runs side by side, one per core). The
    price is that memory freed during the run goes back to the OS only at exit. CPU training calls this
    (again is harmless); a no-op (False) where the C library is not glibc.

    It also asks PyTorch's CPU allocator for transparent huge pages on blocks of 2 MB and more
    (THP_MEM_ALLOC_ENABLE, unless set; read at the first such allocation, so call this before): the step's
    row gathers and scatters (experts, attention heads) then miss the TLB far less. 16 x 512 `small` step, five
    pairs of processes alternated on the dev VM: the median step was lower with huge pages in all five (by 1-13%,
    once 52% against a slow-mode run), the fastest step in two of five; this VM's swings blur anything finer.
    """
    import ctypes
    import ctypes.util

    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


@functools.lru_cache(maxsize=None)
def _matmul_peak_flops(dtype: torch.dtype, device: torch.device | str = "cpu") -> float:
    """Measured dense matmul throughput of this device (FLOP/s), the MFU denominator: the best of 10 (with 3,
    a busy 2-core VM read anywhere from 0.53 to 1.45 TFLOP/s in bf16 within one morning)."""
    device = torch.device(device)
    n = 4096 if device.type == "cuda" else 2048
    g = torch.Generator(device=device).manual_seed(0)  # not the global RNG: training's random streams stay put
    a, b = (torch.randn(n, n, dtype=dtype, device=device, generator=g) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(10):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


class PeakMeter:
    """The MFU denominator during training: the best matmul peak read so far. On CPU it is read again (outside the
    timed steps) once `every_s` seconds have passed: a shared machine's reading at start-up can be far below what it
    does minutes later (the 2-core dev VM reads ~0.7 or ~2.1 TFLOP/s in bf16 from one minute to the next), and a
    low denominator would inflate the logged MFU."""

    def __init__(self, dtype: torch.dtype, device: torch.device, scale: int = 1, every_s: float = 60.0,
                 read=None, clock=time.monotonic, given: float | None = None):
        """given: the peak per device in FLOP/s (a datasheet's, or a fast-mode reading), used as it is: nothing is
        read."""
        self.device, self.scale, self.every_s, self.clock, self.given = device, scale, every_s, clock, given
        self.read = read or (lambda: _matmul_peak_flops.__wrapped__(dtype, device))
        if given is not None:
            self.peak = given * scale
        else:
            self.peak = (_matmul_peak_flops(dtype, device) if read is None else self.read()) * scale
        self.due = clock() + every_s

    def refresh(self) -> float:
        """The best peak so far (FLOP/s, times `scale`), after a new reading if one is due (CPU only)."""
        if self.given is None and self.device.type == "cpu" and self.clock() >= self.due:
            self.peak = max(self.peak, self.read() * self.scale)
            self.due = self.clock() + self.every_s
        return self.peak


def train_dtype(dtype: str, device: torch.device) -> str:
    """--dtype as run: "auto" is bfloat16 where bf16 training is the faster, on GPUs and on CPUs where the bf16
    training kernels run (AMX), else float32: ATen's own bf16 CPU matmuls made the demo's steps slower than fp32
    (448 vs 363 ms), the kernels twice as fast (0.18 vs 0.38 s)."""
    if dtype != "auto":
        return dtype
    from .. import kernels

    return "bfloat16" if device.type == "cuda" or (device.type == "cpu" and kernels.amx()) else "float32"


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 x activated matmul parameters (embedding lookup excluded) + causal attention, forward + backward."""
    from ..sizing import count_parameters

    active = count_parameters(cfg)["params_activated_per_token"] - cfg.vocab_size * cfg.hidden_size
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    return 6 * active + attn


class Trainer:
    def __init__(self, args: TrainArgs):
        from .data_setup import build_data  # data pipeline (tokenizer, streams) lives beside the loop

        self.started = time.time()  # --max-minutes counts from here: set-up and evaluation included
        args.validate()
        self.args = args
        self.par = _init_parallel(args)  # None in a lone process: no process group, today's exact code path
        self.world = self.par.world_size if self.par else 1
        self.is_main = self.par is None or self.par.is_main
        self.device = self.par.device if self.par else _single_device(args.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        mb = args.micro_batch_size or args.batch_size
        if mb % self.world:
            raise TrainError(f"the global micro-batch ({mb} sequences: --micro-batch-size, or --batch-size without "
                             f"it) must be divisible by the number of processes ({self.world})")
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(args.seed)
        resume_from = latest_checkpoint(self.out) if args.resume else None
        if not args.resume:
            self._clear_previous_run()
        if args.resume and resume_from is None:
            raise TrainError(f"--resume: no checkpoint under {self.out / 'checkpoints'}")
        if resume_from is not None:
            self.model = DeepseekV3.from_pretrained(resume_from, dtype=torch.float32)
            cfg = self.model.config
        else:
            if args.init_from:
                self.model = DeepseekV3.from_pretrained(args.init_from, dtype=torch.float32)
                cfg = self.model.config
            else:
                cfg = ModelConfig.from_json(args.config) if args.config else ModelConfig.preset(args.preset or "tiny")
                self.model = DeepseekV3(cfg)
                self.model.reset_parameters(seed=args.seed)
        self.cfg = cfg
        self.data = build_data(args, cfg, resume_from or args.init_from, rank=self.par.rank if self.par else 0,
                               world_size=self.world)
        if self.par is not None:
            from .parallel import ParallelError, parallelize

            try:
                self.model = parallelize(self.model, self.par)
            except ParallelError as e:
                raise TrainError(str(e)) from None
        else:
            self.model.to(self.device)
        self.model.train()
        self.opt = build_optimizer(self.model, args.lr, args.weight_decay, state_dtype=args.optim_state_dtype)
        self.step = 0
        self.schedule = 0.0  # where the LR / MTP / bias schedules stand, in steps (see _schedule_position)
        self.dtype = train_dtype(args.dtype, self.device)  # "auto" resolved
        self.autocast_dtype = torch.bfloat16 if self.dtype == "bfloat16" else None
        peak_dtype = torch.bfloat16 if self.autocast_dtype else torch.float32
        self.peak_meter = PeakMeter(peak_dtype, self.device, self.world,
                                    given=args.peak_tflops * 1e12 if args.peak_tflops else None)
        self.flops_tok = flops_per_token(cfg, args.seq_len)
        self.best_eval: dict | None = None
        if resume_from is not None:
            st = load_training_state(resume_from, self.opt, self.model)
            self.step = st["step"]
            self.schedule = float(st.get("schedule", self.step))
            self.data.train.load_state_dict(st["data"])
            if self.is_main:
                self._truncate_metrics(self.step)
        if self.is_main:
            (self.out / "train_args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
        self._loggers = self._external_loggers() if self.is_main else []
        fail = os.environ.get("DSV3_TEST_FAIL")  # "RANK:STEP": that rank raises at that step (tests of failure)
        self._fail_at = tuple(map(int, fail.split(":"))) if fail else None
        self._schedule_start = self.schedule  # --fit-budget: this process spreads the rest over its budget

    # ---- one optimizer step ------------------------------------------------------------------------
    def _mtp_on(self, mtp_lambda: float) -> bool:
        return mtp_lambda > 0 and self.cfg.num_nextn_predict_layers > 0

    @property
    def _doc_bos(self) -> int | None:
        """The BOS id that starts every packed document, when attention is kept inside documents (else None)."""
        return self.data.tokenizer.bos_id if self.args.doc_mask else None

    def _documents(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """Document number of every input token (a new one at each BOS), when attention is kept inside them."""
        return None if self._doc_bos is None else document_ids(inputs, self._doc_bos)

    def _losses(self, batch: torch.Tensor, mtp_lambda: float, global_counts: torch.Tensor | None = None):
        """Main CE, MTP CE (mean over depths), balance term and per-router loads of one micro-batch.

        With `global_counts` (several processes: trained labels of the whole global micro-batch for the main
        head, then per MTP depth) the losses are this rank's shares: summed token losses / global count, and
        the balance term (a mean over sequences) / the process count; summed over ranks they give the mean.
        """
        tokens, trained = split_loss_mask(batch.to(self.device))
        inputs, labels = tokens[:, :-1], tokens[:, 1:].masked_fill(~trained[:, 1:], -100)
        dev = self.device.type
        ctx = (torch.autocast(dev, dtype=self.autocast_dtype) if self.autocast_dtype
               else torch.autocast(dev, enabled=False))
        with ctx:
            out = self.model.forward_train(inputs, mtp=self._mtp_on(mtp_lambda), documents=self._documents(inputs),
                                           recompute=self.args.recompute)
        if global_counts is None:
            main = cross_entropy(out.logits, labels, overwrite_logits=True)
            mtp = torch.zeros((), device=main.device)
            if out.mtp_logits:
                mtp = sum(cross_entropy(lg, labels[:, k:], overwrite_logits=True)
                          for k, lg in enumerate(out.mtp_logits, start=1))
                mtp = mtp / len(out.mtp_logits)
        else:
            main = cross_entropy(out.logits, labels, reduction="sum", overwrite_logits=True) / global_counts[0]
            mtp = torch.zeros((), device=main.device)
            if out.mtp_logits:
                mtp = sum(cross_entropy(lg, labels[:, k:], reduction="sum", overwrite_logits=True) / global_counts[k]
                          for k, lg in enumerate(out.mtp_logits, 1))
                mtp = mtp / len(out.mtp_logits)
        routing = out.routing + out.mtp_routing
        balance = sum((r.balance for r in routing), torch.zeros((), device=main.device))
        if global_counts is not None:
            balance = balance / self.world
        return main, mtp, balance, [r.load for r in routing]

    def _global_label_counts(self, batches: list[torch.Tensor], mtp_lambda: float) -> torch.Tensor:
        """[n_micro, 1 + D]: trained labels of each global micro-batch (main head, then MTP depth k = 1..D)."""
        depths = self.cfg.num_nextn_predict_layers if self._mtp_on(mtp_lambda) else 0
        rows = []
        for b in batches:
            trained = split_loss_mask(b)[1][:, 1:]  # [B, T]: label j is trained
            rows.append([int(trained[:, k:].sum()) for k in range(depths + 1)])
        counts = torch.tensor(rows, dtype=torch.float64, device=self.device)
        return self.par.all_reduce(counts).float()

    def _schedule_position(self) -> float:
        """The step the schedules are evaluated at: the step itself, or with --fit-budget whichever is further
        along of the step and the elapsed share of the time budget (mapped onto the steps still to go), so a
        run the budget stops early has still finished its LR decay, on any machine speed."""
        pos = float(self.step)
        a = self.args
        if a.fit_budget:
            frac = min(1.0, (time.time() - self.started) / (60 * a.max_minutes))
            if self.par is not None:  # every rank must use the same LR
                frac = float(self.par.all_reduce(torch.tensor([frac], device=self.device),
                                                   torch.distributed.ReduceOp.MAX).item())
            pos = max(pos, self._schedule_start + (a.max_steps - self._schedule_start) * frac)
        self.schedule = max(self.schedule, pos)
        return self.schedule

    def train_step(self) -> dict:
        a = self.args
        pos = self._schedule_position()
        lr = lr_at(pos, a.max_steps, a.lr, a.warmup_steps, a.decay_start, a.min_lr_ratio)
        lam = mtp_lambda_at(pos, a.max_steps, a.mtp_lambda, a.mtp_lambda_late, a.mtp_lambda_switch)
        gamma = bias_gamma_at(pos, a.max_steps, a.bias_gamma, a.bias_gamma_off)
        for g in self.opt.param_groups:
            g["lr"] = lr
        mb = a.micro_batch_size or a.batch_size  # global: every rank runs mb / world of its sequences
        n_micro = a.batch_size // mb
        if self._fail_at and self.par and self._fail_at == (self.par.rank, self.step + 1):
            raise RuntimeError(f"DSV3_TEST_FAIL: rank {self.par.rank} fails at step {self.step + 1} on purpose")
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
        loads = None
        self.opt.zero_grad(set_to_none=True)
        batches = [self.data.train.next_batch(mb // self.world) for _ in range(n_micro)]
        counts = self._global_label_counts(batches, lam) if self.par else [None] * n_micro
        shares = torch.zeros(3, device=self.device)  # this rank's shares of the three logged losses
        for batch, cnt in zip(batches, counts):
            main, mtp, balance, micro_loads = self._losses(batch, lam, cnt)
            total = main + lam * mtp + a.balance_alpha * balance
            (total / n_micro).backward()
            if self.par:
                shares += torch.stack([main.detach(), mtp.detach(), a.balance_alpha * balance.detach()]) / n_micro
            else:
                sums["loss"] += main.item() / n_micro
                sums["mtp_loss"] += mtp.item() / n_micro
                sums["balance_loss"] += a.balance_alpha * balance.item() / n_micro
            loads = micro_loads if loads is None else [x + y for x, y in zip(loads, micro_loads)]
        if self.par:
            from .parallel import clip_grad_norm_

            sums = dict(zip(sums, self.par.all_reduce(shares).tolist()))
            # the bias update and MaxVio use the global batch's load: every rank ends with the same biases
            loads = list(self.par.all_reduce(torch.stack(loads)).unbind(0))
            grad_norm = clip_grad_norm_(self.model.parameters(), a.grad_clip, self.par)
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), a.grad_clip))
        ok = math.isfinite(sums["loss"]) and math.isfinite(grad_norm)
        if ok:
            self.opt.step()
            update_biases(self.model, loads, gamma)
        self.opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        tokens = a.batch_size * a.seq_len
        n_main = self.cfg.num_moe_layers
        vio = [max_vio(c) for c in loads[:n_main]] if loads else []
        rec = {"step": self.step + 1, **sums, "lr": lr, "schedule_step": pos, "grad_norm": grad_norm,
               "mtp_lambda": lam, "bias_gamma": gamma, "tokens_per_s": tokens / dt,
               "mfu": tokens * self.flops_tok / dt / self.peak_meter.peak,
               "max_vio": sum(vio) / len(vio) if vio else 0.0, "max_vio_per_layer": vio,
               "expert_load": [(c / c.sum()).tolist() for c in loads[:n_main]] if loads else [],
               "time": time.time()}
        if not ok:
            rec["skipped"] = True
        return rec

    # ---- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss and math accuracy. Several processes: rank 0 evaluates the gathered full model (the
        others get {} and wait for it at their next collective)."""
        from ..eval.math_eval import evaluate_math, heldout_loss

        model = self.model
        if self.par is not None:
            from ..checkpoint.dcp import gather_full_model

            model = gather_full_model(self.model, self.par)
            if model is None:
                return {}
        model.eval()
        try:
            res = {"eval_loss": heldout_loss(model, self.data.heldout_batches, self._doc_bos)}
            if self.data.eval_problems:
                acc = evaluate_math(model, self.data.tokenizer, self.data.eval_problems)
                res["eval_accuracy"] = acc["accuracy"]
                res["eval_by_steps"] = acc["by_steps"]
        finally:
            model.train()
        return res

    # ---- the loop -------------------------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        return {"step": self.step, "schedule": self.schedule, "data": self.data.train.state_dict(),
                "args": dataclasses.asdict(self.args)}

    def save(self) -> Path:
        if self.par is not None:  # collective: every rank writes its shards, rank 0 the rest
            from ..checkpoint.dcp import save_distributed

            return save_distributed(self.out, self.step, self.model, self.opt, self.data.tokenizer,
                                    self._trainer_state(), self.par, self.args.keep_last)
        return save_checkpoint(self.out, self.step, self.model, self.opt, self.data.tokenizer,
                               self._trainer_state(), self.args.keep_last)

    def _clear_previous_run(self) -> None:
        """A fresh run must not mix with an earlier one in the same directory: its metrics would be appended
        to the old ones and `--resume` could pick up an old, later-numbered checkpoint."""
        previous = [p for p in (self.out / "metrics.jsonl", self.out / "checkpoints") if p.exists()]
        if not previous:
            return
        if not self.args.overwrite:
            raise TrainError(f"{self.out} already holds a run ({', '.join(p.name for p in previous)}): pass --resume "
                             "to continue it, --overwrite to start over there, or choose another --out")
        if self.is_main:
            for p in previous:
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def _truncate_metrics(self, step: int) -> None:
        path = self.out / "metrics.jsonl"
        if path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
            path.write_text("".join(ln + "\n" for ln in keep))

    def _external_loggers(self):
        loggers = []
        if self.args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                loggers.append(("tb", SummaryWriter(str(self.out / "tensorboard"))))
            except ImportError:
                print("tensorboard is not installed; --tensorboard ignored")
        if self.args.wandb:
            try:
                import wandb

                loggers.append(("wandb", wandb.init(project="dsv3", dir=str(self.out),
                                                    config=dataclasses.asdict(self.args))))
            except ImportError:
                print("wandb is not installed; --wandb ignored")
        return loggers

    def _log(self, rec: dict) -> None:
        if not self.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        scalars = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}
        for kind, lg in self._loggers:
            if kind == "tb":
                for k, v in scalars.items():
                    lg.add_scalar(k, v, rec["step"])
            else:
                lg.log(scalars, step=rec["step"])

    def run(self) -> dict:
        from tqdm import tqdm

        a = self.args
        end = min(a.max_steps, a.stop_at) if a.stop_at else a.max_steps
        deadline = self.started + 60 * a.max_minutes if a.max_minutes else None
        bad = 0
        interrupted = False
        last_rec: dict = {}

        def on_sigterm(signum, frame):
            raise KeyboardInterrupt

        # Several processes: no checkpoint on SIGTERM (torchrun sends it when a peer failed; the ranks may sit
        # in different collectives), so the default action ends the process at once.
        old = signal.signal(signal.SIGTERM, on_sigterm) if self.par is None else None
        say = tqdm.write if self.is_main else (lambda msg: None)
        bar = tqdm(total=end, initial=self.step, disable=not (a.progress and self.is_main),
                   desc=f"train ({self.dtype})",
                   unit="step", dynamic_ncols=True)
        try:
            while self.step < end:
                self.peak_meter.refresh()  # a new reading now and then, before the step's clock starts
                rec = self.train_step()
                if rec.get("skipped"):
                    bad += 1
                    self._log(rec)
                    if bad >= a.max_bad_steps:
                        raise TrainError(f"{bad} non-finite losses in a row at step {self.step + 1}; stopping. "
                                         f"The last good checkpoint is intact under {self.out / 'checkpoints'}")
                    continue
                bad = 0
                self.step += 1
                out_of_time = deadline is not None and time.time() >= deadline
                if deadline is not None and self.par is not None:
                    out_of_time = self.par.agree(out_of_time)  # every rank stops at the same step
                if a.eval_every and (self.step % a.eval_every == 0 or self.step == end or out_of_time):
                    rec.update(self.evaluate())
                self._log(rec)
                last_rec = rec
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", mtp=f"{rec['mtp_loss']:.3f}",
                                vio=f"{rec['max_vio']:.2f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                if a.save_every and self.step % a.save_every == 0 and self.step < end:
                    self.save()
                if out_of_time:
                    say(f"time budget of {a.max_minutes} min reached at step {self.step}")
                    break
        except KeyboardInterrupt:
            if self.par is not None:
                say(f"interrupted at step {self.step}; resume from the last checkpoint with --resume")
                raise
            interrupted = True
            say(f"interrupted at step {self.step}; saving a checkpoint")
        finally:
            bar.close()
            if old is not None:
                signal.signal(signal.SIGTERM, old)
        ckpt = self.save()
        for kind, lg in self._loggers:
            lg.close() if kind == "tb" else lg.finish()
        if interrupted:
            raise KeyboardInterrupt
        return {"step": self.step, "checkpoint": str(ckpt), "dtype": self.dtype,
                **{k: v for k, v in last_rec.items() if k.startswith("eval") or k == "loss"}}


def _single_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _init_parallel(args: TrainArgs):
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and args.ep == 1:
        return None  # a lone process never imports torch.distributed's machinery
    from .parallel import ParallelError, init_parallel

    try:
        return init_parallel(args.ep, args.dist_timeout)
    except ParallelError as e:
        raise TrainError(str(e)) from None


def train(args: TrainArgs) -> dict:
    try:
        return Trainer(args).run()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
