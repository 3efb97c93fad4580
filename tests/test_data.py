"""Data pipeline: math corpus and grader, split by content, tokenizer (vs transformers), sources, packing."""

from __future__ import annotations

import importlib.util
import itertools
import json
import re

import pytest
import torch

from dsv3.data import (
    DOMAINS,
    DataError,
    MathProblem,
    PackedStream,
    Tokenizer,
    content_key,
    extract_answer,
    format_example,
    format_prompt,
    generate_problems,
    grade,
    iter_problems,
    load_documents,
    load_gsm8k_jsonl,
    math_stream,
    problem_at,
    split_of,
    train_tokenizer,
)
from dsv3.data.tokenizer import ASSISTANT, BOS, EOS, PAD, USER

_EQ = re.compile(r"(\d+) ([-+x/]) (\d+) = (\d+)")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b, "/": lambda a, b: a / b}


# ---- grader ----------------------------------------------------------------------------------------------

def test_extract_answer_and_grade():
    assert extract_answer("He has 2 + 3 = 5.\n#### 5") == 5
    assert extract_answer("#### 1,234") == 1234
    assert extract_answer("#### -17") == -17
    assert extract_answer("#### $45") == 45
    assert extract_answer("#### 12.0") == 12
    assert extract_answer("#### 12.5") is None
    assert extract_answer("#### 3\nmore text #### 4") == 4  # the last ####
    assert extract_answer("The answer is 5") is None
    assert extract_answer("####") is None
    assert extract_answer("#### five") is None
    assert grade(" She now has 4 x 2 = 8 apples.\n#### 8", 8)
    assert not grade("#### 9", 8)
    assert not grade("no answer here", 8)
    assert grade("####1,000", 1000)
    assert grade("#### -3", -3) and not grade("#### 3", -3)




# ---- generated problems ----------------------------------------------------------------------------------

def _check_problem(p: MathProblem) -> None:
    lines = p.solution.split("\n")
    assert lines[-1] == f"#### {p.answer}"
    eqs = [_EQ.search(line) for line in lines[:-1]]
    assert all(eqs), p.solution
    assert len(eqs) == p.steps
    q_numbers = [int(x) for x in re.findall(r"\d+", p.question)]
    # The question's numbers, in order, are the first operand and then each step's new operand; a product
    # start is written many-digit factor first, whatever the question's order.
    written = [int(eqs[0][1])] + [int(m[3]) for m in eqs]
    if eqs[0][2] == "x" and q_numbers[:2] != written[:2]:
        assert q_numbers[:2] == written[1::-1] and written[0] >= written[1], p
        written[:2] = written[1::-1]
    assert q_numbers == written, p
    prev = None
    for i, m in enumerate(eqs):
        a, op, b, r = int(m[1]), m[2], int(m[3]), int(m[4])
        assert _OPS[op](a, b) == r, m[0]  # exact: division leaves no remainder
        if i > 0:
            assert a == prev, p.solution  # each step continues from the previous result
        prev = r
    assert prev == p.answer
    for x in q_numbers + [int(x) for x in re.findall(r"\d+", p.solution)]:
        assert 2 <= x <= 999, p
    assert p.domain in DOMAINS


def test_solutions_are_correct_and_small():
    problems = generate_problems(3000, seed=11, worked="plain")
    for p in problems:
        _check_problem(p)
    assert {p.steps for p in problems} == {1, 2, 3, 4}
    assert {p.domain for p in problems} == set(DOMAINS)
    ops = {m[2] for p in problems for m in _EQ.finditer(p.solution)}
    assert ops == {"+", "-", "x", "/"}


_WORK = re.compile(r"(\d+) ([-+x/]) (\d+) \[([^\]]*)\] = (\d+)")


