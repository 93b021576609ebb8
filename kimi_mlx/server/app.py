"""The HTTP API: OpenAI-compatible endpoints on Starlette, served by uvicorn.

Endpoints: POST /v1/chat/completions, POST /v1/completions (JSON or SSE with `stream`),
GET /v1/models, GET /health, GET /metrics (Prometheus text format, prometheus-client).
Errors are OpenAI-style bodies {"error": {"message", "type", "param", "code"}}: bad JSON or
fields 400, context too long 400 (with the numbers), wrong API key 401, queue full 429,
shutting down 503. While a request waits or its prompt is prefilled, a streaming response
sends SSE comment lines (": keep-alive") so proxies and clients do not time out.
A client that disconnects cancels its request (its batch row is freed at the next step).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import KimiError
from ..generate import check_context, sampling_temperature  # tiny temperatures: greedy
from .engine import Engine, Event, QueueFull, Request, ShuttingDown
from .sampling import SamplingParams
from .tools import ToolCallStream

log = logging.getLogger("kimi_mlx.server")
KEEPALIVE_S = 5.0  # seconds without output before a streaming response sends a comment line
# The largest request body: the longest prompt a file may hold (files.MAX_PROMPT_BYTES, more than a
# 1M-token context) twice over for JSON's escapes; a larger body was read whole into memory.
MAX_BODY_BYTES = 512 << 20
MAX_LOGPROBS = 20


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    default_max_tokens: int = 512
    kv_bits: int | None = None
    keepalive_s: float = KEEPALIVE_S


async def _read_body(request: HTTPRequest) -> bytes:
    """The request body, refused with a 413 past MAX_BODY_BYTES (by its Content-Length at once,
    else as it streams in)."""
    too_big = APIError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------- request fields


def _get(body: dict, name: str, kinds, default=None, check=None, what: str = ""):
    """body[name] if of type `kinds` (None allowed = default) and passing `check`, else a 400."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise APIError(400, f"'{name}' must be {what or kinds}", param=name)
    if not isinstance(value, kinds):
        raise APIError(400, f"'{name}' must be {what or getattr(kinds, '__name__', kinds)}", param=name)
    if check is not None and not check(value):
        raise APIError(400, f"'{name}' must be {what}, not {value!r}", param=name)
    return value


def _sampling(body: dict) -> tuple[SamplingParams, int, list[str]]:
    _refuse_unsupported(body)
    num = (int, float)
    temperature = float(_get(body, "temperature", num, 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]"))
    top_p = float(_get(body, "top_p", num, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"))
    top_k = _get(body, "top_k", int, 0, lambda v: v >= 0, "an integer >= 0")
    min_p = float(_get(body, "min_p", num, 0.0, lambda v: 0 <= v <= 1, "a number in [0, 1]"))
    # mx.random.key takes a uint64: -1 or 2**64 failed the engine step (an empty reply), not the request
    seed = _get(body, "seed", int, None, lambda v: 0 <= v < 2**64, "an integer in [0, 2**64)")
    _get(body, "n", int, 1, lambda v: v == 1, "1 (one choice per request)")  # checked only
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4):
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    params = SamplingParams(sampling_temperature(temperature), top_p, top_k, min_p, seed)
    return params, _max_tokens(body), stop


# OpenAI options this server does not implement, with the value that changes nothing (clients
# often send these defaults); any other value would change the reply, so it is a 400 rather than
# a reply that silently ignored it.
UNSUPPORTED = {
    "frequency_penalty": (0, "0 (penalties are not supported; repetition_penalty is not either)"),
    "presence_penalty": (0, "0 (penalties are not supported)"),
    "logit_bias": ({}, "an empty object (logit_bias is not supported)"),
    "best_of": (1, "1 (one completion per request)"),
    "echo": (False, "false (the prompt is not echoed)"),
    "suffix": ("", "empty (insertion is not supported)"),
    "repetition_penalty": (1, "1 (penalties are not supported)"),
}


def _refuse_unsupported(body: dict) -> None:
    """A 400 naming the first option this server would otherwise ignore while it changes the reply."""
    for name, (neutral, what) in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not _is_neutral(value, neutral):
            raise APIError(400, f"'{name}' must be {what}, not {value!r}", param=name)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise APIError(400, "'response_format' must be {\"type\": \"text\"}: JSON modes are not supported "
                       f"(the reply is free text), not {fmt!r}", param="response_format")


def _is_neutral(value, neutral) -> bool:
    if isinstance(neutral, bool):
        return value is neutral
    if isinstance(neutral, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == neutral
    return type(value) is type(neutral) and value == neutral


def _max_tokens(body: dict) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        v = _get(body, name, int, None, lambda v: v >= 1, "an integer >= 1")
        if v is not None:
            return v
    return None


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of messages", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise APIError(400, f"messages[{i}]: each message needs a 'role' of system, user, assistant or tool",
                           param="messages")
        c = m.get("content")
        if c is not None and not isinstance(c, (str, list)):
            raise APIError(400, f"messages[{i}].content must be text or a list of parts", param="messages")
        if isinstance(c, list) and not all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in c):
            raise APIError(400, f"messages[{i}].content: each part must be an object with 'text'", param="messages")
        other = [p.get("type") for p in c if p.get("type", "text") != "text"] if isinstance(c, list) else []
        if other:  # an image the model cannot see would be dropped silently, and the reply made without it
            raise APIError(400, f"messages[{i}].content: a part of type {other[0]!r}; this model reads text only",
                           param="messages")
        if c is None and not m.get("tool_calls"):
            raise APIError(400, f"messages[{i}] has no content", param="messages")
    out = []
    for m in messages:
        m = dict(m)
        if m["role"] == "developer":
            m["role"] = "system"
        if isinstance(m.get("content"), list):  # text parts only: the model reads text
            m["content"] = [p if "text" in p else {**p, "text": ""} for p in m["content"]]
        for call in m.get("tool_calls") or []:
            if not (isinstance(call, dict) and isinstance(call.get("function"), dict)):
                raise APIError(400, "tool_calls: each call needs a 'function' object", param="messages")
        out.append(m)
    return out


def _tools(body: dict) -> list[dict] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
            for t in tools):
        raise APIError(400, "'tools' must be a list of {type: function, function: {name, ...}}", param="tools")
    return tools or None


