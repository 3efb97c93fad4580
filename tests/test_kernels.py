"""The CPU kernels (dsv3.kernels): exact against fp32 products of the same bf16 numbers, and the model paths that
use them (Linear, the experts) equal to the ATen paths they replace."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dsv3 import DeepseekV3, ModelConfig, kernels
from dsv3.model.layers import Linear, fused_linear
from dsv3.model.transformer import cross_entropy

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="CPU without AVX512-BF16 or no C++ compiler")


def reference(x, w):
    """The product in fp32 (bf16 x bf16 products are exact in fp32), rounded to bf16 once."""
    return F.linear(x.float(), w.float()).bfloat16()


def assert_close_bf16(y, ref):
    """fp32 sums in another order may round to the neighbouring bf16 value: at most one bf16 ulp apart."""
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    torch.testing.assert_close(y.float(), ref.float(), rtol=2 ** -7, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("N,K", [(4, 32), (7, 100), (160, 512), (513, 256)])  # ragged K and N edges included
def test_gemv_matches_fp32_product(M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = torch.randn(N, K, generator=g).bfloat16()
    assert_close_bf16(kernels.gemv(x, w), reference(x, w))


@needs_kernels
def test_grouped_gemv_matches_per_group_products():
    g = torch.Generator().manual_seed(0)
    E, N, K = 6, 40, 96
    counts = [3, 0, 1, 7, 0, 2]  # empty groups and groups longer than the 4-row tile
    offs = torch.tensor(counts).cumsum(0)
    x = torch.randn(sum(counts), K, generator=g).bfloat16()
    w = torch.randn(E, N, K, generator=g).bfloat16()
    ref = torch.cat([reference(xe, w[e]) for e, xe in enumerate(x.split(counts))])
    assert_close_bf16(kernels.grouped_gemv(x, w, offs), ref)
    assert_close_bf16(kernels.grouped_gemv(x, w, offs.to(torch.int32)), ref)  # grouped_mm's offset dtype
    with pytest.raises(RuntimeError, match="offs must end at M"):
        kernels.grouped_gemv(x, w, offs - 1)
    with pytest.raises(RuntimeError, match="bf16 only"):
        kernels.gemv(x.float(), w[0].float())


@needs_kernels
def test_linear_uses_kernel_for_few_rows_only(monkeypatch):
    lin = Linear(64, 48, bias=True).bfloat16()
    calls = []
    monkeypatch.setattr(kernels, "gemv", lambda x, w: calls.append(x.shape) or torch.ops.dsv3.gemv(x, w))
    x = torch.randn(2, 1, 64).bfloat16()
    with torch.no_grad():
        y = lin(x)
        lin(torch.randn(8, 64).bfloat16())  # more than 4 rows: F.linear
        lin.float()(torch.randn(1, 64))  # fp32: F.linear
    assert calls == [(2, 64)]
    assert_close_bf16(y, (reference(x.view(2, 64), lin.weight.bfloat16()).float() + lin.bias).bfloat16().view(2, 1, 48))
    lin.bfloat16()
    lin(x).sum().backward()  # with gradients: F.linear, which has a backward
    assert calls == [(2, 64)] and lin.weight.grad is not None


@needs_kernels
@pytest.mark.parametrize("T,N,K", [(1000, 1056, 96), (517, 160, 64), (31, 32, 32), (1, 64, 32), (600, 32, 1088)])
def test_linear_weight_grad_is_the_fp32_product(T, N, K):
    """dy^T x in fp32 for any number of rows (tails padded inside), one block of dW rows split over the tokens
    (partial sums added) or several blocks: the exact products of the bf16 numbers summed in fp32."""
    if not kernels.linear_weight_grad_ok(torch.empty(0), torch.empty(N, K)):
        pytest.skip("no AMX")
    g = torch.Generator().manual_seed(T + N + K)
    dy = torch.randn(T, N, generator=g).bfloat16()
    x = torch.randn(T, 2 * K, generator=g).bfloat16()[:, ::2].contiguous()
    x_strided = torch.randn(T, K + 32, generator=g).bfloat16()[:, :K]  # rows not adjacent
    for xx in (x, x_strided):
        out = kernels.linear_weight_grad(dy, xx)
        exact = dy.double().t() @ xx.double()
        assert out.dtype == torch.float32 and out.shape == (N, K)
        # T fp32 roundings of partial sums at most
        assert (out.double() - exact).abs().max() <= T * 2 ** -24 * (dy.double().abs().t() @ xx.double().abs()).max()
    with pytest.raises(RuntimeError, match="multiples of 32"):
        kernels.linear_weight_grad(dy[:, :16].contiguous(), x)


def _train_once(module, x, dy):
    """module(x) under CPU bf16 autocast, backward with dy as the output's gradient: (output, x's gradient, the
    parameters' gradients)."""
    module.zero_grad()
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, [p.grad.clone() for p in module.parameters()]


