"""Kimi tokenizer: file formats, round trips, Han pre-splitting, chat template, streaming.

Every test builds a small real-format tokenizer folder (tiktoken.model with all 256
bytes plus a few dozen trained merges, tokenizer_config.json with Kimi's control
tokens at Kimi's offsets after the ranks). Expected chat strings are written out by
hand from Kimi's format, never produced by the code under test.
"""

import json
import re
from collections import Counter

import pytest

from kimi_mlx.errors import KimiError
from kimi_mlx.tokenizer import (
    CONFIG_FILE,
    TEMPLATE_FILE,
    TIKTOKEN_FILE,
    load_tokenizer,
    split_long_runs,
    write_tokenizer_files,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs.",
    "Hello, world! Hello there, how are you today? I'm fine, thanks.",
    "你好世界。中文文本测试，你好，世界！今天天气很好。中文中文。",
    "我们在测试分词器。分词器需要处理中文和English混合文本。",
    "def main():\n    return 42\n\nprint(main())\n",
]
# Offsets of Kimi's control tokens after the BPE ranks (163584 + offset in Kimi-Linear).
KIMI_SPECIALS = {
    "[BOS]": 0, "[EOS]": 1, "<|im_end|>": 2, "<|im_user|>": 3, "<|im_assistant|>": 4,
    "<|start_header_id|>": 6, "<|end_header_id|>": 7, "[EOT]": 9, "<|im_system|>": 10,
    "<|tool_calls_section_begin|>": 11, "<|tool_calls_section_end|>": 12,
    "<|tool_call_begin|>": 13, "<|tool_call_argument_begin|>": 14, "<|tool_call_end|>": 15,
    "<|im_middle|>": 17, "[UNK]": 254, "[PAD]": 255,
}
TOOL_MARKERS = [s for s in KIMI_SPECIALS if "tool_call" in s]
# A Kimi-Linear-style checkpoint template (jinja with {%- -%}, compact tool JSON).
CHECKPOINT_TEMPLATE = """{%- if tools -%}
  <|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>
{%- endif -%}
{% for message in messages %}
  {%- set role_name = message.get('name') or message['role'] -%}
  {%- if message['role'] == 'user' -%}
    <|im_user|>{{ role_name }}<|im_middle|>
  {%- elif message['role'] == 'assistant' -%}
    <|im_assistant|>{{ role_name }}<|im_middle|>
  {%- else -%}
    <|im_system|>{{ role_name }}<|im_middle|>
  {%- endif -%}
  {{ message['content'] }}<|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}
  <|im_assistant|>assistant<|im_middle|>
{%- endif -%}
"""
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "你好, can you say 😀?"},
    {"role": "assistant", "content": "当然 😀"},
    {"role": "user", "content": "Thanks!"},
]
EXPECTED_CHAT = (
    "<|im_system|>system<|im_middle|>You are a helpful assistant.<|im_end|>"
    "<|im_user|>user<|im_middle|>你好, can you say 😀?<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|>当然 😀<|im_end|>"
    "<|im_user|>user<|im_middle|>Thanks!<|im_end|>"
)
GEN_PROMPT = "<|im_assistant|>assistant<|im_middle|>"
MIXED = "Hello, 世界! 😀🎉 naïve café — 你好世界 end\n\tdef f(x): return x  # ok"


def train_bpe(texts, num_merges):
    """Greedy byte-pair merges over whitespace-led words: a small but real vocabulary."""
    words = Counter(tuple(bytes([b]) for b in w.encode()) for t in texts for w in re.findall(r"\s?\S+", t))
    ranks = {bytes([i]): i for i in range(256)}
    for _ in range(num_merges):
        pairs = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks.setdefault(a + b, len(ranks))
        words = Counter({_merge(word, a, b): n for word, n in words.items()})
    return ranks


def _merge(word, a, b):
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def add_token(ranks, token):
    """Make `token` reachable: add its byte prefixes, then itself (if not there yet)."""
    for end in range(2, len(token) + 1):
        ranks.setdefault(token[:end], len(ranks))


def build_ranks():
    ranks = train_bpe(CORPUS, 60)
    for ch in "中文你好世界当然":
        add_token(ranks, ch.encode())
    # Emoji only as a 3-byte prefix: every emoji is split across two tokens.
    add_token(ranks, "😀".encode()[:3])
    # A trap only a missing Han split would use: "文" + "E" in one token.
    add_token(ranks, "文E".encode())
    return ranks


