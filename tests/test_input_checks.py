"""Every input checked at the boundary: one KimiError line (exit code 2 in the CLI), before any work.

Token ids, sampling options, config.json values, prompt-cache arrays, path switches in the
environment, and logits that turn NaN. Each kind is tried with several members; the expected
value is the refusal (its message names the bad input) or, for valid edge values, acceptance.
"""

import json
import math
import shutil

import mlx.core as mx
import pytest
from test_generate import CONFIG
from test_generate import folder as folder  # noqa: F401 (fixture)
from test_generate import loaded as loaded  # noqa: F401 (fixture)
from typer.testing import CliRunner

from kimi_mlx import KimiError, generate, stream_generate
from kimi_mlx.cli import app
from kimi_mlx.config import ModelArgs
from kimi_mlx.generate import check_sampling


def one_line_exit_2(result, *needles):
    """The CLI refused: exit code 2, one line on stderr starting 'error:', naming each needle."""
    err = result.stderr.strip()
    assert result.exit_code == 2, result.output
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- token ids


@pytest.mark.parametrize("ids", [[100000, 5], [5, 512], [-1, 5], [5, -2**40], [2**40]])
def test_token_ids_outside_the_vocabulary_are_refused(loaded, ids):
    model, tok = loaded
    with pytest.raises(KimiError, match="outside the vocabulary 0..511"):
        generate(model, tok, ids, max_tokens=2)
    with pytest.raises(KimiError, match="outside the vocabulary 0..511"):
        generate(model, tok, mx.array(ids) if abs(max(ids, key=abs)) < 2**31 else ids, max_tokens=2)


@pytest.mark.parametrize("ids", [[1.5, 2], [True, 3], [[1, 2]]])
def test_token_ids_that_are_not_ints_are_refused(loaded, ids):
    model, tok = loaded
    with pytest.raises(KimiError, match="whole numbers"):
        generate(model, tok, ids, max_tokens=2)


def test_the_edges_of_the_vocabulary_are_accepted(loaded):
    model, tok = loaded
    assert len(list(stream_generate(model, tok, [0, 511], max_tokens=2))) == 2


def test_decoding_an_id_past_the_tokenizer_is_refused(loaded):
    _, tok = loaded
    for bad in (512, 2**32, -1):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.decode([65, bad])
        with pytest.raises(KimiError, match="outside the vocabulary"):
            tok.detokenizer().add_token(bad)


# ---------------------------------------------------------------- sampling options

BAD_OPTIONS = [
    ("max_tokens", 0, "--max-tokens"), ("max_tokens", -3, "--max-tokens"),
    ("temperature", -0.5, "--temp"), ("temperature", math.nan, "--temp"), ("temperature", math.inf, "--temp"),
    ("top_p", -0.1, "--top-p"), ("top_p", 1.5, "--top-p"), ("top_p", math.nan, "--top-p"),
    ("top_k", -1, "--top-k"),
    ("min_p", -0.01, "--min-p"), ("min_p", 1.01, "--min-p"), ("min_p", math.nan, "--min-p"),
    ("repetition_penalty", 0.0, "--repetition-penalty"), ("repetition_penalty", -1.0, "--repetition-penalty"),
    ("repetition_penalty", math.nan, "--repetition-penalty"),
    ("seed", -1, "--seed"),
]


@pytest.mark.parametrize("name,value,flag", BAD_OPTIONS)
def test_sampling_options_outside_their_range_are_refused(loaded, name, value, flag):
    model, tok = loaded
    kwargs = {"max_tokens": 2, name: value}
    with pytest.raises(KimiError, match=f"{name} .{flag}. is") as err:
        generate(model, tok, "hi", **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name,value,flag", BAD_OPTIONS)
def test_cli_refuses_bad_sampling_options_in_one_line(folder, name, value, flag):  # noqa: F811
    result = CliRunner().invoke(app, ["generate", "--model", str(folder), "-p", "hi", flag, str(value)])
    one_line_exit_2(result, flag)


def test_edge_values_are_accepted():
    # 0 = off/greedy is the existing convention (mlx-lm's make_sampler) and stays valid
    check_sampling(1, temperature=0, top_p=0, top_k=0, min_p=0, repetition_penalty=None)
    check_sampling(1, temperature=2.0, top_p=1.0, top_k=5, min_p=1.0, repetition_penalty=1e-3, seed=0)


def test_cli_refuses_a_bad_prefill_step(folder, tmp_path):  # noqa: F811
    result = CliRunner().invoke(app, ["cache-prompt", str(tmp_path / "c.safetensors"), "--model", str(folder),
                                      "-p", "hi", "--prefill-step", "0"])
    one_line_exit_2(result, "--prefill-step")


# ---------------------------------------------------------------- NaN logits


class NaNAfter:
    """The model, with every logit NaN from its `n`-th call on (as a broken kernel would give)."""

    def __init__(self, model, n):
        self._model, self.n = model, n

    def __call__(self, *args, **kwargs):
        self.n -= 1
        out = self._model(*args, **kwargs)
        return out * math.nan if self.n <= 0 else out

    def __getattr__(self, name):
        return getattr(self._model, name)


@pytest.mark.parametrize("calls,temperature", [(1, 0.0), (3, 0.0), (4, 0.8)])
def test_nan_logits_stop_generation_with_an_error(loaded, calls, temperature):
    model, tok = loaded
    tokens = []
    with pytest.raises(KimiError, match="logits became NaN"):
        for r in stream_generate(NaNAfter(model, calls), tok, "hello", max_tokens=8, temperature=temperature):
            tokens.append(r.token)
    # the prompt is fed in two calls (all but its last token, then the last); then one per token
    assert len(tokens) == max(calls - 2, 0)  # every token before the NaN, none after
