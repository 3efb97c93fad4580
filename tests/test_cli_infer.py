"""`dsv3 generate` and `dsv3 chat` through `dsv3.cli.main`, checked against the reference `dsv3.generate`."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from dsv3 import DeepseekV3, generate
from dsv3.cli import main
from dsv3.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "tiny-cli"
    assert main(["init", "--preset", "tiny", "--out", str(path), "--seed", "5"]) == 0
    return path


@pytest.fixture(scope="module")
def bare(ckpt, tmp_path_factory) -> Path:
    """The same weights without a tokenizer."""
    path = tmp_path_factory.mktemp("cli") / "bare"
    path.mkdir()
    for f in ckpt.iterdir():
        if not f.name.startswith("tokenizer"):
            shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def tok(ckpt) -> Tokenizer:
    return Tokenizer.load(ckpt)


@pytest.fixture(scope="module")
def reference(ckpt, tok):
    """Greedy continuation by dsv3.generate, without the EOS that ends it (the engine leaves it out)."""
    model = DeepseekV3.from_pretrained(ckpt).eval()

    def run(ids: list[int], n: int) -> list[int]:
        new = generate(model, [ids], n, eos_token_id=tok.eos_id)[0]
        return new[: new.index(tok.eos_id)] if tok.eos_id in new else new

    return run


PROMPT = "Question: Ann has 4 pens and buys 7 more."


@pytest.mark.parametrize("flags", [[], ["--no-speculative"]])
def test_generate_prints_the_greedy_continuation(ckpt, tok, reference, capsys, flags):
    expected = tok.decode(reference(tok.encode(PROMPT, add_bos=True), 12))
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", PROMPT, "--max-tokens", "12", *flags]) == 0
    out, err = capsys.readouterr()
    assert out == PROMPT + expected + "\n"
    assert "tokens in" in err and "tok/s" in err


def test_generate_stop_string(ckpt, tok, reference, capsys):
    full = tok.decode(reference(tok.encode(PROMPT, add_bos=True), 24))
    assert len(full) >= 8, full
    stop = full[3:6]
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", PROMPT, "--max-tokens", "24",
                 "--stop", stop, "--stop", "\u2603"]) == 0
    out, err = capsys.readouterr()
    assert out == PROMPT + full[: full.index(stop)] + "\n"
    assert "finish: stop" in err


def test_generate_prompt_ids_without_tokenizer(bare, reference, capsys):
    ids = [0, 17, 42, 99, 300]
    new = reference(ids, 8)
    assert main(["generate", "--checkpoint", str(bare), "--prompt-ids", "0 17,42 99 300", "--max-tokens", "8"]) == 0
    out, _ = capsys.readouterr()
    assert out == "0 17 42 99 300 |" + "".join(f" {t}" for t in new) + "\n"
    # text needs a tokenizer: a clear error, exit status 2
    assert main(["generate", "--checkpoint", str(bare), "--prompt", "hi"]) == 2
    assert "--prompt-ids" in capsys.readouterr().err


def test_generate_n_samples_are_seeded(ckpt, capsys):
    args = ["generate", "--checkpoint", str(ckpt), "--prompt", PROMPT, "--max-tokens", "8", "--temperature", "1",
            "--seed", "7", "--n", "2"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    assert "--- sample 0 (" in first and "--- sample 1 (" in first
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", PROMPT, "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_chat_history_clear_and_exit(ckpt, tok, reference, capsys, monkeypatch):
    q1, q2 = "What is 2 + 3?", "And 4 + 4?"

    def reply(messages) -> str:
        return tok.decode(reference(tok.apply_chat_template(messages), 6))

    r1 = reply([{"role": "user", "content": q1}])
    r2 = reply([{"role": "user", "content": q1}, {"role": "assistant", "content": r1},
                {"role": "user", "content": q2}])
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{q1}\n/clear\n\n{q1}\n{q2}\n/exit\nnever read\n"))
    assert main(["chat", "--checkpoint", str(ckpt), "--max-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out == f"{r1}\n(conversation cleared)\n{r1}\n{r2}\n"


def test_chat_ends_at_end_of_input(ckpt, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["chat", "--checkpoint", str(ckpt)]) == 0
    assert capsys.readouterr().out == ""