@pytest.fixture(scope="module")
def ranks():
    return build_ranks()


def make_folder(path, ranks, chat_template=CHECKPOINT_TEMPLATE):
    n = len(ranks)
    specials = {s: n + off for s, off in KIMI_SPECIALS.items()}
    write_tokenizer_files(path, ranks, specials, chat_template=chat_template, not_special=TOOL_MARKERS)
    return path


@pytest.fixture(scope="module")
def tok(ranks, tmp_path_factory):
    return load_tokenizer(make_folder(tmp_path_factory.mktemp("kimi"), ranks))


@pytest.fixture(scope="module")
def tok_builtin(ranks, tmp_path_factory):
    return load_tokenizer(make_folder(tmp_path_factory.mktemp("kimi_nt"), ranks, chat_template=None))


# ---------------------------------------------------------------- ids and files


def test_special_ids_follow_the_ranks_and_reserved_fill_the_rest(tok, ranks):
    n = len(ranks)
    assert tok.vocab_size == n + 256
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (n, n + 2, n + 255)
    assert tok.token_to_id("<|im_middle|>") == n + 17
    assert tok.eos_token_ids == {n + 1, n + 2}  # [EOS] and <|im_end|>
    assert tok.special_tokens[f"<|reserved_token_{n + 5}|>"] == n + 5
    assert tok.token_to_id("<|not_a_token|>") is None
    assert len(tok.special_tokens) == 256


def test_written_files_are_in_the_reference_format(ranks, tmp_path, monkeypatch):
    folder = make_folder(tmp_path, ranks)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no cache writes from tiktoken's loader
    from tiktoken.load import load_tiktoken_bpe

    assert load_tiktoken_bpe(str(folder / TIKTOKEN_FILE)) == ranks  # tiktoken's own reader agrees
    first = (folder / TIKTOKEN_FILE).read_text().splitlines()[0]
    assert first == "AA== 0"  # base64 of b"\x00", space, rank
    config = json.loads((folder / CONFIG_FILE).read_text())
    n = len(ranks)
    assert config["added_tokens_decoder"][str(n + 2)] == {
        "content": "<|im_end|>", "lstrip": False, "normalized": False,
        "rstrip": False, "single_word": False, "special": True,
    }
    assert config["added_tokens_decoder"][str(n + 13)]["special"] is False
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("[BOS]", "[EOS]", "[PAD]")
    assert config["tokenizer_class"] == "TikTokenTokenizer"
    assert (folder / TEMPLATE_FILE).read_text() == CHECKPOINT_TEMPLATE


# ---------------------------------------------------------------- encode / decode


@pytest.mark.parametrize(
    "text",
    ["The quick brown fox.", "你好世界，中文文本测试。", "😀🎉👍🏽", MIXED, "", "  \n\n  x  ", "it's I'LL we'd"],
    ids=["latin", "han", "emoji", "mixed", "empty", "spaces", "contractions"],
)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.num_base_tokens for i in ids)
    assert tok.decode(ids) == text


def test_merges_are_used(tok):
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox".encode())
    assert tok.encode("文") == [tok._enc.encode_single_token("文".encode())]


def test_han_runs_are_split_from_latin(tok):
    """With Kimi's [\\p{Han}]+ branch "中文English" splits before "E"; the "文E" token
    in the vocabulary must never be used."""
    trap = tok._enc.encode_single_token("文E".encode())
    for text in ["中文English混合", "文E", "abc文Edef"]:
        ids = tok.encode(text)
        assert trap not in ids
        assert tok.decode(ids) == text


def test_special_strings_in_text_stay_text_by_default(tok):
    im_end = tok.token_to_id("<|im_end|>")
    plain = tok.encode("a<|im_end|>b")
    assert im_end not in plain and tok.decode(plain) == "a<|im_end|>b"
    assert tok.encode("a<|im_end|>b", allow_special=True) == tok.encode("a") + [im_end] + tok.encode("b")
    assert im_end in tok.encode("<|im_end|>", allow_special={"<|im_end|>"})


