"""Model state on disk: prompt caches (`kimi-mlx cache-prompt`) and the chat's /save files.

One safetensors file holds the token ids the state has consumed and every layer's cache arrays:
    "tokens" [N] int32, "cache.{layer}.{j}" = the layer cache's `state` arrays (see cache.py)
with string metadata: format, version, model (fingerprint), model_name, cache_kinds,
cache_counts, cache_meta, plus what the caller adds (a chat's messages, a prompt cache's text).
Files are written to a temporary name and renamed, so an interrupted write leaves no file.

A prompt cache is the opening of a conversation prefilled once: in chat form, an optional
system turn and a user turn left open after its text (mlx-lm's cache_prompt does the same);
in raw form, the plain text. What follows is appended to that user turn ("\\n\\n" then the new
prompt, then the template's close and the assistant header), as ids concatenated to the cached
ones, so continuing never re-tokenizes the cached part.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from .cache import KDACache
from .errors import KimiError
from .files import expand_user

PROMPT_CACHE_FORMAT = "kimi-mlx-prompt-cache"
FILE_VERSION = "1"
SEPARATOR = "\n\n"  # between the cached text and the prompt that continues it


def model_fingerprint(model) -> str:
    """Identify a model by its config and final-norm weights (cheap, differs between checkpoints)."""
    h = hashlib.sha256(json.dumps(model.args.to_dict(), sort_keys=True, default=str).encode())
    h.update(np.array(model.model.norm.weight.astype(mx.float32)).tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- state files


def file_path(path: str | os.PathLike) -> Path:
    """`path` as a Path (~ expanded); a value that cannot name a file (None, a number) is a
    KimiError, not the TypeError of Path()."""
    if not isinstance(path, (str, os.PathLike)):
        raise KimiError(f"{path!r}: not a file name (give a str or a path)")
    return expand_user(path, "give another file name")


def check_output_file(path: str | os.PathLike) -> Path:
    """`path` as a Path if a file can be written there, else a KimiError naming it: a folder (".",
    "/"), a missing folder, or one we may not write in. Call it before long work (a prefill)."""
    path = file_path(path)
    if "\0" in str(path):
        raise KimiError(f"{str(path)!r}: a file name cannot hold a NUL character")
    if path.name in ("", ".", "..") or path.is_dir():
        raise KimiError(f"{path}: is a folder; give a file name, e.g. {path / 'chat.safetensors'}")
    if not path.parent.is_dir():
        raise KimiError(f"{path}: the folder {path.parent} does not exist; create it or choose another")
    if (path.exists() or path.is_symlink()) and not _replaceable(path):
        raise KimiError(f"{path}: exists and is not a kimi-mlx chat or prompt-cache file, so it is not "
                        "overwritten; choose another file name (or move that file away)")
    try:  # a real probe: permissions, read-only file systems and root's exemptions all show here
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise KimiError(f"{path}: cannot write in {path.parent} ({e.strerror}); choose another folder") from None
    return path


STATE_FORMATS = ("kimi-mlx-chat", PROMPT_CACHE_FORMAT)  # the files save_state_file writes


def _replaceable(path: Path) -> bool:
    """Whether saving may replace the file at `path`: an empty file, or a state file of ours (its
    safetensors metadata names one of STATE_FORMATS), so /save and cache-prompt never overwrite
    someone's document, script or model weights. Only the header is read."""
    try:
        if not path.is_file():
            return False  # a dangling link, a device, a FIFO
        if path.stat().st_size == 0:
            return True
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100 << 20:
                return False
            meta = json.loads(f.read(n)).get("__metadata__") or {}
        return isinstance(meta, dict) and meta.get("format") in STATE_FORMATS
    except (OSError, ValueError, AttributeError, RecursionError):  # unreadable, not JSON, not an object
        return False


def save_state_file(path: str | os.PathLike, model, tokens: list[int], cache: list, file_format: str,
                    model_name: str, extra: dict[str, str] | None = None) -> None:
    """Write tokens + cache states + metadata atomically (see the module docstring). Any failure
    (a folder given, no permission, disk full) is one KimiError line and leaves no file behind."""
    path = check_output_file(path)
    arrays = {"tokens": mx.array(tokens, dtype=mx.int32)}
    for i, c in enumerate(cache):
        arrays.update({f"cache.{i}.{j}": a for j, a in enumerate(c.state)})
    metadata = {
        "format": file_format, "version": FILE_VERSION,
        "model": model_fingerprint(model), "model_name": model_name,
        "cache_kinds": json.dumps([type(c).__name__ for c in cache]),
        "cache_counts": json.dumps([len(c.state) for c in cache]),
        "cache_meta": json.dumps([c.meta_state for c in cache]),
        "num_tokens": str(len(tokens)),
        **(extra or {}),
    }
    tmp = None
    try:
        # A fresh name beside the target (never a name someone's file may have); the suffix keeps
        # MLX from appending .safetensors. An OSError here names the reason (read-only file system, ...).
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.safetensors")
        tmp = Path(name)  # one step: a signal in between must not leave `tmp` a str for the cleanup below
        os.close(fd)
        mx.save_safetensors(str(tmp), arrays, metadata=metadata)
        os.replace(tmp, path)
    except (OSError, RuntimeError, ValueError) as e:
        raise KimiError(f"{path}: cannot save ({getattr(e, 'strerror', None) or e})") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)  # left only by a failed or interrupted write


