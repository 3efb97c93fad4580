"""The serving engine (dsv3.infer.Engine) against dsv3.generate and transformers, and its request semantics."""

from __future__ import annotations

import pytest
import torch
from hf_oracle import hf_model, random_model, tiny_config

import dsv3
from dsv3.data.tokenizer import train_tokenizer
from dsv3.infer import Engine, EngineFull, RequestTooLong, SamplingParams
from dsv3.infer.detok import Detokenizer
from dsv3.infer.sampling import child_seed

GREEDY = dict(temperature=0.0)


def prompts_of(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def greedy_solo(model, prompts, n):
    return [dsv3.generate(model, [p], n, eos_token_id=None)[0] for p in prompts]


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), seed=5)


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["the cat sat on the mat", "a dog ate 12 apples and 7 pears", "héllo wörld €5 ¥7 漢字", "ok"] * 20
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="module")
def text_model():
    return random_model(tiny_config(vocab_size=300), seed=7)


def token_ids(outs):
    return [o.outputs[0].token_ids for o in outs]


# ---- agreement with the reference paths ---------------------------------------------------------------
@pytest.mark.parametrize("speculative", [False, True])
def test_greedy_equals_generate_and_transformers(speculative):
    yarn = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    model = random_model(tiny_config(rope_scaling=yarn), seed=3)
    prompts = prompts_of((5, 11, 8, 1), model.config.vocab_size, seed=4)
    ours = token_ids(Engine(model, speculative=speculative).generate(prompts, SamplingParams(max_tokens=12, **GREEDY)))
    assert ours == dsv3.generate(model, prompts, 12, eos_token_id=None)
    hf = hf_model(model)
    for p, o in zip(prompts, ours):
        if len(p) > 1:
            ref = hf.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              pad_token_id=0)[0, len(p):].tolist()
            assert o == ref
        else:  # transformers 5.24's generate departs from its own forward after a 1-token prompt: use the forward
            with torch.no_grad():
                assert hf(torch.tensor([p + o])).logits[0, :-1].argmax(-1).tolist() == o


@pytest.mark.parametrize("speculative", [False, True])
def test_batching_and_continuous_admission_change_nothing(model, speculative):
    prompts = prompts_of((1, 3, 17, 6, 30, 9), model.config.vocab_size, seed=1)
    solo = greedy_solo(model, prompts, 10)
    params = SamplingParams(max_tokens=10, **GREEDY)
    assert token_ids(Engine(model, speculative=speculative).generate(prompts, params)) == solo
    # requests arrive while others decode; max_batch 3 makes some wait
    eng = Engine(model, max_batch=3, speculative=speculative)
    ids, final, waited = {}, {}, False
    for step in range(200):
        if step in (0, 2, 3, 5):
            for i in {0: [0, 1], 2: [2], 3: [3, 4], 5: [5]}[step]:
                ids[eng.add_request(prompts[i], params)] = i
        for out in eng.step():
            if out.finished:
                final[ids[out.request_id]] = out.outputs[0].token_ids
        assert eng.stats["running"] <= 3
        waited |= eng.stats["waiting"] > 0
        if len(final) == len(prompts):
            break
    assert waited and [final[i] for i in range(len(prompts))] == solo
    assert eng.stats["free_blocks"] == eng.stats["total_blocks"] and not eng.has_unfinished()


@pytest.mark.parametrize("speculative", [False, True])
def test_preemption_when_the_cache_runs_out_keeps_outputs(model, speculative):
    prompts = prompts_of((6, 7, 5, 8), model.config.vocab_size, seed=2)
    solo = greedy_solo(model, prompts, 20)
    # 4-token blocks, 12 of them: each request fits alone (<= 8 blocks) but not all four together
    eng = Engine(model, block_size=4, num_blocks=12, speculative=speculative)
    outs = eng.generate(prompts, SamplingParams(max_tokens=20, **GREEDY))
    assert eng.stats["preemptions"] > 0
    assert token_ids(outs) == solo
    assert eng.stats["free_blocks"] == 12