def test_decode_skips_special_but_keeps_tool_markers(tok):
    sp = tok.special_tokens
    ids = [tok.bos_token_id, *tok.encode("hi"), sp["<|tool_call_begin|>"], sp["<|im_end|>"], sp[f"<|reserved_token_{tok.num_base_tokens + 5}|>"]]
    assert tok.decode(ids, skip_special_tokens=True) == "hi<|tool_call_begin|>"
    assert tok.decode(ids).startswith("[BOS]hi<|tool_call_begin|><|im_end|>")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_long_runs_are_cut_like_the_reference():
    assert list(split_long_runs("ab   cdefgh  x", max_run=3)) == ["ab   cde", "fgh  x"]
    assert list(split_long_runs("abcdefg", max_chars=3, max_run=10)) == ["abc", "def", "g"]
    assert list(split_long_runs("short text")) == ["short text"]


# ---------------------------------------------------------------- chat template


def _ids_by_hand(tok, parts):
    """Ids from alternating (marker, text) parts: markers are single ids, text is BPE."""
    ids = []
    for part in parts:
        ids += [tok.special_tokens[part]] if part in tok.special_tokens else tok.encode(part)
    return ids


def test_checkpoint_template_renders_kimi_format(tok):
    assert tok.chat_template_source.endswith(TEMPLATE_FILE)
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == EXPECTED_CHAT + GEN_PROMPT
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False, tokenize=False) == EXPECTED_CHAT


def test_template_markers_become_single_ids(tok):
    ids = tok.apply_chat_template(MESSAGES[:2])
    expected = _ids_by_hand(tok, [
        "<|im_system|>", "system", "<|im_middle|>", "You are a helpful assistant.", "<|im_end|>",
        "<|im_user|>", "user", "<|im_middle|>", "你好, can you say 😀?", "<|im_end|>",
        "<|im_assistant|>", "assistant", "<|im_middle|>",
    ])
    assert ids == expected
    assert ids.count(tok.token_to_id("<|im_end|>")) == 2
    assert tok.decode(ids) == tok.apply_chat_template(MESSAGES[:2], tokenize=False)


def test_template_inside_tokenizer_config(ranks, tmp_path):
    folder = make_folder(tmp_path, ranks)
    (folder / TEMPLATE_FILE).unlink()
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["chat_template"] = CHECKPOINT_TEMPLATE
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    assert "chat_template" in tok.chat_template_source
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == EXPECTED_CHAT + GEN_PROMPT


def test_builtin_template_when_checkpoint_has_none(tok_builtin):
    assert tok_builtin.chat_template_source == "built-in Kimi template"
    assert tok_builtin.apply_chat_template(MESSAGES, tokenize=False) == EXPECTED_CHAT + GEN_PROMPT
    assert tok_builtin.apply_chat_template(MESSAGES, add_generation_prompt=False, tokenize=False) == EXPECTED_CHAT
    # No default system prompt is inserted (Kimi-Linear's template adds none).
    assert tok_builtin.apply_chat_template(MESSAGES[3:], tokenize=False) == (
        "<|im_user|>user<|im_middle|>Thanks!<|im_end|>" + GEN_PROMPT
    )


def test_builtin_template_tools_and_tool_calls(tok_builtin):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "北京天气?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "functions.weather:0", "type": "function", "function": {"name": "weather", "arguments": '{"city":"北京"}'}}]},
        {"role": "tool", "tool_call_id": "functions.weather:0", "content": "晴 25°C"},
    ]
    expected = (
        '<|im_system|>tool_declare<|im_middle|>[{"function":{"name":"weather","parameters":{"type":"object"}},"type":"function"}]<|im_end|>'
        "<|im_user|>user<|im_middle|>北京天气?<|im_end|>"
        '<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|><|tool_call_begin|>functions.weather:0'
        '<|tool_call_argument_begin|>{"city":"北京"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
        "<|im_system|>tool<|im_middle|>## Return of functions.weather:0\n晴 25°C<|im_end|>"
        + GEN_PROMPT
    )
    assert tok_builtin.apply_chat_template(messages, tokenize=False, tools=tools) == expected
    ids = tok_builtin.apply_chat_template(messages, tools=tools)
    assert tok_builtin.token_to_id("<|tool_call_begin|>") in ids


