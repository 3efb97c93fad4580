"""Built-in corpus: GSM8K-style math word problems generated procedurally from a seed, with a grader.

A problem is a chain of 1 to 4 arithmetic steps (+, -, x, exact /) on one running quantity, told as a
short story in one of several domains. Its solution has one line per step that writes the equation out
(``She now has 23 + 45 = 68 apples.``) and ends with GSM8K's ``#### <answer>`` line, so a model only ever
has to do one operation on numbers it can copy from the question or the line above. Every number, operand
and intermediate result, is an integer in 2..999; multipliers and divisors are single digits (2..9).
By default each equation also shows its digit-by-digit work (``worked="columns"``, see `equation`):
``She now has 023 + 045 [3+5+0=08 2+4+0=06 0+0+0=00] = 68 apples.``

Train/test split by content: `content_key` is the sequence of numbers in a question and `split_of` hashes
it, so a test question, and any rewording of it with other names, domain or phrasing, can never be
produced for training (`iter_problems` rejects problems of the other split).

Problem ``i`` of a stream is a pure function of ``(seed, split, i)``, so streams can be resumed at any
index in O(1) (``iter_problems(..., start=i)``).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

MIN_VALUE = 2  # every number in a problem (operands and results) is in MIN_VALUE..MAX_VALUE
MAX_VALUE = 999  # (counts of at least 2 keep every noun plural: no "1 apples")
MAX_STEPS = 4
TEST_FRACTION = 0.1  # share of the content-key space that belongs to the test split
_TEST_BUCKETS = 1000  # split_of: sha256(content key) mod _TEST_BUCKETS < TEST_FRACTION * _TEST_BUCKETS -> test

_SYMBOL = {"add": "+", "sub": "-", "mul": "x", "div": "/"}
WORKED_STYLES = ("columns", "plain")  # how an equation line is written out; see `equation`


@dataclass
class MathProblem:
    question: str
    solution: str  # worked steps, one per line, then "#### <answer>"
    answer: int
    steps: int  # number of arithmetic steps (equation lines) in the solution
    domain: str


# ---- prompt format (training text and evaluation) --------------------------------------------------------

def format_prompt(question: str) -> str:
    """The text a model is given; it should continue with " " + solution (greedy decoding until EOS)."""
    return f"Question: {question.strip()}\nAnswer:"


def format_example(problem: MathProblem) -> str:
    """One training document: the prompt followed by the worked solution."""
    return format_prompt(problem.question) + " " + problem.solution


def _check_worked(worked: str) -> None:
    if worked not in WORKED_STYLES:
        raise ValueError(f"worked must be one of {WORKED_STYLES}, got {worked!r}")


def equation(a: int, op: str, b: int, worked: str = "columns") -> str:
    """The equation of one step as a solution line writes it.

    ``plain``: ``959 + 18 = 977``. ``columns`` (the default): the numbers padded to three digits, with the
    digit-by-digit work in brackets before the result, one fixed-width group per column::

        959 + 018 [9+8+0=17 5+1+1=07 9+0+0=09] = 977               units first: x + y + carry = carry, digit
        093 - 008 [13-8-0=5 09-0-1=8 00-0-0=0] = 85                units first: borrow, x - y - borrow = digit
        045 x 6 [5x6=30+0=30 4x6=24+3=27 0x6=00+2=02] = 270        units first: x times y, + carry = carry, digit
        138 / 3 [01/3=0(00)r1 13/3=4(12)r1 18/3=6(18)r0] = 46      hundreds first: remainder and digit / divisor
                                                                   = quotient (quotient x divisor) r remainder

    Every digit a token needs is then at a fixed distance before it (the operand digits in the padded
    equation, the carry in the group before), so each token is a one-digit table lookup or a copy rather
    than a whole 3-digit sum in one go; the result reads the groups' digits back in reverse. Products and
    quotients write their intermediate product first: adding the carry to a product in the same token, or
    finding a remainder without the product, were the errors left in 1-step problems without it. On the
    demo's 2-core budget this is what makes 3-digit arithmetic learnable (README, demo section). ``op`` is
    add/sub/mul/div.
    """
    r = _apply(op, a, b)
    sym = _SYMBOL[op]
    if worked == "plain":
        return f"{a} {sym} {b} = {r}"
    _check_worked(worked)
    digits = [int(c) for c in f"{a:03d}"]  # hundreds, tens, units
    groups = []
    if op == "div":
        rem = 0
        for x in digits:
            q, new = divmod(10 * rem + x, b)
            groups.append(f"{rem}{x}/{b}={q}({q * b:02d})r{new}")
            rem = new
        return f"{a:03d} / {b} [{' '.join(groups)}] = {r}"
    other = [int(c) for c in f"{b:03d}"] if op != "mul" else [b] * 3
    carry = 0
    for x, y in zip(reversed(digits), reversed(other)):
        if op == "add":
            s = x + y + carry
            groups.append(f"{x}+{y}+{carry}={s:02d}")
            carry = s // 10
        elif op == "mul":
            s = x * y + carry
            groups.append(f"{x}x{y}={x * y:02d}+{carry}={s:02d}")
            carry = s // 10
        else:
            borrow = int(x - y - carry < 0)
            groups.append(f"{borrow}{x}-{y}-{carry}={10 * borrow + x - y - carry}")
            carry = borrow
    right = f"{b:03d}" if op != "mul" else str(b)
    return f"{a:03d} {sym} {right} [{' '.join(groups)}] = {r}"


# ---- grading ---------------------------------------------------------------------------------------------

_ANSWER_RE = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


def extract_answer(text: str) -> int | None:
    """The integer after the last ``####`` (commas removed), GSM8K style; None if there is none."""
    idx = text.rfind("####")
    if idx < 0:
        return None
    m = _ANSWER_RE.match(text, idx)
    if m is None:
        return None
    num = m.group(1).replace(",", "")
    if "." in num:
        whole, frac = num.split(".")
        if frac.strip("0"):
            return None
        num = whole
    try:
        return int(num)
    except ValueError:
        return None


