"""Kimi's tokenizer: tiktoken BPE read from the checkpoint's own files, no transformers.

A Kimi model folder holds two tokenizer files (plus, optionally, a third):

- ``tiktoken.model``: one line per BPE token, ``<base64 bytes> <rank>``, ranks 0..n-1.
- ``tokenizer_config.json``: ``added_tokens_decoder`` (id -> {"content", "special", ...})
  naming the control tokens that follow the ranks, ``bos_token`` / ``eos_token`` /
  ``pad_token`` / ``unk_token``, and maybe a ``chat_template`` string.
- ``chat_template.jinja``: the chat template, when it is not inside the config.

Id layout (as Moonshot's ``tokenization_kimi.py``): BPE ranks take ids 0..n-1; the
256 ids after them are special tokens, named from ``added_tokens_decoder`` or, where
unnamed, ``<|reserved_token_{id}|>``. For Kimi-Linear n = 163584, so the vocabulary is
163840 = the model's embedding rows. (Moonshot's Kimi-Linear file reserves 256 + 2 ids,
i.e. two ids past the embedding table; we keep the model's 163840.)
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import json
import numbers
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import AbstractSet, Any

import tiktoken
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import KimiError
from .files import expand_user, read_bytes, read_json_object, read_text

TIKTOKEN_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
# Control-token ids run from the BPE ranks up, every gap filled with a reserved token: an id far
# past them (a corrupt config's 3000000000) would make billions of entries. Kimi has 256.
MAX_SPECIAL_TOKENS = 1 << 20
NUM_RESERVED_SPECIAL_TOKENS = 256

# Kimi's pre-tokenizer split (tokenization_kimi.py, Kimi-K2 and Kimi-Linear alike).
# Han runs come first and are subtracted from the letter classes, so "中文English"
# splits into "中文" | "English" and BPE never merges across a script boundary.
PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# Same limits as the reference: tiktoken panics on >400k-char inputs and is quadratic
# on very long runs of one character class (openai/tiktoken#195). Splitting the same
# way keeps our ids identical to the reference on long inputs.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000

# Used when the checkpoint ships no chat template. Kimi-Linear's format: every turn is
# <|im_{user,assistant,system}|>{name or role}<|im_middle|>{content}<|im_end|>, tools are
# declared first as compact JSON, and (unlike Kimi-K2) no default system prompt is added.
DEFAULT_CHAT_TEMPLATE = """\
{%- macro content_text(msg) -%}
  {%- set c = msg.get('content') -%}
  {%- if c is string -%}{{ c }}
  {%- elif c is not none -%}
    {%- for part in c -%}
      {%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}
        <|media_start|>image<|media_content|><|media_pad|><|media_end|>
      {%- else -%}{{ part['text'] }}{%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- if tools -%}
  <|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>
{%- endif -%}
{%- for message in messages -%}
  {%- set name = message.get('name') or message['role'] -%}
  {%- if message['role'] == 'user' -%}<|im_user|>{{ name }}<|im_middle|>
  {%- elif message['role'] == 'assistant' -%}<|im_assistant|>{{ name }}<|im_middle|>
  {%- else -%}<|im_system|>{{ name }}<|im_middle|>
  {%- endif -%}
  {%- if message['role'] == 'assistant' and message.get('tool_calls') -%}
    {{ content_text(message) }}<|tool_calls_section_begin|>
    {%- for call in message['tool_calls'] -%}
      {%- set args = call['function']['arguments'] -%}
      <|tool_call_begin|>{{ call['id'] }}<|tool_call_argument_begin|>
      {%- if args is string %}{{ args }}{% else %}{{ args | tojson }}{% endif -%}
      <|tool_call_end|>
    {%- endfor -%}
    <|tool_calls_section_end|>
  {%- elif message['role'] == 'tool' -%}
    ## Return of {{ message.get('tool_call_id') }}
{{ content_text(message) }}
  {%- else -%}{{ content_text(message) }}
  {%- endif -%}
  <|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}
