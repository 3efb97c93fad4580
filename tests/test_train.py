"""Training: bias updates, balance loss, schedules, a short run that learns, bit-identical resume, bad input."""

import json
import math

import pytest
import torch
from hf_oracle import tiny_config
from safetensors.torch import load_file

from dsv3 import DeepseekV3, ModelConfig
from dsv3.model.moe import Experts, MoE, expert_ffn
from dsv3.model.transformer import _BlockwiseCrossEntropy, cross_entropy
from dsv3.train.balance import max_vio, routers, update_biases
from dsv3.train.optim import BF16MomentsAdamW, build_optimizer, lr_at, mtp_lambda_at
from dsv3.train.trainer import PeakMeter, TrainArgs, Trainer, TrainError


def test_bias_update_direction_and_size():
    model = DeepseekV3(tiny_config())
    rs = routers(model)
    E = rs[0].e_score_correction_bias.numel()
    loads = [torch.arange(E, dtype=torch.float32) for _ in rs]  # expert i got i tokens; mean (E-1)/2
    before = [r.e_score_correction_bias.clone() for r in rs]
    update_biases(model, loads, gamma=0.001)
    for r, b0, c in zip(rs, before, loads):
        delta = r.e_score_correction_bias - b0
        expect = 0.001 * torch.sign(c.mean() - c)  # underloaded up, overloaded down, by exactly gamma
        torch.testing.assert_close(delta, expect, atol=1e-9, rtol=0)
    assert all(not p.requires_grad for r in rs for p in r.buffers())
    mtp_bias = rs[-1].e_score_correction_bias.clone()  # MTP off: its router got no load and stays put
    update_biases(model, loads[:-1], gamma=0.001)
    assert torch.equal(rs[-1].e_score_correction_bias, mtp_bias)
    with pytest.raises(ValueError, match="routers"):
        update_biases(model, loads + loads[:1], gamma=0.001)
    assert max_vio(torch.tensor([1.0, 1.0, 4.0, 2.0])) == pytest.approx((4 - 2) / 2)


def test_balance_loss_matches_hand_computation():
    cfg = tiny_config(n_group=1, topk_group=1)
    moe = MoE(cfg)
    B, T, E, k = 2, 3, cfg.n_routed_experts, cfg.num_experts_per_tok
    scores = torch.rand(B * T, E)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(B * T)])
    st = moe.routing_stats(idx, scores, B, T)
    total = 0.0
    for b in range(B):
        for i in range(E):
            f = E / (k * T) * sum(int(i in idx[b * T + t].tolist()) for t in range(T))
            p = sum(float(scores[b * T + t, i] / scores[b * T + t].sum()) for t in range(T)) / T
            total += f * p
    assert float(st.balance) == pytest.approx(total / B, rel=1e-6)
    assert st.load.sum() == B * T * k


def _experts_kernel(monkeypatch, kernel: bool, H: int, inter: int) -> list:
    """Route CPU bf16 experts through the fused kernel (skipped where it cannot run; returns a list that gets one
    entry per kernel call) or the per-expert GEMMs."""
    from dsv3 import kernels

    calls: list = []
    if not kernel:
        monkeypatch.setattr(kernels, "experts_ok", lambda *a: False)
    elif not kernels.experts_ok(torch.zeros(1, H), torch.zeros(1, 2 * inter, H), torch.zeros(1, H, inter)):
        pytest.skip("the experts kernel needs AMX")
    else:
        forward = kernels.experts_forward
        monkeypatch.setattr(kernels, "experts_forward", lambda *a: calls.append(1) or forward(*a))
    return calls