def grade(completion: str, answer: int) -> bool:
    """True when the completion's final ``#### N`` equals the reference answer."""
    got = extract_answer(completion)
    return got is not None and got == int(answer)


# ---- split by content ------------------------------------------------------------------------------------

def content_key(question: str) -> str:
    """What identifies a problem's content: the numbers of the question, in order (names and wording aside)."""
    return " ".join(re.findall(r"\d+", question))


def split_of(question: str) -> str:
    """``"test"`` or ``"train"``: a fixed hash of `content_key`; the same for every seed and rewording."""
    digest = hashlib.sha256(content_key(question).encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % _TEST_BUCKETS
    return "test" if bucket < round(TEST_FRACTION * _TEST_BUCKETS) else "train"


# ---- domains and phrasings -------------------------------------------------------------------------------
# Placeholders: {name} {he} {He} {him} {his} {His} {item} {a} {b} {n}. Templates must contain no digits other
# than the placeholders (content_key reads the numbers of the question). Each op sentence holds exactly one
# number {n}; each start sentence holds {a} (and {b} for sum/product starts), in the order the solution uses.

@dataclass(frozen=True)
class _Domain:
    name: str
    items: tuple[str, ...]
    start: tuple[str, ...]  # "{name} has {a} {item}."  (no step)
    start_sum: tuple[str, ...]  # {a} and {b} of the item: a + b  (one step)
    start_prod: tuple[str, ...]  # {a} groups of {b}: a x b  (one step)
    add: tuple[str, ...]
    sub: tuple[str, ...]
    mul: tuple[str, ...]
    div: tuple[str, ...]
    question: tuple[str, ...]
    first_line: str  # solution line for a sum/product start: "{name} has {eq} {item}."
    step_line: str  # solution line for an op: "{He} now has {eq} {item}."
    person: bool = True  # whether {name} is a person (else a fixed subject in the templates)


_DOMAINS: tuple[_Domain, ...] = (
    _Domain(
        name="shopping",
        items=("apples", "oranges", "pencils", "erasers", "stickers", "marbles", "notebooks", "candies"),
        start=("{name} has {a} {item}.", "{name} buys {a} {item} at the store."),
        start_sum=("{name} buys {a} {item} on Monday and {b} {item} on Tuesday.",
                   "{name} has {a} red {item} and {b} blue {item}."),
        start_prod=("{name} buys {a} bags of {item} with {b} {item} in each bag.",),
        add=("{He} buys {n} more {item}.", "A friend gives {him} {n} more {item}."),
        sub=("{He} gives {n} {item} to a friend.", "{He} loses {n} {item}."),
        mul=("{He} buys more until {he} has {n} times as many {item}.",),
        div=("{He} packs the {item} equally into {n} bags and keeps one bag.",),
        question=("How many {item} does {name} have now?", "How many {item} does {he} have at the end?"),
        first_line="{name} has {eq} {item}.",
        step_line="{He} now has {eq} {item}.",
    ),
    _Domain(
        name="baking",
        items=("cookies", "muffins", "cupcakes", "rolls", "pies", "brownies"),
        start=("{name} bakes {a} {item}.", "{name} has {a} {item} on the table."),
        start_sum=("{name} bakes {a} {item} in the morning and {b} {item} in the afternoon.",),
        start_prod=("{name} bakes {a} trays of {item} with {b} {item} on each tray.",),
        add=("{He} bakes {n} more {item}.", "{His} mother brings {n} more {item}."),
        sub=("{He} sells {n} {item}.", "The family eats {n} {item}."),
        mul=("{He} bakes until {he} has {n} times as many {item}.",),
        div=("{He} puts the {item} equally on {n} plates and keeps one plate.",),
        question=("How many {item} does {name} have now?", "How many {item} are left for {him}?"),
        first_line="{name} has {eq} {item}.",
        step_line="{He} now has {eq} {item}.",
    ),
    _Domain(
        name="travel",
        items=("passengers",),
        start=("A bus has {a} passengers.", "A train leaves the city with {a} passengers."),
        start_sum=("A bus has {a} adults and {b} children on board.",),
        start_prod=("A bus has {a} rows with {b} passengers in each row.",),
        add=("At the next stop, {n} more passengers get on.", "Then {n} people get on."),
        sub=("At the next stop, {n} passengers get off.", "Then {n} people get off."),
        mul=("At the station, the number of passengers becomes {n} times as large.",),
        div=("The passengers split equally into {n} groups, and one group stays on.",),
        question=("How many passengers are on board now?", "How many passengers are there at the end?"),
        first_line="There are {eq} {item}.",
        step_line="Now there are {eq} {item}.",
        person=False,
    ),
    _Domain(
        name="school",
        items=("books", "crayons", "stickers", "worksheets", "markers"),
        start=("A teacher has {a} {item}.", "The classroom has {a} {item}."),
        start_sum=("A teacher has {a} new {item} and {b} old {item}.",),
        start_prod=("A teacher has {a} boxes of {item} with {b} {item} in each box.",),
        add=("The school sends {n} more {item}.", "Students bring {n} more {item}."),
        sub=("The teacher hands out {n} {item}.", "The class uses up {n} {item}."),
        mul=("The school gives more until there are {n} times as many {item}.",),
        div=("The {item} are shared equally by {n} classes, and the teacher keeps one share.",),
        question=("How many {item} does the teacher have now?", "How many {item} are left at the end?"),
        first_line="The teacher has {eq} {item}.",
        step_line="The teacher now has {eq} {item}.",
        person=False,
    ),
    _Domain(
        name="garden",
        items=("tulips", "roses", "carrots", "tomatoes", "seeds", "sunflowers"),
        start=("{name} plants {a} {item}.", "{name} has {a} {item} in the garden."),
        start_sum=("{name} plants {a} {item} by the fence and {b} {item} by the house.",),
        start_prod=("{name} plants {a} rows of {item} with {b} {item} in each row.",),
        add=("{He} plants {n} more {item}.", "{His} neighbor gives {him} {n} more {item}."),
        sub=("Rabbits eat {n} of the {item}.", "{He} picks {n} {item} for a friend."),
        mul=("By summer there are {n} times as many {item}.",),
        div=("{He} splits the {item} equally into {n} beds and keeps one bed.",),
        question=("How many {item} does {name} have now?", "How many {item} are in {his} garden at the end?"),
        first_line="{name} has {eq} {item}.",
        step_line="{He} now has {eq} {item}.",
    ),
    _Domain(
        name="savings",
        items=("dollars",),
        start=("{name} has {a} dollars in {his} piggy bank.", "{name} saves {a} dollars."),
        start_sum=("{name} saves {a} dollars in May and {b} dollars in June.",),
        start_prod=("{name} saves for {a} weeks and puts away {b} dollars each week.",),
        add=("{He} earns {n} more dollars.", "{His} aunt gives {him} {n} dollars."),
        sub=("{He} spends {n} dollars on a book.", "{He} pays {n} dollars for lunch."),
        mul=("{His} savings grow to {n} times as much.",),
        div=("{He} splits the money equally into {n} envelopes and keeps one envelope.",),
        question=("How many dollars does {name} have now?", "How much money does {he} have at the end?"),
        first_line="{name} has {eq} dollars.",
        step_line="{He} now has {eq} dollars.",
    ),
    _Domain(
        name="farm",
        items=("eggs", "apples", "potatoes", "pumpkins", "carrots"),
        start=("A farmer has {a} {item}.", "A farmer picks {a} {item}."),
        start_sum=("A farmer picks {a} {item} on Monday and {b} {item} on Tuesday.",),
        start_prod=("A farmer fills {a} crates with {b} {item} in each crate.",),
        add=("The farmer picks {n} more {item}.", "A neighbor brings {n} more {item}."),
        sub=("The farmer sells {n} {item} at the market.", "The farmer gives away {n} {item}."),
        mul=("By the end of the month the farmer has {n} times as many {item}.",),
        div=("The farmer splits the {item} equally into {n} baskets and keeps one basket.",),
        question=("How many {item} does the farmer have now?", "How many {item} are left at the end?"),
        first_line="The farmer has {eq} {item}.",
        step_line="The farmer now has {eq} {item}.",
        person=False,
    ),
    _Domain(
        name="game",
        items=("points", "coins", "stars", "gems"),
        start=("{name} scores {a} {item} in a game.", "{name} starts a game with {a} {item}."),
        start_sum=("{name} wins {a} {item} in the first round and {b} {item} in the second round.",),
        start_prod=("{name} wins {a} rounds and gets {b} {item} for each round.",),
        add=("{He} wins {n} more {item}.", "{He} finds {n} more {item}."),
        sub=("{He} loses {n} {item}.", "{He} spends {n} {item} in the shop."),
        mul=("A bonus gives {him} {n} times as many {item}.",),
        div=("{He} shares the {item} equally with {n} players and keeps one share.",),
        question=("How many {item} does {name} have now?", "How many {item} does {he} have at the end?"),
        first_line="{name} has {eq} {item}.",
        step_line="{He} now has {eq} {item}.",
    ),
)
DOMAINS: tuple[str, ...] = tuple(d.name for d in _DOMAINS)

_NAMES = {
    "she": ("Mia", "Emma", "Ava", "Lily", "Zoe", "Nora", "Ella", "Grace", "Ruth", "Maya", "Anna", "Sara"),
    "he": ("Tom", "Sam", "Leo", "Ben", "Max", "Jack", "Owen", "Noah", "Eli", "Finn", "Paul", "Omar"),
}
_PRONOUNS = {"she": dict(he="she", him="her", his="her"), "he": dict(he="he", him="him", his="his")}


# ---- generation ------------------------------------------------------------------------------------------

def _sample_number(rng: random.Random, lo: int, hi: int) -> int:
    """An integer in [lo, hi] with its digit count drawn uniformly first (so 1-, 2- and 3-digit numbers
    are equally common wherever the range allows)."""
    spans = [(max(lo, 10 ** (d - 1) if d > 1 else 0), min(hi, 10**d - 1)) for d in (1, 2, 3)]
    spans = [(a, b) for a, b in spans if a <= b]
    a, b = rng.choice(spans)
    return rng.randint(a, b)


def _feasible_ops(v: int) -> list[str]:
    ops = []
    if v + MIN_VALUE <= MAX_VALUE:
        ops.append("add")
    if v - MIN_VALUE >= MIN_VALUE:
        ops.append("sub")
    if 2 * v <= MAX_VALUE:
        ops.append("mul")
    if _divisors(v):
        ops.append("div")
    return ops


def _divisors(v: int) -> list[int]:
    """Single-digit divisors of v that leave a quotient of at least MIN_VALUE."""
    return [d for d in range(2, 10) if v % d == 0 and v // d >= MIN_VALUE]


def _apply(op: str, v: int, n: int) -> int:
    return {"add": v + n, "sub": v - n, "mul": v * n, "div": v // n}[op]


def _sample_operand(rng: random.Random, op: str, v: int) -> int:
    if op == "add":
        return _sample_number(rng, MIN_VALUE, MAX_VALUE - v)
    if op == "sub":
        return _sample_number(rng, MIN_VALUE, v - MIN_VALUE)
    if op == "mul":
        return rng.randint(2, min(9, MAX_VALUE // v))
    return rng.choice(_divisors(v))


def _build(rng: random.Random, steps: int, worked: str) -> MathProblem:
    dom = rng.choice(_DOMAINS)
    gender = rng.choice(("she", "he"))
    pro = _PRONOUNS[gender]
    fill = dict(name=rng.choice(_NAMES[gender]), item=rng.choice(dom.items), **pro,
                He=pro["he"].capitalize(), His=pro["his"].capitalize())

    def say(template: str, **kw) -> str:
        return template.format(**fill, **kw)

    sentences: list[str] = []
    lines: list[str] = []
    # Start: a plain amount (no step) or a sum/product of two numbers (the first step).
    kind = rng.choices(("plain", "sum", "prod"), weights=(0.6, 0.2, 0.2))[0]
    if kind == "sum":
        a = _sample_number(rng, MIN_VALUE, MAX_VALUE - MIN_VALUE)
        b = _sample_number(rng, MIN_VALUE, MAX_VALUE - a)
        v = a + b
        sentences.append(say(rng.choice(dom.start_sum), a=a, b=b))
        lines.append(say(dom.first_line, eq=equation(a, "add", b, worked)))
    elif kind == "prod":
        small = rng.randint(2, 9)
        big = _sample_number(rng, 2, MAX_VALUE // small)
        a, b = (small, big) if rng.random() < 0.5 else (big, small)
        v = a * b
        sentences.append(say(rng.choice(dom.start_prod), a=a, b=b))
        # The worked line puts the many-digit factor first whatever the question's order: the 55-minute
        # reference model solved "45 x 6" (3-digit x 1-digit: 12/12) far more often than "6 x 45" (1/9).
        lines.append(say(dom.first_line, eq=equation(max(a, b), "mul", min(a, b), worked)))
    else:
        # The first op is drawn before the start amount (weighted so that, with the sum/product starts,
        # 1-step problems are about 1/4 each of +, -, x, /), then an amount it applies to.
        first_op = rng.choices(("add", "sub", "mul", "div"), weights=(1, 5, 1, 5))[0]
        if first_op == "div":
            d = rng.randint(2, 9)
            v = d * _sample_number(rng, MIN_VALUE, MAX_VALUE // d)
        else:
            hi = {"add": MAX_VALUE - MIN_VALUE, "sub": MAX_VALUE, "mul": MAX_VALUE // 2}[first_op]
            v = _sample_number(rng, 2 * MIN_VALUE if first_op == "sub" else MIN_VALUE, hi)
        sentences.append(say(rng.choice(dom.start), a=v))
    while len(lines) < steps:
        op = first_op if kind == "plain" and len(lines) == 0 else rng.choice(_feasible_ops(v))
        n = _sample_operand(rng, op, v)
        r = _apply(op, v, n)
        sentences.append(say(rng.choice(getattr(dom, op)), n=n))
        lines.append(say(dom.step_line, eq=equation(v, op, n, worked)))
        v = r
    sentences.append(say(rng.choice(dom.question)))
    lines.append(f"#### {v}")
    question = " ".join(s[0].upper() + s[1:] for s in sentences)
    solution = "\n".join(line[0].upper() + line[1:] for line in lines)
    return MathProblem(question=question, solution=solution, answer=v, steps=steps, domain=dom.name)


def _normalize_steps(steps: int | Sequence[int] | None,
                     step_weights: Mapping[int, float] | Sequence[float] | None) -> tuple[list[int], list[float]]:
    if isinstance(step_weights, Mapping):
        choices = [int(k) for k in step_weights]
        weights = [float(step_weights[k]) for k in step_weights]
    elif step_weights is not None:
        weights = [float(w) for w in step_weights]
        if len(weights) != MAX_STEPS:
            raise ValueError(f"step_weights as a sequence needs {MAX_STEPS} weights (for 1..{MAX_STEPS} steps), "
                             f"got {len(weights)}; or pass a mapping {{steps: weight}}")
        choices = list(range(1, MAX_STEPS + 1))
    else:
        choices = list(range(1, MAX_STEPS + 1))
        weights = [1.0] * MAX_STEPS
    if steps is not None:
        allowed = {steps} if isinstance(steps, int) else {int(s) for s in steps}
        if not allowed:
            raise ValueError("steps is empty; give a number of steps in 1..4 or a list of them")
        for s in allowed:
            if not 1 <= s <= MAX_STEPS:
                raise ValueError(f"steps={s} is out of range; problems have 1..{MAX_STEPS} steps")
        pairs = [(c, w) for c, w in zip(choices, weights, strict=True) if c in allowed]
        if step_weights is None or not pairs:
            pairs = [(s, 1.0) for s in sorted(allowed)]
        choices, weights = [c for c, _ in pairs], [w for _, w in pairs]
    for c, w in zip(choices, weights, strict=True):
        if not 1 <= c <= MAX_STEPS:
            raise ValueError(f"step_weights has steps={c}; problems have 1..{MAX_STEPS} steps")
        if w < 0:
            raise ValueError(f"step_weights[{c}]={w} is negative")
    if sum(weights) <= 0:
        raise ValueError("step_weights sum to zero; give at least one positive weight")
    return choices, weights


def problem_at(index: int, seed: int = 0, split: str = "train", steps: int | Sequence[int] | None = None,
               step_weights: Mapping[int, float] | Sequence[float] | None = None,
               worked: str = "columns") -> MathProblem:
    """Problem number ``index`` of the stream ``iter_problems(seed, split, ...)``, computed directly."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    choices, weights = _normalize_steps(steps, step_weights)
    _check_worked(worked)
    return _problem_at(index, seed, split, choices, weights, worked)


def _problem_at(index: int, seed: int, split: str, choices: list[int], weights: list[float],
                worked: str) -> MathProblem:
    for attempt in range(10_000):
        rng = random.Random(f"dsv3-math:{seed}:{split}:{index}:{attempt}")
        k = rng.choices(choices, weights=weights)[0]
        p = _build(rng, k, worked)
        if split_of(p.question) == split:
            return p
    raise RuntimeError("could not generate a problem of the requested split")  # pragma: no cover


def iter_problems(seed: int = 0, split: str = "train", steps: int | Sequence[int] | None = None,
                  step_weights: Mapping[int, float] | Sequence[float] | None = None,
                  start: int = 0, worked: str = "columns") -> Iterator[MathProblem]:
    """Endless, deterministic stream of problems of one split, beginning at problem number ``start``.

    ``steps`` restricts the difficulty (an int or a list of ints in 1..4); ``step_weights`` sets the mix,
    as ``{steps: weight}`` or a list of 4 weights for 1..4 steps (default: equal weights). ``worked``
    chooses how the solutions write each equation (`equation`); the problems are the same either way.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    choices, weights = _normalize_steps(steps, step_weights)
    _check_worked(worked)
    i = start
    while True:
        yield _problem_at(i, seed, split, choices, weights, worked)
        i += 1


def generate_problems(n: int, seed: int = 0, split: str = "train", steps: int | Sequence[int] | None = None,
                      step_weights: Mapping[int, float] | Sequence[float] | None = None,
                      worked: str = "columns") -> list[MathProblem]:
    """The first ``n`` problems of ``iter_problems(seed, split, steps, step_weights, worked=worked)``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    it = iter_problems(seed, split, steps, step_weights, worked=worked)
    return [next(it) for _ in range(n)]


# ---- GSM8K files -----------------------------------------------------------------------------------------

_CALC_RE = re.compile(r"<<[^>]*>>")


def parse_gsm8k(question: str, answer: str, where: str = "GSM8K record") -> MathProblem:
    """A GSM8K record (``question``, ``answer`` ending in ``#### N``) as a MathProblem; calculator
    annotations ``<<48/2=24>>`` are removed and every solution line with one (or an ``=``) counts as a step."""
    from .sources import DataError  # local import: sources imports this module

    if not isinstance(question, str) or not isinstance(answer, str):
        raise DataError(f"{where}: 'question' and 'answer' must be strings")
    value = extract_answer(answer)
    if value is None:
        raise DataError(f"{where}: the answer has no '#### <integer>' line")
    lines = answer.strip().split("\n")
    body = [ln for ln in lines if not ln.lstrip().startswith("####")]
    steps = sum(1 for ln in body if "<<" in ln or "=" in ln)
    solution = "\n".join([_CALC_RE.sub("", ln) for ln in body] + [f"#### {value}"])
    return MathProblem(question=question.strip(), solution=solution, answer=value, steps=steps, domain="gsm8k")


def load_gsm8k_jsonl(path: str | Path) -> list[MathProblem]:
    """Problems from a GSM8K-format JSONL file (one ``{"question": ..., "answer": "... #### N"}`` a line)."""
    from .sources import DataError, iter_jsonl

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected GSM8K-format JSONL)")
    problems = []
    for where, rec in iter_jsonl(path):
        if not isinstance(rec, dict) or "question" not in rec or "answer" not in rec:
            raise DataError(f"{where}: a GSM8K record needs 'question' and 'answer' fields")
        problems.append(parse_gsm8k(rec["question"], rec["answer"], where))
    if not problems:
        raise DataError(f"{path}: no problems in the file")
    return problems
