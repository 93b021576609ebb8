"""Multi-turn chat: the cache carries the history, so each turn prefills only its own new tokens.

Invariants of a session state (`_State`):
- `tokens` are the ids of the whole conversation as the model sees it: rendered turns, the
  generated reply ids, and `<|im_end|>` closing every assistant turn.
- the cache has consumed `tokens[:offset]` (offset = each cache's `.offset`); anything after
  it (a system message before the first turn) is fed with the next turn.
A turn works on copies of the caches and replaces the live state only when the reply is
complete, so a reply stopped early (Ctrl-C, a consumer that breaks) leaves the session as it was.
The state before each turn is kept for /undo and /retry: KDA states are recurrent and cannot
be trimmed back, only restored.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

import mlx.core as mx

from .errors import KimiError, Terminated
from .files import MAX_PROMPT_BYTES
from .generate import (DEFAULT_PREFILL_STEP, PROGRESS_MIN_TOKENS, GenerationResponse, check_context, check_kv_bits_of,
                       check_sampling, stream_generate)
from .prompt_cache import (SEPARATOR, PromptCache, continue_open_turn, model_fingerprint, read_state_file,
                           save_state_file)

FILE_FORMAT = "kimi-mlx-chat"
FILE_VERSION = "1"
DEFAULT_MAX_TOKENS = 2048
DEFAULT_UNDO_MEMORY = 4 * 2**30  # older snapshots are dropped past this; the last one is always kept

HELP = "commands: /undo /retry /reset /system TEXT /save FILE /load FILE /quit (// starts a message with /)"


@dataclass
class _State:
    messages: list[dict]
    tokens: list[int]
    cache: list  # never mutated once it belongs to a state: turns work on copies
    open_turn: str | None = None  # a prompt cache's user text, left open: the next message continues it

    @property
    def offset(self) -> int:
        return self.cache[0].offset if self.cache else 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for c in self.cache for a in c.state)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean_text(text: str, what: str = "a message") -> str:
    """Lone surrogates (undecodable bytes kept by surrogateescape, half a UTF-16 pair) become one
    U+FFFD each, split pairs are joined: what the tokenizer would encode (tiktoken does the same),
    and text that can be saved as UTF-8. Anything but a str is a KimiError (was a TypeError from
    the regex: 'expected string or bytes-like object')."""
    if not isinstance(text, str):
        raise KimiError(f"{what} must be text (a str), not {type(text).__name__}")
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _check_template_renders_turns_alone(tokenizer) -> None:
    """Turns are rendered one at a time (the cache holds the rest): warn if the template renders
    a conversation otherwise (e.g. adds a default system message or rewrites earlier turns)."""
    convo = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
             {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]
    whole = tokenizer.apply_chat_template(convo, add_generation_prompt=True)
    parts = [tokenizer.apply_chat_template([m], add_generation_prompt=False) for m in convo[:-1]]
    parts.append(tokenizer.apply_chat_template(convo[-1:], add_generation_prompt=True))
    if whole != [i for p in parts for i in p]:
        warnings.warn(
            f"{tokenizer.chat_template_source}: the chat template renders a conversation differently from its "
            "turns one by one; multi-turn chat feeds each turn alone, so the model sees slightly different ids",
            stacklevel=3,
        )


class ChatSession:
    """A conversation with one model, usable from Python:

        session = ChatSession(model, tokenizer, system="Be brief.")
        print(session.chat("Hello"))          # or stream: for r in session.send("Hello"): ...
        session.undo(); session.retry(); session.save("chat.safetensors")

    `sampling` takes stream_generate's options (temperature, top_p, top_k, min_p,
    repetition_penalty); `seed` seeds MLX's generator once, so /retry can still differ.
    """

    def __init__(self, model, tokenizer, system: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS, *,
                 seed: int | None = None, model_name: str | None = None, prefill_step: int = DEFAULT_PREFILL_STEP,
                 undo_memory: int = DEFAULT_UNDO_MEMORY, kv_bits: int | None = None,
                 ignore_memory_plan: bool = False, **sampling):
        self.model, self.tokenizer = model, tokenizer
        self.ignore_memory_plan = ignore_memory_plan  # the memory plan is an estimate: a way past it
        check_sampling(max_tokens, seed=seed, prefill_step=prefill_step, **sampling)
        self.max_tokens, self.prefill_step, self.undo_memory = max_tokens, prefill_step, undo_memory
        self.sampling, self.kv_bits = sampling, kv_bits
        self.model_name = model_name or "this model"
        self.fingerprint = model_fingerprint(model)
        self.im_end = tokenizer.token_to_id("<|im_end|>")
        if self.im_end is None:
            raise KimiError(f"{self.model_name}: the tokenizer has no <|im_end|> token; chat needs an Instruct model")
        self.max_context = model.args.model_max_length
        _check_template_renders_turns_alone(tokenizer)
        self.last_cut_by_context = False
        if seed is not None:
            mx.random.seed(seed)
        self.reset(system)

    # ---- the conversation

    @property
    def messages(self) -> list[dict]:
        return self._state.messages

    @property
    def tokens(self) -> list[int]:
        """Every id of the conversation; the cache has consumed all but a pending system message."""
        return self._state.tokens

    @property
    def cache(self) -> list:
        return self._state.cache

    @property
    def system(self) -> str | None:
        first = self.messages[0] if self.messages else None
        return first["content"] if first and first["role"] == "system" else None

    @property
    def context_used(self) -> int:
        return len(self.tokens)

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    def restart(self) -> None:
        """Back to the start: the prompt cache the session began from, else the system message."""
        if self._opening is not None:
            self.start_from(self._opening)
        else:
            self.reset(self.system)

    def reset(self, system: str | None = None) -> None:
        """Start over, with `system` as the system message (None: none)."""
        messages = [{"role": "system", "content": _clean_text(system, "the system message")}] if system else []
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=False) if messages else []
        self._state = _State(messages, list(ids), self.model.make_cache(self.kv_bits))
        self._opening: PromptCache | None = None
        self._undo: list[_State] = []

    def send(self, text: str) -> Iterator[GenerationResponse]:
        """Stream the reply to a user message; the turn is committed when the last response is
        yielded. Raises KimiError at once if the message does not fit the context."""
        base, text = self._state, _clean_text(text)
        plan = self._plan(base, text)

        def commit(new: _State) -> None:
            self._push_undo(base)
            self._state = new

        return self._turn(base, text, plan, commit)

    def retry(self) -> Iterator[GenerationResponse]:
        """Stream a new reply to the last user message, from the state before it."""
        if not self._undo:
            raise KimiError("nothing to retry")
        base = self._undo[-1]
        text = self.messages[len(base.messages)]["content"]
        if base.open_turn is not None:  # the message recorded is the cached text + this one
            text = text[len(base.open_turn) + len(SEPARATOR):]
        plan = self._plan(base, text)
        return self._turn(base, text, plan, lambda new: setattr(self, "_state", new))

    def undo(self) -> None:
        """Forget the last turn (message and reply): back to the state before it."""
        if not self._undo:
            raise KimiError("nothing to undo")
        self._state = self._undo.pop()

    def chat(self, text: str) -> str:
        """The whole reply to `text` as one string."""
        return "".join(r.text for r in self.send(text))

    # ---- one turn

    def _plan(self, base: _State, text: str) -> tuple[list[int], list[int], int]:
        """The turn's own ids, the ids it feeds (with any pending ones) and its reply budget;
        a message that cannot fit is refused."""
        if base.open_turn is None:
            new = list(self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))
        else:
            new = continue_open_turn(self.tokenizer, base.open_turn, text)
        feed = base.tokens[base.offset:] + new
        room = self.max_context - base.offset - len(feed) - 1  # keep one id for the closing <|im_end|>
        if room < 1:
            raise KimiError(
                f"message of {len(new)} tokens does not fit: context {len(base.tokens)}/{self.max_context} used; "
                "/undo, /reset or send a shorter message"
            )
        max_tokens = min(self.max_tokens, room)
        check_context(self.model, len(feed), max_tokens, self.kv_bits, used=base.offset,  # memory plan
                      ignore_memory_plan=self.ignore_memory_plan)
        return new, feed, max_tokens

    def _turn(self, base: _State, text: str, plan: tuple, commit) -> Iterator[GenerationResponse]:
        new, feed, max_tokens = plan
        cache = [c.copy() for c in base.cache]
        reply_ids, reply_text = [], ""
        stream = stream_generate(self.model, self.tokenizer, feed, max_tokens, cache=cache,
                                 prefill_step=self.prefill_step, progress=len(feed) >= PROGRESS_MIN_TOKENS,
                                 ignore_memory_plan=self.ignore_memory_plan, **self.sampling)
        for r in stream:
            reply_ids.append(r.token)
            reply_text += r.text
            if r.finish_reason is None:
                yield r
                continue
            # Close the turn before the last response is handed out: a consumer may stop there.
            tokens = base.tokens + new + reply_ids
            if reply_ids[-1] != self.im_end:
                tokens.append(self.im_end)
            self._feed_missing(cache, tokens)
            self.last_cut_by_context = r.finish_reason == "length" and max_tokens < self.max_tokens
            user = text if base.open_turn is None else base.open_turn + SEPARATOR + text
            messages = base.messages + [{"role": "user", "content": user}, {"role": "assistant", "content": reply_text}]
            commit(_State(messages, tokens, cache))
            yield r

    def _feed_missing(self, cache: list, tokens: list[int]) -> None:
        """Feed what the cache has not consumed. Pipelined decode has usually fed the last token
        already, but not after a length-limited reply."""
        offsets = {c.offset for c in cache}
        if len(offsets) != 1:
            raise RuntimeError(f"caches disagree on the tokens consumed: {sorted(offsets)}")
        missing = tokens[offsets.pop():]
        if missing:
            self.model(mx.array([missing]), cache=cache, last_only=True)
            mx.eval([c.state for c in cache])

    def _push_undo(self, state: _State) -> None:
        self._undo.append(state)
        while len(self._undo) > 1 and sum(s.nbytes for s in self._undo) > self.undo_memory:
            self._undo.pop(0)

    # ---- files

    def save(self, path: str | os.PathLike) -> None:
        """Conversation, ids and cache states in one safetensors file (written atomically)."""
        extra = {"messages": json.dumps(self.messages, ensure_ascii=False),
                 "open_turn": json.dumps(self._state.open_turn, ensure_ascii=False)}
        save_state_file(path, self.model, self.tokens, self.cache, FILE_FORMAT, self.model_name, extra)

    def load(self, path: str | os.PathLike) -> None:
        """Replace the session with a saved one; the file must come from this model."""
        tokens, cache, meta = read_state_file(path, self.model, FILE_FORMAT, self.model_name,
                                              "kimi-mlx chat file", "save one with /save")
        try:
            messages, open_turn = json.loads(meta["messages"]), json.loads(meta.get("open_turn", "null"))
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise ValueError("messages are not a list of {role, content} texts")
            if open_turn is not None and not isinstance(open_turn, str):
                raise ValueError("open_turn is not a text")
        except (KeyError, ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError
            raise KimiError(f"{path}: corrupt chat file ({type(e).__name__}: {e})") from None
        self._state, self._undo = _State(messages, tokens, cache, open_turn), []

    def start_from(self, prompt_cache: PromptCache) -> None:
        """Start over from a prompt cache: its text opens the first user message, which the next
        message you send completes."""
        if prompt_cache.raw:
            raise KimiError("a raw prompt cache (--raw) continues with kimi-mlx generate --raw, not chat")
        check_kv_bits_of(prompt_cache.cache, self.kv_bits, "the prompt cache")
        messages = [{"role": "system", "content": prompt_cache.system}] if prompt_cache.system else []
        self._state = _State(messages, list(prompt_cache.tokens), prompt_cache.fresh_cache(), prompt_cache.text)
        self._undo, self._opening = [], prompt_cache


# ---------------------------------------------------------------- the terminal chat


class OutputError(OSError):
    """The replies cannot be written (stdout on a full disk, an I/O error): the session ends."""


class _Terminal:
    """Reads lines and writes the reply and status; stdin may be a pipe (no TTY)."""

    def __init__(self, stdin: TextIO, stdout: TextIO, stderr: TextIO):
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.use_input = stdin is sys.stdin and stdin.isatty()  # input() gives line editing on a TTY
        self.dim = stderr.isatty()

    def read(self) -> str | None:
        """The next line, or None at EOF."""
        if self.use_input:
            try:
                return input(">>> ")
            except EOFError:
                return None
        self.write(">>> ")
        line = self.stdin.readline(MAX_PROMPT_BYTES + 1)  # a bound: a line without end (/dev/zero) must not fill memory
        if len(line) > MAX_PROMPT_BYTES and not line.endswith("\n"):
            while (rest := self.stdin.readline(1 << 20)) and not rest.endswith("\n"):
                pass  # skip the rest of that line, holding 1 MiB at a time
            raise KimiError(f"message longer than {MAX_PROMPT_BYTES >> 20} MiB, more text than a model context "
                            "holds; it was skipped")
        return line.rstrip("\r\n") if line else None

    def write(self, text: str) -> None:
        try:
            self.stdout.write(text)
            self.stdout.flush()
        except BrokenPipeError:
            raise
        except OSError as e:  # a full disk under `> chat.txt`, an I/O error: the replies cannot be shown
            raise OutputError(e.errno, e.strerror) from None

    def note(self, text: str) -> None:
        self.stderr.write(f"\x1b[2m{text}\x1b[0m\n" if self.dim else f"{text}\n")
        self.stderr.flush()


def _status(session: ChatSession, last: GenerationResponse) -> str:
    return (f"[ prefill {last.prompt_tps:.1f} tok/s | generation {last.generation_tps:.1f} tok/s | "
            f"context {session.context_used}/{session.max_context} ]")


def _stream_reply(session: ChatSession, term: _Terminal, stream: Iterator[GenerationResponse]) -> None:
    """Print a reply as it streams; Ctrl-C stops it and the turn is discarded."""
    before, last = session._state, None
    try:
        for last in stream:
            term.write(last.text)
    except Terminated:  # SIGTERM / SIGHUP: the process is asked to end, not the reply
        stream.close()
        raise
    except KeyboardInterrupt:
        stream.close()
        term.write("\n")
        if session._state is before:
            term.note("[reply stopped; the turn was discarded]")
        return
    term.write("\n")
    if last is not None:
        term.note(_status(session, last))
    if session.last_cut_by_context:
        term.note("[the context is full: /undo or /reset to continue]")


def _command(session: ChatSession, term: _Terminal, line: str) -> bool:
    """Run one /command; False means quit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/undo":
        session.undo()
        term.note(f"[undone; context {session.context_used}/{session.max_context}]")
    elif name == "/retry":
        _stream_reply(session, term, session.retry())
    elif name == "/reset":
        session.restart()
        term.note("[conversation reset]")
    elif name == "/system":
        session.reset(arg or None)
        term.note("[new conversation with this system message]" if arg else "[new conversation, no system message]")
    elif name in ("/save", "/load") and not arg:
        term.note(f"usage: {name} FILE")
    elif name == "/save":
        session.save(arg)
        term.note(f"[saved {len(session.messages)} messages to {arg}]")
    elif name == "/load":
        session.load(arg)
        term.note(f"[loaded {len(session.messages)} messages; context {session.context_used}/{session.max_context}]")
    else:
        term.note(f"unknown command {name}; {HELP}")
    return True


