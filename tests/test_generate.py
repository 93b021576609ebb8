"""Generation API and `kimi-mlx generate`, on a tiny random model with a byte-level Kimi tokenizer.

The truth for every cached, stepped, pipelined path is a greedy loop that re-runs the whole
sequence through the model without any cache.
"""

import mlx.core as mx
import pytest
from tiny import TINY_CONFIG, write_checkpoint
from typer.testing import CliRunner

from kimi_mlx import KimiError, generate, load, stream_generate
from kimi_mlx.tokenizer import write_tokenizer_files

SPECIALS = {"[BOS]": 256, "[EOS]": 257, "<|im_end|>": 258, "<|im_user|>": 259, "<|im_assistant|>": 260,
            "<|im_system|>": 261, "<|im_middle|>": 262, "[PAD]": 511}
CONFIG = {**TINY_CONFIG, "vocab_size": 512, "bos_token_id": 256, "eos_token_id": 258, "pad_token_id": 511,
          "model_max_length": 64}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tiny import random_weights

    path = write_checkpoint(tmp_path_factory.mktemp("gen"), config=CONFIG, weights=random_weights(CONFIG, seed=1))
    write_tokenizer_files(path, {bytes([b]): b for b in range(256)}, SPECIALS, eos_token="[EOS]")
    return path


@pytest.fixture(scope="module")
def loaded(folder):
    return load(str(folder))


def greedy_without_cache(model, ids, n):
    """The truth: every step recomputes the whole sequence."""
    out = []
    for _ in range(n):
        logits = model(mx.array([ids + out]))[0, -1]
        out.append(int(mx.argmax(logits)))
    return out


def test_greedy_tokens_match_uncached_truth(loaded):
    model, tok = loaded
    ids = tok.encode("hello there")
    responses = list(stream_generate(model, tok, ids, max_tokens=6))
    truth = greedy_without_cache(model, ids, 6)
    emitted = [r.token for r in responses]
    eos = tok.eos_token_ids
    assert emitted == truth[: len(emitted)]
    assert responses[-1].finish_reason == ("stop" if emitted[-1] in eos else "length")


def test_prefill_step_does_not_change_the_result(loaded):
    model, tok = loaded
    ids = tok.encode("a longer prompt, fed in several steps")
    a = [r.token for r in stream_generate(model, tok, ids, max_tokens=4, prefill_step=5)]
    b = [r.token for r in stream_generate(model, tok, ids, max_tokens=4, prefill_step=512)]
    assert a == b


def test_logprob_is_the_log_softmax_of_the_chosen_token(loaded):
    model, tok = loaded
    ids = tok.encode("xyz")
    first = next(iter(stream_generate(model, tok, ids, max_tokens=1)))
    logits = model(mx.array([ids]))[0, -1]
    expected = logits[first.token] - mx.logsumexp(logits)
    assert abs(first.logprob - expected.item()) < 1e-4


def test_seeded_sampling_is_reproducible(loaded):
    model, tok = loaded
    kw = dict(max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    a = [r.token for r in stream_generate(model, tok, "seed me", **kw)]
    b = [r.token for r in stream_generate(model, tok, "seed me", **kw)]
    assert a == b


def test_stop_string_cuts_the_reply(loaded):
    model, tok = loaded
    full = generate(model, tok, "abc", max_tokens=10)
    if len(full) < 3:
        pytest.skip("the random model replied too little to place a stop string")
    stop = full[1:3]
    cut = generate(model, tok, "abc", max_tokens=10, stop=[stop])
    assert cut == full[: full.find(stop)]


def test_eos_stops_generation(loaded):
    model, tok = loaded
    ids = tok.encode("stop here")
    truth = greedy_without_cache(model, ids, 3)

    class StopsAtThird:
        eos_token_ids = {truth[2]}

        def __getattr__(self, name):
            return getattr(tok, name)

    responses = list(stream_generate(model, StopsAtThird(), ids, max_tokens=10))
    if truth[2] in truth[:2]:
        pytest.skip("the random model repeated a token")
    assert [r.token for r in responses] == truth[:3] and responses[-1].finish_reason == "stop"


def test_chat_messages_use_the_template(loaded):
    model, tok = loaded
    messages = [{"role": "user", "content": "hi"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert generate(model, tok, messages, max_tokens=3) == generate(model, tok, ids, max_tokens=3)


def test_prompt_longer_than_context_is_refused(loaded):
    model, tok = loaded
    with pytest.raises(KimiError, match="exceeds the model's context of 64"):
        generate(model, tok, "x" * 60, max_tokens=10)


def test_cli_generate_streams_text(folder, loaded):
    from kimi_mlx.cli import app

    model, tok = loaded
    expected = generate(model, tok, [{"role": "user", "content": "hi"}], max_tokens=5)
    result = CliRunner().invoke(app, ["generate", "--model", str(folder), "--prompt", "hi", "-n", "5", "--verbose"])
    assert result.exit_code == 0, result.output
    assert expected in result.stdout
    assert "tokens/s" in result.stderr


def test_cli_reports_user_errors_in_one_line(tmp_path):
    from kimi_mlx.cli import app

    result = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1


def test_generation_raises_the_wired_limit_on_metal_and_restores_it(loaded, monkeypatch):
    """As mlx-lm: on Metal the wired limit is the GPU's recommended working set while a generation
    runs (the weights stay resident), and what it was afterwards; other backends leave it alone.
    Here 'Metal' is stood in for, recording the calls."""
    from kimi_mlx.generate import generate_tokens

    model, _ = loaded
    calls = []
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda *a: {"max_recommended_working_set_size": 123456})
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 99)
    monkeypatch.setattr(mx, "synchronize", lambda *a: None)
    tokens = list(generate_tokens(model, mx.array([5, 6, 7]), max_tokens=3))
    assert len(tokens) == 3 and calls == [123456, 99]
    calls.clear()
    gen = generate_tokens(model, mx.array([5, 6, 7]), max_tokens=10)
    next(gen)
    gen.close()  # a reply stopped early (stop string, Ctrl-C) restores it too
    assert calls == [123456, 99]
    calls.clear()
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    list(generate_tokens(model, mx.array([5, 6, 7]), max_tokens=2))
    assert calls == []
