"""Multi-process training on CPU (gloo, processes started here through torch.distributed.run): 2 processes with
expert parallelism reproduce 1 process, checkpoints resume across process counts, a failing rank ends the job
quickly; the launcher's command line; the memory planner against a hand computation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from hf_oracle import tiny_config

from dsv3 import DeepseekV3, ModelConfig
from dsv3.train.trainer import TrainArgs, Trainer, TrainError

STEPS = 4
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A small math tokenizer, trained once: every process loads it instead of training its own."""
    from dsv3.data.tokenizer import train_math_tokenizer

    path = tmp_path_factory.mktemp("tok")
    train_math_tokenizer(vocab_size=512, n_problems=2000, out_dir=path)
    return path


def _settings(tok_dir) -> dict:
    return dict(preset="tiny", tokenizer=str(tok_dir), seq_len=32, batch_size=4, max_steps=STEPS, lr=3e-3,
                warmup_steps=2, eval_every=STEPS, eval_problems=2, save_every=2, dtype="float32", seed=0)


def _flags(settings: dict) -> list[str]:
    return [x for k, v in settings.items() for x in ("--" + k.replace("_", "-"), str(v))] + ["--no-progress"]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _run(cmd: list[str], timeout: float = 240, **env) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return res


def _metrics(run) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_losses(got: list[dict], want: list[dict], rel: float = 1e-4) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    assert "eval_loss" in got[-1] and "eval_accuracy" in got[-1]
    for g, w in zip(got, want):
        for key in ("loss", "mtp_loss", "balance_loss"):
            assert abs(g[key] - w[key]) <= rel * abs(w[key]), (g["step"], key, g[key], w[key])
        if "eval_loss" in w:  # several processes: rank 0 evaluates the gathered model
            assert abs(g["eval_loss"] - w["eval_loss"]) <= rel * w["eval_loss"]
        # the global loads drive the bias updates
        torch.testing.assert_close(torch.tensor(g["expert_load"]), torch.tensor(w["expert_load"]), atol=1e-6, rtol=0)


def _assert_same_weights(a, b) -> None:
    wa = DeepseekV3.from_pretrained(a).state_dict()
    wb = DeepseekV3.from_pretrained(b).state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        if k.endswith("e_score_correction_bias"):  # sign updates from identical global loads: exactly equal
            assert torch.equal(wa[k], wb[k]), k
        else:  # Adam's first steps are sign-like, so compare whole tensors, not single near-zero-gradient entries
            rel = float((wa[k] - wb[k]).norm() / wa[k].norm().clamp_min(1e-12))
            assert rel < 5e-4, (k, rel)
    assert any(wa[k].abs().sum() > 0 for k in wa if k.endswith("e_score_correction_bias"))


def _keep_until(run, step: int, dest):
    """A copy of run directory `run` as it was after `step` (later checkpoints dropped)."""
    shutil.copytree(run, dest)
    for ck in (dest / "checkpoints").glob("step-*"):
        if int(ck.name.split("-")[1]) > step:
            shutil.rmtree(ck)
    return dest


@pytest.fixture(scope="module")
def one_process(tok_dir, tmp_path_factory):
    """The reference: one process, no process group, checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("one") / "run"
    Trainer(TrainArgs(out=str(run), progress=False, **_settings(tok_dir))).run()
    return run


@pytest.fixture(scope="module")
def two_processes_ep2(tok_dir, tmp_path_factory):
    """`dsv3 train --nproc 2 --ep 2`, with a global micro-batch of 2 (one sequence per process per forward)."""
    run = tmp_path_factory.mktemp("two") / "run"
    flags = _flags({**_settings(tok_dir), "micro_batch_size": 2})
    _run([sys.executable, "-m", "dsv3", "train", "--out", str(run), "--nproc", "2", "--ep", "2", *flags])
    return run


@pytest.mark.slow
def test_expert_parallel_dispatch_matches_plain_experts():
    """All-to-all dispatch and combine, the grouped GEMM on the received rows and autograd through both, on
    2 processes; one step routes nothing to rank 1's experts."""
    worker = os.path.join(os.path.dirname(__file__), "ep_worker.py")
    res = _run([*TORCHRUN, worker], timeout=120)
    assert res.stdout.count("ep_worker ok") == 2


@pytest.mark.slow
def test_two_processes_with_expert_parallelism_match_one_process(one_process, two_processes_ep2):
    _assert_same_losses(_metrics(two_processes_ep2), _metrics(one_process))  # rank 0 alone logged
    _assert_same_weights(one_process, two_processes_ep2)
    ck = two_processes_ep2 / "checkpoints" / "step-000004"
    state = json.loads((ck / "trainer_state.json").read_text())
    assert (state["format"], state["world_size"], state["ep"]) == ("dcp", 2, 2)
    assert (ck / "dcp" / ".metadata").exists() and (ck / "model.safetensors").exists()


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_in_one(one_process, two_processes_ep2, tok_dir, tmp_path):
    run = _keep_until(two_processes_ep2, 2, tmp_path / "run")
    Trainer(TrainArgs(out=str(run), progress=False, resume=True, **_settings(tok_dir))).run()
    _assert_same_losses(_metrics(run), _metrics(one_process))
    _assert_same_weights(one_process, run)


