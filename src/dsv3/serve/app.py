"""The OpenAI-compatible HTTP API over an Engine: /v1/chat/completions, /v1/completions, /v1/models, /health.

Each HTTP request becomes one engine request per prompt (the n choices of a prompt are one engine request);
their outputs stream back through an EngineRunner. Streams are Server-Sent Events (``data: {json}`` chunks
then ``data: [DONE]``). A client that disconnects, streaming or not, has its requests aborted, which frees
their cache blocks at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..infer.engine import Engine, EngineFull, RequestOutput, RequestTooLong
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    error_body,
    usage,
)
from .runner import EngineFailure, EngineRunner, Submission

log = logging.getLogger("dsv3.serve")

DEFAULT_MAX_BODY_BYTES = 1 << 20


def create_app(engine: Engine, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """A FastAPI app serving ``engine`` under the id ``engine.model_name``.

    api_key: when set, every /v1/ route needs ``Authorization: Bearer <api_key>`` (/health stays open).
    max_body_bytes: larger request bodies are refused with 413 (from Content-Length, and while reading).
    """
    runner = EngineRunner(engine)

    @asynccontextmanager
    async def lifespan(app):
        runner.start()
        try:
            yield
        finally:
            runner.stop()

    app = FastAPI(title="dsv3", lifespan=lifespan)
    app.state.runner = runner
    server = _Server(engine, runner)

    # ---- errors: every failure is an OpenAI-style body -------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(error_body("the request body is not valid JSON"), status_code=400)

        def where(e) -> str:
            return ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"

        message = "; ".join(f"{where(e)}: {e.get('msg')}" for e in errors[:5]) or "invalid request body"
        return JSONResponse(error_body(message, param=where(errors[0]) if errors else None), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(str(exc.detail), code=code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):  # logged with its traceback by the server; the client gets JSON
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return JSONResponse(error_body(f"internal server error: {type(exc).__name__}", type="server_error"),
                            status_code=500)

    # ---- routes ---------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        status = "ok" if runner.alive else "engine stopped"
        return JSONResponse({"status": status, "model": engine.model_name, **runner.stats},
                            status_code=200 if runner.alive else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        server.check_model(model_id)
        return server.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await server.chat(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await server.completion(body, request)

    # Pure ASGI (not @app.middleware) so it sees the body before FastAPI parses it, and so the replayed
    # receive() still reports the client's disconnect to the routes.
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


class _Server:
    """What the routes do, kept apart from FastAPI's wiring."""

    def __init__(self, engine: Engine, runner: EngineRunner):
        self.engine = engine
        self.runner = runner
        self.tokenizer = engine.tokenizer
        self.texts = TokenTexts(self.tokenizer)
        self.created = int(time.time())

    def model_card(self) -> dict:
        return {"id": self.engine.model_name, "object": "model", "created": self.created, "owned_by": "dsv3",
                "max_model_len": self.engine.max_context}

    def check_model(self, name: str) -> None:
        if name != self.engine.model_name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.engine.model_name!r}",
                           param="model", code="model_not_found")

    def _need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise APIError(400, f"this checkpoint has no tokenizer.json, so {what} is not possible; "
                                "send token ids to /v1/completions instead", code="no_tokenizer")

    async def _submit(self, prompts: list[list[int]], params, request_id: str, prompt_param: str) -> Submission:
        try:
            return await self.runner.submit(prompts, params, request_id)
        except RequestTooLong as e:
            raise APIError(400, str(e), param=prompt_param, code="context_length_exceeded") from None
        except EngineFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", type="rate_limit_error",
                           code="queue_full") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except EngineFailure as e:
            raise APIError(503, str(e), type="server_error") from None

    def _max_tokens(self, requested: int | None, prompts: list[list[int]]) -> int:
        """The request's max_tokens, or by default all the context the longest prompt leaves."""
        if requested is not None:
            return requested
        return max(1, self.engine.max_context - max(len(p) for p in prompts))

    # ---- /v1/chat/completions -------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, request: Request):
        self.check_model(req.model)
        req.check_supported()
        self._need_tokenizer("chat")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        params = req.sampling_params(self._max_tokens(req.requested_max_tokens(), [prompt]), req.logprobs_k())
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        sub = await self._submit([prompt], params, rid, "messages")
        if req.stream:
            return _sse(self._chat_stream(sub, rid, req, len(prompt)), sub)
        outs = await _collect(sub, request)
        if outs is None:
            return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
        choices = []
        completion_tokens = 0
        for seq in outs[0].outputs:
            completion_tokens += len(seq.token_ids)
            choices.append({
                "index": seq.index,
                "message": {"role": "assistant", "content": seq.text},
                "logprobs": chat_logprobs(seq.logprobs or [], self.texts) if params.logprobs is not None else None,
                "finish_reason": seq.finish_reason,
            })
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.engine.model_name,
                "choices": choices, "usage": usage(len(prompt), completion_tokens), "system_fingerprint": None}

    async def _chat_stream(self, sub: Submission, rid: str, req: ChatCompletionRequest, prompt_tokens: int):
        created, model = int(time.time()), self.engine.model_name
        include_usage = req.include_usage
        want_logprobs = req.logprobs_k() is not None

        def chunk(index: int, delta: dict, logprobs=None, finish_reason=None) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                 "finish_reason": finish_reason}]}
            if include_usage:
                body["usage"] = None
            return _event(body)

        n = req.n or 1
        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
        sent_logprobs = [0] * n
        finished: set[int] = set()
        completion_tokens = 0
        async for out in sub:
            for seq in out.outputs:
                if seq.index in finished:
                    continue
                lp = None
                if want_logprobs and seq.logprobs and len(seq.logprobs) > sent_logprobs[seq.index]:
                    lp = chat_logprobs(seq.logprobs[sent_logprobs[seq.index]:], self.texts)
                    sent_logprobs[seq.index] = len(seq.logprobs)
                if seq.delta_text or lp:
                    yield chunk(seq.index, {"content": seq.delta_text}, lp)
                if seq.finish_reason is not None:
                    finished.add(seq.index)
                    completion_tokens += len(seq.token_ids)
                    yield chunk(seq.index, {}, None, seq.finish_reason)
        if include_usage:
            yield _event({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                          "choices": [], "usage": usage(prompt_tokens, completion_tokens)})

    # ---- /v1/completions ------------------------------------------------------------------------------
    async def completion(self, req: CompletionRequest, request: Request):
        self.check_model(req.model)
        req.check_supported()
        raw = req.prompt_list()
        if isinstance(raw[0], str):
            self._need_tokenizer("a text prompt")
            add_bos = self.tokenizer.bos_id is not None
            prompts = [self.tokenizer.encode(p, add_bos=add_bos) for p in raw]
        else:
            prompts = raw
        if any(len(p) == 0 for p in prompts):
            raise APIError(400, "every prompt needs at least one token", param="prompt")
        params = req.sampling_params(self._max_tokens(req.max_tokens, prompts), req.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        sub = await self._submit(prompts, params, rid, "prompt")
        if req.stream:
            return _sse(self._completion_stream(sub, rid, req, sum(len(p) for p in prompts)), sub)
        outs = await _collect(sub, request)
        if outs is None:
            return JSONResponse({}, status_code=499)
        choices = []
        completion_tokens = 0
        for p, out in enumerate(outs):
            for seq in out.outputs:
                completion_tokens += len(seq.token_ids)
                lp = completion_logprobs(seq.logprobs or [], self.texts) if params.logprobs is not None else None
                choices.append({"index": p * params.n + seq.index, "text": seq.text, "logprobs": lp,
                                "finish_reason": seq.finish_reason})
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.engine.model_name,
                "choices": choices, "usage": usage(sum(len(p) for p in prompts), completion_tokens),
                "system_fingerprint": None}

    async def _completion_stream(self, sub: Submission, rid: str, req: CompletionRequest, prompt_tokens: int):
        created, model = int(time.time()), self.engine.model_name
        include_usage = req.include_usage
        n = req.n or 1
        prompt_index = {r: i for i, r in enumerate(sub.request_ids)}
        sent_logprobs: dict[int, int] = {}
        text_len: dict[int, int] = {}  # where the next logprob token's text starts, per choice
        finished: set[int] = set()
        completion_tokens = 0

        def chunk(index: int, text: str, logprobs=None, finish_reason=None) -> str:
            body = {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
            if include_usage:
                body["usage"] = None
            return _event(body)

        async for out in sub:
            for seq in out.outputs:
                index = prompt_index[out.request_id] * n + seq.index
                if index in finished:
                    continue
                lp = None
                if req.logprobs is not None and seq.logprobs and len(seq.logprobs) > sent_logprobs.get(index, 0):
                    lp = completion_logprobs(seq.logprobs[sent_logprobs.get(index, 0):], self.texts,
                                             offset=text_len.get(index, 0))
                    sent_logprobs[index] = len(seq.logprobs)
                    text_len[index] = text_len.get(index, 0) + sum(len(t) for t in lp["tokens"])
                if seq.delta_text or lp or seq.finish_reason is not None:
                    yield chunk(index, seq.delta_text, lp, seq.finish_reason)
                if seq.finish_reason is not None:
                    finished.add(index)
                    completion_tokens += len(seq.token_ids)
        if include_usage:
            yield _event({"id": rid, "object": "text_completion", "created": created, "model": model,
                          "choices": [], "usage": usage(prompt_tokens, completion_tokens)})


# ---- helpers ---------------------------------------------------------------------------------------------
def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _sse(events, sub: Submission) -> StreamingResponse:
    """Stream ``events`` as Server-Sent Events, ending with ``data: [DONE]``. Starlette cancels the stream
    when the client disconnects; the ``finally`` then aborts the requests, freeing their cache blocks."""

    async def body():
        try:
            async for event in events:
                yield event
        except EngineFailure as e:
            yield _event(error_body(str(e), type="server_error"))
        finally:
            sub.cancel()  # a no-op when everything finished
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _collect(sub: Submission, request: Request) -> list[RequestOutput] | None:
    """The final RequestOutput of each prompt, in prompt order; None (requests aborted) if the client
    disconnects first."""
    finals: dict[str, RequestOutput] = {}

    async def consume():
        async for out in sub:
            if out.finished:
                finals[out.request_id] = out

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(consume()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            sub.cancel()
    if not work.done() or work.cancelled():
        return None
    try:
        work.result()
    except EngineFailure as e:
        raise APIError(503, str(e), type="server_error") from None
    return [finals[r] for r in sub.request_ids]


class _Guard:
    """ASGI middleware in front of the app: the API key (401) and the body-size limit (413).

    The body is read here in full, up to the limit, and replayed to the app; after the replay, receive() is
    the server's again, so routes and streaming responses still see ``http.disconnect``.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                message = ("missing API key: send 'Authorization: Bearer <key>'" if not auth
                           else "incorrect API key provided")
                return await _send_error(send, 401, message, code="invalid_api_key",
                                         extra_headers=[(b"www-authenticate", b"Bearer")])
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await _send_error(send, 400, f"invalid Content-Length header {length!r}")
            if int(length) > self.max_body_bytes:
                return await _send_too_large(send, self.max_body_bytes)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:  # no or a false Content-Length (chunked upload)
                return await _send_too_large(send, self.max_body_bytes)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_too_large(send, limit: int) -> None:
    await _send_error(send, 413, f"request body too large: the limit is {limit} bytes", code="request_too_large")


async def _send_error(send, status: int, message: str, code: str | None = None, extra_headers=()) -> None:
    body = json.dumps(error_body(message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
