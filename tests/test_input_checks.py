"""Every input checked at the boundary: one KimiError line (exit code 2 in the CLI), before any work.

Token ids, sampling options, config.json values, prompt-cache arrays, path switches in the
environment, and logits that turn NaN. Each kind is tried with several members; the expected
value is the refusal (its message names the bad input) or, for valid edge values, acceptance.
"""

import json
import math
import shutil

import mlx.core as mx
import numpy as np
import pytest
from test_generate import CONFIG
from test_generate import folder as folder  # noqa: F401 (fixture)
from test_generate import loaded as loaded  # noqa: F401 (fixture)
from typer.testing import CliRunner

from kimi_mlx import KimiError, generate, stream_generate
from kimi_mlx.cli import app
from kimi_mlx.config import ModelArgs
from kimi_mlx.generate import check_sampling
from kimi_mlx.tokenizer import TokenIdError


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


def test_a_cache_that_is_not_this_models_is_refused(loaded, folder):  # noqa: F811
    """cache= takes model.make_cache()'s list: anything else (ints, a shorter list, another
    model's caches, layers at different offsets) was an AttributeError deep in a layer."""
    from tiny import TINY_CONFIG

    from kimi_mlx import Model, ModelArgs

    model, tok = loaded
    other = Model(ModelArgs.from_dict({**TINY_CONFIG, "num_hidden_layers": 3, "linear_attn_config": {
        **TINY_CONFIG["linear_attn_config"], "kda_layers": [1, 2], "full_attn_layers": [3]}}))
    ahead = model.make_cache()
    model(mx.array([[5, 6]]), cache=ahead)  # every layer consumes two tokens
    ahead[0] = model.make_cache()[0]  # then one layer starts over
    for cache in ([1, 2], model.make_cache()[:-1], other.make_cache(), "cache", ahead):
        with pytest.raises(KimiError, match="cache does not match this model|cache layers disagree"):
            generate(model, tok, "hi", max_tokens=2, cache=cache)
    assert generate(model, tok, "hi", max_tokens=2, cache=model.make_cache()) == generate(model, tok, "hi", max_tokens=2)


def test_kv_bits_that_disagree_with_a_cache_being_continued_are_refused(loaded):
    """--kv-bits sets a fresh cache's latent precision; with a prompt cache (or cache=) that holds
    others it was ignored, silently. Now refused; the same bits (16 or None for 16-bit) pass."""
    from kimi_mlx.chat import ChatSession
    from kimi_mlx.prompt_cache import make_prompt_cache

    model, tok = loaded
    for made, asked_ok, asked_bad in ((None, [None, 16], [8, 4]), (8, [None, 8], [16, 4])):
        pc = make_prompt_cache(model, tok, "a cached document", kv_bits=made)
        for bits in asked_ok:
            assert len(list(stream_generate(model, tok, "q", max_tokens=2, prompt_cache=pc, kv_bits=bits))) == 2
        for bits in asked_bad:
            with pytest.raises(KimiError, match=f"kv_bits {bits}: the prompt cache holds {made or 16}-bit"):
                generate(model, tok, "q", max_tokens=2, prompt_cache=pc, kv_bits=bits)
            with pytest.raises(KimiError, match=f"kv_bits {bits}: cache= holds"):
                generate(model, tok, [5, 6], max_tokens=2, cache=pc.fresh_cache(), kv_bits=bits)
            with pytest.raises(KimiError, match=f"kv_bits {bits}: the prompt cache holds"):
                ChatSession(model, tok, max_tokens=2, kv_bits=bits).start_from(pc)


@pytest.mark.parametrize("messages,message", [
    ([{"content": "no role"}], "message 0 has role None"),
    ([{"role": "user", "content": "a"}, {"role": 3, "content": "b"}], "message 1 has role 3"),
])
def test_a_message_without_a_role_is_refused(loaded, messages, message):
    """The template rendered a message without a role as a system turn with no name, silently."""
    model, tok = loaded
    with pytest.raises(KimiError, match=message):
        generate(model, tok, messages, max_tokens=2)


