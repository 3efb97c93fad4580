"""dsv3 against transformers' DeepseekV3ForCausalLM (pinned 5.24.0) on random weights, in fp32."""

import pytest
import torch
from hf_oracle import hf_model, random_model, tiny_config

import dsv3

YARN = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}

VARIANTS = {
    "q-lora+group-routing": {},
    "no-q-compression": dict(q_lora_rank=None),
    "yarn": dict(rope_scaling=YARN),
    "yarn-mscale-all-dim-only": dict(rope_scaling={**YARN, "mscale": None, "mscale_all_dim": 0.8}),
    "ungrouped-routing": dict(n_group=1, topk_group=1),
    "dense-first-two": dict(first_k_dense_replace=2, num_hidden_layers=4),
    "all-moe": dict(first_k_dense_replace=0),
    "rope-rotate-half": dict(rope_interleave=False),
    "two-shared-experts-no-norm-topk": dict(n_shared_experts=2, norm_topk_prob=False),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(name):
    cfg = tiny_config(**VARIANTS[name])
    model = random_model(cfg)
    hf = hf_model(model)
    if "rope_scaling" in VARIANTS[name]:
        assert hf.model.rotary_emb.rope_type == "yarn"  # the oracle really runs YaRN
    ids = torch.randint(0, cfg.vocab_size, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert ref.abs().max() > 1.0  # not a degenerate comparison
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_router_matches_transformers_and_uses_bias_for_choice_only():
    cfg = tiny_config()
    model = random_model(cfg)
    hf = hf_model(model)
    moe_layer = cfg.first_k_dense_replace
    x = torch.randn(50, cfg.hidden_size)
    w, idx, scores = model.model.layers[moe_layer].mlp.gate(x)
    _, hw, hidx = hf.model.layers[moe_layer].mlp.gate(x)
    order, horder = idx.sort(-1), hidx.sort(-1)
    assert torch.equal(order.values, horder.values)
    torch.testing.assert_close(w.gather(1, order.indices), hw.gather(1, horder.indices), atol=1e-6, rtol=0)
    # weights come from the unbiased sigmoid scores, renormalised and scaled
    s = torch.sigmoid(x @ model.model.layers[moe_layer].mlp.gate.weight.T)
    expect = s.gather(1, idx)
    expect = expect / expect.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    torch.testing.assert_close(w, expect, atol=1e-6, rtol=0)
    # group limit: chosen experts lie in at most topk_group groups
    groups = idx // (cfg.n_routed_experts // cfg.n_group)
    assert max(len(set(g.tolist())) for g in groups) <= cfg.topk_group


@pytest.mark.parametrize("tokens", [1, 2, 50])
def test_moe_block_matches_transformers_for_any_token_count(tokens):
    """One token (matrix-vector products), a few and many tokens (grouped GEMMs)."""
    cfg = tiny_config()
    model = random_model(cfg)
    hf = hf_model(model)
    moe_layer = cfg.first_k_dense_replace
    x = torch.randn(1, tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        ours, ref = model.model.layers[moe_layer].mlp(x), hf.model.layers[moe_layer].mlp(x)
    assert ref.abs().max() > 1e-3
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


def test_absorbed_cache_decoding_equals_full_forward():
    cfg = tiny_config(rope_scaling=YARN)
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 30)
        prefix = 7  # prefill 7 tokens with the full path, then decode one token at a time
        steps = [model(ids[:, :prefix], cache=cache)]
        for t in range(prefix, 30):
            pos = torch.full((2, 1), t)
            steps.append(model.forward_cached(ids[:, t:t + 1], pos, cache))
        # and a multi-token absorbed chunk from an empty cache (used by speculative verification)
        cache2 = model.new_cache(2, 30)
        chunk = model.forward_cached(ids, torch.arange(30).expand(2, 30), cache2)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)
    torch.testing.assert_close(chunk, full, atol=1e-4, rtol=0)
    assert cache.kv[0].shape[-1] + cache.pe[0].shape[-1] == cfg.kv_lora_rank + cfg.qk_rope_head_dim


def test_greedy_generate_matches_transformers_generate():
    cfg = tiny_config(rope_scaling=YARN)
    model = random_model(cfg, seed=3)
    hf = hf_model(model)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 11, 8)]
    ours = dsv3.generate(model, prompts, max_new_tokens=12, eos_token_id=None)
    for p, o in zip(prompts, ours):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                          pad_token_id=0)[0, len(p):].tolist()
        assert o == ref


def test_batched_generate_equals_one_by_one_and_sampling_is_seeded():
    cfg = tiny_config()
    model = random_model(cfg, seed=5)
    prompts = [[3, 4, 5, 6, 7, 8], [9], [10, 11, 12]]
    batched = dsv3.generate(model, prompts, max_new_tokens=6, eos_token_id=None)
    single = [dsv3.generate(model, [p], max_new_tokens=6, eos_token_id=None)[0] for p in prompts]
    assert batched == single
    a = dsv3.generate(model, prompts, 8, temperature=1.0, top_p=0.9, seed=7, eos_token_id=None)
    b = dsv3.generate(model, prompts, 8, temperature=1.0, top_p=0.9, seed=7, eos_token_id=None)
    assert a == b and all(len(x) == 8 for x in a)


def test_generate_stops_at_eos_and_rejects_bad_input():
    cfg = tiny_config()
    model = random_model(cfg, seed=6)
    first = dsv3.generate(model, [[1, 2, 3]], 1, eos_token_id=None)[0][0]
    assert dsv3.generate(model, [[1, 2, 3]], 5, eos_token_id=first) == [[first]]
    with pytest.raises(ValueError, match="context length"):
        dsv3.generate(model, [[1] * 250], 10)
    with pytest.raises(ValueError, match="token ids"):
        dsv3.generate(model, [[cfg.vocab_size]], 1)
    with pytest.raises(ValueError, match="at least one token"):
        dsv3.generate(model, [[]], 1)


def test_mtp_alignment_and_routing_stats():
    cfg = tiny_config()
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    out = model.forward_train(ids)
    torch.testing.assert_close(out.logits, model(ids))
    assert [t.shape for t in out.mtp_logits] == [(2, 15, cfg.vocab_size)]
    # depth-1 MTP at position i sees token i+1: changing the last token changes only the last MTP position
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % cfg.vocab_size
    out2 = model.forward_train(ids2)
    torch.testing.assert_close(out2.mtp_logits[0][:, :-1], out.mtp_logits[0][:, :-1])
    assert not torch.allclose(out2.mtp_logits[0][:, -1], out.mtp_logits[0][:, -1])
    assert len(out.routing) == cfg.num_moe_layers
    for st in out.routing:
        assert st.load.sum() == 2 * 16 * cfg.num_experts_per_tok
