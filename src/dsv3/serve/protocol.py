"""OpenAI request schemas, their mapping to engine SamplingParams, and the pieces of OpenAI responses.

Two kinds of bad request, two statuses: a body whose shape or types are wrong (missing ``messages``, a string
where a number goes) fails the pydantic schema -> 422; well-typed values the engine refuses (temperature -1,
n = 0, a prompt longer than the context) -> 400. Unknown fields are ignored, as clients add their own; known
OpenAI features this server does not implement (tools, logit_bias, echo, ...) are refused with 400 rather than
silently ignored.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from ..infer.engine import SamplingParams, TokenLogprob


class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- request schemas -------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints. top_k, stop_token_ids and ignore_eos are extensions (vLLM's names),
    sent with the openai client as ``extra_body={...}``."""

    model_config = ConfigDict(extra="ignore")
    request_names: ClassVar[dict[str, str]] = {}  # SamplingParams field -> request field, where they differ
    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None or self.top_k < 0 else self.top_k,  # -1 means off, as in vLLM
            seed=self.seed,
            stop=[s for s in stop if s],  # OpenAI ignores empty stop strings
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            n=1 if self.n is None else self.n,
            logprobs=logprobs,
        )
        try:
            params.validate()
        except ValueError as e:  # "<field> must be ..., got ...": name the field as the request calls it
            field = str(e).split(" ", 1)[0]
            name = self.request_names.get(field, field)
            raise APIError(400, name + str(e)[len(field):], param=name) from None
        return params

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise APIError(400, f"message content parts of type {part.type!r} are not supported (text only)",
                               param="messages")
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    request_names: ClassVar[dict[str, str]] = {"logprobs": "top_logprobs"}
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        if self.tools or self.functions or self.tool_choice not in (None, "none"):
            raise APIError(400, "tool and function calling are not supported by this server", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")
        if not self.messages:
            raise APIError(400, "messages must hold at least one message", param="messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        if self.echo:
            raise APIError(400, "echo is not supported by this server", param="echo")
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise APIError(400, "best_of is not supported by this server (leave it unset or equal to n)",
                           param="best_of")

    def prompt_list(self) -> list[str] | list[list[int]]:
        """The prompts as a list of strings or a list of token-id lists (never mixed)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


# ---- response pieces -------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-printable-character map that byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenTexts:
    """Token id -> (text, raw bytes) for logprobs; a byte-level token that holds part of a UTF-8 character
    has its real bytes (OpenAI's ``bytes`` field) and a text with a replacement character."""

    _BYTES = _byte_decoder()

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._lookup(token_id)
        return hit

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        if self.tokenizer is None:
            text = f"token_id:{token_id}"
            return text, list(text.encode())
        piece = self.tokenizer.id_to_token(token_id)
        if piece is not None and all(ch in self._BYTES for ch in piece):
            raw = bytes(self._BYTES[ch] for ch in piece)
            return raw.decode("utf-8", errors="replace"), list(raw)
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text, list(text.encode())


def chat_logprobs(entries: list[TokenLogprob], texts: TokenTexts) -> dict:
    """OpenAI chat ``logprobs``: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    content = []
    for e in entries:
        text, raw = texts(e.token_id)
        top = []
        for tid, lp in e.top:
            t, b = texts(tid)
            top.append({"token": t, "logprob": lp, "bytes": b})
        content.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content}


def completion_logprobs(entries: list[TokenLogprob], texts: TokenTexts, offset: int = 0) -> dict:
    """OpenAI (legacy) completions ``logprobs``: parallel lists; ``offset`` is where the first token's text
    starts in the choice's text (for streamed chunks after the first)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        text, _ = texts(e.token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(e.logprob)
        top: dict[str, float] = {}
        for tid, lp in e.top:
            top.setdefault(texts(tid)[0], lp)  # two ids can share a text; keep the likelier (listed first)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out
