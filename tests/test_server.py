"""The OpenAI-compatible server as a user meets it: a real `dsv3 serve` process on a free loopback port,
driven by the official `openai` package (and raw httpx where the client hides the HTTP).

Two servers share one random tiny checkpoint: an open one, and a strict one (--api-key, --max-batch 1,
--max-waiting 1) for 401 and 429.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from dsv3.cli import main as dsv3_main
from dsv3.data.tokenizer import Tokenizer

KEY = "test-key-123"
LONG = {"ignore_eos": True}  # random weights may sample EOS at any step; these tests want exact lengths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint: Path, log: Path, *flags: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("DSV3_API_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dsv3", "serve", "--checkpoint", str(checkpoint), "--port", str(self.port),
             "--log-level", "warning", *flags],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)  # a file, not a pipe nobody drains

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dsv3 serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"dsv3 serve not ready after {timeout} s:\n{self.log.read_text()}")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def client(self, api_key: str = "none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kw)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "tiny-serve"  # the directory name is the model id
    assert dsv3_main(["init", "--preset", "tiny", "--out", str(path), "--seed", "3"]) == 0
    return path


@pytest.fixture(scope="module")
def servers(checkpoint, tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve-logs")
    both = [Server(checkpoint, logs / "open.log"),
            Server(checkpoint, logs / "strict.log", "--api-key", KEY, "--max-batch", "1", "--max-waiting", "1")]
    try:
        for s in both:
            s.wait_ready()
        yield both
    finally:
        for s in both:
            s.stop()


@pytest.fixture(scope="module")
def server(servers) -> Server:
    return servers[0]


@pytest.fixture(scope="module")
def strict(servers) -> Server:
    return servers[1]


@pytest.fixture(scope="module")
def tok(checkpoint) -> Tokenizer:
    return Tokenizer.load(checkpoint)


MODEL = "tiny-serve"
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 12 + 30?"}]


def _chat(client, **kw):
    args = dict(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, extra_body=LONG)
    args.update(kw)
    return client.chat.completions.create(**args)


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert server.client().models.retrieve(MODEL).id == MODEL
    health = server.health()
    assert health["status"] == "ok" and health["model"] == MODEL
    assert {"running", "waiting", "free_blocks", "total_blocks"} <= set(health)


def test_chat_usage_and_stream_agree(server, tok):
    client = server.client()
    r = _chat(client)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.apply_chat_template(CHAT))
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8

    chunks = list(_chat(client, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: streaming changes nothing
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])
    # max_completion_tokens is the newer name of max_tokens
    r2 = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=3, temperature=0,
                                        extra_body=LONG)
    assert r2.usage.completion_tokens == 3 and choice.message.content.startswith(r2.choices[0].message.content)


def test_completions_text_ids_stream_and_logprobs(server, tok):
    client = server.client()
    prompt = "Question: Tom has 3 apples."
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                                  extra_body=LONG)
    c = r.choices[0]
    assert r.object == "text_completion" and c.finish_reason == "length" and r.usage.completion_tokens == 6
    ids = tok.encode(prompt, add_bos=True)
    assert r.usage.prompt_tokens == len(ids)
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 3
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the most likely token

    # the same prompt as token ids gives the same completion
    r_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, extra_body=LONG)
    assert r_ids.choices[0].text == c.text and r_ids.usage.prompt_tokens == len(ids)

    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=LONG))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == len(ids)

    # a list of prompts: one choice per prompt (times n), in order
    batch = client.completions.create(model=MODEL, prompt=[prompt, "Answer:"], max_tokens=6, temperature=0,
                                      extra_body=LONG)
    assert [ch.index for ch in batch.choices] == [0, 1] and batch.choices[0].text == c.text


def test_chat_logprobs(server):
    r = _chat(server.client(), max_tokens=5, logprobs=True, top_logprobs=4)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for t in content:
        assert len(t.top_logprobs) == 4
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert bytes(t.bytes).decode("utf-8", errors="replace") == t.token
    streamed = list(_chat(server.client(), max_tokens=5, logprobs=True, top_logprobs=4, stream=True))
    tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == [t.token for t in content]


def test_seed_n_and_penalties(server):
    client = server.client()
    kw = dict(max_tokens=10, temperature=1.0, n=3, seed=1234)
    a, b = _chat(client, **kw), _chat(client, **kw)
    texts_a = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts_a == [c.message.content for c in b.choices]  # same seed, same samples
    assert len(set(texts_a)) > 1  # the n samples are independent
    assert a.usage.completion_tokens == 30
    other = _chat(client, max_tokens=10, temperature=1.0, n=3, seed=99)
    assert [c.message.content for c in other.choices] != texts_a
    # n > 1 streams: every choice streams its own text and ends once
    chunks = list(_chat(client, stream=True, **kw))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(3)]
    assert streamed == texts_a
    assert sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason) == [0, 1, 2]
    # penalties and top_p / top_k are accepted and change nothing about the shape of the answer
    r = _chat(client, max_tokens=6, temperature=0.8, top_p=0.9, presence_penalty=1.5, frequency_penalty=0.5,
              seed=5, extra_body={**LONG, "top_k": 20})
    assert r.usage.completion_tokens == 6


def test_stop_strings(server):
    client = server.client()
    full = _chat(client, max_tokens=24).choices[0].message.content
    assert len(full) >= 8, f"need some text to cut: {full!r}"
    stop = full[4:7]
    expected = full[: full.index(stop)]
    for s in (stop, [stop, "\u2603never"]):  # a string or a list
        r = _chat(client, max_tokens=24, stop=s)
        assert r.choices[0].message.content == expected
        assert r.choices[0].finish_reason == "stop"
    chunks = list(_chat(client, max_tokens=24, stop=[stop], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    r = client.completions.create(model=MODEL, prompt="Question:", max_tokens=24, temperature=0, stop=stop[:2],
                                  extra_body=LONG)
    assert stop[:2] not in r.choices[0].text


def _status(fn) -> tuple[int, dict]:
    try:
        fn()
    except openai.APIStatusError as e:
        return e.status_code, e.body
    raise AssertionError("the request should have failed")


def test_errors_are_openai_shaped_and_the_server_survives(server, tok):
    client = server.client()
    status, body = _status(lambda: client.chat.completions.create(model="gpt-4", messages=CHAT))
    assert status == 404 and body["code"] == "model_not_found" and "gpt-4" in body["message"]
    status, body = _status(lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "nobody"}]))
    assert status == 422 and body["type"] == "invalid_request_error"
    status, body = _status(lambda: _chat(client, temperature=-1.0))
    assert status == 400 and body["param"] == "temperature"
    status, body = _status(lambda: _chat(client, top_p=0))
    assert status == 400 and body["param"] == "top_p"
    status, body = _status(lambda: _chat(client, n=0))
    assert status == 400
    status, body = _status(lambda: _chat(client, top_logprobs=3))  # without logprobs=True
    assert status == 400 and body["param"] == "top_logprobs"
    status, body = _status(lambda: _chat(client, tools=[{"type": "function", "function": {"name": "f"}}]))
    assert status == 400
    # a prompt longer than the context (tiny: 1024 positions)
    too_long = [{"role": "user", "content": "1 " * 1500}]
    status, body = _status(lambda: client.chat.completions.create(model=MODEL, messages=too_long, max_tokens=4))
    assert status == 400 and body["code"] == "context_length_exceeded"
    status, body = _status(lambda: client.completions.create(model=MODEL, prompt=[5] * 1020, max_tokens=10))
    assert status == 400 and body["code"] == "context_length_exceeded"
    status, body = _status(lambda: client.completions.create(model=MODEL, prompt=[], max_tokens=4))
    assert status == 400

    raw = httpx.Client(base_url=server.url, timeout=30)
    r = raw.post("/v1/chat/completions", json={"model": MODEL})
    assert r.status_code == 422 and "messages" in r.json()["error"]["message"]
    r = raw.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (1 << 20)}]}).encode()
    r = raw.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "too large" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(20):
            yield b"x" * 65536

    r = raw.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = raw.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()

    # still serving, and nothing left behind
    assert _chat(client, max_tokens=3).usage.completion_tokens == 3
    h = server.health()
    assert h["running"] == 0 and h["waiting"] == 0 and h["free_blocks"] == h["total_blocks"]


def _wait_idle(server: Server, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = server.health()
        if (h["running"] == 0 and h["waiting"] == 0) or time.monotonic() > deadline:
            return h
        time.sleep(0.05)


def _wait_running(server: Server, running: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while server.health()["running"] < running:
        assert time.monotonic() < deadline, f"no request started running: {server.health()}"
        time.sleep(0.02)


def test_disconnect_mid_stream_frees_the_request(server):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 900, "temperature": 0, "stream": True, **LONG}
    before = server.health()["generated_tokens"]
    with httpx.Client(base_url=server.url, timeout=30) as raw:
        with raw.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert got[0].startswith("data: ")
            _wait_running(server, 1)
        # leaving the block closes the connection long before 900 tokens
    h = _wait_idle(server)
    assert h["running"] == 0 and h["waiting"] == 0 and h["free_blocks"] == h["total_blocks"], h
    assert h["generated_tokens"] - before < 900  # aborted, not run to the end
    assert _chat(server.client(), max_tokens=2).usage.completion_tokens == 2


def test_disconnect_while_waiting_for_a_full_answer(server):
    body = {"model": MODEL, "prompt": "Question:", "max_tokens": 1000, "temperature": 0, **LONG}
    before = server.health()["generated_tokens"]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 1000 tokens
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    h = _wait_idle(server)
    assert h["running"] == 0 and h["waiting"] == 0 and h["free_blocks"] == h["total_blocks"], h
    assert h["generated_tokens"] - before < 1000


def test_api_key(strict):
    status, body = _status(lambda: strict.client(api_key="wrong").models.list())
    assert status == 401 and body["code"] == "invalid_api_key"
    r = httpx.get(strict.url + "/v1/models")  # no Authorization header at all
    assert r.status_code == 401 and "error" in r.json()
    assert strict.health()["status"] == "ok"  # /health needs no key
    assert [m.id for m in strict.client(api_key=KEY).models.list().data] == [MODEL]
    assert _chat(strict.client(api_key=KEY), max_tokens=2).usage.completion_tokens == 2


def test_queue_full_is_429(strict):
    client = strict.client(api_key=KEY)
    before = strict.health()["generated_tokens"]
    first = _chat(client, max_tokens=900, stream=True)  # takes the one batch slot
    try:
        _wait_running(strict, 1)
        second = _chat(client, max_tokens=900, stream=True)  # waits: the one waiting place
        try:
            status, body = _status(lambda: _chat(client, max_tokens=2))
            assert status == 429 and body["type"] == "rate_limit_error"
        finally:
            second.close()
    finally:
        first.close()
    h = _wait_idle(strict)
    assert h["running"] == 0 and h["waiting"] == 0 and h["generated_tokens"] - before < 900, h  # both aborted
    assert _chat(client, max_tokens=2).usage.completion_tokens == 2  # and serving again


def test_16_concurrent_streams_match_greedy(server):
    prompts = [[{"role": "user", "content": f"What is {i} + {2 * i + 1}?" + " Show the steps." * (i % 4)}]
               for i in range(16)]
    client = server.client()
    expected = [client.chat.completions.create(model=MODEL, messages=m, max_tokens=12, temperature=0,
                                               extra_body=LONG).choices[0].message.content for m in prompts]

    async def one(aclient, messages):
        stream = await aclient.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                       stream=True, stream_options={"include_usage": True},
                                                       extra_body=LONG)
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        return text, finish, usage.completion_tokens

    async def run_all():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                                      timeout=120) as aclient:
            return await asyncio.gather(*(one(aclient, m) for m in prompts))

    results = asyncio.run(run_all())
    assert [r[0] for r in results] == expected
    assert all(r[1] == "length" and r[2] == 12 for r in results)
    h = _wait_idle(server)
    assert h["free_blocks"] == h["total_blocks"]


# ---- in process (no HTTP server): an engine without a tokenizer, and an engine that fails ---------------
def test_tokenizer_less_engine_and_engine_failure_in_process(monkeypatch):
    from hf_oracle import random_model, tiny_config

    from dsv3 import generate
    from dsv3.infer import Engine
    from dsv3.serve import create_app

    model = random_model(tiny_config(), seed=0)
    engine = Engine(model, None, max_batch=4)
    app = create_app(engine)
    real_step, failures = engine.step, []

    def step_that_fails_once():
        if not failures:
            failures.append(1)
            raise RuntimeError("boom")
        return real_step()

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            chat = {"model": "dsv3", "messages": [{"role": "user", "content": "x"}]}
            r = await c.post("/v1/chat/completions", json=chat)
            assert r.status_code == 400 and r.json()["error"]["code"] == "no_tokenizer"
            r = await c.post("/v1/completions", json={"model": "dsv3", "prompt": "text"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "no_tokenizer"
            body = {"model": "dsv3", "prompt": [3, 1, 4, 1, 5], "max_tokens": 6, "temperature": 0, "logprobs": 2}
            r = await c.post("/v1/completions", json={**body, "stop": ["a"]})
            assert r.status_code == 400 and "stop" in r.json()["error"]["message"]
            r = await c.post("/v1/completions", json={**body, "prompt": [3, 1000]})  # vocab 97
            assert r.status_code == 400

            r = await c.post("/v1/completions", json=body)
            choice = r.json()["choices"][0]
            assert r.status_code == 200 and choice["text"] == ""  # no tokenizer: ids only
            ids = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
            assert ids == generate(model, [[3, 1, 4, 1, 5]], 6, eos_token_id=None)[0]

            monkeypatch.setattr(engine, "step", step_that_fails_once)
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 503 and "boom" in r.json()["error"]["message"]
            r = await c.post("/v1/completions", json=body)  # the engine thread lives on
            assert r.status_code == 200 and r.json()["choices"][0]["logprobs"]["tokens"] == choice["logprobs"]["tokens"]
            health = (await c.get("/health")).json()
            assert health["running"] == 0 and health["free_blocks"] == health["total_blocks"]

    app.state.runner.start()  # ASGITransport does not run the lifespan
    try:
        asyncio.run(go())
    finally:
        app.state.runner.stop()
