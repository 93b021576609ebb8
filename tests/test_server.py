"""`kimi-mlx serve` driven through the official `openai` client against a real server on a free
localhost port (uvicorn in a thread of this process; SIGTERM in a subprocess), demo model.

Truth for generated text: kimi_mlx.generate on the same model, one request alone, greedy.
Batched-vs-single logits at fp32: tests/test_server_batching.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from kimi_mlx import load_model, load_tokenizer, stream_generate  # noqa: E402
from kimi_mlx.server.app import ServerConfig, build_app  # noqa: E402
from kimi_mlx.server.serve import make_engine, make_uvicorn  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "kimi_mlx" / "demo" / "model"
KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A server in a thread: engine + app + uvicorn on a free port."""

    def __init__(self, model, tokenizer, api_key=None, keepalive_s=5.0, **engine_kw):
        self.engine = make_engine(model, tokenizer, model_name="demo", **engine_kw)
        self.app = build_app(self.engine, ServerConfig(model_name="demo", api_key=api_key, default_max_tokens=64,
                                                       keepalive_s=keepalive_s))
        self.port = free_port()
        self.server = make_uvicorn(self.engine, self.app, "127.0.0.1", self.port, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        assert self.server.started
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key=KEY, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def post(self, path: str, data: bytes, key=KEY) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=data, headers={"Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def demo():
    return load_model(DEMO, dtype=mx.float32), load_tokenizer(DEMO)


@pytest.fixture(scope="module")
def live(demo):
    s = LiveServer(*demo, api_key=KEY, max_batch=8, max_queue=16, state_cache_mb=64)
    yield s
    s.close()


def reference(demo, messages, max_tokens, **kw):
    model, tok = demo
    return "".join(r.text for r in stream_generate(model, tok, messages, max_tokens, **kw))


CHATS = [[{"role": "user", "content": c}] for c in
         ["add 12 34", "copy hello world", "reverse abcdef", "count a in banana", "what is recall", "copy x y z w"]]


# ------------------------------------------------------------------ endpoints


def test_health_models_metrics(live):
    status, body = live.get("/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert [m.id for m in live.client().models.list().data] == ["demo"]
    live.client().chat.completions.create(model="demo", messages=CHATS[0], temperature=0, max_tokens=4)
    status, text = live.get("/metrics")
    assert status == 200
    assert 'kimi_mlx_http_requests_total{endpoint="chat",status="200"}' in text
    assert "kimi_mlx_time_to_first_token_seconds_count" in text and "kimi_mlx_requests{state=\"decoding\"}" in text


def test_chat_matches_generate_streaming_and_not(live, demo):
    c = live.client()
    for messages in CHATS[:3]:
        ref = reference(demo, messages, 16)
        r = c.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=16)
        assert r.choices[0].message.content == ref
        assert r.usage.prompt_tokens == len(demo[1].apply_chat_template(messages))
        assert r.usage.completion_tokens >= 1
        assert r.usage.prompt_tokens_details.cached_tokens is not None
        chunks = list(c.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=16,
                                                stream=True, stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == ref
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason


def test_completions_stop_max_tokens_logprobs_seed(live, demo):
    c = live.client()
    prompt = "12+34="
    ref = reference(demo, demo[1].encode(prompt), 12)
    r = c.completions.create(model="demo", prompt=prompt, temperature=0, max_tokens=12, logprobs=2)
    assert r.choices[0].text == ref
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) == 2 and max(t.values()) >= lp.token_logprobs[i] - 1e-6 for i, t in enumerate(lp.top_logprobs))
    # stop string: the text ends before it
    if len(ref) > 3:
        stop = ref[2:4]
        s = c.completions.create(model="demo", prompt=prompt, temperature=0, max_tokens=12, stop=[stop])
        assert s.choices[0].text == ref[:ref.find(stop)] and s.choices[0].finish_reason == "stop"
    m = c.completions.create(model="demo", prompt=prompt, temperature=0, max_tokens=2, extra_body={"ignore_eos": True})
    assert m.usage.completion_tokens == 2 and m.choices[0].finish_reason == "length"
    # seed: the same sampled text twice, whatever else is running
    a = c.completions.create(model="demo", prompt=prompt, temperature=1.0, top_p=0.9, seed=7, max_tokens=10)
    b = c.completions.create(model="demo", prompt=prompt, temperature=1.0, top_p=0.9, seed=7, max_tokens=10)
    assert a.choices[0].text == b.choices[0].text


def test_tiny_temperature_is_greedy(live, demo):
    # 1/t overflows float32 below ~1e-38: every logit became -inf and a random id was drawn
    c = live.client()
    prompt = "12+34="
    ref = reference(demo, demo[1].encode(prompt), 8)
    r = c.completions.create(model="demo", prompt=prompt, temperature=1e-300, max_tokens=8, seed=3)
    assert r.choices[0].text == ref


def test_chat_logprobs(live):
    r = live.client().chat.completions.create(model="demo", messages=CHATS[1], temperature=0, max_tokens=6,
                                              logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 3 and abs(e.top_logprobs[0].logprob - e.logprob) < 1e-5  # greedy: top-1


# ------------------------------------------------------------------ errors


def test_errors_are_openai_bodies(live):
    c = live.client()
    with pytest.raises(openai.AuthenticationError):
        live.client(key="wrong").chat.completions.create(model="demo", messages=CHATS[0])
    status, body = live.post("/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="demo", messages=CHATS[0], temperature=5)
    assert "temperature" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="demo", messages=[{"role": "nobody", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="demo", messages=CHATS[0], max_tokens=2_000_000)
    assert "1048576" in str(e.value) and "2000000" in str(e.value)  # the numbers
    status, body = live.post("/v1/completions", json.dumps({"prompt": [1, 10**9]}).encode())
    assert status == 400 and body["error"]["param"] == "prompt"
    status, body = live.post("/v1/nothing", b"{}")
    assert status == 404 and "/v1/nothing" in body["error"]["message"]


def test_a_body_nested_too_deeply_or_too_large_is_a_4xx(live, monkeypatch):
    """'[[[[...' was a RecursionError: HTTP 500 and a traceback in the log; a body of any size was
    read whole into memory."""
    from kimi_mlx.server import app as app_module

    status, body = live.post("/v1/chat/completions", b"[" * 100000 + b"]" * 100000)
    assert status == 400 and "nested too deeply" in body["error"]["message"], body
    deep = b'{"messages": [{"role": "user", "content": ' + b"[" * 50000 + b"]" * 50000 + b"}]}"
    status, body = live.post("/v1/chat/completions", deep)
    assert status == 400 and "nested too deeply" in body["error"]["message"], body
    monkeypatch.setattr(app_module, "MAX_BODY_BYTES", 1000)
    big = json.dumps({"prompt": "x" * 2000, "max_tokens": 1}).encode()
    status, body = live.post("/v1/completions", big)
    assert status == 413 and "larger than" in body["error"]["message"], body
    status, _ = live.post("/v1/completions", json.dumps({"prompt": "x" * 100, "max_tokens": 1}).encode())
    assert status == 200


@pytest.mark.parametrize("seed", [-1, 2**64, -2**70])
def test_a_seed_outside_uint64_is_a_400(live, seed):
    """mx.random.key takes a uint64: seed -1 passed the request check, then failed the engine
    step (an empty reply and a traceback in the log)."""
    status, body = live.post("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2, "seed": seed}).encode())
    assert status == 400 and body["error"]["param"] == "seed", body
    status, body = live.post("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2, "seed": 2**64 - 1}).encode())
    assert status == 200, body


@pytest.mark.parametrize("option, value", [
    ("frequency_penalty", 0.5), ("presence_penalty", -1), ("logit_bias", {"5": 100}), ("best_of", 2),
    ("echo", True), ("suffix", "tail"), ("repetition_penalty", 1.2), ("frequency_penalty", "0"),
    ("response_format", {"type": "json_object"}), ("response_format", "json"),
])
def test_options_that_would_be_ignored_are_a_400(live, option, value):
    """An option the server does not implement, at a value that changes the reply, is refused with
    a line naming it; its neutral value (what clients send by default) is accepted."""
    status, body = live.post("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2, option: value}).encode())
    assert status == 400 and body["error"]["param"] == option, body


def test_neutral_values_of_unsupported_options_are_accepted(live):
    neutral = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "best_of": 1, "echo": False,
               "suffix": "", "response_format": {"type": "text"}}
    status, body = live.post("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2, **neutral}).encode())
    assert status == 200, body
    status, body = live.post("/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **neutral}).encode())
    assert status == 200, body


def test_an_image_part_is_a_400_not_silently_dropped(live):
    msg = {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                       {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}
    status, body = live.post("/v1/chat/completions", json.dumps({"messages": [msg], "max_tokens": 2}).encode())
    assert status == 400 and "image_url" in body["error"]["message"] and "text only" in body["error"]["message"], body


def test_queue_full_is_429(demo):
    """One row, no queue, the engine not turning: the second request is refused at once."""
    s = LiveServer(*demo, max_batch=1, max_queue=0, state_cache_mb=0)
    s.engine.stop(drain=False)  # the loop exits; the thread is restarted by nobody
    s.engine.stopping = False
    try:
        assert s.get("/health")[0] == 503  # the model thread is not running: not healthy
        c = s.client()
        first = c.chat.completions.create(model="demo", messages=CHATS[0], stream=True, max_tokens=4)
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model="demo", messages=CHATS[1], max_tokens=4)
        first.close()
    finally:
        s.close()


def test_keepalive_comments_while_waiting_then_the_stream(demo):
    """While a request waits (here: the engine held still; in use: a long prefill) the SSE
    stream sends comment lines; once the engine turns, the tokens follow."""
    s = LiveServer(*demo, keepalive_s=0.05, state_cache_mb=0)
    s.engine.stop(drain=False)
    s.engine.stopping = False
    try:
        body = json.dumps({"prompt": "1+1=", "max_tokens": 3, "stream": True, "ignore_eos": True}).encode()
        with urllib.request.urlopen(urllib.request.Request(s.url + "/v1/completions", data=body), timeout=30) as r:
            first = r.readline() + r.readline()
            assert first == b": keep-alive\n\n"
            s.engine.start()
            rest = r.read().decode()
        assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in rest
    finally:
        s.close()


# ------------------------------------------------------------------ tools


class ScriptedModel:
    """The demo model whose logits after a prompt always spell `script` (a tool call), then eos:
    the tool-call path runs end to end without a model trained to call tools."""

    def __init__(self, model, script: list[int], eos: int):
        self.inner, self.script, self.eos, self.step = model, script, eos, 0

    def __getattr__(self, name):  # everything else (args, make_cache, model, ...) is the demo model's
        return getattr(self.inner, name)

    def __call__(self, inputs, cache=None, mask=None, last_only=False):
        logits = self.inner(inputs, cache=cache, mask=mask, last_only=last_only)
        if inputs.shape[1] > 1 or last_only:
            self.step = 0  # a prefill step: the reply starts
        tok = self.script[self.step] if self.step < len(self.script) else self.eos
        self.step += 1
        onehot = mx.where(mx.arange(logits.shape[-1]) == tok, 100.0, -100.0)
        return mx.broadcast_to(onehot, logits.shape)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


def test_tool_calls_rendered_and_parsed(demo):
    model, tok = demo
    text = ('Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0'
            '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')
    script = tok.encode(text, allow_special=True)
    s = LiveServer(ScriptedModel(model, script, tok.eos_token_id), tok, state_cache_mb=0)
    try:
        c = s.client()
        r = c.chat.completions.create(model="demo", messages=CHATS[0], tools=TOOLS, max_tokens=80)
        assert r.usage.prompt_tokens == len(tok.apply_chat_template(CHATS[0], tools=TOOLS))  # tools rendered
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.content == "Let me check."
        (call,) = msg.tool_calls
        assert call.id == "functions.get_weather:0" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        chunks = list(c.chat.completions.create(model="demo", messages=CHATS[0], tools=TOOLS, max_tokens=80,
                                                stream=True))
        content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
        assert content == "Let me check." and len(calls) == 1 and calls[0].id == call.id
        assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        # the call and its result go back through the template
        history = CHATS[0] + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                              {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        r2 = c.chat.completions.create(model="demo", messages=history, tools=TOOLS, max_tokens=80)
        assert r2.usage.prompt_tokens == len(tok.apply_chat_template(history, tools=TOOLS))
    finally:
        s.close()


def test_tool_call_stream_split_anywhere():
    from kimi_mlx.server.tools import ToolCallStream, parse_tool_calls

    text = ('hi<|tool_calls_section_begin|><|tool_call_begin|>functions.a:0<|tool_call_argument_begin|>{"x": 1}'
            '<|tool_call_end|><|tool_call_begin|>functions.b:1<|tool_call_argument_begin|>{}<|tool_call_end|>'
            '<|tool_calls_section_end|>')
    whole = parse_tool_calls(text)
    assert whole[0] == "hi" and [c["id"] for c in whole[1]] == ["functions.a:0", "functions.b:1"]
    for size in (1, 3, 7):
        stream, content, calls = ToolCallStream(), "", []
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        for i, p in enumerate(pieces):
            c, new = stream.feed(p, final=i == len(pieces) - 1)
            content, calls = content + c, calls + new
        assert (content, calls) == whole


# ------------------------------------------------------------------ concurrency, state cache, faults


def test_concurrent_clients_get_their_own_answers(live, demo):
    refs = [reference(demo, m, 24, ) for m in CHATS]
    out = [None] * len(CHATS)

    def ask(i):
        stream = i % 2 == 0
        c = live.client()
        if stream:
            out[i] = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                model="demo", messages=CHATS[i], temperature=0, max_tokens=24, stream=True) if ch.choices)
        else:
            out[i] = c.chat.completions.create(model="demo", messages=CHATS[i], temperature=0,
                                               max_tokens=24).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(CHATS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == refs


def test_follow_up_turn_prefills_only_new_tokens(live, demo):
    model, tok = demo
    c = live.client()
    turn1 = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "copy one two three"}]
    r1 = c.chat.completions.create(model="demo", messages=turn1, temperature=0, max_tokens=20)
    reply = r1.choices[0].message.content
    turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "reverse abc"}]
    r2 = c.chat.completions.create(model="demo", messages=turn2, temperature=0, max_tokens=20)
    ids2 = tok.apply_chat_template(turn2)
    # what the first request consumed (its prompt and its whole reply, <|im_end|> included) is the
    # rendered history, token for token, and that much was not prefilled again
    assert r1.choices[0].finish_reason == "stop"
    history = tok.apply_chat_template(turn1 + [{"role": "assistant", "content": reply}], add_generation_prompt=False)
    assert r1.usage.prompt_tokens + r1.usage.completion_tokens == len(history)
    assert ids2[:len(history)] == history
    assert r2.usage.prompt_tokens_details.cached_tokens == len(history)
    assert r2.choices[0].message.content == reference(demo, turn2, 20)


def test_template_that_re_renders_turns_never_reuses_a_stale_state(demo, tmp_path):
    """A template that renders earlier assistant turns differently (as thinking templates drop
    old reasoning): the reply's snapshot is not a prefix of the next prompt, so it is not used;
    the answer equals an uncached run."""
    folder = tmp_path / "rerender"
    shutil.copytree(DEMO, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}<|im_user|>user<|im_middle|>{{ m['content'] }}<|im_end|>"
        "{%- elif loop.last -%}<|im_assistant|>assistant<|im_middle|>{{ m['content'] }}<|im_end|>"
        "{%- else -%}<|im_assistant|>assistant<|im_middle|>[old]<|im_end|>{%- endif -%}"
        "{%- endfor -%}{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    model, tok = demo[0], load_tokenizer(folder)
    s = LiveServer(model, tok, state_cache_mb=64)
    try:
        c = s.client()
        turn1 = [{"role": "user", "content": "copy one two"}]
        r1 = c.chat.completions.create(model="demo", messages=turn1, temperature=0, max_tokens=12)
        turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                         {"role": "user", "content": "add 1 2"}, {"role": "assistant", "content": "3"},
                         {"role": "user", "content": "copy a"}]
        r2 = c.chat.completions.create(model="demo", messages=turn2, temperature=0, max_tokens=12)
        ids1, ids2 = tok.apply_chat_template(turn1, add_generation_prompt=False), tok.apply_chat_template(turn2)
        assert ids2[:len(ids1)] == ids1
        assert r2.usage.prompt_tokens_details.cached_tokens <= r1.usage.prompt_tokens  # not the stale reply state
        assert r2.choices[0].message.content == "".join(
            x.text for x in stream_generate(model, tok, turn2, 12))
    finally:
        s.close()


def test_disconnect_mid_stream_frees_the_row(live):
    before = live.engine.stats["cancelled"]
    c = live.client()
    stream = c.completions.create(model="demo", prompt="copy a b c", max_tokens=5000, stream=True,
                                  extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    for _ in range(200):
        if live.engine.stats["cancelled"] > before and not live.engine.rows:
            break
        time.sleep(0.05)
    assert live.engine.stats["cancelled"] == before + 1 and not live.engine.rows
    # the server goes on
    assert live.client().completions.create(model="demo", prompt="1+1=", max_tokens=2).usage.completion_tokens >= 1


def test_one_failing_request_does_not_stop_the_server(live, monkeypatch):
    from kimi_mlx.server import engine as engine_mod

    real = engine_mod.RowSampler.__call__

    def boom(self, logprobs):  # the seed-666 request fails at its 4th token: inside the decode batch
        self.calls = getattr(self, "calls", 0) + 1
        if self.params.seed == 666 and self.calls > 3:
            raise RuntimeError("planted failure")
        return real(self, logprobs)

    monkeypatch.setattr(engine_mod.RowSampler, "__call__", boom)
    c = live.client()
    beside = {}

    def long_request():  # decodes in the same batch while the other one fails
        beside["r"] = c.completions.create(model="demo", prompt="copy a b", max_tokens=150, temperature=1, seed=2,
                                           extra_body={"ignore_eos": True})

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(0.2)
    with pytest.raises(openai.InternalServerError):
        c.completions.create(model="demo", prompt="1+1=", max_tokens=30, temperature=1, seed=666,
                             extra_body={"ignore_eos": True})
    t.join(120)
    assert beside["r"].usage.completion_tokens == 150 and beside["r"].choices[0].finish_reason == "length"
    assert c.completions.create(model="demo", prompt="1+1=", max_tokens=3, temperature=1, seed=1).usage


def rss() -> int:
    """Resident set size of this process in bytes (Linux; 0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def test_soak_memory_stays_bounded(demo):
    """Some hundreds of short requests from 4 threads: MLX active memory after the first 100
    does not grow (the state cache is bounded at 2 MB here, so it keeps evicting)."""
    s = LiveServer(*demo, max_batch=8, state_cache_mb=2)
    try:
        def burst(n, tid):
            c = s.client()
            for i in range(n):
                msgs = [{"role": "user", "content": f"add {tid} {i}"}]
                c.chat.completions.create(model="demo", messages=msgs, temperature=0, max_tokens=4)

        def run(n):
            ts = [threading.Thread(target=burst, args=(n, t)) for t in range(4)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(120)

        run(25)
        mx.clear_cache()
        base, rss0 = mx.get_active_memory(), rss()
        run(50)
        mx.clear_cache()
        grown, rss_grown = mx.get_active_memory() - base, rss() - rss0
        assert s.engine.stats["finished"] >= 300
        assert s.engine.state_cache.nbytes <= 2 << 20
        assert grown < 4 << 20, f"active memory grew by {grown / 2**20:.1f} MiB over 200 requests"
        assert rss_grown < 32 << 20, f"RSS grew by {rss_grown / 2**20:.1f} MiB over 200 requests"
    finally:
        s.close()


def test_cli_serve_bad_model_is_one_line_error(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(repo / "cli.py"), "serve", "--model", str(tmp_path / "nothing")],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(repo)})
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "nothing" in r.stderr


def test_sigterm_drains_in_flight_requests(tmp_path):
    """A real `kimi-mlx serve` process: SIGTERM during a stream lets the stream finish, then exits 0."""
    port = free_port()
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.Popen([sys.executable, str(repo / "cli.py"), "serve", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        for _ in range(1200):  # loading takes seconds on a busy machine
            try:
                c.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.1)
        stream = c.completions.create(model="demo", prompt="copy a b", max_tokens=200, stream=True,
                                      extra_body={"ignore_eos": True})
        chunks = [next(iter(stream))]
        proc.send_signal(signal.SIGTERM)
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
        # uvicorn re-raises the signal it caught once its graceful shutdown is done, so the
        # status says how the process was stopped; what matters is that it ended, after the stream
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