@pytest.mark.slow
def test_checkpoint_of_one_process_resumes_in_two(one_process, tok_dir, tmp_path):
    """Through torchrun itself, and plain FSDP (ep 1: every expert sharded over both processes)."""
    run = _keep_until(one_process, 2, tmp_path / "run")
    _run([*TORCHRUN, "-m", "dsv3", "train", "--out", str(run), "--resume", *_flags(_settings(tok_dir))])
    _assert_same_losses(_metrics(run), _metrics(one_process))
    _assert_same_weights(one_process, run)


@pytest.mark.slow
def test_bf16_optimizer_state_and_recompute_on_two_processes_match_one(tok_dir, tmp_path):
    """--optim-state-dtype bfloat16 steps FSDP2's sharded parameters (DTensor) and the experts split by --ep as
    one process steps whole ones, and its checkpoint (sharded) resumes in one process; --recompute reruns the
    blocks, their all-to-all exchanges included, in the backward of both processes (the reference has neither)."""
    settings = {**_settings(tok_dir), "optim_state_dtype": "bfloat16"}
    one = tmp_path / "one"
    Trainer(TrainArgs(out=str(one), progress=False, **settings)).run()
    two = tmp_path / "two"
    _run([sys.executable, "-m", "dsv3", "train", "--out", str(two), "--nproc", "2", "--ep", "2", "--recompute",
          *_flags({**settings, "micro_batch_size": 2})])
    assert json.loads((two / "train_args.json").read_text())["recompute"]
    _assert_same_losses(_metrics(two), _metrics(one))
    _assert_same_weights(one, two)
    run = _keep_until(two, 2, tmp_path / "resumed")
    Trainer(TrainArgs(out=str(run), progress=False, resume=True, **settings)).run()
    _assert_same_losses(_metrics(run), _metrics(one))
    _assert_same_weights(one, run)


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_quickly_with_its_error(tok_dir, tmp_path):
    t0 = time.monotonic()
    cmd = [*TORCHRUN, "-m", "dsv3", "train", "--out", str(tmp_path / "run"), "--ep", "2",
           *_flags({**_settings(tok_dir), "max_steps": 50})]
    res = subprocess.run(cmd, env=_env(DSV3_TEST_FAIL="1:2"), capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert res.returncode != 0
    assert elapsed < 60, elapsed
    assert "rank 1 fails at step 2 on purpose" in res.stdout + res.stderr
    assert not (tmp_path / "run" / "checkpoints" / "step-000050").exists()


def test_expert_parallelism_needs_processes(tmp_path, tok_dir):
    with pytest.raises(TrainError, match="--ep 2 needs at least 2 processes"):
        Trainer(TrainArgs(out=str(tmp_path / "run"), progress=False, ep=2, **_settings(tok_dir)))


def test_nproc_relaunch_command_line_round_trips():
    from dsv3.cli import build_parser
    from dsv3.train.cli import train_argv

    argv = ["train", "--out", "r", "--seq-len", "64", "--batch-size", "8", "--data", "a.txt", "b.txt",
            "--resume", "--no-progress", "--ep", "2", "--step-weights", "0.5", "0.5", "0", "0", "--nproc", "4"]
    args = build_parser().parse_args(argv)
    again = build_parser().parse_args(["train", *train_argv(args)])
    drop = {"nproc", "_parser", "func"}
    assert {k: v for k, v in vars(again).items() if k not in drop} == {
        k: v for k, v in vars(args).items() if k not in drop}
    assert "--nproc" not in train_argv(args) and again.nproc is None


# ---- memory planner ------------------------------------------------------------------------------------
def test_plan_matches_a_hand_computation():
    from dsv3.plan import PlanError, plan

    cfg = tiny_config()  # H 64, 3 layers (first dense), 8 experts of width 32, 1 shared, 1 MTP module, V 97
    H, V, F, I, E, k, nh = 64, 97, 96, 32, 8, 3, 4
    qk, v, q_lora, kv_lora, rope = 16 + 8, 12, 32, 24, 8
    attn = H * q_lora + q_lora + q_lora * nh * qk + H * (kv_lora + rope) + kv_lora + kv_lora * nh * (16 + v) \
        + nh * v * H
    norms = 2 * H
    dense = attn + norms + 3 * H * F
    moe_rest = attn + norms + E * H + 3 * H * I  # router + shared expert
    experts = E * 3 * H * I
    mtp_rest = moe_rest + 2 * H + 2 * H * H + H  # enorm, hnorm, eh_proj, shared_head.norm
    root = 2 * V * H + H  # embedding, untied head, final norm
    total = root + dense + 2 * (moe_rest + experts) + mtp_rest + experts
    assert total == 259_168

    p = plan(cfg, gpus=4, ep=2, micro_batch=2, seq_len=16)
    assert (p.dp, p.experts_per_gpu, p.params_total) == (2, 4, total)
    assert p.parameters == p.gradients == 4 * total / 4 and p.optimizer == 8 * total / 4
    assert plan(cfg, gpus=4, ep=2, micro_batch=2, seq_len=16, optim_state_dtype="bfloat16").optimizer == 4 * total / 4
    assert p.fsdp_working_set == 8 * root + 12 * (mtp_rest + experts / 2)  # the MTP block is the largest
    # activations per token: 4 blocks (3 + MTP) of fp32 norms and bf16 attention, 1 dense MLP, 3 MoE (2 + MTP)
    a_norms, a_attn = 4 * H, H + 2 * q_lora + 2 * kv_lora + 4 * nh * qk + nh * v + (nh + 1) * rope
    a_moe, a_router = H + k * (3 * H + 4 * I) + 4 * I, 2 * E
    per_token = (4 * (4 * a_norms + 2 * a_attn) + 2 * (H + 4 * F) + 3 * (2 * a_moe + 4 * a_router)
                 + 4 * 4 * H + 2 * 2 * H + 2 * (2 * V + 4 * (2 * H + V)))
    assert p.activations == per_token * 2 * 16
    # --recompute: every block (3 + MTP) keeps its two inputs (8 H bytes), one block is rebuilt at a time
    block = 4 * a_norms + 2 * a_attn
    rebuilt = max(block + 2 * (H + 4 * F), block + 2 * a_moe + 4 * a_router)
    per_token = 4 * 8 * H + rebuilt + 4 * 4 * H + 2 * 2 * H + 2 * (2 * V + 4 * (2 * H + V))
    assert plan(cfg, gpus=4, ep=2, micro_batch=2, seq_len=16, recompute=True).activations == per_token * 2 * 16
    assert p.total == p.parameters + p.gradients + p.optimizer + p.fsdp_working_set + p.activations
    assert plan(cfg, gpus=4, ep=4).fsdp_working_set < p.fsdp_working_set  # more EP, smaller gathered experts
    for kw, msg in [(dict(gpus=4, ep=3), "must divide --gpus"), (dict(gpus=6, ep=3), "routed experts"),
                    (dict(gpus=4, ep=2, dp=4), "every GPU")]:
        with pytest.raises(PlanError, match=msg):
            plan(cfg, **kw)


def test_plan_activation_estimate_is_close_to_autograd(monkeypatch):
    """The activation table against the bytes autograd really saves (fp32 model, so every value is 4 bytes).
    The plan is for GPUs, where RMSNorm runs on ATen: the CPU's fused norm (which saves less) is switched off."""
    from dsv3 import kernels
    from dsv3.model.transformer import cross_entropy
    from dsv3.plan import activation_values_per_token

    monkeypatch.setattr(kernels, "rms_norm_ok", lambda x, w: False)

    cfg = ModelConfig.preset("tiny")
    model = DeepseekV3(cfg).train()
    B, T = 2, 64
    x = torch.randint(0, cfg.vocab_size, (B, T + 1))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.forward_train(x[:, :-1])
        cross_entropy(out.logits, x[:, 1:]) + cross_entropy(out.mtp_logits[0], x[:, 2:])
    measured = sum(saved.values()) / 4 / (B * T)  # values per token
    a = activation_values_per_token(cfg)
    n_mtp, n_moe = cfg.num_nextn_predict_layers, cfg.num_moe_layers
    estimate = ((cfg.num_hidden_layers + n_mtp) * (a["norms_fp32"] + a["attention"])
                + (cfg.num_hidden_layers - n_moe) * a["dense_mlp"] + (n_moe + n_mtp) * (a["moe"] + a["router_fp32"])
                + n_mtp * (a["mtp_combine_fp32"] + a["mtp_combine"]) + (1 + n_mtp) * a["head_fp32"])
    assert estimate == pytest.approx(measured, rel=0.05)


def test_plan_cli(capsys):
    from dsv3.cli import main

    assert main(["plan", "--preset", "deepseek-v3", "--gpus", "256", "--ep", "64", "--seq-len", "1024"]) == 0
    text = capsys.readouterr().out
    assert "dp 4 x ep 64" in text and "4 routed experts per GPU" in text and "| total |" in text
    assert main(["plan", "--preset", "deepseek-v3", "--gpus", "64", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["ep"] for r in rows] == [1, 2, 4, 8, 16, 32, 64]
    assert all(r["params_total"] == rows[0]["params_total"] for r in rows)
    assert rows[-1]["fsdp_working_set"] < rows[0]["fsdp_working_set"]