@needs_kernels
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_linear_takes_the_weight_gradient_from_the_kernel(bias, dtype, monkeypatch):
    """Linear under CPU bf16 autocast with gradients: output and input gradient bit-identical to autocast's
    F.linear; the weight (and bias) gradient is the fp32 sum itself, where autocast's is that sum rounded to bf16."""
    lin = Linear(96, 64, bias=bias)
    if not kernels.linear_weight_grad_ok(torch.empty(0), lin.weight):
        pytest.skip("no AMX")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 70, 96, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(3, 70, 64, generator=g).bfloat16()
    calls = []
    real = kernels.linear_weight_grad
    monkeypatch.setattr(kernels, "linear_weight_grad", lambda *a: calls.append(1) or real(*a))

    def run():
        lin.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lin(x)
        y.backward(dy)
        return y.detach(), x.grad, lin.weight.grad, lin.bias.grad if bias else None

    y, dx, dw, db = run()
    assert calls == [1]
    monkeypatch.setattr(kernels, "linear_weight_grad_ok", lambda *a: False)
    y_ref, dx_ref, dw_ref, db_ref = run()
    assert calls == [1] and y.dtype == torch.bfloat16 and dx.dtype == dtype
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    exact = dy.reshape(-1, 64).double().t() @ x.detach().bfloat16().reshape(-1, 96).double()
    assert torch.equal(dw.bfloat16(), dw_ref.bfloat16())  # autocast's dW is ours rounded to bf16
    assert (dw.double() - exact).abs().max() < 1e-4 < (dw_ref.double() - exact).abs().max()
    if bias:
        torch.testing.assert_close(db, dy.float().sum((0, 1)), rtol=1e-6, atol=1e-5)
    monkeypatch.undo()
    xt = torch.randn(96, 20, generator=g).to(dtype).t()  # rows not contiguous: copied for the kernel
    lin.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin(xt).float().sum().backward()
    torch.testing.assert_close(lin.weight.grad, xt.bfloat16().float().sum(0).expand(64, 96), rtol=1e-6, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("bias", [False, True])
def test_fused_linears_are_the_layers_as_one_product(bias):
    """fused_linear (MLA's q_a and kv_a) in CPU bf16 training: each output bit-identical to its layer's own product
    under autocast; the input gradient is the two layers' products summed in fp32 and rounded once (each layer's
    rounded to bf16 and summed by autograd, otherwise); the weight and bias gradients as each layer's."""
    torch.manual_seed(0)
    layers = [Linear(64, 96, bias=bias), Linear(64, 32, bias=bias)]
    if not kernels.linear_weight_grad_ok(torch.empty(0), layers[0].weight):
        pytest.skip("no AMX")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 64, generator=g).bfloat16().requires_grad_()
    dys = [torch.randn(3, 50, n, generator=g).bfloat16() for n in (96, 32)]

    def run(fused):
        for layer in layers:
            layer.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ys = fused_linear(x, *layers) if fused else [layer(x) for layer in layers]
        torch.autograd.backward(ys, dys)
        grads = [t.grad.clone() for layer in layers for t in layer.parameters()]
        return [y.detach() for y in ys], x.grad, grads

    ys, dx, grads = run(True)
    ys_ref, dx_ref, grads_ref = run(False)
    assert all(torch.equal(a, b) for a, b in zip(ys, ys_ref))
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref))
    exact = sum(dy.double() @ layer.weight.detach().bfloat16().double() for dy, layer in zip(dys, layers))
    # the fp32 sum's own error, relative to the terms' magnitudes: it dominates where the terms cancel
    terms = sum(dy.double().abs() @ layer.weight.detach().bfloat16().double().abs() for dy, layer in zip(dys, layers))
    err, err_ref = (dx.double() - exact).abs(), (dx_ref.double() - exact).abs()
    assert dx.dtype == torch.bfloat16 and (err <= exact.abs() * 2**-8 + terms * 2**-20).all()  # within the one rounding
    assert err.mean() < 0.8 * err_ref.mean()  # two roundings there


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_latents_are_fused_linear_and_the_norms(dtype, monkeypatch):
    """MLA's q_a / kv_a product and the norms after it in CPU bf16 training (`_TrainLatents`): outputs, input gradient
    and every weight gradient bit-identical to `fused_linear` and the RMSNorm modules, whose gradients autograd
    concatenates (here written into one buffer). kv_lora_rank 48: c_kv's gradient columns start mid-line."""
    from dsv3.model import attention

    cfg = ModelConfig(hidden_size=64, num_attention_heads=2, q_lora_rank=64, kv_lora_rank=48, qk_nope_head_dim=16,
                      qk_rope_head_dim=16, v_head_dim=16)
    torch.manual_seed(0)
    mla = attention.MLA(cfg)
    for norm in (mla.q_a_layernorm, mla.kv_a_layernorm):
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 64, generator=g).to(dtype).requires_grad_()
    dys = [torch.randn(3, 50, n, generator=g).bfloat16() for n in (2 * 32, 48, 16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if not attention._TrainLatents.runs(x, (mla.q_a_proj, mla.kv_a_proj_with_mqa), (mla.q_a_layernorm,)):
            pytest.skip("no AMX")
    calls = []
    fused = attention._TrainLatents.apply
    monkeypatch.setattr(attention._TrainLatents, "apply", lambda *a: calls.append(1) or fused(*a))

    def run():
        mla.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q, c_kv, k_pe = mla._project(x)
        ys = [q.reshape(3, 50, -1), c_kv, k_pe]
        torch.autograd.backward(ys, dys)
        grads = [p.grad.clone() for p in mla.parameters() if p.grad is not None]
        return [y.detach().clone() for y in ys], x.grad, grads

    ys, dx, grads = run()
    assert calls == [1]
    monkeypatch.setattr(attention._TrainLatents, "runs", lambda *a: False)
    ys_ref, dx_ref, grads_ref = run()
    assert calls == [1] and len(grads) == len(grads_ref) == 5  # q_a, its norm, q_b, kv_a, its norm
    assert all(torch.equal(a, b) for a, b in zip(ys, ys_ref))
    assert dx.dtype == dtype and torch.equal(dx, dx_ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_mlp_runs_gate_and_up_as_one_product(dtype, monkeypatch):
    """MLP under CPU bf16 autocast training: gate and up in one product, SwiGLU through the kernels. Output and
    weight gradients bit-identical to autocast's silu and mul between the three Linears; the input gradient sums
    gate's and up's parts in fp32 (autograd adds two bf16 products), so within a bf16 rounding of it."""
    from dsv3.model import layers

    mlp = layers.MLP(64, 96)
    if not kernels.linear_weight_grad_ok(torch.empty(0), mlp.gate_proj.weight):
        pytest.skip("no AMX")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 64, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(3, 50, 64, generator=g).bfloat16()
    calls = []
    fused = layers._TrainMLP.apply
    monkeypatch.setattr(layers._TrainMLP, "apply", lambda *a: calls.append(1) or fused(*a))

    y, dx, grads = _train_once(mlp, x, dy)
    assert calls == [1]
    monkeypatch.setattr(layers._TrainMLP, "apply",
                        lambda x, *w: mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))
    y_ref, dx_ref, grads_ref = _train_once(mlp, x, dy)
    assert torch.equal(y, y_ref) and all(torch.equal(a, b) for a, b in zip(grads, grads_ref))
    assert dx.dtype == dtype
    torch.testing.assert_close(dx.float(), dx_ref.float(), rtol=2 ** -7, atol=2 ** -7 * dx_ref.abs().max().item())


@needs_kernels
def test_experts_kernel_adds_the_shared_experts_itself(monkeypatch):
    """CPU bf16 training: the experts kernel adds the shared experts' output to the routed sum in its own pass and
    their input gradient to the k slots' sum. Output and every weight gradient bit-identical to the shared MLP run
    beside it (autograd's add and sum); the input gradient within a bf16 rounding of that (the fp32 sum rounded
    once, where autograd rounds after each add)."""
    from dsv3.model import layers
    from dsv3.model.moe import Experts, MoE

    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    moe = next(m for m in DeepseekV3(cfg).modules() if isinstance(m, MoE))
    if not kernels.experts_ok(torch.zeros(1, cfg.hidden_size), moe.experts.gate_up_proj, moe.experts.down_proj):
        pytest.skip("the experts kernel needs AMX")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 150, cfg.hidden_size, generator=g).bfloat16().requires_grad_()
    dy = torch.randn(2, 150, cfg.hidden_size, generator=g)
    mlp_calls = []
    real = layers._TrainMLP.apply
    monkeypatch.setattr(layers._TrainMLP, "apply", lambda *a: mlp_calls.append(1) or real(*a))

    y, dx, grads = _train_once(moe, x, dy)
    assert mlp_calls == []  # inside the experts' call
    monkeypatch.setattr(Experts, "folds", lambda *a: False)
    y_ref, dx_ref, grads_ref = _train_once(moe, x, dy)
    assert mlp_calls == [1]
    assert y.dtype == torch.float32 and torch.equal(y, y_ref)
    assert len(grads) == 6 and all(torch.equal(a, b) for a, b in zip(grads, grads_ref))
    assert dx.dtype == torch.bfloat16 and not torch.equal(dx, dx_ref)
    torch.testing.assert_close(dx.float(), dx_ref.float(), rtol=2 ** -7, atol=2 ** -8 * dx_ref.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("E,M", [(32, 32768), (7, 1), (256, 1000)])
def test_sort_by_expert_is_a_stable_argsort(E, M):
    """The counting sort of the experts' slots gives exactly argsort(stable=True) and the count per expert (skewed
    indices, so that most experts repeat and some get none); an index out of range is an error, not a wild write."""
    g = torch.Generator().manual_seed(E)
    idx = (torch.rand(M, generator=g) ** 3 * E).long()
    order, counts = kernels.sort_by_expert(idx, E)
    assert torch.equal(order, idx.argsort(stable=True))
    assert torch.equal(counts, torch.bincount(idx, minlength=E))
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.sort_by_expert(torch.tensor([0, E]), E)


@needs_kernels
@pytest.mark.parametrize("E,k,n_group,topk_group,sigmoid", [(32, 4, 4, 2, True), (256, 8, 8, 4, True),
                                                             (64, 6, 8, 3, False), (64, 6, 1, 1, True)])
def test_route_topk_chooses_the_experts_aten_does(E, k, n_group, topk_group, sigmoid):
    """The routing kernel against the router's ATen ops: the same experts for every token (order aside); with
    scores rounded to bf16, where groups and experts often tie, a valid choice for every token (its groups among
    the best, its experts the best of their groups) that differs only where ATen broke a tie otherwise; best
    first; distinct indices in range even on NaN scores."""
    from dsv3.model.moe import Router

    cfg = ModelConfig(n_routed_experts=E, num_experts_per_tok=k, n_group=n_group, topk_group=topk_group,
                      scoring_func="sigmoid" if sigmoid else "softmax")
    router = Router(cfg)
    g = torch.Generator().manual_seed(E + k)
    logits = torch.randn(700, E, generator=g)
    fp32, rounded = logits.sigmoid() + torch.randn(E, generator=g) * 0.1, logits.bfloat16().sigmoid().float()
    for scores in (fp32, rounded):
        ours = kernels.route_topk(scores, k, n_group, topk_group, sigmoid)
        ref = router._choose(scores, sigmoid)
        assert ours.dtype == torch.int64 and ours.shape == (700, k)
        chosen = scores.gather(1, ours)
        assert (chosen.diff(dim=1) <= 0).all()  # best first
        grouped = scores.view(700, n_group, -1)
        group_score = grouped.topk(2, -1).values.sum(-1) if sigmoid and n_group > 1 else grouped.amax(-1)
        cut = group_score.topk(topk_group, -1).values[:, -1:]  # the last kept group's score
        assert (group_score.gather(1, ours // (E // n_group)) >= cut).all()
        must = (group_score > cut).repeat_interleave(E // n_group, 1).scatter(1, ours, False)  # unchosen, kept
        assert (scores.masked_fill(~must, -1).amax(1) <= chosen[:, -1]).all()
        differ = (ours.sort(1).values != ref.sort(1).values).any(1)
        tie = ((group_score == cut).sum(1) > 1) | ((scores == chosen[:, -1:]).sum(1) > 1)
        assert not differ.any() if scores is fp32 else not (differ & ~tie).any()  # (3-13% of bf16 rows differ)
    rounded[:5] = float("nan")
    nan = kernels.route_topk(rounded, k, n_group, topk_group, sigmoid)
    assert ((nan >= 0) & (nan < E)).all() and (nan.sort(1).values.diff(dim=1) > 0).all()


@needs_kernels
@pytest.mark.parametrize("N", [1, 3, 16])
def test_experts_with_kernel_equal_aten_path(N, monkeypatch):
    """The decode-time experts (sorted rows through grouped_gemv) against the same sorted path on ATen's
    grouped GEMM, both in bf16: the same numbers up to one bf16 rounding per product."""
    cfg = ModelConfig.preset("tiny")
    model = DeepseekV3(cfg).bfloat16().eval()
    experts = next(m for m in model.modules() if m.__class__.__name__ == "Experts")
    g = torch.Generator().manual_seed(N)
    x = torch.randn(N, cfg.hidden_size, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:cfg.num_experts_per_tok] for _ in range(N)])
    w = torch.rand(N, cfg.num_experts_per_tok, generator=g)
    calls = []
    real = kernels.grouped_gemv
    monkeypatch.setattr(kernels, "grouped_gemv", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fast = experts(x, w, idx)
        assert len(calls) == 2  # gate_up and down
        monkeypatch.setitem(kernels._state, "ok", False)
        slow = experts(x, w, idx)  # N == 1: the per-expert mv path; else ATen's grouped GEMM
    assert len(calls) == 2
    torch.testing.assert_close(fast.float(), slow.float(), rtol=0.02, atol=0.02 * slow.float().abs().max().item())


def test_build_failure_falls_back_with_a_warning(tmp_path):
    """No usable compiler: one warning, available() is False, and the model still runs (on ATen)."""
    code = ("import warnings, torch; from dsv3 import kernels, DeepseekV3, ModelConfig\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always'); ok = kernels.available()\n"
            "m = DeepseekV3(ModelConfig.preset('tiny')).bfloat16().eval()\n"
            "with torch.no_grad(): m(torch.tensor([[1, 2, 3]]))\n"
            "print(ok, len(w), kernels._cpu_has_avx512_bf16())")
    env = {**os.environ, "CXX": "/bin/false", "DSV3_KERNEL_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    ok, n_warnings, has_cpu = out.stdout.split()
    assert ok == "False"
    assert n_warnings == ("1" if has_cpu == "True" else "0")


_heads = torch.zeros(1, 1, 1, 16, dtype=torch.bfloat16)
needs_amx = pytest.mark.skipif(
    not kernels.attention_ok(_heads, _heads),
    reason="CPU without AMX (oneDNN brgemm), AVX512-BF16 or a C++ compiler")


def _attention_case(B, H, T, Dq, Dv, seed):
    """bf16 q, k, v laid out as the model makes them ([B, T, H, D] transposed), and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, d, generator=g).transpose(1, 2).bfloat16() for d in (Dq, Dq, Dv))
    return q, k, v, torch.randn(B, H, T, Dv, generator=g).bfloat16()


def _errors(results, q, k, v, go, mask, scale):
    """Largest error of each of out, dq, dk, dv against SDPA's fp32 results on the same bf16 numbers, relative to
    the largest reference entry."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, attn_mask=mask, is_causal=mask is None, scale=scale)
    out.backward(go.float())
    refs = [out.detach()] + [t.grad for t in leaves]
    return [((r.float() - ref).abs().max() / ref.abs().max()).item() for r, ref in zip(results, refs)]


@needs_amx
@pytest.mark.parametrize("B,H,T,Dq,Dv,kind", [
    (2, 3, 128, 64, 32, "causal"),   # the small preset's head dims
    (2, 2, 100, 48, 32, "causal"),   # the tiny preset's; T not a multiple of the 64-token tile
    (1, 2, 200, 64, 64, "documents"),  # packed documents: tiles outside every document are skipped
    (2, 2, 150, 32, 16, "padding"),  # right padding (rows that only see themselves), as prefill builds it
    (1, 2, 70, 192, 128, "causal"),  # DeepSeek-V3's head dims
    (1, 1, 1100, 64, 32, "causal"),  # more keys than one 512-key softmax pass: a running max across passes
    (1, 1, 1100, 32, 16, "documents"),  # and query chunks whose key tiles skip blocks
])
def test_attention_kernels_match_fp32_sdpa(B, H, T, Dq, Dv, kind):
    """Output and gradients from the AMX kernels against SDPA's fp32 forward and backward on the same bf16
    numbers: within bf16 rounding of the results, and no worse than ATen's own bf16 flash attention (whose
    backward reads 0.3-0.8% on these cases: it sums partial results in bf16). The log-sum-exp the backward
    starts from equals the fp32 one."""
    from dsv3.model.attention import _CPUAttention

    q, k, v, go = _attention_case(B, H, T, Dq, Dv, seed=T + Dq)
    mask = None
    if kind == "documents":
        mask = DeepseekV3._document_mask(torch.tensor([[0] * 40 + [1] * 70 + [2] * (T - 110)]), T)
    elif kind == "padding":
        keep = torch.ones(B, T, dtype=torch.long)
        keep[1, 90:] = 0
        mask = DeepseekV3._padding_mask(keep, T)
    scale = Dq ** -0.5
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = _CPUAttention.apply(leaves[0], torch.cat(leaves[1:], -1), None, None, None, mask, scale, Dq)
    assert out.dtype == torch.bfloat16 and out.shape == (B, H, T, Dv)
    out.backward(go)
    ours = _errors([out.detach()] + [t.grad for t in leaves], q, k, v, go, mask, scale)
    aten = [t.detach().clone().requires_grad_() for t in (q, k, F.pad(v, (0, Dq - Dv)))]
    aten_out = F.scaled_dot_product_attention(*aten, attn_mask=mask, is_causal=mask is None, scale=scale)[..., :Dv]
    aten_out.backward(go)
    theirs = _errors([aten_out.detach(), aten[0].grad, aten[1].grad, aten[2].grad[..., :Dv]], q, k, v, go, mask, scale)
    assert max(ours) < 2 ** -8 * 1.5, ours  # the results' own bf16 rounding is up to 2^-8 of their size
    assert max(ours[1:]) <= max(theirs[1:]) * 1.05 and ours[0] <= theirs[0] * 1.5, (ours, theirs)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    allowed = torch.ones(T, T, dtype=torch.bool).tril() if mask is None else mask
    ref_lse = scores.masked_fill(~allowed, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(kernels.attention_forward(q, k, v, mask, scale)[1], ref_lse, rtol=1e-5, atol=1e-5)


@needs_amx
@pytest.mark.parametrize("interleave,kind", [(True, "causal"), (False, "causal"), (True, "documents")])
def test_attention_kernels_rotate_q_and_k(interleave, kind):
    """Given k_pe, cos and sin, the kernels rotate the rope dims of q and of the keys themselves (k_pe shared by
    the heads, as MLA makes it): the output is bit-identical to rotating with `apply_rotary` and concatenating
    first, and the gradients of q, kv and k_pe against an fp32 reference are within bf16 rounding and no worse."""
    from dsv3.model.attention import _CPUAttention
    from dsv3.model.layers import apply_rotary

    B, H, T, Dn, Dr, Dv = 2, 3, 150, 32, 32, 32
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, T, H, Dn + Dr, generator=g).bfloat16()
    kv = torch.randn(B, T, H, Dn + Dv, generator=g).bfloat16()
    k_pe = torch.randn(B, T, Dr, generator=g).bfloat16()
    go = torch.randn(B, H, T, Dv, generator=g).bfloat16()
    angles = torch.arange(T).float()[None, :, None] * 0.9 ** torch.arange(Dr // 2).float()
    cos, sin = angles.cos(), angles.sin()
    mask = None
    if kind == "documents":
        mask = DeepseekV3._document_mask(torch.tensor([[0] * 40 + [1] * 70 + [2] * (T - 110)] * B), T)
    scale = (Dn + Dr) ** -0.5

    def unfused(q, kv, k_pe, dtype):  # the model's path before the kernels took the rope
        q, kv, k_pe = q.to(dtype), kv.to(dtype), k_pe.to(dtype)
        qr = torch.cat((q[..., :Dn], apply_rotary(q[..., Dn:], cos, sin, interleave)), -1).transpose(1, 2)
        kr = apply_rotary(k_pe[:, :, None], cos, sin, interleave).expand(B, T, H, Dr)
        k = torch.cat((kv[..., :Dn], kr), -1).transpose(1, 2)
        v = kv[..., Dn:].transpose(1, 2)
        if dtype == torch.float32:
            return F.scaled_dot_product_attention(qr, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
        return _CPUAttention.apply(qr, torch.cat((k, v), -1), None, None, None, mask, scale, Dn + Dr)

    def run(f):
        leaves = [t.clone().requires_grad_() for t in (q, kv, k_pe)]
        out = f(*leaves)
        out.backward(go.to(out.dtype))
        return [out.detach().float()] + [t.grad.float() for t in leaves]

    ref = run(lambda *a: unfused(*a, torch.float32))
    fused = run(lambda q, kv, k_pe: _CPUAttention.apply(q.transpose(1, 2), kv.transpose(1, 2), k_pe, cos, sin, mask,
                                                         scale, Dn, interleave))
    before = run(lambda *a: unfused(*a, torch.bfloat16))
    err = lambda res: [((r - e).abs().max() / e.abs().max()).item() for r, e in zip(res, ref)]  # noqa: E731
    ours, theirs = err(fused), err(before)
    assert torch.equal(fused[0], before[0])  # the same rotation arithmetic, the same rounding: the same output
    assert max(ours) < 2 ** -7, ours  # the rotated q and k are rounded to bf16 before the products, as before
    assert all(a <= b * 1.1 for a, b in zip(ours, theirs)), (ours, theirs)


@needs_amx
def test_training_attention_uses_the_kernel(monkeypatch):
    """A bf16 training forward routes attention through the kernels (eval and fp32 do not), and the model's
    gradients agree with the all-ATen path up to bf16 noise. Dense FFNs: with routed experts, bf16-sized
    differences in the attention output flip some tokens' expert choices, and the router's gradients with them."""
    import dataclasses

    cfg = dataclasses.replace(ModelConfig.preset("tiny"), n_routed_experts=None)
    torch.manual_seed(0)
    model = DeepseekV3(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 97))
    calls = []
    real = kernels.attention_backward
    monkeypatch.setattr(kernels, "attention_backward", lambda *a: calls.append(1) or real(*a))

    def grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.forward_train(x, mtp=True)
            sum(y.float().square().mean() for y in [out.logits, *out.mtp_logits]).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    fast = grads()
    assert len(calls) == cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    monkeypatch.setitem(kernels._state, "amx", False)
    slow = grads()
    assert len(calls) == cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    worst = max(((a - b).norm() / b.norm()).item() for a, b in zip(fast, slow) if b.norm() > 0)
    assert worst < 0.03
    monkeypatch.setitem(kernels._state, "amx", True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    model.float()(x).sum().backward()  # fp32: SDPA
    assert len(calls) == cfg.num_hidden_layers + cfg.num_nextn_predict_layers


@needs_kernels
@pytest.mark.parametrize("dtype,dim,strided", [(torch.float32, 512, False), (torch.bfloat16, 256, False),
                                               (torch.bfloat16, 128, True), (torch.float32, 48, False)])
def test_fused_rms_norm_matches_aten(dtype, dim, strided, monkeypatch):
    """Training's RMSNorm through the kernel against the F.rms_norm formula it replaces: output, input and weight
    gradients equal up to fp32 summation order (bf16 x: its gradient within one bf16 rounding), strided rows included
    (kv_a_layernorm normalises a slice of kv_a_proj's output)."""
    from dsv3.model.layers import RMSNorm

    g = torch.Generator().manual_seed(dim)
    norm = RMSNorm(dim)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(dim, generator=g) + 0.5)
    base = torch.randn(3, 17, dim + 16 * strided, generator=g) * 3
    x = base.to(dtype)[..., :dim].detach().requires_grad_()
    dy = torch.randn(3, 17, dim, generator=g)
    calls, results = [], []
    real = kernels.rms_norm_forward
    monkeypatch.setattr(kernels, "rms_norm_forward", lambda *a: calls.append(1) or real(*a))
    for fused in (True, False):
        monkeypatch.setattr(kernels, "rms_norm_ok", lambda x, w, fused=fused: fused)
        x.grad = norm.weight.grad = None
        y = norm(x)
        y.backward(dy)
        results.append((y.detach(), x.grad, norm.weight.grad))
    assert len(calls) == 1
    for got, ref in zip(*results):
        assert got.dtype == ref.dtype
        rtol = 1e-6 if got.dtype == torch.float32 else 2 ** -7  # bf16 dx: sums in another order may round one ulp off
        torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=1e-6 * ref.float().abs().max().item())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernel_bf16_output_and_gradient(dtype):
    """bf16_out writes exactly the fp32 result rounded to bf16 (what autocast feeds the next matmul), and a bf16
    output gradient gives exactly the gradients of the same values in fp32."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(70, 256, generator=g) * 3).to(dtype)
    w = torch.rand(256, generator=g) + 0.5
    y32, rstd = kernels.rms_norm_forward(x, w, 1e-6)
    y16, rstd16 = kernels.rms_norm_forward(x, w, 1e-6, True)
    assert y32.dtype == torch.float32 and y16.dtype == torch.bfloat16
    assert torch.equal(y16, y32.bfloat16()) and torch.equal(rstd16, rstd)
    dy = torch.randn(70, 256, generator=g).bfloat16()
    for got, ref in zip(kernels.rms_norm_backward(dy, x, w, rstd), kernels.rms_norm_backward(dy.float(), x, w, rstd)):
        assert torch.equal(got, ref)


@needs_kernels
def test_rms_norm_backward_writes_into_given_columns():
    """rms_norm_backward(out=) writes dx into columns of a wider buffer (the rest untouched) and returns it, the same
    numbers as its own output; columns not aligned to 16 elements are refused before anything is written."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 48, generator=g).bfloat16()
    w = torch.rand(48, generator=g) + 0.5
    dy = torch.randn(100, 48, generator=g).bfloat16()
    _, rstd = kernels.rms_norm_forward(x, w, 1e-6, True)
    dx, dw = kernels.rms_norm_backward(dy, x, w, rstd)
    buf = torch.full((100, 96), 7.0, dtype=torch.bfloat16)
    got, dw2 = kernels.rms_norm_backward(dy, x, w, rstd, out=buf[:, 32:80])
    assert torch.equal(got, dx) and torch.equal(buf[:, 32:80], dx) and torch.equal(dw2, dw)
    assert (buf[:, :32] == 7).all() and (buf[:, 80:] == 7).all()
    with pytest.raises(RuntimeError, match="aligned to 16 elements"):
        kernels.rms_norm_backward(dy, x, w, rstd, out=buf[:, 8:56])


@needs_kernels
def test_rms_norm_backward_same_for_any_thread_count():
    """The weight gradient's partial sums go by blocks of rows, not by thread: 1 and 2 threads give the same bits
    (and rows past the last full block count)."""
    g = torch.Generator().manual_seed(2)
    x, dy = torch.randn(1000, 128, generator=g), torch.randn(1000, 128, generator=g)
    w = torch.rand(128, generator=g) + 0.5
    _, rstd = kernels.rms_norm_forward(x, w, 1e-6)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(kernels.rms_norm_backward(dy, x, w, rstd))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    n = x * rstd[:, None]
    torch.testing.assert_close(runs[0][1], (dy * n).sum(0), rtol=1e-5, atol=1e-4)


def _bf16_train_step(model, ids):
    """Loss (main + first MTP depth) and gradients of one bf16-autocast training step on ids [B, T]."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_train(ids[:, :-1])
    loss = cross_entropy(out.logits, ids[:, 1:]) + cross_entropy(out.mtp_logits[0], ids[:, 2:])
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@needs_kernels
@pytest.mark.parametrize("rdtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_kernel_is_the_add_then_the_norm(rdtype):
    """The residual add fused into the norm: the sum is exactly h + r, the norm exactly the norm of that sum, and
    the backward's dres is exactly added to the norm's input gradient."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(70, 256, generator=g) * 3
    r = torch.randn(70, 256, generator=g).to(rdtype)
    w = torch.rand(256, generator=g) + 0.5
    for bf16 in (False, True):
        s, y, rstd = kernels.add_rms_norm_forward(h, r, w, 1e-6, bf16)
        assert torch.equal(s, h + r)
        y_ref, rstd_ref = kernels.rms_norm_forward(h + r, w, 1e-6, bf16)
        assert torch.equal(y, y_ref) and torch.equal(rstd, rstd_ref)
    dy, dres = torch.randn(70, 256, generator=g).bfloat16(), torch.randn(70, 256, generator=g)
    dx, dw = kernels.rms_norm_backward(dy, s, w, rstd, dres)
    dx_ref, dw_ref = kernels.rms_norm_backward(dy, s, w, rstd)
    assert torch.equal(dx, dx_ref + dres) and torch.equal(dw, dw_ref)
    dx2, dw2, dx_bf16 = kernels.rms_norm_backward(dy, s, w, rstd, dres, bf16_copy=True)  # for a bf16 r
    assert torch.equal(dx2, dx) and torch.equal(dw2, dw) and torch.equal(dx_bf16, dx.bfloat16())


@needs_kernels
def test_training_adds_the_residual_inside_the_norms(monkeypatch):
    """CPU training runs each residual add inside the norm after it (the blocks pass the stream on as h + y): the
    loss and every gradient are bit-identical to adding first and normalising after."""
    from dsv3.model import layers

    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    model = DeepseekV3(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 65))
    calls = []
    fused = layers._FusedAddRMSNorm.apply

    monkeypatch.setattr(layers._FusedAddRMSNorm, "apply", lambda *a: calls.append(1) or fused(*a))
    loss, grads = _bf16_train_step(model, ids)
    # two per block but the first one's input norm, and the final norm; the MTP block's stream starts from its
    # projection's bf16 output under autocast, which the kernel does not take (added first there, as before)
    assert len(calls) == 2 * cfg.num_hidden_layers - 1 + 1

    def add_then_norm(h, r, w, eps, bf16):
        s = h + r
        return s, layers._FusedRMSNorm.apply(s, w, eps, bf16)

    monkeypatch.setattr(layers._FusedAddRMSNorm, "apply", add_then_norm)
    ref_loss, ref_grads = _bf16_train_step(model, ids)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


@needs_kernels
def test_bf16_training_norms_hand_matmuls_bf16():
    """Under CPU bf16 autocast the norms whose outputs only feed linear layers (and the experts) write bf16 and the
    rest fp32; the forward's loss is bit-identical to every norm writing fp32 (autocast casts to those values
    anyway), and the gradients agree to bf16 noise (the consumers' input gradients are summed in bf16)."""
    from dsv3.model.layers import RMSNorm

    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    model = DeepseekV3(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 65))
    flagged = {n for n, m in model.named_modules() if isinstance(m, RMSNorm) and m.feeds_matmuls}
    assert flagged and all(n.split(".")[-1] in ("input_layernorm", "post_attention_layernorm", "q_a_layernorm",
                                                "kv_a_layernorm", "enorm", "hnorm") for n in flagged)
    dtypes = {}
    for n, m in model.named_modules():
        if isinstance(m, RMSNorm):
            # with a residual a norm returns (sum, normalised): the latter is what the matmuls read
            m.register_forward_hook(lambda mod, args, out, n=n: dtypes.__setitem__(
                n, (out[-1] if isinstance(out, tuple) else out).dtype))

    loss, grads = _bf16_train_step(model, ids)
    assert {n for n, d in dtypes.items() if d == torch.bfloat16} == flagged
    assert dtypes["model.norm"] == torch.float32
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.feeds_matmuls = False
    ref_loss, ref_grads = _bf16_train_step(model, ids)
    assert all(d == torch.float32 for d in dtypes.values())
    assert torch.equal(loss, ref_loss)
    worst = max(((a - b).norm() / b.norm()).item() for a, b in zip(grads, ref_grads) if b.norm() > 0)
    assert worst < 0.03
