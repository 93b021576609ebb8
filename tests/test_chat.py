"""Multi-turn chat on a tiny random model with a byte-level Kimi tokenizer.

The truth for the cached multi-turn path is one uncached forward over the whole conversation's ids.
The model's lm_head rows for the end tokens are zeroed, so a greedy reply always runs to max_tokens
(logit 0 never beats the largest of ~500 random logits); replies that end on an end token are made
by declaring a token the model does produce an end token (a tokenizer wrapper).
"""

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import pytest
from tiny import TINY_CONFIG, random_weights, write_checkpoint
from typer.testing import CliRunner

from kimi_mlx import KimiError, load
from kimi_mlx.chat import ChatSession, chat_loop
from kimi_mlx.tokenizer import write_tokenizer_files

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = {"[BOS]": 256, "[EOS]": 257, "<|im_end|>": 258, "<|im_user|>": 259, "<|im_assistant|>": 260,
            "<|im_system|>": 261, "<|im_middle|>": 262, "[PAD]": 511}
CONFIG = {**TINY_CONFIG, "vocab_size": 512, "bos_token_id": 256, "eos_token_id": 258, "pad_token_id": 511,
          "model_max_length": 1 << 20}
IM_END = 258


def write_model(path, seed):
    weights = random_weights(CONFIG, seed=seed)
    weights["lm_head.weight"][257:259] = 0.0  # never greedy-picked: replies run to max_tokens
    write_checkpoint(path, config=CONFIG, weights=weights)
    write_tokenizer_files(path, {bytes([b]): b for b in range(256)}, SPECIALS, eos_token="[EOS]")
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("chat"), seed=1)


@pytest.fixture(scope="module")
def loaded(folder):
    return load(str(folder))


class EndsOn:
    """The tokenizer, with `token` as its only end token (and as <|im_end|> if `as_im_end`)."""

    def __init__(self, tok, token, as_im_end):
        self._tok, self._token, self._as_im_end = tok, token, as_im_end
        self.eos_token_ids = {token}

    def token_to_id(self, name):
        return self._token if name == "<|im_end|>" and self._as_im_end else self._tok.token_to_id(name)

    def __getattr__(self, name):
        return getattr(self._tok, name)