@pytest.mark.parametrize("kernel", [True, False])
def test_cpu_bf16_autocast_experts_match_fp32(monkeypatch, kernel):
    """CPU bf16 training runs the experts as bf16 GEMMs (fused kernel, or oneDNN over zero-padded rows per expert),
    with empty experts, experts longer than a block of rows and, for the kernel, than a weight-gradient chunk:
    outputs and all gradients equal the fp32 grouped GEMM's to bf16 precision, and the weight gradients are fp32
    like the master weights."""
    g = torch.Generator().manual_seed(0)
    E, H, inter = 6, *((64, 32) if kernel else (48, 24))
    calls = _experts_kernel(monkeypatch, kernel, H, inter)
    counts = torch.tensor([10, 0, 600 if kernel else 70, 5, 0, 15])
    gate_up = (torch.randn(E, 2 * inter, H, generator=g) * 0.2).requires_grad_()
    down = (torch.randn(E, H, inter, generator=g) * 0.2).requires_grad_()
    xs = torch.randn(int(counts.sum()), H, generator=g, requires_grad=True)
    dy = torch.randn(xs.shape[0], H, generator=g)
    grads = []
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = expert_ffn(xs, counts, gate_up, down)
        assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
        (y.float() * dy).sum().backward()
        grads.append([y.detach().float()] + [t.grad for t in (xs, gate_up, down)])
        xs.grad = gate_up.grad = down.grad = None
    for ref, got in zip(*grads):
        assert got.dtype == torch.float32
        assert ((got - ref).norm() / ref.norm()).item() < 0.01
    assert len(calls) == kernel


@pytest.mark.parametrize("kernel", [True, False])
def test_cpu_bf16_autocast_routed_experts_match_fp32(monkeypatch, kernel):
    """The same for a whole Experts layer over tokens (k = 3 choices each, experts left idle): the bf16 path
    gathers tokens straight into the per-expert rows and sums each token's k slot gradients in fp32."""
    g = torch.Generator().manual_seed(1)
    E, H, inter, N, k = 8, 96 if kernel else 48, 32, 50, 3  # 96: a partial 64-row weight-gradient tile
    calls = _experts_kernel(monkeypatch, kernel, H, inter)
    experts = Experts(E, H, inter)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(E, 2 * inter, H, generator=g) * 0.2)
        experts.down_proj.copy_(torch.randn(E, H, inter, generator=g) * 0.2)
    x = torch.randn(N, H, generator=g, requires_grad=True)
    idx = torch.stack([torch.randperm(E - 2, generator=g)[:k] for _ in range(N)])  # experts 6 and 7 idle
    weights = torch.rand(N, k, generator=g, requires_grad=True)
    dy = torch.randn(N, H, generator=g)
    grads = []
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = experts(x, weights, idx)
        (y.float() * dy).sum().backward()
        grads.append([y.detach().float()] + [t.grad for t in (x, weights, experts.gate_up_proj, experts.down_proj)])
        x.grad = weights.grad = experts.gate_up_proj.grad = experts.down_proj.grad = None
    for ref, got in zip(*grads):
        assert got.dtype == torch.float32
        assert ((got - ref).norm() / ref.norm()).item() < 0.01
    assert grads[1][3][6:].abs().max() == 0  # idle experts: zero weight gradients
    assert len(calls) == kernel


def test_peak_meter_rereads_on_cpu_and_keeps_the_best():
    """The MFU denominator: read at start-up, read again on CPU once the interval has passed (not before), the best
    reading kept (a slow reading later does not lower it), times the number of processes; on GPUs read once."""
    now, readings = [0.0], iter([1.0, 3.0, 2.0])
    meter = PeakMeter(torch.bfloat16, torch.device("cpu"), scale=2, every_s=60, read=lambda: next(readings),
                      clock=lambda: now[0])
    assert meter.refresh() == 2.0  # the start-up reading, x2 processes; the next is not due
    now[0] = 61
    assert meter.refresh() == 6.0
    now[0] = 200
    assert meter.refresh() == 6.0  # 2.0 read, 3.0 kept
    gpu = PeakMeter(torch.bfloat16, torch.device("cuda"), read=lambda: 5.0, clock=lambda: now[0])
    now[0] = 10_000
    assert gpu.refresh() == 5.0