def read_state_file(path: str | os.PathLike, model, file_format: str, model_name: str, kind: str,
                    how_to_make: str) -> tuple[list[int], list, dict]:
    """Read a file written by save_state_file for this model: (tokens, cache, metadata).
    A missing or foreign file, or one saved from another model, is a KimiError naming it."""
    path = file_path(path)
    if not path.is_file():
        raise KimiError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise KimiError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != file_format:
        raise KimiError(f"{path}: not a {kind} ({how_to_make})")
    if meta.get("model") != model_fingerprint(model):
        raise KimiError(f"{path}: saved from another model ({meta.get('model_name', '?')}); "
                        f"{model_name} cannot continue it")
    try:
        kinds = json.loads(meta["cache_kinds"])
        counts, metas = json.loads(meta["cache_counts"]), json.loads(meta["cache_meta"])
        cache = model.make_cache()
        if kinds != [type(c).__name__ for c in cache]:
            raise ValueError("its cache layers do not match this model")
        for i, c in enumerate(cache):
            c.state = [arrays[f"cache.{i}.{j}"] for j in range(counts[i])]
            c.meta_state = metas[i]
            _check_layer_state(model.args, i, c)
        tokens = _checked_tokens(arrays["tokens"], model.args.vocab_size)
        if len({c.offset for c in cache}) != 1 or cache[0].offset > len(tokens):
            raise ValueError("cache offsets do not match its token ids")
    except (KeyError, ValueError, TypeError, IndexError, ZeroDivisionError, RecursionError) as e:  # deep: '[[[[...'
        raise KimiError(f"{path}: corrupt file ({type(e).__name__}: {e})") from None
    return tokens, cache, meta


_FLOATS = (mx.float16, mx.bfloat16, mx.float32)


def _checked_tokens(tokens: mx.array, vocab_size: int) -> list[int]:
    """The file's token ids: a 1-D integer array of ids in [0, vocab_size)."""
    if tokens.ndim != 1 or tokens.dtype not in (mx.int32, mx.int64, mx.uint32):
        raise ValueError(f"tokens is {tokens.dtype} {tuple(tokens.shape)}, expected 1-D int32")
    ids = tokens.tolist()
    if ids and not 0 <= min(ids) <= max(ids) < vocab_size:
        raise ValueError(f"token ids outside 0..{vocab_size - 1}")
    return ids


