"""The opt-in compiled decode path (`DeepseekV3.compile_decode`) against eager decoding."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_oracle import random_model, tiny_config

import dsv3
from dsv3.infer import Engine, SamplingParams
from dsv3.model.layers import apply_rotary
from dsv3.model.moe import Experts


def test_real_rotary_equals_complex(monkeypatch):
    """The real-valued interleaved rotary (what a compiled graph runs) gives the eager complex form's values."""
    g = torch.Generator().manual_seed(0)
    cos, sin = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 3, 5, 8, generator=g).to(dtype)
        eager = apply_rotary(x, cos, sin, interleave=True)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        real = apply_rotary(x, cos, sin, interleave=True)
        monkeypatch.undo()
        assert real.dtype == dtype
        # the same products and sums; the complex kernel may fuse a multiply-add, so allow the last bit
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(real, eager, rtol=tol, atol=tol)


def test_gathered_experts_equal_eager():
    torch.manual_seed(0)
    ex = Experts(8, 16, 12)
    with torch.no_grad():
        ex.gate_up_proj.normal_()
        ex.down_proj.normal_()
    x, w, idx = torch.randn(1, 16), torch.rand(1, 3), torch.tensor([[5, 0, 3]])
    torch.testing.assert_close(ex._gathered(x, w, idx), ex._one_token(x, w, idx), rtol=1e-5, atol=1e-5)
    x, w, idx = torch.randn(4, 16), torch.rand(4, 3), torch.tensor([[5, 0, 3], [1, 5, 7], [2, 3, 4], [0, 1, 2]])
    torch.testing.assert_close(ex._gathered(x, w, idx), ex(x, w, idx), rtol=1e-5, atol=1e-5)  # grouped GEMM path


@pytest.mark.slow
def test_compiled_decode_matches_eager():
    """Same greedy tokens as eager `dsv3.generate`, logits within 1e-4 (fp32), one graph for a growing context.

    Tiny random model with MoE, q compression, YaRN rotary and a non-zero router correction bias."""
    from torch._dynamo.utils import counters

    yarn = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    model = random_model(tiny_config(num_hidden_layers=2, rope_scaling=yarn), seed=1)
    assert any(isinstance(m, Experts) for m in model.layers[1].modules()) and model.config.q_lora_rank
    compiled = copy.deepcopy(model).compile_decode()
    prompt = torch.randint(0, model.config.vocab_size, (7,), generator=torch.Generator().manual_seed(2)).tolist()

    graphs = counters["stats"]["unique_graphs"]
    out = dsv3.generate(compiled, [prompt], 20, eos_token_id=None)
    assert counters["stats"]["unique_graphs"] - graphs == 1  # context 8..26: no recompilation per step
    assert out == dsv3.generate(model, [prompt], 20, eos_token_id=None)

    with torch.inference_mode():  # step by step, the logits themselves
        ids = torch.tensor([prompt])
        caches = [m.new_cache(1, 40) for m in (model, compiled)]
        for m, c in zip((model, compiled), caches):
            m(ids, cache=c)
        tok = ids[:, -1:]
        for pos in range(len(prompt), len(prompt) + 6):
            ref, got = (m.forward_cached(tok, torch.tensor([[pos]]), c, max_position=pos)
                        for m, c in zip((model, compiled), caches))
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
            tok = ref[:, -1].argmax(-1, keepdim=True)
        for a, b in zip(*(c.latent for c in caches)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # the cache writes happen in the graph too
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert model.compile_decode(enable=False)._compiled is None


@pytest.mark.slow
def test_compiled_speculative_engine_matches_eager():
    """Greedy MTP speculation through the compiled fused verify-and-draft step: the same tokens as plain
    greedy decoding and the same drafts (acceptance counts) as the eager engine."""
    model = random_model(tiny_config(num_hidden_layers=2), seed=3)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, model.config.vocab_size, (7,), generator=g).tolist()]  # batch 1: fewer graphs
    params = SamplingParams(max_tokens=16, temperature=0.0)
    eager = Engine(model, num_draft_tokens=1)
    compiled = Engine(copy.deepcopy(model), num_draft_tokens=1, compile=True)
    outs = [[o.outputs[0].token_ids for o in e.generate(prompts, params)] for e in (eager, compiled)]
    assert outs[0] == outs[1] == dsv3.generate(model, prompts, 16, eos_token_id=None)
    assert eager.stats["spec_drafted"] == compiled.stats["spec_drafted"] > 0
    assert eager.stats["spec_accepted"] == compiled.stats["spec_accepted"]


@pytest.mark.slow
@pytest.mark.skipif(not dsv3.kernels.available(), reason="CPU without AVX512-BF16 or no C++ compiler")
def test_compiled_bf16_decode_runs_cpu_kernels(monkeypatch):
    """bf16 on CPU: the compiled graph (C++ wrapper) calls the dsv3 kernels for the linear layers and experts and
    gives eager's logits to bf16 precision; eager with the kernels off (ATen) agrees too."""
    from torch._inductor.utils import run_and_get_code

    model = random_model(tiny_config(num_hidden_layers=2), seed=3).bfloat16()
    compiled = copy.deepcopy(model).compile_decode()
    with torch.inference_mode():
        ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
        caches = [model.new_cache(1, 16) for _ in range(3)]
        for c in caches:
            model(ids, cache=c)
        tok = ids[:, -1:]
        for pos in range(6, 10):
            p = torch.tensor([[pos]])
            ref = model.forward_cached(tok, p, caches[0], max_position=pos)
            got, code = run_and_get_code(compiled.forward_cached, tok, p, caches[1], max_position=pos)
            if pos == 6:
                assert "dsv3::gemv" in "".join(code) and "dsv3::grouped_gemv" in "".join(code)
            monkeypatch.setitem(dsv3.kernels._state, "ok", False)
            aten = model.forward_cached(tok, p, caches[2], max_position=pos)
            monkeypatch.undo()
            scale = ref.float().abs().max().item()
            torch.testing.assert_close(got.float(), ref.float(), rtol=0, atol=0.05 * scale)
            torch.testing.assert_close(aten.float(), ref.float(), rtol=0, atol=0.05 * scale)
            tok = ref[:, -1].argmax(-1, keepdim=True)