@pytest.mark.parametrize("tools", ["get_weather", {"type": "function"}, [{"type": "function"}, "f"]])
def test_tools_must_be_a_list_of_declarations(loaded, tools):
    """A string was declared as a list of its characters, a dict as a list of its keys, silently."""
    _, tok = loaded
    with pytest.raises(KimiError, match="tools must be a list of tool declarations"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=tools)


def test_messages_may_be_a_tuple(loaded):
    """A tuple of messages is chat messages (it was read as token ids and refused as such)."""
    model, tok = loaded
    messages = [{"role": "user", "content": "hi"}]
    assert generate(model, tok, tuple(messages), max_tokens=3) == generate(model, tok, messages, max_tokens=3)


def test_generate_raw_with_a_system_message_is_refused(folder):  # noqa: F811
    """--raw sends the text without the chat template, so there is no system turn to put --system
    in: it was dropped silently (cache-prompt already refused the pair)."""
    result = CliRunner().invoke(app, ["generate", "--model", str(folder), "--raw", "--system", "be brief",
                                      "-p", "hi", "-n", "2"])
    one_line_exit_2(result, "--system needs the chat form")


@pytest.mark.parametrize("command", [["info"], ["plan", "-c", "10"], ["generate", "-p", "hi", "-n", "2"]])
@pytest.mark.parametrize("model", ["", " "])
def test_an_empty_model_path_is_refused_not_read_as_the_current_folder(folder, tmp_path, monkeypatch, command,  # noqa: F811
                                                                        model):
    """-m '' was the current folder: 'config.json: not found', or a model folder you stand in."""
    shutil.copytree(folder, tmp_path / "here")
    monkeypatch.chdir(tmp_path / "here")
    one_line_exit_2(CliRunner().invoke(app, command + ["-m", model]), f"model path {model!r}")


@pytest.mark.parametrize("dtype", [mx.int32, mx.uint8, mx.complex64, "int8", "bogus", 16])
def test_load_refuses_a_dtype_that_is_not_a_float_the_model_runs_in(folder, dtype):  # noqa: F811
    """load(dtype=...) takes float16/bfloat16/float32 (or their names): an integer dtype loaded the
    weights truncated, then failed at the first rms_norm; a made-up name was an AttributeError."""
    from kimi_mlx import load

    with pytest.raises(KimiError, match="float16, bfloat16 or float32"):
        load(str(folder), dtype=dtype)
    with pytest.raises(KimiError, match="model path None"):
        load(None)
    model, _ = load(str(folder), dtype="float16")
    assert model.model.norm.weight.dtype == mx.float16


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


BAD_ID_VALUES = [1.5, 65.0, True, False, "5", None, [65], mx.array(1.5), mx.array([65])]


@pytest.mark.parametrize("bad", BAD_ID_VALUES, ids=repr)
def test_token_ids_that_are_not_whole_numbers_are_refused_by_the_tokenizer(loaded, bad):
    """decode([1.5]) decoded id 1, True id 1, "15" ids 1 and 5, silently (int() on each)."""
    _, tok = loaded
    with pytest.raises(TokenIdError, match="is not a whole number"):
        tok.decode([65, bad])
    with pytest.raises(TokenIdError, match="is not a whole number"):
        tok.token_bytes(bad)
    detok = tok.detokenizer()
    with pytest.raises(TokenIdError, match="is not a whole number"):
        detok.add_token(bad)
    assert detok.tokens == []  # a refused id is not kept


@pytest.mark.parametrize("ids", ["15", mx.array([1.5, 2.0]), np.array([65.0]), np.array([[65, 66]]), {"a": 65}])
def test_decode_of_containers_of_the_wrong_kind_is_refused(loaded, ids):
    _, tok = loaded
    with pytest.raises(TokenIdError):
        tok.decode(ids)


