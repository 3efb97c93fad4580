"""MTP speculative decoding: the cached MTP path, greedy identity with plain decoding, and the acceptance rule
keeping the target distribution."""

from __future__ import annotations

import pytest
import torch
from hf_oracle import random_model, tiny_config

import dsv3
from dsv3.infer import Engine, SamplingParams
from dsv3.infer.speculative import accept

GREEDY = dict(temperature=0.0)


def tv(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Total variation distance between the empirical distribution of samples and probs."""
    emp = torch.bincount(samples, minlength=probs.numel()).double() / samples.numel()
    return 0.5 * (emp - probs.double()).abs().sum().item()


def test_acceptance_rule_keeps_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    V, k, N = 6, 2, 200_000
    p = (torch.randn(k + 1, V, generator=g) * 1.5).softmax(-1)
    q = (torch.randn(k, V, generator=g) * 1.5).softmax(-1)
    drafts = torch.stack([torch.multinomial(q[j], N, replacement=True, generator=g) for j in range(k)], dim=1)
    n_acc, extra = accept(p.expand(N, -1, -1), q.expand(N, -1, -1), drafts, torch.rand(N, k, generator=g),
                          torch.rand(N, generator=g))
    emitted = torch.cat((drafts, extra[:, None]), dim=1)  # token j is emitted when n_acc >= j
    emitted[torch.arange(N), n_acc] = extra
    for j in range(k + 1):
        rows = n_acc >= j  # position j exists in these rows; its token must follow p_j
        assert rows.sum() > N // 10
        assert tv(emitted[rows, j], p[j]) < 0.01, j
    # the test can fail: taking the drafts unchecked would give q, far from p
    assert tv(drafts[:, 0], p[0]) > 0.1
    assert (n_acc == 0).sum() > N // 10  # first drafts rejected often too (n_acc == k is covered above)


def test_acceptance_rule_with_one_hot_distributions_is_greedy():
    p = torch.eye(5)[[2, 4, 1]][None]  # argmax tokens 2, 4, 1 at the three positions
    q = torch.eye(5)[[2, 3]][None]  # drafts 2 (right) then 3 (wrong)
    n_acc, extra = accept(p, q, torch.tensor([[2, 3]]), torch.full((1, 2), 0.999), torch.tensor([0.5]))
    assert n_acc.tolist() == [1] and extra.tolist() == [4]


def test_cached_mtp_step_matches_the_training_path():
    cfg = tiny_config()
    model = random_model(cfg, seed=1)
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model.forward_train(ids)
        ref = out.mtp_logits[0]  # [2, 19, V]: position i predicts token i+2 from hidden i and token i+1
        cache = model.new_cache(2, 20, mtp=True)
        hidden = model.prefill(ids[:, :10], None, cache, mtp=True)  # MTP latents of positions 0..8
        torch.testing.assert_close(hidden, out.hidden[:, :10], atol=1e-5, rtol=0)
        steps = []
        for i in range(9, 19):  # one position at a time, then a chunk, as drafting uses them
            pos = torch.full((2, 1), i)
            steps.append(model.forward_mtp_cached(ids[:, i + 1:i + 2], out.hidden[:, i:i + 1], pos, cache)[0])
        cache2 = model.new_cache(2, 20, mtp=True)
        model.prefill(ids[:, :10], None, cache2, mtp=True)
        chunk = model.forward_mtp_cached(ids[:, 10:], out.hidden[:, 9:19], torch.arange(9, 19).expand(2, -1),
                                         cache2)[0]
    torch.testing.assert_close(torch.cat(steps, dim=1), ref[:, 9:], atol=1e-4, rtol=0)
    torch.testing.assert_close(chunk, ref[:, 9:], atol=1e-4, rtol=0)


def test_verify_and_draft_equals_verify_then_draft():
    """The fused greedy step (one forward: verify two tokens, then the MTP module at both positions, drafting
    from the last verified one) equals the two separate calls, with the draft accepted in one row and
    rejected in the other; the caches it writes are the same too."""
    cfg = tiny_config()
    model = random_model(cfg, seed=3)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    n = 9  # tokens 0..8 known, token 8 not fed yet: main and MTP caches hold positions 0..7 after catch-up
    with torch.no_grad():
        cache = model.new_cache(2, 16, mtp=True)
        hidden = model.prefill(ids[:, :8], None, cache, mtp=True)  # main 0..7, MTP 0..6
        logits, _ = model.forward_mtp_cached(ids[:, 8:9], hidden[:, 7:8], torch.full((2, 1), 7), cache)  # MTP 7
        # the main model's own token at position n, to draft it right in row 0 and wrong in row 1
        probe = model.new_cache(2, 16, mtp=True)
        for a, b in zip(probe.latent, cache.latent):
            a.copy_(b)
        g_n = model.forward_cached(ids[:, 8:9], torch.full((2, 1), 8), probe)[:, 0].argmax(-1)
        d_n = torch.stack((g_n[0], (g_n[1] + 1) % cfg.vocab_size))
        inp = torch.stack((ids[:, 8], d_n), dim=1)  # [2, 2]
        pos = torch.tensor([[n - 1, n]] * 2)
        ref_cache = model.new_cache(2, 16, mtp=True)
        for a, b in zip(ref_cache.latent, cache.latent):
            a.copy_(b)
        logits, picks, last_hidden = model.verify_and_draft(inp, pos, cache)
        # reference: verify, then the MTP module on the main model's tokens
        ref_logits, ref_hidden = model.forward_cached(inp, pos, ref_cache, return_hidden=True)
        target = ref_logits.argmax(-1)
        mtp_logits, _ = model.forward_mtp_cached(target, ref_hidden, pos, ref_cache)
    accepted = (target[:, 0] == inp[:, 1]).long()
    assert accepted.tolist() == [1, 0]
    nxt = mtp_logits[torch.arange(2), accepted].argmax(-1)
    assert picks.tolist() == torch.cat((target, accepted[:, None], nxt[:, None]), dim=1).tolist()
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(last_hidden, ref_hidden[torch.arange(2), accepted], atol=1e-5, rtol=0)
    for a, b in zip(cache.latent, ref_cache.latent):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [1, 2])
def test_speculative_greedy_equals_plain_on_a_random_model(k):
    model = random_model(tiny_config(), seed=11)
    g = torch.Generator().manual_seed(12)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (3, 14, 1, 8, 25)]
    eng = Engine(model, num_draft_tokens=k)
    assert eng.speculative  # on by default with MTP weights
    outs = eng.generate(prompts, SamplingParams(max_tokens=15, **GREEDY))
    assert [o.outputs[0].token_ids for o in outs] == dsv3.generate(model, prompts, 15, eos_token_id=None)
    st = eng.stats
    assert st["spec_drafted"] > 0 and st["acceptance_rate"] == st["spec_accepted"] / st["spec_drafted"]


def test_drafts_stay_exact_when_steps_switch_between_fused_and_general():
    """A greedy request drafts in the fused verify step while it runs alone, and through the general path
    while a sampled request shares its batch. Across both switches every draft it holds is the MTP module's
    exact prediction (the training path on the tokens so far), so no cache row went stale, and its output is
    plain greedy."""
    model = random_model(tiny_config(), seed=21)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(22)
    prompt, other = (torch.randint(0, V, (n,), generator=g).tolist() for n in (6, 9))
    eng = Engine(model, num_draft_tokens=1)
    rid = eng.add_request(prompt, SamplingParams(max_tokens=40, **GREEDY))
    seq = eng._requests[rid].seqs[0]
    checked, steps = 0, 0
    while eng.has_unfinished():
        if steps == 3:
            eng.add_request(other, SamplingParams(max_tokens=6, temperature=1.0, seed=5))
        eng.step()
        steps += 1
        if seq.draft is not None and seq.finish_reason is None:
            with torch.no_grad():  # position n-2 (hidden n-2, token n-1) drafts token n
                ref = model.forward_train(torch.tensor([seq.tokens])).mtp_logits[0][0, len(seq.tokens) - 2]
            top = ref.topk(2).values
            if top[0] - top[1] > 1e-3:  # skip near-ties
                assert seq.draft == ref.argmax().item()
                checked += 1
    assert seq.output == dsv3.generate(model, [prompt], 40, eos_token_id=None)[0]
    assert checked >= 10


@pytest.mark.parametrize("k", [1, 2])
def test_speculative_greedy_with_drafts_accepted_and_rejected(k):
    """A doctored MTP module proposes the true next-next token at two positions out of three and a wrong one
    at the third: the output must still be plain greedy, with the acceptance the doctoring implies."""
    model = random_model(tiny_config(), seed=13)
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (7,), generator=torch.Generator().manual_seed(14)).tolist()
    truth = prompt + dsv3.generate(model, [prompt], 33, eos_token_id=None)[0]  # drafts may look past token 30
    plain = truth[len(prompt):len(prompt) + 30]
    real = model.forward_mtp_cached

    def doctored(input_ids, prev, positions, cache, depth=0, max_position=None):
        logits, hidden = real(input_ids, prev, positions, cache, depth, max_position)
        forced = torch.full_like(logits, -10.0)
        for b, row in enumerate(positions.tolist()):
            for s, i in enumerate(row):  # position i drafts token i + 2
                t = truth[i + 2]
                forced[b, s, t if i % 3 else (t + 1) % V] = 10.0
        return forced, hidden

    real_fused = model.verify_and_draft

    def doctored_fused(input_ids, positions, cache, max_position=None):  # k = 1: drafts made in the verify step
        logits, picks, hidden = real_fused(input_ids, positions, cache, max_position)
        picks = picks.clone()
        for b, (p, acc) in enumerate(zip(positions[:, 0].tolist(), picks[:, 2].tolist())):
            i = p + acc  # the last verified position drafts token i + 2
            picks[b, 3] = truth[i + 2] if i % 3 else (truth[i + 2] + 1) % V
        return logits, picks, hidden

    model.forward_mtp_cached, model.verify_and_draft = doctored, doctored_fused
    try:
        eng = Engine(model, num_draft_tokens=k)
        out = eng.generate([prompt], SamplingParams(max_tokens=30, **GREEDY))[0].outputs[0]
        st = eng.stats
    finally:
        del model.forward_mtp_cached, model.verify_and_draft
    assert out.token_ids == plain
    # replay the schedule: the first draft comes from position len(prompt) - 1, after the prefill's token
    produced, pos, accepted, steps = 1, len(prompt) - 1, 0, 1
    while produced < 30:
        n_acc = next((j for j in range(k) if (pos + j) % 3 == 0), k)  # drafts up to the first wrong one
        accepted, produced, pos, steps = accepted + n_acc, produced + n_acc + 1, pos + n_acc + 1, steps + 1
    assert st["spec_accepted"] == accepted and st["spec_drafted"] == k * (steps - 1) and st["steps"] == steps
    assert 0 < accepted < k * (steps - 1) and steps < 25  # accepted drafts really saved steps


def test_speculative_sampling_keeps_the_distribution_end_to_end():
    """The second token of each sample comes from a draft + verify step; over many seeded samples its joint
    distribution with the first token must be the model's own, although the random MTP module drafts from a
    very different distribution."""
    model = random_model(tiny_config(vocab_size=8), seed=21)
    prompt = [1, 2, 3, 4]
    with torch.no_grad():
        p1 = model(torch.tensor([prompt]))[0, -1].softmax(-1)
        p2 = model(torch.tensor([prompt + [t] for t in range(8)]))[:, -1].softmax(-1)  # [t1, V]
    joint = (p1[:, None] * p2).flatten()
    eng = Engine(model, max_batch=64)
    firsts, seconds = [], []
    for seed in range(150):
        out = eng.generate([prompt], SamplingParams(max_tokens=2, temperature=1.0, n=64, seed=seed))[0]
        for o in out.outputs:
            firsts.append(o.token_ids[0])
            seconds.append(o.token_ids[1])
    samples = torch.tensor(firsts) * 8 + torch.tensor(seconds)
    assert tv(samples, joint) < 0.06
    # the drafts alone would not pass: the MTP module's distribution is far from the model's
    assert 0 < eng.stats["acceptance_rate"] < 0.8


def test_speculative_sampling_is_seeded_and_respects_limits():
    model = random_model(tiny_config(), seed=15)
    prompt = [5, 6, 7]
    sp = SamplingParams(max_tokens=13, temperature=0.8, top_k=20, seed=4, logprobs=2)
    a = Engine(model, num_draft_tokens=2).generate([prompt], sp)[0].outputs[0]
    b = Engine(model, num_draft_tokens=2).generate([prompt, [9, 9]], [sp, SamplingParams(seed=1)])[0].outputs[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 13 and a.finish_reason == "length"
    assert len(a.logprobs) == 13