def _read_columns(a: str, op: str, b: str, groups: list[str]) -> int:
    """The result the digit-by-digit work spells out, checking every group's arithmetic on the way."""
    assert len(a) == 3 and (len(b) == 3 if op in "+-" else len(b) == 1), (a, b)
    if op == "/":
        rem, q = 0, ""
        for x, g in zip(a, groups):
            m = re.fullmatch(r"(\d)(\d)/(\d)=(\d)\((\d\d)\)r(\d)", g)
            assert m and int(m[1]) == rem and m[2] == x and m[3] == b and int(m[5]) == int(m[4]) * int(b), g
            assert int(m[5]) + int(m[6]) == 10 * rem + int(x) and int(m[6]) < int(b), g
            rem, q = int(m[6]), q + m[4]
        assert rem == 0
        return int(q)
    carry, digits = 0, ""
    for i, g in enumerate(groups):
        x, y = a[2 - i], b[2 - i] if op != "x" else b
        if op == "-":
            m = re.fullmatch(r"([01])(\d)-(\d)-([01])=(\d)", g)
            assert m and (m[2], m[3]) == (x, y) and int(m[4]) == carry, g
            assert 10 * int(m[1]) + int(x) - int(y) - carry == int(m[5]), g
            carry, digits = int(m[1]), m[5] + digits
        elif op == "+":
            m = re.fullmatch(r"(\d)\+(\d)\+(\d)=(\d\d)", g)
            assert m and (m[1], m[2]) == (x, y) and int(m[3]) == carry and int(x) + int(y) + carry == int(m[4]), g
            carry, digits = int(m[4]) // 10, m[4][1] + digits
        else:
            m = re.fullmatch(r"(\d)x(\d)=(\d\d)\+(\d)=(\d\d)", g)
            assert m and (m[1], m[2]) == (x, y) and int(m[3]) == int(x) * int(y) and int(m[4]) == carry, g
            assert int(m[3]) + carry == int(m[5]), g
            carry, digits = int(m[5]) // 10, m[5][1] + digits
    assert carry == 0  # results stay below 1000
    return int(digits)


def test_columns_work():
    """The default solutions are the plain ones with each equation's digit-by-digit work written out."""
    columns, plain = generate_problems(2000, seed=11), generate_problems(2000, seed=11, worked="plain")
    ops = set()
    for c, p in zip(columns, plain, strict=True):
        assert (c.question, c.answer, c.steps) == (p.question, p.answer, p.steps)
        n = 0
        for line_c, line_p in zip(c.solution.split("\n"), p.solution.split("\n"), strict=True):
            m = _WORK.search(line_c)
            if m is None:
                assert line_c == line_p and line_c.startswith("####")
                continue
            n += 1
            a, op, b, work, r = m.groups()
            assert _read_columns(a, op, b, work.split(" ")) == int(r), line_c
            assert line_c.replace(m[0], f"{int(a)} {op} {int(b)} = {r}") == line_p
            ops.add(op)
        assert n == c.steps
    assert ops == {"+", "-", "x", "/"}
    assert format_example(columns[0]).count("[") == columns[0].steps
    with pytest.raises(ValueError, match="worked"):
        generate_problems(1, worked="digits")


def test_determinism_and_seeds():
    a = generate_problems(200, seed=5)
    assert a == generate_problems(200, seed=5)
    assert a != generate_problems(200, seed=6)
    assert a[:50] == generate_problems(50, seed=5)
    assert next(iter_problems(5, start=123)) == a[123] == problem_at(123, seed=5)


def test_steps_and_weights():
    assert {p.steps for p in generate_problems(100, steps=2)} == {2}
    assert {p.steps for p in generate_problems(200, steps=[1, 3])} == {1, 3}
    only3 = generate_problems(100, step_weights={3: 1.0})
    assert {p.steps for p in only3} == {3}
    mix = generate_problems(400, step_weights=[0.8, 0.2, 0, 0])
    counts = [sum(p.steps == k for p in mix) for k in (1, 2, 3, 4)]
    assert counts[0] > 2 * counts[1] > 0 and counts[2] == counts[3] == 0
    for bad in (dict(steps=5), dict(steps=[]), dict(step_weights=[1, 1]), dict(step_weights={1: 0.0}),
                dict(split="dev")):
        with pytest.raises(ValueError):
            generate_problems(1, **bad)


def test_split_disjoint_by_content():
    train = generate_problems(20_000, seed=0, split="train")
    test = generate_problems(2_000, seed=0, split="test")
    assert all(split_of(p.question) == "train" for p in train)
    assert all(split_of(p.question) == "test" for p in test)
    assert not {p.question for p in train} & {p.question for p in test}
    # Stronger: not even the numbers of a test question occur (in that order) in any training question.
    assert not {content_key(p.question) for p in train} & {content_key(p.question) for p in test}
    # The rule is a fixed function of the numbers: rewording a question never moves it across the split.
    q = test[0].question
    assert split_of(q.replace("How many", "How  many").upper()) == "test"
    share = sum(split_of(f"Tom has {i} apples and {i + 7} pears.") == "test" for i in range(4000)) / 4000
    assert 0.08 < share < 0.12
    assert {p.steps for p in test} == {1, 2, 3, 4}


# ---- GSM8K files -----------------------------------------------------------------------------------------

_GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "A shop sells 1,200 pens.", "answer": "It sells 1,200 pens.\n#### 1,200"},
]