def test_decode_takes_ints_and_integer_arrays(loaded):
    _, tok = loaded
    want = bytes([65, 66]).decode()  # the byte-level test tokenizer: ids 65, 66 are b"A", b"B"
    for ids in ([65, 66], (65, 66), mx.array([65, 66]), np.array([65, 66], dtype=np.int64), range(65, 67),
                [np.int32(65), mx.array(66)]):
        assert tok.decode(ids) == want
    assert tok.decode(65) == "A" and tok.decode(np.int64(66)) == "B"


def test_allow_special_as_one_string_is_refused(loaded):
    """set("<|im_end|>") is its characters: no control token allowed, silently."""
    _, tok = loaded
    with pytest.raises(TypeError, match="set of token strings"):
        tok.encode("<|im_end|>", allow_special="<|im_end|>")
    assert tok.encode("<|im_end|>", allow_special={"<|im_end|>"}) == [tok.token_to_id("<|im_end|>")]


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


@pytest.mark.parametrize("top_k", [511, 512, 10**6])
def test_top_k_up_to_past_the_vocabulary_is_accepted(loaded, top_k):
    model, tok = loaded
    assert len(list(stream_generate(model, tok, "hi", max_tokens=2, temperature=1.0, top_k=top_k))) == 2


@pytest.mark.parametrize("temperature,cut", [(1e-300, {}), (1e-40, {}), (2e-38, {}), (1e-31, {}),
                                             (1e308, {"top_k": 1}), (1e31, {"top_k": 1}), (1e40, {"top_p": 1e-9}),
                                             (1e300, {"min_p": 1.0})])
def test_extreme_temperatures_sample_their_limit(loaded, temperature, cut):
    """A temperature near 0 samples the argmax (greedy), a huge one samples uniformly among the
    tokens a cut keeps (here one: greedy again). Past float32's range of 1/temperature the sampler
    drew a random id (all logits -inf) or id 0 (-inf x 0 = NaN) instead, silently."""
    model, tok = loaded
    greedy = [r.token for r in stream_generate(model, tok, "hello", max_tokens=6)]
    for seed in (0, 1):
        got = [r.token for r in stream_generate(model, tok, "hello", max_tokens=6, temperature=temperature,
                                                seed=seed, **cut)]
        assert got == greedy, (temperature, cut, seed)


@pytest.mark.parametrize("penalty,bound", [(1e-300, 1e-30), (1e-46, 1e-30), (1e300, 1e30)])
def test_extreme_repetition_penalties_give_their_bounds_result(loaded, penalty, bound):
    """A penalty below float32's range rounded to 0 in mlx-lm's processor (logit / 0 = inf, then
    NaN logprobs: an error blaming the weights); it now samples what the bound does."""
    model, tok = loaded
    ids = [5, 6, 7, 5, 6]
    want = [r.token for r in stream_generate(model, tok, ids, max_tokens=5, repetition_penalty=bound)]
    assert [r.token for r in stream_generate(model, tok, ids, max_tokens=5, repetition_penalty=penalty)] == want


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


class NoEnd:
    """The tokenizer without end tokens: a sampled reply cannot stop before the NaN."""

    eos_token_ids: set = set()

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.mark.parametrize("calls,temperature", [(1, 0.0), (3, 0.0), (4, 0.8)])
def test_nan_logits_stop_generation_with_an_error(loaded, calls, temperature):
    model, tok = loaded
    tokens = []
    with pytest.raises(KimiError, match="logits became NaN"):
        for r in stream_generate(NaNAfter(model, calls), NoEnd(tok), [65], max_tokens=8, temperature=temperature):
            tokens.append(r.token)
    # a one-token prompt: each call gives the logits of one token
    assert len(tokens) == calls - 1  # every token before the NaN, none after


# ---------------------------------------------------------------- config.json