def test_peak_meter_takes_a_given_peak_without_reading():
    """--peak-tflops: the denominator is the given peak per device times the processes, and nothing is measured."""
    def no_read():
        raise AssertionError("a given peak must not be measured")

    now = [0.0]
    meter = PeakMeter(torch.bfloat16, torch.device("cpu"), scale=4, read=no_read, clock=lambda: now[0], given=2e12)
    now[0] = 1e6
    assert meter.refresh() == 8e12
    with pytest.raises(TrainError, match="--peak-tflops"):
        TrainArgs(peak_tflops=0.0).validate()


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blockwise_cross_entropy_matches_torch(monkeypatch, dtype, kernel):
    """Loss and gradient equal F.cross_entropy on the fp32 logits, ignored labels included: over several blocks,
    and through the CPU kernel (a vocabulary of 50: rows end in a partial vector)."""
    from dsv3 import kernels

    if kernel and not kernels.available():
        pytest.skip("no CPU kernels here")
    monkeypatch.setattr(kernels, "cross_entropy_ok", lambda logits: kernel)
    monkeypatch.setattr(_BlockwiseCrossEntropy, "BLOCK", 3 * 50)  # 3 rows per block: 7 blocks for 20 rows
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 5, 50, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 50, (4, 5), generator=g)
    labels[0, :3] = labels[2, 4] = -100
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    for reduction in ("mean", "sum"):
        ours = cross_entropy(ours_in, labels, reduction=reduction)
        ref = torch.nn.functional.cross_entropy(ref_in.float().reshape(-1, 50), labels.reshape(-1), reduction=reduction)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        (ours * 1.7).backward()
        (ref * 1.7).backward()
        assert ours_in.grad.dtype == dtype
        torch.testing.assert_close(ours_in.grad.float(), ref_in.grad.float(), rtol=1e-6, atol=1e-7)
        assert (ours_in.grad[0, :3] == 0).all() and (ours_in.grad[2, 4] == 0).all()
        ours_in.grad = ref_in.grad = None
    assert cross_entropy(logits, torch.full((4, 5), -100)).isnan()  # nothing to average, as F.cross_entropy


@pytest.mark.parametrize("kernel", [True, False])
def test_cross_entropy_can_write_its_gradient_over_the_logits(monkeypatch, kernel):
    """overwrite_logits: the same loss and bit-identical gradient, written into the logits' own memory (through the
    kernel and blockwise); a second backward through the graph then raises instead of reading the gradient."""
    from dsv3 import kernels

    if kernel and not kernels.available():
        pytest.skip("no CPU kernels here")
    monkeypatch.setattr(kernels, "cross_entropy_ok", lambda logits: kernel)
    monkeypatch.setattr(_BlockwiseCrossEntropy, "BLOCK", 3 * 50)
    g = torch.Generator().manual_seed(0)
    start = (torch.randn(4, 5, 50, generator=g) * 3).bfloat16()
    labels = torch.randint(0, 50, (4, 5), generator=g)
    labels[1, 2] = -100
    results = []
    for overwrite in (False, True):
        x = start.clone().requires_grad_()
        logits = x * 1  # not a leaf, as a model's output
        loss = cross_entropy(logits, labels, overwrite_logits=overwrite)
        (loss * 1.7).backward(retain_graph=True)
        results.append((loss.detach(), x.grad))
        assert torch.equal(logits, x.grad) == overwrite  # the gradient took the logits' place
        assert (logits._version > 0) == overwrite  # and autograd knows they changed
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    with pytest.raises(RuntimeError, match="overwrite_logits"):
        loss.backward()


def test_schedules():
    peak = 1e-3
    assert lr_at(0, 100, peak, 10, 0.5, 0.1) == pytest.approx(peak / 10)
    assert lr_at(9, 100, peak, 10, 0.5, 0.1) == pytest.approx(peak)
    assert lr_at(40, 100, peak, 10, 0.5, 0.1) == pytest.approx(peak)  # constant phase
    assert lr_at(75, 100, peak, 10, 0.5, 0.1) == pytest.approx(peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))))
    assert lr_at(100, 100, peak, 10, 0.5, 0.1) == pytest.approx(0.1 * peak)
    assert mtp_lambda_at(10, 100, 0.3, 0.1, 0.7) == 0.3 and mtp_lambda_at(80, 100, 0.3, 0.1, 0.7) == 0.1


def test_no_weight_decay_on_norms_and_biases():
    model = DeepseekV3(tiny_config())
    opt = build_optimizer(model, 1e-3, 0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in no_decay["params"]) and all(p.dim() >= 2 for p in decay["params"])