def test_load_gsm8k_jsonl(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _GSM8K) + "\n")
    a, b = load_gsm8k_jsonl(path)
    assert a.answer == 72 and a.steps == 2 and a.domain == "gsm8k"
    assert "<<" not in a.solution and a.solution.endswith("#### 72")
    assert "48/2 = 24 clips" in a.solution
    assert b.answer == 1200 and b.steps == 0
    assert grade(a.solution, a.answer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_GSM8K[0]) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        load_gsm8k_jsonl(bad)
    with pytest.raises(DataError, match="no such file"):
        load_gsm8k_jsonl(tmp_path / "missing.jsonl")


# ---- tokenizer -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def texts():
    return [format_example(p) for p in generate_problems(600, seed=2)]


@pytest.fixture(scope="module")
def tok(texts):
    return train_tokenizer(texts, vocab_size=512)


def test_tokenizer_specials_and_digits(tok, texts):
    assert tok.vocab_size == 512
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert [tok.token_to_id(t) for t in (BOS, EOS, PAD, USER, ASSISTANT)] == [0, 1, 2, 3, 4]
    ids = tok.encode("He has 123 + 4056 = 4179 apples.")
    pieces = [tok.id_to_token(i) for i in ids]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("123405641" "79")
    for text in texts[:50]:
        for i in tok.encode(text):
            piece = tok.id_to_token(i)
            assert not any(c.isdigit() for c in piece) or (len(piece) == 1 and piece.isdigit())
    assert tok.encode("hi", add_bos=True) == [0] + tok.encode("hi")


def test_prompt_format(tok):
    for p in generate_problems(50, seed=3):
        assert format_prompt(p.question) == f"Question: {p.question}\nAnswer:"
        assert format_example(p) == format_prompt(p.question) + " " + p.solution
        assert p.solution.endswith(f"#### {p.answer}")
        # The prompt's tokens are a prefix of the training example's: evaluation sees what training saw.
        prompt = tok.encode(format_prompt(p.question))
        assert tok.encode(format_example(p))[:len(prompt)] == prompt


def test_tokenizer_round_trip_and_determinism(tok, texts):
    samples = texts[:20] + ["", "Ünïcödé — 日本語 😀\ttabs  and\n\nnewlines ", "x" * 300, "#### 1,234\n"]
    for s in samples:
        assert tok.decode(tok.encode(s)) == s
    again = train_tokenizer(texts, vocab_size=512)
    assert again.tok.to_str() == tok.tok.to_str()
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, vocab_size=100)


def test_tokenizer_matches_transformers(tok, texts, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    for s in texts[:20] + ["Ünïcödé 😀 12 + 3 = 15", f"{BOS}Question: hi{EOS}"]:
        ids = tok.encode(s)
        assert hf(s, add_special_tokens=False)["input_ids"] == ids
        assert hf(s)["input_ids"] == ids  # no BOS added implicitly: callers add it (encode(add_bos=True))
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)
        assert hf.decode(ids) == tok.decode(ids, skip_special_tokens=False)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "#### 4"}, {"role": "user", "content": "And 3 x 3?"}]
    for gen in (True, False):
        expected = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
        expected = expected["input_ids"] if not isinstance(expected, list) else expected
        assert tok.apply_chat_template(messages, add_generation_prompt=gen) == expected
    text = tok.render_chat(messages[:2])
    assert text == f"{BOS}Be brief.{USER}What is 2 + 2?{ASSISTANT}"
    ids = tok.apply_chat_template(messages[:3], add_generation_prompt=False)
    assert ids[0] == 0 and ids[-1] == 1
    # Our loader reads the same directory back, and a transformers-saved directory too.
    loaded = Tokenizer.load(tmp_path)
    assert loaded.encode(texts[0]) == tok.encode(texts[0]) and loaded.eos_id == 1
    assert loaded.apply_chat_template(messages) == tok.apply_chat_template(messages)
    hf.save_pretrained(str(tmp_path / "hf"))
    reloaded = Tokenizer.load(tmp_path / "hf")
    assert (reloaded.bos_id, reloaded.eos_id, reloaded.pad_id) == (0, 1, 2)
    assert reloaded.apply_chat_template(messages) == tok.apply_chat_template(messages)
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "nowhere")


# ---- sources ---------------------------------------------------------------------------------------------