# ---- sampling ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("speculative", [False, True])
def test_seeds_are_reproducible_whatever_the_batch(model, speculative):
    V = model.config.vocab_size
    target, *others = prompts_of((7, 4, 12, 9), V, seed=3)
    sp = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=40, seed=11)
    alone = Engine(model, speculative=speculative).generate([target], sp)[0].outputs[0].token_ids
    eng = Engine(model, speculative=speculative)
    mixed = eng.generate([others[0], target, others[1], others[2]],
                         [SamplingParams(max_tokens=9, temperature=1.2, seed=1), sp,
                          SamplingParams(max_tokens=12, **GREEDY), SamplingParams(max_tokens=5)])
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = Engine(model, speculative=speculative).generate(
        [target], SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=40, seed=12))
    assert other_seed[0].outputs[0].token_ids != alone


@pytest.mark.parametrize("speculative", [False, True])
def test_n_choices(model, speculative):
    prompt = prompts_of((6,), model.config.vocab_size, seed=4)[0]
    eng = Engine(model, speculative=speculative)
    out = eng.generate([prompt], SamplingParams(max_tokens=8, temperature=1.0, n=4, seed=3))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3] and out.finished
    choices = [tuple(o.token_ids) for o in out.outputs]
    assert all(len(c) == 8 for c in choices) and len(set(choices)) > 1
    # the choices share the prompt's cache blocks: each must still be what its own seed gives alone
    for i, o in enumerate(out.outputs):
        alone = eng.generate([prompt], SamplingParams(max_tokens=8, temperature=1.0, seed=child_seed(3, i)))[0]
        assert alone.outputs[0].token_ids == o.token_ids
    assert child_seed(3, 0) == 3  # choice 0 keeps the request's seed
    greedy = eng.generate([prompt], SamplingParams(max_tokens=8, n=3, **GREEDY))[0]
    assert all(o.token_ids == greedy_solo(model, [prompt], 8)[0] for o in greedy.outputs)
    assert eng.stats["free_blocks"] == eng.stats["total_blocks"]


def test_stop_token_ids_eos_and_length(model):
    prompt = prompts_of((5,), model.config.vocab_size, seed=6)[0]
    ref = greedy_solo(model, [prompt], 16)[0]
    j = next(i for i in range(2, 16) if ref[i] not in ref[:i])  # a token first generated at step j
    eng = Engine(model, speculative=False)
    out = eng.generate([prompt], SamplingParams(max_tokens=16, stop_token_ids=[ref[j]], **GREEDY))[0].outputs[0]
    assert out.token_ids == ref[:j] and out.finish_reason == "stop"
    out = eng.generate([prompt], SamplingParams(max_tokens=4, **GREEDY))[0].outputs[0]
    assert out.token_ids == ref[:4] and out.finish_reason == "length"
    eos_model = random_model(tiny_config(eos_token_id=ref[j]), seed=5)
    eos_eng = Engine(eos_model)
    out = eos_eng.generate([prompt], SamplingParams(max_tokens=16, **GREEDY))[0].outputs[0]
    assert out.token_ids == ref[:j] and out.finish_reason == "stop"
    out = eos_eng.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True, **GREEDY))[0].outputs[0]
    assert out.token_ids == ref and out.finish_reason == "length"