def _check_layer_state(args, i: int, c) -> None:
    """Shapes and dtypes of one layer's restored cache arrays, from the model's config (see
    cache.py's layouts), so a damaged file is refused here and not deep inside a prefill."""

    def expect(a, shape, dtypes, what):
        if tuple(a.shape) != tuple(shape) or a.dtype not in dtypes:
            raise ValueError(f"layer {i} {what} is {a.dtype} {tuple(a.shape)}, expected {tuple(shape)}")

    if isinstance(c, KDACache):
        if c.conv is None:
            return
        H, D, K = args.kda_heads, args.kda_head_dim, args.conv_kernel
        if len(c.conv) != 3:
            raise ValueError(f"layer {i} holds {len(c.conv) + 1} KDA arrays, expected 4")
        for a in c.conv:
            expect(a, (1, K - 1, H * D), _FLOATS, "conv window")
        expect(c.recurrent, (1, H, D, D), (mx.float32,), "recurrent state")
        return
    width = args.kv_lora_rank + args.qk_rope_head_dim
    padded = -(-width // c.group_size) * c.group_size
    for page in c.pages + ([c.tail] if c.tail is not None else []):
        n = page[0].shape[1] if page[0].ndim == 3 else -1
        if c.kv_bits is None and len(page) == 1:
            expect(page[0], (1, n, width), _FLOATS, "latent page")
        elif c.kv_bits in (8, 4) and len(page) == 3:
            expect(page[0], (1, n, padded * c.kv_bits // 32), (mx.uint32,), "packed latent page")
            for a in page[1:]:
                expect(a, (1, n, padded // c.group_size), _FLOATS, "latent scales")
        else:
            raise ValueError(f"layer {i} latent pages do not match kv_bits {c.kv_bits or 16}")
        if n < 1:
            raise ValueError(f"layer {i} has an empty latent page")
    if c.key_mask is not None:
        expect(c.key_mask, (1, c.offset), (mx.bool_,), "key mask")


# ---------------------------------------------------------------- prompt caches


def open_user_turn(tokenizer, text: str, system: str | None = None) -> tuple[list, list]:
    """The template's (text, is_marker) pieces up to the end of a user turn holding `text` (the
    turn left open), and the pieces that close it and open the assistant's reply. The user's
    text is a plain piece: control-token text in it stays text (tokenizer.chat_segments)."""
    # where the template cuts the turn: a private-use character the texts do not hold (any may be pasted)
    mark = next(m for m in map(chr, range(0xE000, 0xF900)) if m not in text and m not in (system or ""))
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text + mark}]
    segments = tokenizer.chat_segments(messages, add_generation_prompt=True)
    hits = [i for i, (piece, is_marker) in enumerate(segments) if not is_marker and mark in piece]
    if len(hits) != 1 or segments[hits[0]][0].count(mark) != 1:
        raise KimiError("the chat template does not render the user's text verbatim; use --raw")
    i = hits[0]
    before, after = segments[i][0].split(mark)
    return segments[:i] + [(before, False)], [(after, False)] + segments[i + 1 :]


def continue_open_turn(tokenizer, cached_text: str, prompt: str, system: str | None = None) -> list[int]:
    """Ids that complete a user turn left open after `cached_text`: the separator, `prompt` (as
    text: control-token text in it stays text), the turn's close and the assistant header.
    The user message is cached_text + SEPARATOR + prompt."""
    _, tail = open_user_turn(tokenizer, cached_text, system)
    return tokenizer.encode_segments([(SEPARATOR + prompt, False)] + tail)


@dataclass
class PromptCache:
    """A prefilled conversation opening: `tokens` consumed by `cache` (see the module docstring)."""

    tokens: list[int]
    cache: list
    text: str  # the cached prompt text
    system: str | None = None
    raw: bool = False
    model_name: str = "this model"
    meta: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def fresh_cache(self) -> list:
        """Copies of the cache (sharing its arrays): each continuation starts from the same state."""
        return [c.copy() for c in self.cache]

    def continuation(self, tokenizer, prompt: str) -> list[int]:
        """Ids that follow the cached ones for `prompt`: raw text, or the rest of the open user
        turn and the assistant header."""
        if self.raw:
            return tokenizer.encode(prompt, allow_special=True)
        return continue_open_turn(tokenizer, self.text, prompt, self.system)

    def save(self, path: str | os.PathLike, model) -> None:
        extra = {"text": self.text, "system": json.dumps(self.system), "raw": json.dumps(self.raw)}
        save_state_file(path, model, self.tokens, self.cache, PROMPT_CACHE_FORMAT, self.model_name, extra)


def make_prompt_cache(model, tokenizer, text: str, *, system: str | None = None, raw: bool = False,
                      kv_bits: int | None = None, prefill_step: int = 512, model_name: str = "this model",
                      progress: bool = False, ignore_memory_plan: bool = False) -> PromptCache:
    """Prefill `text` once (chat form unless raw) into a fresh cache, in steps of prefill_step.
    ignore_memory_plan: run even when the memory plan (an estimate) says it does not fit."""
    from .generate import check_context, check_sampling, prefill_all

    check_sampling(prefill_step=prefill_step)
    if raw and system:
        raise KimiError("--system needs the chat form; drop --raw or --system")
    # raw: the text as is, control-token text included (the explicit way to send control ids)
    ids = tokenizer.encode(text, allow_special=True) if raw else tokenizer.encode_segments(
        open_user_turn(tokenizer, text, system)[0])
    if not ids:
        raise KimiError("the prompt is empty: nothing to cache")
    check_context(model, len(ids), 1, kv_bits, ignore_memory_plan=ignore_memory_plan)
    cache = model.make_cache(kv_bits)
    prefill_all(model, ids, cache, prefill_step, progress=progress)
    return PromptCache(ids, cache, text, system, raw, model_name)


def load_prompt_cache(path: str | os.PathLike, model, model_name: str = "this model") -> PromptCache:
    """A prompt cache file saved for this model (another model's file is refused)."""
    tokens, cache, meta = read_state_file(
        path, model, PROMPT_CACHE_FORMAT, model_name, "kimi-mlx prompt cache", "make one with kimi-mlx cache-prompt")
    if cache[0].offset != len(tokens):
        raise KimiError(f"{path}: corrupt file (the cache has consumed {cache[0].offset} of {len(tokens)} tokens)")
    try:
        system, raw = json.loads(meta.get("system", "null")), json.loads(meta.get("raw", "false"))
        if not (system is None or isinstance(system, str)) or not isinstance(raw, bool):
            raise ValueError(f"system {type(system).__name__}, raw {type(raw).__name__}: expected text and a bool")
    except (ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError
        raise KimiError(f"{path}: corrupt file ({type(e).__name__}: {e})") from None
    return PromptCache(tokens, cache, meta.get("text", ""), system, raw, meta.get("model_name", "?"), meta)