"""


class TokenIdError(KimiError, ValueError):
    """A token id the tokenizer does not have."""


def as_token_id(value: Any) -> int:
    """One token id as an int: a Python or numpy integer, or a 0-d integer MLX/numpy array.
    Anything else is a TokenIdError: a float (1.5 is not an id; int() truncated it to 1), a
    bool (True read as 1), text ("5"), None, a list. The range is the caller's to check."""
    if not isinstance(value, numbers.Integral) and getattr(value, "shape", None) == () and hasattr(value, "item"):
        value = value.item()  # a 0-d array (iterating an mx.array yields these): its Python value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise TokenIdError(f"token id {shown} is not a whole number (token ids are ints, "
                           f"got {type(value).__name__})")
    return int(value)


# ---------------------------------------------------------------- reading files


def _fail(path: Path, problem: str, fix: str) -> KimiError:
    """One-line user error: the file, what is wrong, what to do."""
    return KimiError(f"{path}: {problem}; {fix}")


_REDOWNLOAD = "download the model folder again (e.g. huggingface-cli download moonshotai/Kimi-Linear-48B-A3B-Instruct)"


def read_tiktoken_model(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken.model file into {token bytes: rank}, checking every line."""
    path = Path(path)
    if not path.exists():
        raise _fail(path, "missing (the tokenizer is tiktoken.model + tokenizer_config.json)", _REDOWNLOAD)
    data = read_bytes(path, _REDOWNLOAD, KimiError)  # a folder, unreadable, /dev/zero: one line
    if data.startswith(b"version https://git-lfs"):
        raise _fail(path, "is a Git LFS pointer, not the vocabulary", "run `git lfs pull` or " + _REDOWNLOAD)
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if line.strip():
            token, rank = _parse_rank_line(path, lineno, line)
            if token in ranks:
                raise _fail(path, f"line {lineno} repeats a token already given rank {ranks[token]}", _REDOWNLOAD)
            ranks[token] = rank
    problem = _rank_problem(ranks)
    if problem:
        raise _fail(path, problem, _REDOWNLOAD)
    return ranks


def _parse_rank_line(path: Path, lineno: int, line: bytes) -> tuple[bytes, int]:
    """One `<base64> <rank>` line; any other shape is a corrupt file."""
    fields = line.split()
    try:
        if len(fields) != 2:
            raise ValueError(f"{len(fields)} fields, expected 2")
        token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        if rank < 0:
            raise ValueError("negative rank")
    except (ValueError, binascii.Error) as err:
        raise _fail(path, f"line {lineno} is corrupt ({err}: {line[:40]!r})", _REDOWNLOAD) from None
    return token, rank


def _rank_problem(ranks: Mapping[bytes, int]) -> str | None:
    """Ranks must be exactly 0..n-1: special ids are numbered from n on."""
    if not ranks:
        return "holds no tokens"
    if len(set(ranks.values())) != len(ranks) or min(ranks.values()) != 0 or max(ranks.values()) != len(ranks) - 1:
        return f"ranks are not exactly 0..{len(ranks) - 1} (repeated or missing ranks)"
    return None


def _read_json(path: Path) -> dict:
    """Read a JSON object, turning a syntax error into a one-line error with its line."""
    return read_json_object(path, _REDOWNLOAD, KimiError, missing="missing (it names the chat and control tokens)")


def _token_content(value: Any) -> str | None:
    """`bos_token` etc. are either a string or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _named_tokens(path: Path, config: Mapping, num_base: int) -> tuple[dict[int, str], set[int]]:
    """{id: content} from added_tokens_decoder, and the ids flagged "special": true."""
    names: dict[int, str] = {}
    special: set[int] = set()
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        content = _token_content(entry)
        if not str(key).isdigit() or content is None:
            raise _fail(path, f"added_tokens_decoder entry {key!r} has no integer id or no content", _REDOWNLOAD)
        token_id = int(key)
        if token_id < num_base:
            raise _fail(path, f"added token {content!r} has id {token_id}, inside the {num_base} BPE ranks", _REDOWNLOAD)
        if token_id >= num_base + MAX_SPECIAL_TOKENS:  # every id up to it gets a table entry (_special_table)
            raise _fail(path, f"added token {content!r} has id {token_id}, more than {MAX_SPECIAL_TOKENS} past the "
                        f"{num_base} BPE ranks", _REDOWNLOAD)
        names[token_id] = content
        if not isinstance(entry, dict) or entry.get("special", True):
            special.add(token_id)
    return names, special


def _special_table(path: Path, names: Mapping[int, str], num_base: int) -> dict[str, int]:
    """All special ids: named ones plus `<|reserved_token_{id}|>` for the unnamed gaps."""
    last = max([num_base + NUM_RESERVED_SPECIAL_TOKENS - 1, *names])
    table: dict[str, int] = {}
    for token_id in range(num_base, last + 1):
        content = names.get(token_id, f"<|reserved_token_{token_id}|>")
        if content in table:
            raise _fail(path, f"token {content!r} is given two ids ({table[content]} and {token_id})", _REDOWNLOAD)
        table[content] = token_id
    return table


def _read_chat_template(folder: Path, config: Mapping) -> tuple[str | None, str]:
    """The checkpoint's template and where it came from; chat_template.jinja wins, as in HF."""
    jinja_path = folder / TEMPLATE_FILE
    if jinja_path.exists():
        return read_text(jinja_path, "fix or delete it (tokenizer_config.json's template is used then)",
                         KimiError), str(jinja_path)
    template = config.get("chat_template")
    if isinstance(template, list):  # HF's named-template form: [{"name", "template"}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template.strip():
        return template, f"{folder / CONFIG_FILE} (chat_template)"
    return None, "built-in Kimi template"


def load_tokenizer(path: str | Path) -> KimiTokenizer:
    """Load Kimi's tokenizer from a model folder (tiktoken.model + tokenizer_config.json)."""
    folder = expand_user(path, "pass the folder that holds tiktoken.model")
    if not folder.is_dir():
        raise KimiError(f"{folder}: not a model folder; pass the folder that holds tiktoken.model")
    ranks = read_tiktoken_model(folder / TIKTOKEN_FILE)
    config_path = folder / CONFIG_FILE
    config = _read_json(config_path)
    names, special_ids = _named_tokens(config_path, config, len(ranks))
    specials = _special_table(config_path, names, len(ranks))
    template, template_source = _read_chat_template(folder, config)
    return KimiTokenizer(
        ranks,
        specials,
        skip_ids=special_ids | (set(specials.values()) - set(names)),
        config={k: _token_content(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
        chat_template=template,
        chat_template_source=template_source,
        name=str(folder),
    )


# ---------------------------------------------------------------- the tokenizer


class KimiTokenizer:
    """Encode, decode and chat-format text for Kimi models.

    Build it with `load_tokenizer(folder)`. `special_tokens` maps every control-token
    string (named and reserved) to its id; `skip_ids` are the ids that
    `decode(skip_special_tokens=True)` drops ("special": true ones and the reserved
    ones; tool-call markers are "special": false in Kimi's config and stay visible).
    """

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_tokens: dict[str, int],
        skip_ids: AbstractSet[int],
        config: Mapping[str, str | None],
        chat_template: str | None,
        chat_template_source: str,
        name: str = "kimi",
    ):
        self._enc = tiktoken.Encoding(
            name=f"kimi:{name}", pat_str=PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens
        )
        self.special_tokens: dict[str, int] = dict(special_tokens)
        self._id_to_special = {i: s for s, i in special_tokens.items()}
        self.skip_ids = frozenset(skip_ids)
        self.num_base_tokens = len(mergeable_ranks)
        self.vocab_size: int = max(special_tokens.values(), default=self.num_base_tokens - 1) + 1
        self.bos_token, self.eos_token = config.get("bos_token"), config.get("eos_token")
        self.pad_token, self.unk_token = config.get("pad_token"), config.get("unk_token")
        self.chat_template_source = chat_template_source
        self._template_text = chat_template
        self._template = _compile_template(chat_template or DEFAULT_CHAT_TEMPLATE, chat_template_source)
        # Longest first: at one position the longer control token wins, as in tiktoken.
        alternatives = sorted(special_tokens, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")" if alternatives else "(?!)")

    # ---- ids of the control tokens

    def token_to_id(self, token: str) -> int | None:
        """Id of a special token string (e.g. "<|im_end|>"), or None if there is none."""
        return self.special_tokens.get(token)

    @property
    def bos_token_id(self) -> int | None:
        """[BOS] (163584 in Kimi-Linear)."""
        return self.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def pad_token_id(self) -> int | None:
        """[PAD] (163839 in Kimi-Linear)."""
        return self.token_to_id(self.pad_token) if self.pad_token else None

    @property
    def eos_token_id(self) -> int | None:
        """<|im_end|> when present: the Instruct model ends every reply with it
        (config.json's eos_token_id 163586); otherwise the config's eos_token."""
        im_end = self.token_to_id("<|im_end|>")
        if im_end is not None:
            return im_end
        return self.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends generation: eos_token_id, the config's eos_token, [EOS], <|im_end|>."""
        candidates = [self.eos_token_id, self.token_to_id(self.eos_token or "")]
        candidates += [self.token_to_id("[EOS]"), self.token_to_id("<|im_end|>")]
        return {i for i in candidates if i is not None}

    @property
    def chat_template(self) -> str:
        """The template text in use: the checkpoint's, or the built-in one."""
        return self._template_text or DEFAULT_CHAT_TEMPLATE

    # ---- text <-> ids

    def encode(self, text: str, allow_special: bool | AbstractSet[str] = False) -> list[int]:
        """Token ids of `text`.

        By default a special-token string inside the text ("<|im_end|>") is encoded as
        plain text: text from a user or a file must not be able to forge a turn boundary.
        Pass allow_special=True (all) or a set of token strings to map them to their ids;
        apply_chat_template does so for the template's own markers.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        if isinstance(allow_special, (str, bytes)):  # set("<|im_end|>") would be its characters: none allowed
            raise TypeError(f"allow_special takes True/False or a set of token strings, not {allow_special!r}; "
                            f"for one token pass {{{allow_special!r}}}")
        if allow_special is True:
            allowed: AbstractSet[str] | str = "all"
        else:
            allowed = set(allow_special or ())
        ids: list[int] = []
        for piece in split_long_runs(text):
            ids += self._enc.encode(piece, allowed_special=allowed, disallowed_special=())
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a special token's bytes are its string). An id that is not
        a whole number (see token_id) or is outside 0..vocab_size-1 is a TokenIdError (a KimiError
        and a ValueError), never empty text nor another token's bytes."""
        token_id = as_token_id(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise TokenIdError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        try:
            return self._enc.decode_single_token_bytes(token_id)
        except KeyError:
            raise TokenIdError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})") from None

    def decode(self, ids: Iterable[int] | int, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list/array [T] of ids, or one id); invalid UTF-8 (a sequence cut
        mid-character) becomes U+FFFD. An id that is not a whole number (1.5, True, "5", a
        nested list) or is outside the vocabulary is a TokenIdError: int() would have read
        1.5 as 1 and True as 1, and iterating "15" decodes ids 1 and 5."""
        if hasattr(ids, "tolist"):  # an MLX or numpy array: its values, not 0-d arrays
            ids = ids.tolist()
        if isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Iterable):
            ids = [ids]  # one id (checked below: text or a mapping is refused there)
        ids = [as_token_id(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.skip_ids]
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        """A fresh streaming detokenizer for one generated reply."""
        return StreamingDetokenizer(self, skip_special_tokens=skip_special_tokens)

    # ---- chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int] | str:
        """Render `messages` with the checkpoint's chat template (or the built-in one).

        Returns the text when tokenize=False, else its ids: the template's own <|im_*|> markers
        become single control ids, while control-token text inside any message content, name,
        tool call or tool declaration stays text (user text cannot forge a turn). Encoding the
        returned text with allow_special=True would undo that: use tokenize=True or
        chat_segments. No [BOS] is added, as in the reference. Tools are key-sorted first, as
        Kimi's tokenizer does; tool calls without an id get `functions.NAME:INDEX` (INDEX counts
        the conversation's tool calls from 0), and a tool result without tool_call_id is headed
        by the id of the call it answers (the results follow their calls in order).
        """
        try:
            segments = self.chat_segments(messages, add_generation_prompt, tools)
        except RecursionError:  # contents, arguments or tools nested past Python's limit (a list in a list ...)
            raise KimiError("messages or tools nested too deeply to render (lists or objects inside each other "
                            "past Python's recursion limit)") from None
        return self.encode_segments(segments) if tokenize else "".join(text for text, _ in segments)

    def chat_segments(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, is_marker) pieces: a marker is a control token
        the template itself wrote; everything else, message content included, is plain text.

        Every string the caller passes (contents, names, tool-call ids and arguments, tool
        declarations) has any control-token text in it broken by an escape character before
        rendering, so only the template's own markers match; the escapes are removed from the
        plain pieces afterwards. Tool calls without an id get Kimi's `functions.NAME:INDEX`.
        Plain text between two markers is encoded as one text, as tiktoken does with control
        tokens allowed, so benign conversations get exactly the ids they had. (A template that
        wrote half a control token beside the content could still be completed by it; Kimi's
        templates write whole markers.)
        """
        if tools is not None and (isinstance(tools, (str, Mapping)) or not all(isinstance(t, Mapping) for t in tools)):
            raise KimiError(f"tools must be a list of tool declarations (dicts), not {type(tools).__name__} "
                            f"{str(tools)[:40]!r}")
        variables = {
            "messages": [self._defang(m) for m in _with_tool_call_ids(messages)],
            "add_generation_prompt": add_generation_prompt,
            "tools": self._defang(_deep_sort(list(tools))) if tools else None,
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self.pad_token or "",
            "unk_token": self.unk_token or "",
        }
        text = _render(self._template, variables, self.chat_template_source)
        pieces = self._special_split.split(text)  # [plain, marker, plain, marker, ..., plain]
        segments = []
        for i, piece in enumerate(pieces):
            is_marker = i % 2 == 1
            if not is_marker:
                piece = _UNESCAPE.sub(r"\1", piece)
            if piece:
                segments.append((piece, is_marker))
        return segments

    def encode_segments(self, segments: Iterable[tuple[str, bool]]) -> list[int]:
        """Ids of (text, is_marker) pieces: a marker is its control id, plain text is encoded with
        control-token text kept as text. Adjacent plain pieces are encoded as one text."""
        ids: list[int] = []
        plain: list[str] = []
        for text, is_marker in segments:
            if not is_marker:
                plain.append(text)
                continue
            ids += self.encode("".join(plain))
            plain = []
            ids.append(self.special_tokens[text])
        return ids + self.encode("".join(plain))

    def _defang(self, value: Any) -> Any:
        """A copy of `value` whose strings (keys too) cannot contain an intact control token."""
        if isinstance(value, str):
            value = value.replace(_ESC, _ESC + _ESC)  # keeps a literal escape character in the text
            while self._special_split.search(value):  # a pass may skip an overlapping second match
                value = self._special_split.sub(lambda m: m[0][0] + _ESC + m[0][1:], value)
            return value
        if isinstance(value, Mapping):
            return {self._defang(k): self._defang(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._defang(v) for v in value]
        if value is None or isinstance(value, (bool, numbers.Number)):
            return value
        # Anything else (a Path, a UUID, an object with __str__) is rendered by the template as its
        # str(): defang that text, or control-token text would pass through it intact.
        return self._defang(str(value))


# A private-use character: inserted after the first character of control-token text found in
# untrusted strings, so the rendered template holds an intact control token only where the
# template wrote one; a literal one in the text is doubled. Removed again before encoding.
_ESC = "\U0010fffd"
_UNESCAPE = re.compile(_ESC + "(.)", re.DOTALL)


def _with_tool_call_ids(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Copies of the messages where every tool call has an id and every tool result names it.

    Kimi's ids are `functions.{name}:{index}`, index counting the conversation's tool calls
    from 0 (what the model itself writes). A tool result without tool_call_id answers the
    next unanswered call of the latest assistant message.
    """
    out, index, pending = [], 0, []
    for position, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise KimiError(f"message {position} is a {type(message).__name__}, not a dict with role and content")
        if not isinstance(message.get("role"), str):  # the template would render it as an unnamed system turn
            raise KimiError(f"message {position} has role {message.get('role')!r}; each message needs a role "
                            "(system, user, assistant or tool)")
        message = dict(message)
        calls = message.get("tool_calls")
        if message.get("role") == "assistant" and calls:
            message["tool_calls"], pending = [], []
            for call in calls:
                call = dict(call) if isinstance(call, Mapping) else call
                if isinstance(call, dict) and not call.get("id"):
                    function = call.get("function")
                    name = function.get("name") if isinstance(function, Mapping) else None
                    if not name:
                        raise KimiError(f"message {position}: a tool call has neither an id nor a function name")
                    call["id"] = f"functions.{name}:{index}"
                index += 1
                message["tool_calls"].append(call)
                if isinstance(call, dict):
                    pending.append(call["id"])
        elif message.get("role") == "tool":
            if message.get("tool_call_id") is None:
                if not pending:
                    raise KimiError(f"message {position}: a tool result without tool_call_id, "
                                    "and no tool call before it left unanswered")
                message["tool_call_id"] = pending[0]
            if message["tool_call_id"] in pending:
                pending.remove(message["tool_call_id"])
        out.append(message)
    return out


def split_long_runs(text: str, max_chars: int = MAX_ENCODE_CHARS, max_run: int = MAX_RUN_CHARS) -> Iterator[str]:
    """Cut text into <= max_chars pieces, and cut any run of more than max_run
    whitespace (or non-whitespace) characters, exactly where the reference cuts."""
    for start in range(0, len(text), max_chars):
        chunk = text[start : start + max_chars]
        if not _long_run(max_run).search(chunk):
            yield chunk  # the common case, checked in C instead of a Python loop
            continue
        piece_start, run_len, run_is_space = 0, 0, chunk[:1].isspace()
        for i, ch in enumerate(chunk):
            if ch.isspace() != run_is_space:
                run_len, run_is_space = 1, not run_is_space
                continue
            run_len += 1
            if run_len > max_run:
                yield chunk[piece_start:i]
                piece_start, run_len = i, 1
        yield chunk[piece_start:]


@functools.lru_cache(maxsize=4)
def _long_run(max_run: int) -> re.Pattern:
    """Matches a run longer than max_run; re's \\s is str.isspace(), as the loop uses."""
    return re.compile(rf"\s{{{max_run + 1},}}|\S{{{max_run + 1},}}")


def _deep_sort(obj: Any) -> Any:
    """Dicts with sorted keys, recursively: the tool JSON is then stable across callers."""
    if isinstance(obj, Mapping):
        return {k: _deep_sort(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list):
        return [_deep_sort(v) for v in obj]
    return obj


# ---------------------------------------------------------------- jinja


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    """HF's tojson: plain json.dumps (jinja's own escapes HTML and has no `separators`)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    """Templates call raise_exception('...') to reject a conversation."""
    raise KimiError(f"chat template rejected the messages: {message}")


def _compile_template(source: str, origin: str):
    """Compile in a sandbox with the settings HF uses (trim/lstrip blocks, loop controls)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as err:
        line = getattr(err, "lineno", None)
        where = f"line {line}: " if line else ""
        raise KimiError(f"{origin}: chat template does not compile ({where}{err}); fix or delete it") from None


def _render(template, variables: Mapping[str, Any], origin: str) -> str:
    """Render, turning template errors (e.g. a missing message key) into one line."""
    try:
        return template.render(**variables)
    except TemplateError as err:
        raise KimiError(f"{origin}: chat template failed on these messages ({err})") from None
    except (KeyError, TypeError, AttributeError) as err:
        raise KimiError(f"{origin}: chat template failed on these messages ({type(err).__name__}: {err})") from None


# ---------------------------------------------------------------- streaming


class StreamingDetokenizer:
    """Turn generated ids into text as they arrive, never emitting half a character.

    Works on bytes: each token's bytes go through an incremental UTF-8 decoder, which
    holds back an incomplete multi-byte sequence (an emoji split over two tokens) until
    the rest arrives. Bytes that can never become valid are replaced at once (U+FFFD).
    Same interface as mlx-lm's detokenizers: add_token, finalize, reset, text, tokens,
    last_segment.
    """

    def __init__(self, tokenizer: KimiTokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = tokenizer.skip_ids if skip_special_tokens else frozenset()
        self.reset()

    def reset(self) -> None:
        """Forget everything: start a new reply."""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pieces: list[str] = []
        self.tokens: list[int] = []
        self.offset = 0

    def add_token(self, token_id: int) -> str:
        """Feed one id; return the text it completed ("" while a character is partial).
        A bad id (see KimiTokenizer.token_bytes) is a TokenIdError and changes nothing."""
        token_id = as_token_id(token_id)
        data = self._tokenizer.token_bytes(token_id)  # a bad id raises here, before it joins self.tokens
        self.tokens.append(token_id)
        if token_id in self._skip:
            return ""
        return self._emit(self._decoder.decode(data))

    def finalize(self) -> str:
        """Flush held-back bytes at the end of the reply (a dangling partial char -> U+FFFD)."""
        return self._emit(self._decoder.decode(b"", final=True))

    def _emit(self, segment: str) -> str:
        if segment:
            self._pieces.append(segment)
        return segment

    @property
    def text(self) -> str:
        """All complete text so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def last_segment(self) -> str:
        """Text produced since this property was last read."""
        text = self.text
        segment, self.offset = text[self.offset :], len(text)
        return segment


# ---------------------------------------------------------------- writing files


def write_tokenizer_files(
    folder: str | Path,
    mergeable_ranks: Mapping[bytes, int],
    special_tokens: Mapping[str, int],
    chat_template: str | None = None,
    bos_token: str = "[BOS]",
    eos_token: str = "[EOS]",
    pad_token: str | None = "[PAD]",
    unk_token: str | None = "[UNK]",
    not_special: Iterable[str] = (),
    model_max_length: int = 1_048_576,
) -> None:
    """Write tiktoken.model, tokenizer_config.json (and chat_template.jinja if given)
    in the layout of Moonshot's checkpoints, so load_tokenizer and HF both read them.

    `special_tokens` names the control tokens (ids >= len(mergeable_ranks)); unnamed
    ids up to 256 past the ranks become reserved tokens on load. Tokens listed in
    `not_special` get "special": false, as Kimi's tool-call markers do.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    problem = _rank_problem(mergeable_ranks)
    if problem:
        raise ValueError(f"mergeable_ranks {problem}")
    low = [t for t, i in special_tokens.items() if i < len(mergeable_ranks)]
    if low:
        raise ValueError(f"special tokens {low} have ids inside the {len(mergeable_ranks)} BPE ranks")
    lines = (f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(mergeable_ranks.items(), key=lambda kv: kv[1]))
    _write_atomic(folder / TIKTOKEN_FILE, "".join(lines))
    config = _tokenizer_config(special_tokens, set(not_special), bos_token, eos_token, pad_token, unk_token, model_max_length)
    _write_atomic(folder / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    if chat_template is not None:
        _write_atomic(folder / TEMPLATE_FILE, chat_template)


def _tokenizer_config(specials, not_special, bos, eos, pad, unk, max_length) -> dict:
    """tokenizer_config.json as Moonshot ships it (TikTokenTokenizer via auto_map)."""
    decoder = {
        str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": s not in not_special}
        for s, i in sorted(specials.items(), key=lambda kv: kv[1])
    }
    roles = ["[BOS]", "[EOS]", "[PAD]", "[UNK]", bos, eos, pad, unk]
    extra = [s for s in sorted(specials, key=specials.get) if s not in roles and s not in not_special]
    config = {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": extra,
        "bos_token": bos,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "extra_special_tokens": {},
        "model_max_length": max_length,
        "pad_token": pad,
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": unk,
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
    }
    return {k: v for k, v in config.items() if v is not None}


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name and rename, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