# ---------------------------------------------------------------- streaming


def test_streaming_emits_whole_characters_in_order(tok):
    ids = tok.encode(MIXED)
    partial = [i for i in ids if _incomplete_utf8(tok.token_bytes(i))]
    assert partial, "the vocabulary must split some character across tokens"
    detok = tok.detokenizer()
    shown = ""
    for token_id in ids:
        segment = detok.add_token(token_id)
        assert "\ufffd" not in segment
        shown += segment
        assert MIXED.startswith(shown) and detok.text == shown
    assert detok.finalize() == ""
    assert detok.text == MIXED and detok.tokens == ids


def _incomplete_utf8(data):
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_streaming_skips_specials_and_flushes_a_cut_character(tok):
    reply = tok.encode("当然 😀") + [tok.eos_token_id]
    detok = tok.detokenizer(skip_special_tokens=True)
    assert "".join(detok.add_token(i) for i in reply) == "当然 😀"
    assert detok.last_segment == "当然 😀" and detok.last_segment == ""
    detok.reset()
    assert detok.text == "" and detok.tokens == []
    emoji = tok.encode("😀")
    assert detok.add_token(emoji[0]) == ""  # first 3 bytes held back
    assert detok.finalize() == "\ufffd"  # the reply ended mid-character
    plain = tok.detokenizer()
    assert "".join(plain.add_token(i) for i in reply) == "当然 😀<|im_end|>"


# ---------------------------------------------------------------- bad files


def _one_line_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_missing_tiktoken_model(ranks, tmp_path):
    folder = make_folder(tmp_path, ranks)
    (folder / TIKTOKEN_FILE).unlink()
    with pytest.raises(KimiError) as excinfo:
        load_tokenizer(folder)
    _one_line_error(excinfo, str(folder / TIKTOKEN_FILE), "missing", "download")


@pytest.mark.parametrize(
    "bad_line, reason",
    [("@@@notbase64 2", "corrupt"), ("AAE=", "corrupt"), ("AAE= x", "corrupt"), ("AA== 2", "repeats")],
    ids=["bad-base64", "one-field", "bad-rank", "duplicate-token"],
)
def test_corrupt_tiktoken_line(ranks, tmp_path, bad_line, reason):
    folder = make_folder(tmp_path, ranks)
    lines = (folder / TIKTOKEN_FILE).read_text().splitlines()
    lines[2] = bad_line
    (folder / TIKTOKEN_FILE).write_text("\n".join(lines) + "\n")
    with pytest.raises(KimiError) as excinfo:
        load_tokenizer(folder)
    _one_line_error(excinfo, str(folder / TIKTOKEN_FILE), "line 3", reason)


def test_missing_rank_and_lfs_pointer(ranks, tmp_path):
    folder = make_folder(tmp_path, ranks)
    path = folder / TIKTOKEN_FILE
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:5] + lines[6:]) + "\n")
    with pytest.raises(KimiError) as excinfo:
        load_tokenizer(folder)
    _one_line_error(excinfo, str(path), "ranks are not exactly")
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n")
    with pytest.raises(KimiError) as excinfo:
        load_tokenizer(folder)
    _one_line_error(excinfo, str(path), "Git LFS")


def test_bad_tokenizer_config(ranks, tmp_path):
    folder = make_folder(tmp_path, ranks)
    config = folder / CONFIG_FILE
    config.write_text('{\n  "bos_token": "[BOS]",\n  oops\n}')
    with pytest.raises(KimiError) as excinfo:
        load_tokenizer(folder)
    _one_line_error(excinfo, str(config), "line 3")
    config.unlink()
    with pytest.raises(KimiError) as excinfo:
        load_tokenizer(folder)
    _one_line_error(excinfo, str(config), "missing")


def test_bad_template_and_missing_folder(ranks, tmp_path):
    folder = make_folder(tmp_path, ranks, chat_template="{% for m in messages %}{{ m['content'] }")
    with pytest.raises(KimiError) as excinfo:
        load_tokenizer(folder)
    _one_line_error(excinfo, str(folder / TEMPLATE_FILE), "does not compile")
    with pytest.raises(KimiError) as excinfo:
        load_tokenizer(tmp_path / "nope")
    _one_line_error(excinfo, "not a model folder")