def _top_logprobs(body: dict, chat: bool) -> int | None:
    if chat:
        if not _get(body, "logprobs", bool, False, None, "true or false"):
            return None
        return _get(body, "top_logprobs", int, 0, lambda v: 0 <= v <= MAX_LOGPROBS, f"an integer in [0, {MAX_LOGPROBS}]")
    return _get(body, "logprobs", int, None, lambda v: 0 <= v <= MAX_LOGPROBS, f"an integer in [0, {MAX_LOGPROBS}]")


# ---------------------------------------------------------------- the app


class Server:
    """Routes bound to one engine (the model thread) and its tokenizer."""

    def __init__(self, engine: Engine, config: ServerConfig):
        self.engine, self.tokenizer, self.config = engine, engine.tokenizer, config
        from .metrics import Metrics

        self.metrics = Metrics(engine)

    def app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_text, methods=["GET"]),
        ]
        async def http_error(request: HTTPRequest, exc) -> Response:  # 404 / 405 as OpenAI bodies too
            return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").response()

        return Starlette(routes=routes, exception_handlers={HTTPException: http_error})

    # ---- small endpoints

    async def health(self, request: HTTPRequest) -> Response:
        alive = self.engine.thread is not None and self.engine.thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped", **self.engine.load},
                            status_code=200 if alive else 503)

    async def models(self, request: HTTPRequest) -> Response:
        try:
            self._auth(request)
        except APIError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [
            {"id": self.config.model_name, "object": "model", "created": 0, "owned_by": "kimi-mlx"}]})

    async def metrics_text(self, request: HTTPRequest) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    # ---- completions

    async def chat(self, request: HTTPRequest) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._complete(request, chat=False)

    def _auth(self, request: HTTPRequest) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if given != f"Bearer {key}":
            raise APIError(401, "invalid API key: send 'Authorization: Bearer KEY' with the server's --api-key",
                           "authentication_error", code="invalid_api_key")

    async def _complete(self, request: HTTPRequest, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        t0 = time.perf_counter()
        try:
            self._auth(request)
            try:
                body = json.loads(await _read_body(request))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise APIError(400, f"the request body is not valid JSON ({e})") from None
            except RecursionError:  # "[[[[...": nested past Python's limit (was a 500 and a traceback)
                raise APIError(400, "the request body is not valid JSON (nested too deeply)") from None
            if not isinstance(body, dict):
                raise APIError(400, "the request body must be a JSON object")
            # tokenizing a long prompt takes a while: off the event loop, so other streams flow
            req, stream, include_usage, tools = await asyncio.to_thread(self._build, body, chat)
        except APIError as e:
            self.metrics.request(endpoint, e.status)
            return e.response()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def deliver(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
                req.cancel()

        req.deliver = deliver
        try:
            self.engine.submit(req)
        except QueueFull as e:
            self.metrics.request(endpoint, 429)
            return APIError(429, str(e), "rate_limit_error", code="queue_full").response()
        except ShuttingDown as e:
            self.metrics.request(endpoint, 503)
            return APIError(503, str(e), "server_error", code="shutting_down").response()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        meta = dict(id=rid, created=int(time.time()), model=self.config.model_name)
        if stream:
            gen = self._stream(request, req, queue, meta, chat, include_usage, tools, t0, endpoint)
            return StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._whole(request, req, queue, meta, chat, tools, t0, endpoint)

    def _build(self, body: dict, chat: bool) -> tuple[Request, bool, bool, list | None]:
        sampling, max_tokens, stop = _sampling(body)
        top_logprobs = _top_logprobs(body, chat)
        stream = _get(body, "stream", bool, False, None, "true or false")
        opts = _get(body, "stream_options", dict, {}, None, "an object")
        include_usage = bool(opts.get("include_usage", False))
        ignore_eos = _get(body, "ignore_eos", bool, False, None, "true or false")
        tools, boundaries = None, []
        try:
            if chat:
                messages, tools = _messages(body), _tools(body)
                if body.get("tool_choice") == "none":
                    tools = None
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
                boundaries = self._boundaries(messages, tools, ids)
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                    prompt = prompt[0]
                if isinstance(prompt, str):
                    ids = self.tokenizer.encode(prompt)
                elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                                 for t in prompt):
                    vocab = self.engine.model.args.vocab_size
                    if not all(0 <= t < vocab for t in prompt):
                        raise APIError(400, f"'prompt' token ids must be in [0, {vocab})", param="prompt")
                    ids = list(prompt)
                else:
                    raise APIError(400, "'prompt' must be a string or a list of token ids", param="prompt")
                boundaries = [len(ids)]  # a prompt that a later one extends (few-shot, agents) is reused
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt" if not chat else "messages")
            limit = getattr(self.engine.model.args, "model_max_length", None)
            if max_tokens is None:
                max_tokens = self.config.default_max_tokens
                if limit:
                    max_tokens = max(1, min(max_tokens, limit - len(ids)))
            check_context(self.engine.model, len(ids), max_tokens, self.config.kv_bits)
        except KimiError as e:
            raise APIError(400, str(e), code="context_length_exceeded" if "context" in str(e) else None) from None
        req = Request(ids=ids, max_tokens=max_tokens, sampling=sampling, stop=stop, top_logprobs=top_logprobs,
                      snapshot_at=boundaries, ignore_eos=ignore_eos)
        return req, stream, include_usage, tools

    def _boundaries(self, messages: list[dict], tools, ids: list[int]) -> list[int]:
        """Prompt prefix lengths at the end of each message (and of the whole prompt) that are
        token-for-token prefixes of `ids`: a template that re-renders earlier turns differently
        gives no boundary there, so no wrong snapshot is ever reused."""
        out = []
        for k in range(1, len(messages) + 1):
            head = self.tokenizer.apply_chat_template(messages[:k], add_generation_prompt=False, tools=tools)
            if 0 < len(head) < len(ids) and ids[:len(head)] == head:
                out.append(len(head))
        return sorted(set(out + [len(ids)]))

    # ---- responses

    def _token_text(self, token: int) -> tuple[str, list[int]]:
        b = self.tokenizer.token_bytes(token)
        return b.decode("utf-8", errors="replace"), list(b)

    def _chat_logprobs(self, ev: Event) -> dict:
        """One token's entry of choices[].logprobs.content (OpenAI's chat format)."""
        def entry(token: int, logprob: float) -> dict:
            text, raw = self._token_text(token)
            return {"token": text, "logprob": logprob, "bytes": raw}

        return {**entry(ev.token, ev.logprob), "top_logprobs": [entry(i, lp) for i, lp in ev.top_logprobs or []]}

    def _usage(self, ev: Event) -> dict:
        u = ev.usage
        return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
                "prompt_tokens_details": {"cached_tokens": u["cached_tokens"]}}

    async def _next(self, http: HTTPRequest, req: Request, queue: asyncio.Queue, timeout: float) -> Event | None:
        """The request's next event, or None after `timeout` seconds without one."""
        try:
            return await asyncio.wait_for(queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _whole(self, http, req, queue, meta, chat, tools, t0, endpoint) -> Response:
        events = []
        try:
            while True:
                ev = await self._next(http, req, queue, 0.5)
                if ev is None:
                    if await http.is_disconnected():
                        req.cancel()
                        self.engine.wake()
                        self.metrics.request(endpoint, 499)
                        return Response(status_code=499)
                    continue
                if not events:
                    self.metrics.first_token(time.perf_counter() - t0)
                events.append(ev)
                if ev.finish_reason is not None:
                    break
        except asyncio.CancelledError:
            req.cancel()
            self.engine.wake()
            raise
        last = events[-1]
        if last.error is not None:
            self.metrics.request(endpoint, 500)
            return APIError(500, last.error, "server_error").response()
        text = "".join(e.text for e in events)
        finish = last.finish_reason
        if chat:
            message = {"role": "assistant", "content": text}
            if tools:
                from .tools import parse_tool_calls

                content, calls = parse_tool_calls(text)
                if calls:
                    message = {"role": "assistant", "content": content or None,
                               "tool_calls": [{k: v for k, v in c.items() if k != "index"} for c in calls]}
                    finish = "tool_calls"
            choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            if req.top_logprobs is not None:
                choice["logprobs"] = {"content": [self._chat_logprobs(e) for e in events]}
            body = {**meta, "object": "chat.completion", "choices": [choice], "usage": self._usage(last)}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            if req.top_logprobs is not None:
                choice["logprobs"] = self._completion_logprobs(events)
            body = {**meta, "object": "text_completion", "choices": [choice], "usage": self._usage(last)}
        self.metrics.request(endpoint, 200, time.perf_counter() - t0, last.usage)
        return JSONResponse(body)

    def _completion_logprobs(self, events: list[Event]) -> dict:
        tokens, lps, tops, offsets, pos = [], [], [], [], 0
        for e in events:
            t = self._token_text(e.token)[0]
            tokens.append(t)
            lps.append(e.logprob)
            tops.append({self._token_text(i)[0]: lp for i, lp in e.top_logprobs or []})
            offsets.append(pos)
            pos += len(e.text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    async def _stream(self, http, req, queue, meta, chat, include_usage, tools, t0, endpoint):
        kind = "chat.completion.chunk" if chat else "text_completion"
        tool_stream = ToolCallStream() if (chat and tools) else None
        any_calls, first, status, last = False, True, 200, None

        def chunk(choice: dict | None, usage: dict | None = None) -> str:
            body = {**meta, "object": kind, "choices": [] if choice is None else [choice]}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            if chat:
                yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                             "logprobs": None})
            while True:
                ev = await self._next(http, req, queue, self.config.keepalive_s)
                if ev is None:
                    yield ": keep-alive\n\n"
                    continue
                if req.top_logprobs is None:  # a client that fell behind gets the tokens so far in one chunk
                    while ev.finish_reason is None and not queue.empty():
                        nxt = queue.get_nowait()
                        nxt.text = ev.text + nxt.text
                        ev = nxt
                last = ev
                if first:
                    first = False
                    self.metrics.first_token(time.perf_counter() - t0)
                if ev.error is not None:
                    status = 500
                    err = {"message": ev.error, "type": "server_error", "param": None, "code": None}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    break
                finish = ev.finish_reason
                if chat:
                    text, calls = ev.text, []
                    if tool_stream is not None:
                        text, calls = tool_stream.feed(ev.text, final=finish is not None)
                    lp = None
                    if req.top_logprobs is not None:
                        lp = {"content": [self._chat_logprobs(ev)]}
                    if text or lp is not None:
                        yield chunk({"index": 0, "delta": {"content": text}, "finish_reason": None, "logprobs": lp})
                    for call in calls:
                        any_calls = True
                        yield chunk({"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None,
                                     "logprobs": None})
                    if finish is not None:
                        yield chunk({"index": 0, "delta": {}, "finish_reason": "tool_calls" if any_calls else finish,
                                     "logprobs": None})
                else:
                    lp = self._completion_logprobs([ev]) if req.top_logprobs is not None else None
                    if ev.text or lp is not None or finish is not None:
                        yield chunk({"index": 0, "text": ev.text, "finish_reason": finish, "logprobs": lp})
                if finish is not None:
                    if include_usage:
                        yield chunk(None, self._usage(ev))
                    break
            yield "data: [DONE]\n\n"
        finally:
            if last is None or last.finish_reason is None:  # the client went away (or we failed): free the row
                req.cancel()
                self.engine.wake()
                status = 499 if status == 200 else status
            self.metrics.request(endpoint, status, time.perf_counter() - t0, last.usage if last else None)


def build_app(engine: Engine, config: ServerConfig) -> Starlette:
    server = Server(engine, config)
    app = server.app()
    app.state.server = server
    return app