def chat_loop(session: ChatSession, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """Read messages and commands until /quit, EOF or Ctrl-C at the prompt; return the exit code."""
    for stream, errors in ((stdin, "replace"), (stdout, "replace"), (stderr, "replace")):
        # Bytes that are not UTF-8 (a paste from a latin-1 file) or a terminal that cannot show a
        # character: U+FFFD / '?' instead of ending the session. The user cannot fix the bytes.
        if hasattr(stream, "reconfigure") and getattr(stream, "errors", None) == "strict":
            stream.reconfigure(errors=errors)
    term = _Terminal(stdin, stdout, stderr)
    while True:
        try:
            line = term.read()
        except Terminated:
            raise
        except KeyboardInterrupt:
            term.write("\n")
            return 0
        except BrokenPipeError:
            raise  # the terminal went away: nothing to keep the session for (the CLI exits quietly)
        except OutputError as e:
            term.note(f"error: cannot write the output ({e.strerror or e})")
            return 1
        except OSError as e:  # stdin unreadable: say so and end, the conversation cannot go on
            term.note(f"error: cannot read the input ({e.strerror or e})")
            return 1
        except KimiError as e:  # a line too long to be a message: skipped, the session goes on
            term.note(f"error: {e}")
            continue
        if line is None:
            term.write("\n")
            return 0
        if not line.strip():
            continue
        # Nothing a command or a message raises ends the session: a turn replaces the state only
        # when complete, and /load only once the file is read, so the conversation is intact.
        try:
            if line.startswith("/") and not line.startswith("//"):
                if not _command(session, term, line.strip()):
                    return 0
            else:
                _stream_reply(session, term, session.send(line[1:] if line.startswith("//") else line))
        except KimiError as e:
            term.note(f"error: {e}")
        except BrokenPipeError:
            raise  # the reader of the replies went away: end (the CLI exits quietly)
        except OutputError as e:
            term.note(f"error: cannot write the output ({e.strerror or e})")
            return 1
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            term.note(f"error: {where}{e.strerror or e}")
        except Terminated:  # SIGTERM / SIGHUP end the session (the CLI says so); a /save under way left no file
            raise
        except KeyboardInterrupt:  # Ctrl-C during a command (e.g. /save): the session is unchanged
            term.note("[interrupted]")
        except Exception as e:  # a bug, not a user error: say so in one line, keep the conversation
            term.note(f"error: {line.split()[0] if line.startswith('/') else 'the message'} failed "
                      f"({type(e).__name__}: {e}); the conversation is kept, /save it and report this")


def run_chat(model_path: str, system: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
             sampling: dict | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None,
             stderr: TextIO | None = None, prompt_cache: str | None = None, kv_bits: int | None = None,
             ignore_memory_plan: bool = False) -> int:
    """`kimi-mlx chat`: load the model, then chat on stdin/stdout (status lines on stderr).
    prompt_cache: a file from `kimi-mlx cache-prompt`; the first message continues its text."""
    from . import load
    from .loading import resolve_model_path
    from .prompt_cache import load_prompt_cache

    check_sampling(max_tokens, **(sampling or {}))  # before the model is loaded
    folder = resolve_model_path(model_path)
    model, tokenizer = load(str(folder))
    session = ChatSession(model, tokenizer, system=system, max_tokens=max_tokens, model_name=str(folder),
                          kv_bits=kv_bits, ignore_memory_plan=ignore_memory_plan, **(sampling or {}))
    stderr = stderr or sys.stderr
    if prompt_cache is not None:
        if system:
            raise KimiError("--system and --prompt-cache: the prompt cache has its own system message")
        session.start_from(load_prompt_cache(prompt_cache, model, str(folder)))
        stderr.write(f"{prompt_cache}: continuing {session.context_used} cached tokens; "
                     "your first message completes its text\n")
    stderr.write(f"{folder}: context {session.max_context} tokens. {HELP}\n")
    return chat_loop(session, stdin or sys.stdin, stdout or sys.stdout, stderr)