def test_bf16_moments_adamw_is_adamw_with_its_moments_rounded_to_bf16():
    """With fp32 moments it is torch's AdamW bit for bit; with bf16 moments each step is that same fp32 step from
    the stored moments, its new moments rounded to bf16 (the report's low-precision optimizer state)."""
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))  # noqa: E731
    ref, fp32, bf16 = make(), make(), make()
    for m in (fp32, bf16):
        m.load_state_dict(ref.state_dict())
    start = [p.detach().clone() for p in ref.parameters()]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt_ref = torch.optim.AdamW(ref.parameters(), foreach=False, **kw)
    opt_fp32 = BF16MomentsAdamW(fp32.parameters(), moment_dtype=torch.float32, **kw)
    opt_bf16 = BF16MomentsAdamW(bf16.parameters(), use_kernel=False, **kw)
    for _ in range(12):
        x = torch.randn(8, 16)
        # the fp32 step from the bf16 state: moments upcast exactly, the same parameters and gradients
        step_fp32 = make()
        step_fp32.load_state_dict(bf16.state_dict())
        opt_step = BF16MomentsAdamW(step_fp32.parameters(), moment_dtype=torch.float32, **kw)
        if opt_bf16.state:
            opt_step.load_state_dict(opt_bf16.state_dict())
        for m, o in ((ref, opt_ref), (fp32, opt_fp32), (bf16, opt_bf16), (step_fp32, opt_step)):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()
        assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), fp32.parameters()))
        assert all(torch.equal(a, b) for a, b in zip(step_fp32.parameters(), bf16.parameters()))
        for p, q in zip(bf16.parameters(), step_fp32.parameters()):
            for key in ("exp_avg", "exp_avg_sq"):
                assert opt_bf16.state[p][key].dtype == torch.bfloat16
                assert torch.equal(opt_bf16.state[p][key], opt_step.state[q][key].to(torch.bfloat16))
    with torch.no_grad():
        drift = max(float((a - b).abs().max()) for a, b in zip(ref.parameters(), bf16.parameters()))
        moved = max(float((a - b).abs().max()) for a, b in zip(ref.parameters(), start))
    assert 0 < drift < 0.05 * moved, (drift, moved)  # rounding, not a different optimizer


def test_bf16_moments_adamw_cpu_kernel_is_its_tensor_op_path():
    """`kernels.adamw_bf16_moments_` (one pass on CPU) against the tensor ops, fed the same gradients: the moments
    bit-identical, the parameters within an ulp or so (ATen's vectorised sqrt is not correctly rounded)."""
    from dsv3 import kernels

    if not kernels.available():
        pytest.skip("no CPU kernels here")
    torch.manual_seed(0)
    start = [torch.randn(1000, 37), torch.randn(5), torch.randn(64, 64)]  # tails of 8 and 5 past the 16-lanes
    ours, ref = [p.clone() for p in start], [p.clone() for p in start]
    opt, opt_ref = (BF16MomentsAdamW(ps, lr=1e-2, weight_decay=0.1, use_kernel=k) for ps, k in ((ours, True),
                                                                                               (ref, False)))
    calls = []
    real = kernels.adamw_bf16_moments_
    kernels_call = lambda *a: (calls.append(1), real(*a))  # noqa: E731
    for _ in range(10):
        for p, q in zip(ours, ref):
            p.grad = torch.randn_like(p) * 10.0 ** torch.randint(-6, 1, ()).item()
            q.grad = p.grad.clone()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kernels, "adamw_bf16_moments_", kernels_call)
            opt.step()
        opt_ref.step()
        for p, q in zip(ours, ref):
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[p][key], opt_ref.state[q][key])
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert len(calls) == 10 * len(start)  # the kernel ran


def _args(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), preset="tiny", seq_len=64, batch_size=4, max_steps=6, lr=3e-3,
                warmup_steps=2, eval_every=0, eval_problems=8, save_every=0, dtype="float32", progress=False, seed=0)
    base.update(kw)
    return TrainArgs(**base)