class Recorder:
    """The model, recording the length of every input it is fed (also through `.model`, the
    layers alone, which prefill feeds without the lm_head)."""

    def __init__(self, model, fed=None):
        self._model, self.fed = model, [] if fed is None else fed

    @property
    def model(self):
        return Recorder(self._model.model, self.fed)

    def __call__(self, inputs, *args, **kwargs):
        self.fed.append(inputs.shape[1])
        return self._model(inputs, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def probe(model, cache, token=65):
    """Logits [vocab] after feeding one token to a copy of `cache`."""
    return model(mx.array([[token]]), cache=[c.copy() for c in cache])[0, -1]


def user_ids(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


def turn(session, text):
    """Send a message; return the reply ids and the last response."""
    responses = list(session.send(text))
    return [r.token for r in responses], responses[-1]


def test_second_turn_prefills_only_its_own_tokens(loaded):
    model, tok = loaded
    rec = Recorder(model)
    session = ChatSession(rec, tok, system="be brief", max_tokens=3)
    turn(session, "first message")
    after_first = len(session.tokens)
    assert all(c.offset == after_first for c in session.cache)
    rec.fed.clear()
    reply, last = turn(session, "second")
    new = user_ids(tok, "second")
    assert last.prompt_tokens == len(new)
    assert max(rec.fed) <= len(new)  # no call re-reads the history
    assert sum(rec.fed) == len(new) + len(reply) + 1  # + the closing <|im_end|>
    assert all(c.offset == after_first + sum(rec.fed) == len(session.tokens) for c in session.cache)


@pytest.mark.parametrize("ending", ["length", "im_end", "other_end"])
def test_two_turns_match_one_full_forward(loaded, ending):
    model, tok = loaded
    if ending != "length":  # end the first reply on its third token, consumed by the pipelined decode
        first = turn(ChatSession(model, tok, system="sys", max_tokens=6), "hello")[0]
        if first[2] in first[:2]:
            pytest.skip("the random model repeated a token")
        tok = EndsOn(tok, first[2], as_im_end=ending == "im_end")
    im_end = tok.token_to_id("<|im_end|>")
    session = ChatSession(model, tok, system="sys", max_tokens=6)
    r1, last1 = turn(session, "hello")
    r2, _ = turn(session, "how are you?")
    if ending != "length":
        assert last1.finish_reason == "stop" and len(r1) == 3

    def closed(reply):
        return reply if reply[-1] == im_end else reply + [im_end]

    system = tok.apply_chat_template([{"role": "system", "content": "sys"}], add_generation_prompt=False)
    truth = system + user_ids(tok, "hello") + closed(r1) + user_ids(tok, "how are you?") + closed(r2)
    assert session.tokens == truth
    assert all(c.offset == len(truth) for c in session.cache)
    full = model(mx.array([truth + [65]]))[0, -1]
    assert mx.abs(probe(model, session.cache) - full).max().item() < 1e-4
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_undo_and_retry_restore_exactly(loaded):
    model, tok = loaded
    session = ChatSession(model, tok, max_tokens=4)
    turn(session, "one")
    state1 = (list(session.tokens), list(session.messages), probe(model, session.cache))
    r2, _ = turn(session, "two")
    state2 = (list(session.tokens), list(session.messages), probe(model, session.cache))

    session.undo()
    assert (session.tokens, session.messages) == state1[:2]
    assert mx.array_equal(probe(model, session.cache), state1[2])
    assert turn(session, "two")[0] == r2

    assert [r.token for r in session.retry()] == r2  # greedy: the same reply again
    assert (session.tokens, session.messages) == state2[:2]
    assert mx.array_equal(probe(model, session.cache), state2[2])
    session.undo()
    session.undo()
    assert session.tokens == [] and not session.can_undo
    with pytest.raises(KimiError, match="nothing to undo"):
        session.undo()


def test_a_reply_stopped_early_leaves_the_session_unchanged(loaded):
    model, tok = loaded
    session = ChatSession(model, tok, max_tokens=4)
    turn(session, "one")
    before = (list(session.tokens), probe(model, session.cache))
    stream = session.send("two")
    next(stream)
    stream.close()  # what Ctrl-C in the terminal does
    assert session.tokens == before[0] and len(session.messages) == 2
    assert mx.array_equal(probe(model, session.cache), before[1])


def test_save_then_load_continues_identically(loaded, folder, tmp_path):
    model, tok = loaded
    session = ChatSession(model, tok, system="sys", max_tokens=4, model_name=str(folder))
    turn(session, "remember this")
    path = tmp_path / "chat.kimi"
    session.save(path)
    assert path.is_file() and not list(tmp_path.glob("*.tmp*"))

    fresh = ChatSession(model, tok, max_tokens=4)
    fresh.load(path)
    assert fresh.messages == session.messages and fresh.tokens == session.tokens
    assert fresh.system == "sys"
    assert turn(fresh, "and now?")[0] == turn(session, "and now?")[0]
    assert mx.array_equal(probe(model, fresh.cache), probe(model, session.cache))


def test_load_refuses_other_models_and_other_files(loaded, folder, tmp_path):
    model, tok = loaded
    session = ChatSession(model, tok, max_tokens=2, model_name="tiny-1")
    turn(session, "hi")
    path = tmp_path / "chat.safetensors"
    session.save(path)
    other_model, other_tok = load(str(write_model(tmp_path / "other", seed=2)))  # same config, other weights
    other = ChatSession(other_model, other_tok, model_name="tiny-2")
    with pytest.raises(KimiError, match="saved from another model") as err:
        other.load(path)
    assert "tiny-1" in str(err.value) and "\n" not in str(err.value)
    assert other.tokens == []
    with pytest.raises(KimiError, match="not a kimi-mlx chat file"):
        session.load(folder / "model.safetensors")
    with pytest.raises(KimiError, match="no such file"):
        session.load(tmp_path / "missing.safetensors")


def test_a_turn_past_the_context_is_refused_and_the_session_continues(loaded):
    model, tok = loaded
    session = ChatSession(model, tok, max_tokens=50)
    session.max_context = len(user_ids(tok, "hi")) + 6
    reply, last = turn(session, "hi")  # the reply is cut to what fits, with room for <|im_end|>
    assert len(reply) == 5 and session.last_cut_by_context
    assert len(session.tokens) == session.max_context == session.cache[0].offset
    with pytest.raises(KimiError, match="does not fit"):
        session.send("more")
    assert len(session.tokens) == session.max_context
    session.undo()
    assert turn(session, "hi")[0] == reply


def test_a_template_that_renders_turns_in_context_is_warned_about(loaded):
    model, tok = loaded

    class DefaultSystem:  # adds a system message when there is none, as Kimi-K2's template does
        def apply_chat_template(self, messages, add_generation_prompt=True):
            ids = tok.apply_chat_template(messages, add_generation_prompt)
            return ids if messages and messages[0]["role"] == "system" else [261] + ids

        def __getattr__(self, name):
            return getattr(tok, name)

    with pytest.warns(UserWarning, match="renders a conversation differently"):
        ChatSession(model, DefaultSystem())


class InterruptOnWrite(io.StringIO):
    """stdout that raises KeyboardInterrupt (as Ctrl-C would) on its n-th write."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def write(self, s):
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt
        return super().write(s)


def test_chat_loop_survives_ctrl_c_during_a_reply(loaded):
    model, tok = loaded
    expected = ChatSession(model, tok, max_tokens=4).chat("second")
    session = ChatSession(model, tok, max_tokens=4)
    out, err = InterruptOnWrite(3), io.StringIO()  # writes: prompt, token 1, token 2 (interrupted)
    code = chat_loop(session, io.StringIO("first\nsecond\n"), out, err)
    assert code == 0
    assert "[reply stopped; the turn was discarded]" in err.getvalue()
    assert [m["content"] for m in session.messages] == ["second", expected]
    assert out.getvalue().endswith(f">>> {expected}\n>>> \n")


def test_chat_loop_commands(loaded, tmp_path):
    model, tok = loaded
    session = ChatSession(model, tok, max_tokens=3)
    lines = ["hi", "/undo", "/undo", "/nope", "/save", f"/save {tmp_path / 'c'}", "/system be kind", "x",
             f"/load {tmp_path / 'c'}", "/reset", "/quit", "never read"]
    err = io.StringIO()
    assert chat_loop(session, io.StringIO("\n".join(lines) + "\n"), io.StringIO(), err) == 0
    notes = err.getvalue()
    assert "error: nothing to undo" in notes and "unknown command /nope; commands:" in notes
    assert "usage: /save FILE" in notes and "[loaded 0 messages" in notes
    assert "context " in notes and "tok/s" in notes
    assert session.messages == [] and session.tokens == []


# ---------------------------------------------------------------- the CLI, as a user drives it


def cli(*args):
    return [sys.executable, str(ROOT / "cli.py"), "chat", *args]


ENV = {**os.environ, "PYTHONIOENCODING": "utf-8"}


def test_cli_chat_from_a_pipe(loaded, folder):
    model, tok = loaded
    hello = ChatSession(model, tok, max_tokens=4).chat("hello")
    hi = ChatSession(model, tok, max_tokens=4).chat("hi")
    stdin = "hello\n/retry\n/undo\n/retry\nhi\n/bogus\n/quit\n"
    proc = subprocess.run(cli("--model", str(folder), "--max-tokens", "4"), input=stdin.encode(),
                          capture_output=True, cwd=ROOT, env=ENV, timeout=120)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err
    assert out == f">>> {hello}\n>>> {hello}\n>>> >>> >>> {hi}\n>>> >>> "
    assert "error: nothing to retry" in err and "unknown command /bogus" in err
    assert err.count("context ") >= 3 and "/1048576 ]" in err


def test_cli_runner_chat_ends_at_eof(loaded, folder):
    from kimi_mlx.cli import app

    model, tok = loaded
    expected = ChatSession(model, tok, system="sys", max_tokens=3).chat("hello")
    result = CliRunner().invoke(app, ["chat", "--model", str(folder), "-n", "3", "--system", "sys"], input="hello\n")
    assert result.exit_code == 0, result.output
    assert f">>> {expected}\n" in result.stdout
    assert "tok/s" in result.stderr


class Reader(threading.Thread):
    """Collects a pipe's bytes as they arrive."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.data = pipe, b""

    def run(self):
        while chunk := os.read(self.pipe.fileno(), 4096):
            self.data += chunk


def wait_for(condition, proc, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"never saw {what} (exit code {proc.poll()})")
        time.sleep(0.01)


def test_cli_ctrl_c_stops_a_reply_and_the_session_goes_on(folder):
    proc = subprocess.Popen(cli("--model", str(folder), "--max-tokens", "100000"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=ENV)
    out, err = Reader(proc.stdout), Reader(proc.stderr)
    out.start(), err.start()
    try:
        proc.stdin.write(b"a long reply please\nand another\n")
        proc.stdin.flush()  # stdin stays open: the last Ctrl-C comes at the prompt

        def streaming(n):  # the n-th reply has started
            parts = out.data.split(b">>> ")
            return len(parts) > n and parts[n] != b""

        wait_for(lambda: streaming(1), proc, "the first reply")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: b"reply stopped" in err.data, proc, "the note after Ctrl-C")
        wait_for(lambda: streaming(2), proc, "the second reply")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: err.data.count(b"reply stopped") == 2 and out.data.endswith(b"\n>>> "), proc, "the prompt")
        proc.send_signal(signal.SIGINT)  # Ctrl-C at the prompt: a clean exit
        assert proc.wait(timeout=60) == 0, err.data.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdin.close()
        out.join(5), err.join(5)