@pytest.mark.parametrize("speculative", [False, True])
def test_penalties_follow_the_openai_definition(model, speculative):
    prompt = prompts_of((4,), model.config.vocab_size, seed=8)[0]
    presence, frequency = -1.0, 0.3  # repeats are favoured, then penalised: counts reach 2 and more
    sp = SamplingParams(max_tokens=16, presence_penalty=presence, frequency_penalty=frequency, **GREEDY)
    got = Engine(model, speculative=speculative).generate([prompt], sp)[0].outputs[0].token_ids
    assert got != greedy_solo(model, [prompt], 16)[0]  # the penalties change the output
    assert max(got.count(t) for t in got) >= 2  # so presence and frequency are told apart
    with torch.no_grad():
        logits = model(torch.tensor([prompt + got]))[0, len(prompt) - 1:-1]  # the logits each token came from
    for j, t in enumerate(got):
        counts = torch.bincount(torch.tensor(got[:j], dtype=torch.long), minlength=logits.shape[-1]).float()
        expect = logits[j] - frequency * counts - presence * (counts > 0).float()
        assert t == int(expect.argmax())


@pytest.mark.parametrize("speculative", [False, True])
def test_logprobs_are_log_softmax_of_the_model_logits(model, speculative):
    prompt = prompts_of((9,), model.config.vocab_size, seed=9)[0]
    eng = Engine(model, speculative=speculative)
    for sp in (SamplingParams(max_tokens=10, logprobs=3, **GREEDY),
               SamplingParams(max_tokens=10, logprobs=3, temperature=0.8, seed=5)):
        out = eng.generate([prompt], sp)[0].outputs[0]
        with torch.no_grad():
            lp = model(torch.tensor([prompt + out.token_ids]))[0, len(prompt) - 1:-1].log_softmax(-1)
        assert len(out.logprobs) == len(out.token_ids) == 10
        for j, (t, entry) in enumerate(zip(out.token_ids, out.logprobs)):
            assert entry.token_id == t
            assert abs(entry.logprob - lp[j, t].item()) < 1e-4
            top_v, top_i = lp[j].topk(3)
            assert [i for i, _ in entry.top] == top_i.tolist()
            assert max(abs(v - w) for (_, v), w in zip(entry.top, top_v.tolist())) < 1e-4
    out = eng.generate([prompt], SamplingParams(max_tokens=2, logprobs=0, **GREEDY))[0].outputs[0]
    assert all(e.top == [] for e in out.logprobs)
    assert eng.generate([prompt], SamplingParams(max_tokens=2, **GREEDY))[0].outputs[0].logprobs is None


# ---- text: detokenisation, stop strings, streaming -----------------------------------------------------
def test_detokenizer_never_splits_a_utf8_character(tokenizer):
    text = "héllo wörld €5 ¥7 漢字 🙂!"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text) - 8  # multi-byte characters are spread over several byte tokens
    split = [i for i in range(1, len(ids)) if "\ufffd" in tokenizer.decode(ids[:i])]
    assert split  # some prefixes do end inside a character
    d = Detokenizer(tokenizer, tokenizer.encode("prompt: "))
    seen = []
    for t in ids:
        d.push(t)
        assert "\ufffd" not in d.text
        seen.append(d.text)
    d.finish()
    assert d.text == text and all(b.startswith(a) for a, b in zip(seen, seen[1:]))
    # a stop string split over tokens is cut, and never shown in part
    d = Detokenizer(tokenizer, [], stop=["€5", "zzz"])
    for t in ids:
        stopped = d.push(t)
        assert "€" not in d.text
        if stopped:
            break
    assert stopped and d.text == "héllo wörld "


def test_stop_strings_and_streamed_deltas(text_model, tokenizer):
    eng = Engine(text_model, tokenizer, speculative=False)
    prompt = tokenizer.encode("the cat")
    full = eng.generate([prompt], SamplingParams(max_tokens=40, **GREEDY))[0].outputs[0]
    assert full.text == tokenizer.decode(full.token_ids)
    text = full.text
    # a stop string made of two characters that first appears well inside the output
    a = next(i for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2] and text.find(text[i:i + 2]) == i)
    stop = text[a:a + 2]
    rid = eng.add_request(prompt, SamplingParams(max_tokens=40, stop=[stop], **GREEDY))
    streamed_text, streamed_ids, last = "", [], None
    while eng.has_unfinished():
        for out in eng.step():
            assert out.request_id == rid
            o = out.outputs[0]
            streamed_text += o.delta_text
            streamed_ids += o.delta_token_ids
            assert o.text == streamed_text and stop not in o.text
            last = o
    assert last.finish_reason == "stop" and last.text == text[:a]
    assert streamed_ids == last.token_ids and full.token_ids[:len(last.token_ids)] == last.token_ids
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(text_model, speculative=False).add_request(prompt, SamplingParams(stop=["x"]))