def test_load_documents(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\n\n  \nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third"}) + "\n\n" + json.dumps(_GSM8K[0]) + "\n")
    docs = load_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])
    assert docs[:3] == ["first doc\nline two", "second doc", "third"]
    assert docs[3].startswith("Question: Natalia") and docs[3].endswith("#### 72") and "<<" not in docs[3]
    assert load_documents(str(tmp_path)) == docs  # a directory: its files in sorted order


def test_load_documents_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_documents([str(tmp_path / "missing.txt")])
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no documents"):
        load_documents([str(tmp_path / "empty.txt")])
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"title": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no usable fields"):
        load_documents([str(tmp_path / "bad.jsonl")])
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl:1: invalid JSON"):
        load_documents([str(tmp_path / "broken.jsonl")])
    with pytest.raises(DataError):
        load_documents([])
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(DataError, match="pip install datasets"):
            load_documents(["hf:openai/gsm8k:main:train"])


# ---- packing ---------------------------------------------------------------------------------------------

def test_packing_layout(tok):
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 1]]
    ps = PackedStream(docs, seq_len=4, eos_id=1, bos_id=0)
    b = ps.next_batch(3)
    assert b.dtype == torch.long and b.shape == (3, 5)
    flat = b.flatten().tolist()
    assert flat == [0, 10, 11, 12, 1, 0, 20, 21, 1, 0, 30, 31, 32, 33, 1]  # EOS not doubled
    padded = PackedStream(docs, seq_len=5, eos_id=1, bos_id=0, pad_id=2, mode="pad").next_batch(3).tolist()
    assert padded == [[0, 10, 11, 12, 1, 2], [0, 20, 21, 1, 2, 2], [0, 30, 31, 32, 33, 1]]
    stream = PackedStream(math_stream(tok, seed=0), seq_len=32, eos_id=1, bos_id=0)
    text = tok.decode(stream.next_batch(16).flatten().tolist(), skip_special_tokens=False)
    assert text.startswith(f"{BOS}Question: ") and f"{EOS}{BOS}Question: " in text


def _batches(stream, n, b=3):
    return [stream.next_batch(b) for _ in range(n)]


@pytest.mark.parametrize("mode", ["concat", "pad"])
def test_packing_resume(tok, mode):
    def make():
        return PackedStream(math_stream(tok, seed=4, step_weights=[1, 1, 1, 1]), seq_len=48, eos_id=1, bos_id=0,
                            pad_id=2, mode=mode)

    ref = make()
    _batches(ref, 3)
    state = json.loads(json.dumps(ref.state_dict()))  # a state survives JSON
    expected = _batches(ref, 4)
    resumed = make()
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(_batches(resumed, 4), expected, strict=True))
    # Lists (shuffled per epoch), callables and fresh one-shot iterators resume the same way.
    docs = [tok.encode(f"doc {i} " * (i % 5 + 1)) for i in range(7)]
    sources = [lambda: docs, lambda: (lambda start: (docs[i % 7] for i in itertools.count(start))),
               lambda: iter(docs * 100)]
    for src in sources:
        a = PackedStream(src(), seq_len=8, eos_id=1, bos_id=0, pad_id=2, mode=mode,
                         shuffle_seed=7 if src is sources[0] else None)
        _batches(a, 5)
        st = a.state_dict()
        want = _batches(a, 5)
        b = PackedStream(src(), seq_len=8, eos_id=1, bos_id=0, pad_id=2, mode=mode,
                         shuffle_seed=7 if src is sources[0] else None)
        b.load_state_dict(st)
        assert all(torch.equal(x, y) for x, y in zip(_batches(b, 5), want, strict=True))
    with pytest.raises(DataError, match="seq_len"):
        PackedStream(docs, seq_len=9, eos_id=1).load_state_dict(st)


def test_packing_rank_sharding(tok):
    def make(rank=0, world=1):
        return PackedStream(math_stream(tok, seed=9), seq_len=24, eos_id=1, bos_id=0, rank=rank, world_size=world)

    whole = _batches(make(), 3, b=8)
    shards = [_batches(make(r, 4), 3, b=2) for r in range(4)]
    for step in range(3):
        assert torch.equal(torch.cat([shards[r][step] for r in range(4)]), whole[step])
    with pytest.raises(ValueError):
        make(rank=4, world=4)


def test_packing_errors():
    with pytest.raises(DataError):
        PackedStream([], seq_len=8, eos_id=1)
    with pytest.raises(ValueError):
        PackedStream([[1]], seq_len=8, eos_id=1, mode="pad")  # pad mode needs pad_id
    with pytest.raises(DataError, match="ended"):
        PackedStream(iter([[5, 6]]), seq_len=8, eos_id=1).next_batch(1)