def with_config(folder, tmp_path, change):
    """A copy of the model folder whose config.json has `change` applied."""
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    change(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def setter(key, value, inner=False):
    def change(config):
        (config["linear_attn_config"] if inner else config)[key] = value
    return change


BAD_CONFIGS = [
    ("hidden_size", setter("hidden_size", "32"), "hidden_size is '32' (str), expected int"),
    ("float layers", setter("num_hidden_layers", 4.0), "num_hidden_layers is 4.0"),
    ("null vocab", setter("vocab_size", None), "vocab_size is None"),
    ("bool as int", setter("num_experts", True), "num_experts is True"),
    ("string bool", setter("tie_word_embeddings", "false"), "tie_word_embeddings is 'false'"),
    ("topk > experts", setter("num_experts_per_token", 5), "num_experts_per_token is 5, must be in 1..num_experts (4)"),
    ("topk 0", setter("num_experts_per_token", 0), "num_experts_per_token is 0"),
    ("negative size", setter("intermediate_size", -48), "intermediate_size is -48, must be >= 1"),
    ("zero heads", setter("num_attention_heads", 0), "num_attention_heads is 0"),
    ("negative rope", setter("qk_rope_head_dim", -4), "qk_rope_head_dim is -4"),
    ("eps", setter("rms_norm_eps", 0), "rms_norm_eps is 0"),
    ("kda head dim", setter("head_dim", 0, inner=True), "linear_attn_config.head_dim is 0"),
    ("kda heads str", setter("num_heads", "2", inner=True), "linear_attn_config.num_heads is '2'"),
    ("conv kernel", setter("short_conv_kernel_size", 1, inner=True), "short_conv_kernel_size is 1"),
    ("unknown layer", setter("kda_layers", [1, 2, 9], inner=True), "kda_layers [9] outside 1..4"),
    ("layer 0", setter("kda_layers", [0, 1], inner=True), "kda_layers [0] outside 1..4"),
    ("layer names", setter("kda_layers", ["1"], inner=True), "kda_layers is ['1']"),
    ("both kinds", setter("full_attn_layers", [1, 2], inner=True), "are in both kda_layers and full_attn_layers"),
    ("bos", setter("bos_token_id", 512), "bos_token_id 512 is outside the vocabulary"),
    ("quant bits", setter("quantization", {"group_size": 64, "bits": "4"}), "quantization.bits is '4'"),
    ("quant group", setter("quantization", {"group_size": 0, "bits": 4}), "quantization.group_size is 0"),
    ("quant entry", setter("quantization", {"bits": 4, "model.layers.0.mlp.gate": 8}),
     "quantization['model.layers.0.mlp.gate'] is 8"),
    ("quant list", setter("quantization", [4]), "quantization is [4] (list), expected dict"),
    ("huge vocab", setter("vocab_size", 10**12), "vocab_size is 1000000000000, past the largest size MLX takes"),
    ("huge layers", setter("num_hidden_layers", 2**40), "num_hidden_layers is 1099511627776, past the largest"),
]


@pytest.fixture(scope="module")
def quantized(folder, tmp_path_factory):  # noqa: F811
    """The tiny model with its Linear layers of 32-divisible rows at 4 bits, group 32, as a checkpoint."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from kimi_mlx import load_model

    model = load_model(folder)
    nn.quantize(model, group_size=32, bits=4,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0)
    out = tmp_path_factory.mktemp("q4") / "model"
    shutil.copytree(folder, out)
    (out / "model.safetensors").unlink()
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = json.loads((out / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 4}
    (out / "config.json").write_text(json.dumps(config))
    return out


QUANT_BLOCKS = [{"bits": 7}, {"bits": 64}, {"group_size": 17}, {"group_size": 4096}, {"mode": "foo"},
                {"model.layers.1.mlp.gate": {"bits": 7, "group_size": 32}}]


@pytest.mark.parametrize("change", QUANT_BLOCKS, ids=[json.dumps(q) for q in QUANT_BLOCKS])
def test_a_quantization_block_mlx_cannot_use_is_one_line(quantized, tmp_path, change):
    """Values of the right type that MLX refuses (bits it has no kernel for, a group size that does
    not divide the rows, an unknown mode) were MLX tracebacks while building the quantized model."""
    from kimi_mlx import load_model

    load_model(quantized)  # the checkpoint itself is sound
    copy = with_config(quantized, tmp_path, lambda config: config["quantization"].update(change))
    with pytest.raises(KimiError) as err:
        load_model(copy)
    assert str(copy / "config.json") in str(err.value) and "\n" not in str(err.value)
    result = CliRunner().invoke(app, ["generate", "--model", str(copy), "-p", "hi", "-n", "2"])
    one_line_exit_2(result, "quantization block")


@pytest.mark.parametrize("change,message", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_values_are_one_line_naming_the_file(folder, tmp_path, change, message):  # noqa: F811
    copy = with_config(folder, tmp_path, change)
    with pytest.raises(KimiError) as err:
        ModelArgs.from_file(copy / "config.json")
    assert message in str(err.value) and str(copy / "config.json") in str(err.value)
    assert "\n" not in str(err.value)
    result = CliRunner().invoke(app, ["generate", "--model", str(copy), "-p", "hi"])
    one_line_exit_2(result, "config.json", message)


def test_stop_must_be_a_list_of_strings(loaded):
    model, tok = loaded
    for stop in ("ab", [1], ["a", None]):
        with pytest.raises(KimiError, match="stop must be a list of strings"):
            generate(model, tok, "hi", max_tokens=2, stop=stop)
    generate(model, tok, "hi", max_tokens=2, stop=["a", ""])  # an empty stop string is ignored


def test_the_released_config_is_valid():
    from pathlib import Path

    args = ModelArgs.from_file(Path(__file__).parent / "data" / "kimi_linear_48b_a3b_config.json")
    assert (args.hidden_size, args.num_experts_per_token) == (2304, 8)
    assert ModelArgs.from_dict({**CONFIG, "eos_token_id": [258, 257]}).eos_token_id == [258, 257]


# ---------------------------------------------------------------- path switches in the environment


@pytest.mark.parametrize("var,value", [("KIMI_MLX_KDA_PATH", "fastest"), ("KIMI_MLX_EXPERT_PATH", "sparse"),
                                       ("KIMI_MLX_KERNELS", "cuda")])
def test_unknown_path_values_in_the_environment_are_one_line(folder, monkeypatch, var, value):  # noqa: F811
    monkeypatch.setenv(var, value)
    result = CliRunner().invoke(app, ["generate", "--model", str(folder), "-p", "hi", "-n", "2"])
    one_line_exit_2(result, f"${var}={value!r}", "valid:")


# ---------------------------------------------------------------- prompt-cache files


def rewrite(path, out, change):
    """A copy of a state file with `change(arrays)` applied (its metadata kept)."""
    arrays, meta = mx.load(str(path), return_metadata=True)
    change(arrays)
    mx.save_safetensors(str(out), arrays, metadata=meta)
    return out


BAD_ARRAYS = [
    ("kda state shape", lambda a: a.__setitem__("cache.0.3", a["cache.0.3"][:, :1]), "layer 0 recurrent state"),
    ("kda state dtype", lambda a: a.__setitem__("cache.0.3", a["cache.0.3"].astype(mx.float16)),
     "layer 0 recurrent state is mlx.core.float16"),
    ("conv width", lambda a: a.__setitem__("cache.1.0", a["cache.1.0"][..., :5]), "layer 1 conv window"),
    ("latent width", lambda a: a.__setitem__("cache.2.0", a["cache.2.0"][..., :7]), "layer 2 latent page"),
    ("latent dtype", lambda a: a.__setitem__("cache.2.0", a["cache.2.0"].astype(mx.int32)), "layer 2 latent page"),
    ("batch of 2", lambda a: a.__setitem__("cache.0.0", mx.concatenate([a["cache.0.0"]] * 2)), "layer 0 conv"),
    ("token ids", lambda a: a.__setitem__("tokens", a["tokens"] + 600), "token ids outside 0..511"),
    ("token dtype", lambda a: a.__setitem__("tokens", a["tokens"].astype(mx.float32)), "tokens is mlx.core.float32"),
    ("2-D tokens", lambda a: a.__setitem__("tokens", a["tokens"][None]), "expected 1-D"),
    ("missing array", lambda a: a.pop("cache.1.2"), "KeyError"),
]


@pytest.mark.parametrize("change,message", [c[1:] for c in BAD_ARRAYS], ids=[c[0] for c in BAD_ARRAYS])
def test_prompt_cache_files_with_wrong_arrays_are_refused_on_load(  # noqa: F811
        loaded, folder, tmp_path, change, message):
    from kimi_mlx.prompt_cache import load_prompt_cache, make_prompt_cache

    model, tok = loaded
    assert not model.args.is_kda_layer(2) and model.args.is_kda_layer(0)  # the layers the cases name
    good = tmp_path / "good.safetensors"
    make_prompt_cache(model, tok, "some text to cache").save(good, model)
    load_prompt_cache(good, model)  # the untouched file loads
    bad = rewrite(good, tmp_path / "bad.safetensors", change)
    with pytest.raises(KimiError, match="corrupt file") as err:
        load_prompt_cache(bad, model)
    assert message in str(err.value) and str(bad) in str(err.value)
    result = CliRunner().invoke(app, ["generate", "--model", str(folder), "--prompt-cache", str(bad), "-p", "q"])
    one_line_exit_2(result, "corrupt file")


DEEP = "[" * 100000 + "]" * 100000  # JSON nested past Python's recursion limit


@pytest.mark.parametrize("key,value", [("cache_kinds", DEEP), ("cache_meta", DEEP), ("system", DEEP),
                                       ("system", "5"), ("raw", '"yes"')])
def test_prompt_cache_files_with_wrong_metadata_are_refused_on_load(loaded, folder, tmp_path, key, value):  # noqa: F811
    """Deeply nested metadata was a RecursionError traceback; a system message that is a number, or
    a raw flag that is text, went on into the chat template."""
    from kimi_mlx.prompt_cache import load_prompt_cache, make_prompt_cache

    model, tok = loaded
    good = tmp_path / "good.safetensors"
    make_prompt_cache(model, tok, "some text to cache").save(good, model)
    arrays, meta = mx.load(str(good), return_metadata=True)
    bad = tmp_path / "bad.safetensors"
    mx.save_safetensors(str(bad), arrays, metadata={**meta, key: value})
    with pytest.raises(KimiError, match="corrupt file"):
        load_prompt_cache(bad, model)
    result = CliRunner().invoke(app, ["generate", "--model", str(folder), "--prompt-cache", str(bad), "-p", "q"])
    one_line_exit_2(result, "corrupt file")


def test_chat_files_with_deep_metadata_are_refused_on_load(loaded, tmp_path):
    from kimi_mlx.chat import ChatSession

    model, tok = loaded
    session = ChatSession(model, tok, max_tokens=2)
    list(session.send("hi"))
    session.save(tmp_path / "c.safetensors")
    arrays, meta = mx.load(str(tmp_path / "c.safetensors"), return_metadata=True)
    for key in ("messages", "open_turn", "cache_counts"):
        mx.save_safetensors(str(tmp_path / "bad.safetensors"), arrays, metadata={**meta, key: DEEP})
        with pytest.raises(KimiError, match="corrupt"):
            ChatSession(model, tok).load(tmp_path / "bad.safetensors")


def test_messages_nested_too_deeply_are_one_line(loaded):
    """A content list or tool-call arguments nested thousands deep: a RecursionError traceback."""
    model, tok = loaded
    deep = []
    for _ in range(5000):
        deep = [deep]
    call = {"function": {"name": "f", "arguments": {"a": deep}}}
    for messages in ([{"role": "user", "content": deep}],
                     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}]):
        with pytest.raises(KimiError, match="nested too deeply"):
            generate(model, tok, messages, max_tokens=2)


# ---------------------------------------------------------------- plan


@pytest.mark.parametrize("args,flag", [(["--memory-gb", "-3"], "--memory-gb"), (["--memory-gb", "0"], "--memory-gb"),
                                       (["--memory-gb", "1e308"], "--memory-gb"),
                                       (["--memory-gb", "nan"], "--memory-gb"), (["--memory-gb", "inf"], "--memory-gb"),
                                       (["--prefill-step", "0"], "prefill step 0"), (["--batch", "0"], "batch 0"),
                                       (["--kv-bits", "5"], "--kv-bits 5"),
                                       (["--parallel", "bogus"], "parallel mode 'bogus'"),
                                       (["--parallel", ""], "parallel mode ''")])
def test_plan_refuses_impossible_amounts(args, flag):
    result = CliRunner().invoke(app, ["plan", "--model", "demo", "--context", "1000", *args])
    one_line_exit_2(result, flag)


# ---------------------------------------------------------------- serve


@pytest.mark.parametrize("args,flag", [
    (["--port", "-1"], "--port -1"), (["--port", "65536"], "--port 65536"),
    (["--max-batch", "0"], "--max-batch 0"), (["--max-queue", "-1"], "--max-queue -1"),
    (["--max-tokens", "0"], "--max-tokens 0"), (["--state-cache-mb", "-1"], "--state-cache-mb -1"),
    (["--spill-mb", "-5"], "--spill-mb -5"), (["--kv-bits", "3"], "--kv-bits 3"),
    (["--spill-dir", "__file__"], "not a folder"), (["--spill-dir", ""], "not a folder")])
def test_serve_refuses_options_outside_their_range_before_loading(args, flag, monkeypatch):
    """--port -1 was an OverflowError traceback from bind(); --max-batch 0 served requests that
    waited forever; a --spill-dir that is a file failed after the model had loaded."""
    from kimi_mlx import loading

    def no_load(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr(loading, "resolve_model_path", no_load)
    args = [__file__ if a == "__file__" else a for a in args]
    one_line_exit_2(CliRunner().invoke(app, ["serve", "--model", "demo", *args]), flag)


# ---------------------------------------------------------------- the demo's evaluate command


@pytest.mark.parametrize("args,needle", [(["--model", "/nonexistent/model"], "no such model folder"),
                                         (["--n", "0"], "--n 0"), (["--n", "-1"], "--n -1")])
def test_demo_evaluate_refuses_bad_input_in_one_line(args, needle, capsys):
    """`python -m kimi_mlx.demo.evaluate` (the README's command): a bad --model was a KimiError
    traceback, --n -1 a KeyError traceback after the model had loaded."""
    from kimi_mlx.demo.evaluate import main

    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and needle in err[-1] and "Traceback" not in "\n".join(err), err


# ---------------------------------------------------------------- names that are neither a folder nor a repo id


@pytest.mark.parametrize("args,needle", [
    (["info", "-m", "a b/c d"], "not a hub repo id"), (["generate", "-m", "a--b/c", "-p", "hi"], "not a hub repo id"),
    (["convert", "a b/c d", "out"], "not a hub repo id"),
    (["info", "-m", "~no-such-user-h14/x"], "no home folder"),
    (["convert", "~no-such-user-h14/x", "out"], "no home folder"),
    (["convert", "demo", "~no-such-user-h14/out"], "no home folder"),
    (["cache-prompt", "~no-such-user-h14/c.safetensors", "-p", "hi"], "no home folder"),
    (["generate", "--prompt-cache", "~no-such-user-h14/c.safetensors", "-p", "hi"], "no home folder"),
    (["plan", "-m", "~no-such-user-h14/x", "-c", "1000"], "no home folder")])
def test_names_that_are_not_a_folder_nor_a_repo_id_are_one_line(args, needle, tmp_path, monkeypatch):
    """A repo id the hub's validator refuses was its HFValidationError traceback; ~user for a user
    that does not exist was Python's RuntimeError 'Could not determine home directory'."""
    monkeypatch.chdir(tmp_path)
    one_line_exit_2(CliRunner().invoke(app, args), needle)
    assert list(tmp_path.iterdir()) == []



def test_load_tokenizer_from_an_unknown_users_home_is_a_kimi_error():
    from kimi_mlx.tokenizer import load_tokenizer

    with pytest.raises(KimiError, match="no home folder for that ~user"):
        load_tokenizer("~no-such-user-h14/x")