def _losses(run_dir):
    return [json.loads(ln)["loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: `make demo`'s path on a CPU with AMX
def test_short_run_learns_and_logs_metrics(tmp_path, dtype):
    res = Trainer(_args(tmp_path, max_steps=25, lr=5e-3, eval_every=25, dtype=dtype)).run()
    assert res["dtype"] == dtype
    run = tmp_path / "run"
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 25
    for key in ("step", "loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "max_vio",
                "max_vio_per_layer"):
        assert key in recs[0], key
    assert sum(r["loss"] for r in recs[-3:]) / 3 < recs[0]["loss"] - 1.0  # it learns
    assert "eval_loss" in recs[-1] and "eval_by_steps" in recs[-1] and res["step"] == 25
    # the run directory is a loadable model directory with the trained biases
    model = DeepseekV3.from_pretrained(run)
    assert any(r.e_score_correction_bias.abs().sum() > 0 for r in routers(model))


def test_fit_budget_finishes_the_decay_when_time_runs_out(tmp_path):
    """--fit-budget: a schedule planned for far more steps than the budget allows still ends at the minimum LR."""
    a = _args(tmp_path, max_steps=100_000, max_minutes=0.15, fit_budget=True, eval_problems=0, warmup_steps=0)
    Trainer(a).run()
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 1 < len(recs) < a.max_steps
    pos, lrs = [r["schedule_step"] for r in recs], [r["lr"] for r in recs]
    assert pos == sorted(pos) and pos[-1] > 0.9 * a.max_steps  # driven by the clock, not the step count
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 1.5 * a.min_lr_ratio * a.lr


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_resume_is_bit_identical(tmp_path, state_dtype):
    Trainer(_args(tmp_path / "a", max_steps=6, optim_state_dtype=state_dtype)).run()
    Trainer(_args(tmp_path / "b", max_steps=6, stop_at=3, optim_state_dtype=state_dtype)).run()
    assert len(_losses(tmp_path / "b" / "run")) == 3
    saved = load_file(tmp_path / "b" / "run" / "checkpoints" / "step-000003" / "optimizer.safetensors")
    assert {t.dtype for t in saved.values()} == {getattr(torch, state_dtype)}
    Trainer(_args(tmp_path / "b", max_steps=6, resume=True, optim_state_dtype=state_dtype)).run()
    assert _losses(tmp_path / "a" / "run") == _losses(tmp_path / "b" / "run")
    wa = DeepseekV3.from_pretrained(tmp_path / "a" / "run").state_dict()
    wb = DeepseekV3.from_pretrained(tmp_path / "b" / "run").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: the CPU kernels' autograd functions rerun
def test_recompute_gives_the_same_numbers_from_fewer_saved_tensors(dtype):
    """Activation checkpointing per block: loss, every gradient and the routing statistics bit-identical (the
    backward's rerun adds no statistics), while the blocks' saved tensors are gone (only the heads' remain)."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    model = DeepseekV3(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 65))

    def run(recompute):
        model.zero_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            out = model.forward_train(ids[:, :-1], recompute=recompute)
            loss = (cross_entropy(out.logits, ids[:, 1:]) + cross_entropy(out.mtp_logits[0], ids[:, 2:])
                    + sum(r.balance for r in out.routing + out.mtp_routing))
        loss.backward()
        stats = [(r.load, r.balance.detach()) for r in out.routing + out.mtp_routing]
        return loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}, stats, sum(saved)

    loss, grads, stats, saved = run(False)
    loss_rc, grads_rc, stats_rc, saved_rc = run(True)
    assert torch.equal(loss, loss_rc)
    assert grads.keys() == grads_rc.keys() and all(torch.equal(grads[k], grads_rc[k]) for k in grads)
    assert len(stats) == len(stats_rc) == cfg.num_moe_layers + 1
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(stats, stats_rc))
    assert saved_rc < 0.25 * saved, (saved_rc, saved)


def test_recompute_trains_as_without(tmp_path):
    Trainer(_args(tmp_path / "a", max_steps=4)).run()
    Trainer(_args(tmp_path / "b", max_steps=4, recompute=True)).run()
    assert _losses(tmp_path / "a" / "run") == _losses(tmp_path / "b" / "run")


def test_auto_dtype_is_bf16_where_the_kernels_run(tmp_path, monkeypatch):
    from dsv3 import kernels
    from dsv3.train.trainer import train_dtype

    cpu = torch.device("cpu")
    assert (train_dtype("float32", cpu), train_dtype("bfloat16", cpu)) == ("float32", "bfloat16")
    assert train_dtype("auto", torch.device("cuda")) == "bfloat16"
    for amx, want in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(kernels, "amx", lambda amx=amx: amx)
        assert train_dtype("auto", cpu) == ("bfloat16" if amx else "float32")
        assert Trainer(_args(tmp_path / str(amx), dtype="auto", device="cpu")).autocast_dtype == want


@pytest.mark.parametrize("kw,msg", [
    (dict(data=["/no/such/file.txt"]), "data path not found"),
    (dict(batch_size=4, micro_batch_size=3), "must divide"),
    (dict(lr=-1.0), "--lr"),
    (dict(dtype="float16"), "--dtype"),
    (dict(seq_len=2), "--seq-len"),
    (dict(device="gpu"), "--device must be"),
    (dict(worked="digits"), "--worked"),
    (dict(fit_budget=True), "--fit-budget needs --max-minutes"),
    (dict(optim_state_dtype="float16"), "--optim-state-dtype"),
] + ([] if torch.cuda.is_available() else [(dict(device="cuda"), "no CUDA device")]))
def test_bad_input_fails_before_training(tmp_path, kw, msg):
    with pytest.raises(TrainError, match=msg):
        Trainer(_args(tmp_path, **kw))


def test_empty_dataset_and_vocab_mismatch(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises((TrainError, ValueError), match="(?i)empty|no documents"):
        Trainer(_args(tmp_path, data=[str(empty)]))
    from dsv3.data.tokenizer import train_math_tokenizer

    train_math_tokenizer(vocab_size=512, n_problems=2000, out_dir=tmp_path / "tok")
    cfg = ModelConfig.preset("tiny").replace(vocab_size=300)
    cfg.to_json(tmp_path / "config.json")
    with pytest.raises(TrainError, match="vocab"):
        Trainer(_args(tmp_path, config=str(tmp_path / "config.json"), tokenizer=str(tmp_path / "tok")))


def test_answers_only_loss_masks_exactly_the_prompt():
    from dsv3.data.math import format_example, format_prompt, generate_problems
    from dsv3.data.packing import PackedStream, math_stream, split_loss_mask
    from dsv3.data.tokenizer import train_math_tokenizer

    tok = train_math_tokenizer(vocab_size=400, n_problems=500)
    stream = PackedStream(math_stream(tok, seed=3, answers_only=True), seq_len=400, eos_id=tok.eos_id,
                          bos_id=tok.bos_id)
    tokens, trained = split_loss_mask(stream.next_batch(1))
    p = generate_problems(1, seed=3)[0]
    n_prompt = len(tok.encode(format_prompt(p.question)))
    n_full = len(tok.encode(format_example(p)))
    assert tokens[0, 1:1 + n_full].tolist() == tok.encode(format_example(p))  # after BOS
    assert not trained[0, 1:1 + n_prompt].any() and trained[0, 1 + n_prompt:1 + n_full + 1].all()
    assert trained[0, 0]  # BOS is an ordinary token


def test_document_mask_makes_packed_documents_independent():
    """With the document mask (document numbers from BOS, as the trainer and the held-out loss count them),
    each document of a packed row gets the logits and MTP logits it gets alone; without it, the second one
    sees the first."""
    from dsv3.data.packing import document_ids

    torch.manual_seed(0)
    cfg = tiny_config(bos_token_id=0)
    model = DeepseekV3(cfg).float().eval()
    a, b = [0] + torch.randint(3, 97, (9,)).tolist(), [0] + torch.randint(3, 97, (14,)).tolist()
    row = torch.tensor([a + b])
    documents = document_ids(row, 0)
    assert documents.tolist() == [[1] * len(a) + [2] * len(b)]
    with torch.no_grad():
        packed = model.forward_train(row, documents=documents)
        alone = model.forward_train(torch.tensor([b]))
        crossing = model.forward_train(row)
    tail = slice(len(a), None)
    torch.testing.assert_close(packed.logits[:, tail], alone.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(packed.mtp_logits[0][:, len(a):], alone.mtp_logits[0], atol=1e-4, rtol=0)
    assert (crossing.logits[:, tail] - alone.logits).abs().max() > 1e-3  # without it, b sees a


def test_fresh_run_in_a_used_directory_needs_overwrite(tmp_path):
    Trainer(_args(tmp_path, max_steps=4, save_every=2)).run()
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step-000004").is_dir()
    with pytest.raises(TrainError, match="--overwrite"):
        Trainer(_args(tmp_path, max_steps=3))
    Trainer(_args(tmp_path, max_steps=3, overwrite=True)).run()
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]  # only the new run's records
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003"]  # no stale later step
