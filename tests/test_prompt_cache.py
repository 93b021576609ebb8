"""Prompt caches: prefill once, save, continue exactly (generate, chat, CLI); other models refused.

The truth is the same ids fed in one go to a fresh cache: cached ids + continuation ids.
The tokenizer is byte-level, so the cached text + "\\n\\n" + prompt also tokenizes to exactly
those ids, and the CLI's cached run can be compared with a plain run of the joined text.
"""

import mlx.core as mx
import pytest
from test_chat import write_model
from typer.testing import CliRunner

from kimi_mlx import KimiError, generate, load
from kimi_mlx.chat import ChatSession
from kimi_mlx.prompt_cache import load_prompt_cache, make_prompt_cache

DOC = "The quick brown fox jumps over the lazy dog. " * 6 + "Notes: lion=48, rose=17."
QUESTION = "What is the code for rose?"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("pc"), seed=3)


@pytest.fixture(scope="module")
def loaded(folder):
    return load(str(folder))


def test_continuation_is_the_templated_conversation(loaded):
    model, tok = loaded
    pc = make_prompt_cache(model, tok, DOC, system="be brief", prefill_step=16)
    whole = tok.apply_chat_template([{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": DOC + "\n\n" + QUESTION}])
    assert pc.tokens + pc.continuation(tok, QUESTION) == whole
    assert all(c.offset == len(pc.tokens) for c in pc.cache)


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_saved_cache_continues_exactly(loaded, tmp_path, kv_bits):
    model, tok = loaded
    pc = make_prompt_cache(model, tok, DOC, kv_bits=kv_bits, prefill_step=16)
    pc.save(tmp_path / "doc.safetensors", model)
    back = load_prompt_cache(tmp_path / "doc.safetensors", model)
    assert back.tokens == pc.tokens and back.text == DOC and not back.raw
    nxt = mx.array([pc.continuation(tok, QUESTION)])
    assert mx.array_equal(model(nxt, cache=back.fresh_cache()), model(nxt, cache=pc.fresh_cache()))
    # generation from the file == generation from scratch on the same ids (same kv_bits)
    ids = pc.tokens + pc.continuation(tok, QUESTION)
    want = generate(model, tok, ids, max_tokens=6, kv_bits=kv_bits)
    assert generate(model, tok, QUESTION, max_tokens=6, prompt_cache=back) == want
    assert generate(model, tok, QUESTION, max_tokens=6, prompt_cache=back) == want  # the file's state is reusable


def test_other_models_and_files_are_refused(loaded, tmp_path, tmp_path_factory):
    model, tok = loaded
    make_prompt_cache(model, tok, DOC, prefill_step=16).save(tmp_path / "doc.safetensors", model)
    other, _ = load(str(write_model(tmp_path_factory.mktemp("other"), seed=4)))
    with pytest.raises(KimiError, match="saved from another model"):
        load_prompt_cache(tmp_path / "doc.safetensors", other)
    session = ChatSession(model, tok, max_tokens=2)
    session.save(tmp_path / "chat.safetensors")
    with pytest.raises(KimiError, match="not a kimi-mlx prompt cache"):
        load_prompt_cache(tmp_path / "chat.safetensors", model)
    with pytest.raises(KimiError, match="no such file"):
        load_prompt_cache(tmp_path / "missing.safetensors", model)


def test_chat_from_a_prompt_cache(loaded):
    model, tok = loaded
    pc = make_prompt_cache(model, tok, DOC, prefill_step=16)
    cached = ChatSession(model, tok, max_tokens=5)
    cached.start_from(pc)
    plain = ChatSession(model, tok, max_tokens=5)
    reply = cached.chat(QUESTION)
    assert reply == plain.chat(DOC + "\n\n" + QUESTION)
    assert cached.messages == plain.messages and cached.tokens == plain.tokens
    assert list(cached.retry()) and cached.messages == plain.messages  # retry re-sends the same message
    second = cached.chat("and lion?")
    assert second == plain.chat("and lion?")
    cached.restart()  # /reset: back to the prompt cache, not to an empty chat
    assert cached.tokens == pc.tokens and cached.chat(QUESTION) == reply


def test_cli_cache_prompt_then_generate(folder, tmp_path):
    from kimi_mlx.cli import app

    runner = CliRunner()
    (tmp_path / "doc.txt").write_text(DOC)
    out = tmp_path / "doc.safetensors"
    made = runner.invoke(app, ["cache-prompt", str(out), "--model", str(folder), "--prompt-file", str(tmp_path / "doc.txt")])
    assert made.exit_code == 0, made.output
    assert "tokens cached" in made.output
    cached = runner.invoke(app, ["generate", "--model", str(folder), "--prompt-cache", str(out), "-p", QUESTION, "-n", "6"])
    plain = runner.invoke(app, ["generate", "--model", str(folder), "-p", DOC + "\n\n" + QUESTION, "-n", "6"])
    assert cached.exit_code == 0 and plain.exit_code == 0, cached.output + plain.output
    assert cached.stdout == plain.stdout
    raw = runner.invoke(app, ["generate", "--model", str(folder), "--prompt-cache", str(out), "--raw", "-p", "x"])
    assert raw.exit_code != 0 and "without --raw" in raw.output


def test_generate_and_chat_refuse_a_context_that_cannot_fit(loaded, monkeypatch):
    import kimi_mlx.plan as plan

    model, tok = loaded
    monkeypatch.setattr(plan, "machine_memory", lambda: (1 << 10, "a 1 KiB test machine"))
    with pytest.raises(KimiError, match="do not fit in memory") as err:
        generate(model, tok, QUESTION, max_tokens=4)
    assert "latent cache" in str(err.value)  # the plan is in the message
    session = ChatSession(model, tok, max_tokens=4)
    with pytest.raises(KimiError, match="do not fit in memory"):
        session.send(QUESTION)
    assert session.tokens == []  # refused before any work: the session is unchanged


def test_past_the_model_context_is_refused(loaded):
    model, tok = loaded
    with pytest.raises(KimiError, match="exceeds the model's context of 1048576"):
        generate(model, tok, QUESTION, max_tokens=1 << 20)