# ---- capacity, aborts, validation ---------------------------------------------------------------------
def test_capacity_limits_and_abort_free_blocks(model):
    V = model.config.vocab_size
    eng = Engine(model, max_batch=2, block_size=4, num_blocks=40, max_waiting=3, speculative=False)
    with pytest.raises(RequestTooLong, match="context length 256"):
        eng.add_request([1] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(RequestTooLong, match="num_blocks"):
        eng.add_request([1] * 100, SamplingParams(max_tokens=100))  # fits the context, never the cache
    prompts = prompts_of((5, 9, 3), V, seed=10)
    ids = [eng.add_request(p, SamplingParams(max_tokens=30, **GREEDY)) for p in prompts]
    with pytest.raises(EngineFull):
        eng.add_request(prompts[0], SamplingParams(max_tokens=2))
    eng.step()
    eng.step()
    assert eng.stats["running"] == 2 and eng.stats["waiting"] == 1
    free = eng.stats["free_blocks"]
    eng.abort(ids[0])  # running: its blocks come back at once
    assert eng.stats["free_blocks"] > free and eng.stats["running"] == 1
    eng.abort("no-such-request")
    outs = eng.step()  # reports the abort; the waiting request is admitted in its place
    aborted = [o for o in outs if o.request_id == ids[0]]
    assert aborted and aborted[0].finished and aborted[0].outputs[0].finish_reason == "abort"
    assert eng.stats["running"] == 2
    eng.abort(ids[2])
    while eng.has_unfinished():
        eng.step()
    assert eng.stats["free_blocks"] == eng.stats["total_blocks"] and eng.stats["running"] == 0


def test_request_validation(model):
    eng = Engine(model, max_batch=4, speculative=False)
    bad = [(SamplingParams(temperature=-1), "temperature must be"), (SamplingParams(top_p=0), "top_p must be"),
           (SamplingParams(max_tokens=0), "max_tokens must be"), (SamplingParams(n=5), "n must be <= max_batch"),
           (SamplingParams(logprobs=21), "logprobs must be"), (SamplingParams(presence_penalty=3), "presence_penalty"),
           (SamplingParams(stop=[""]), "stop must be")]
    for sp, msg in bad:
        with pytest.raises(ValueError, match=msg):
            eng.add_request([1, 2], sp)
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request([model.config.vocab_size], SamplingParams())
    with pytest.raises(ValueError, match="at least one token"):
        eng.add_request([], SamplingParams())
    eng.add_request([1], SamplingParams(), request_id="a")
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([1], SamplingParams(), request_id="a")
    with pytest.raises(ValueError, match="MTP"):
        Engine(random_model(tiny_config(num_nextn_predict_layers=0)), speculative=True)


def test_from_checkpoint(tmp_path, text_model, tokenizer):
    ckpt = tmp_path / "my-model"
    text_model.save_pretrained(ckpt)
    tokenizer.save(ckpt)
    eng = Engine.from_checkpoint(ckpt, max_batch=2)
    assert eng.model_name == "my-model" and eng.max_context == 256 and eng.speculative
    prompt = tokenizer.encode("a dog")
    out = eng.generate([prompt], SamplingParams(max_tokens=6, **GREEDY))[0].outputs[0]
    assert out.token_ids == greedy_solo(text_model, [prompt], 6)[0]
    assert out.text == tokenizer.decode(out.token_ids)
