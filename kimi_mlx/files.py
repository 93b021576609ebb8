"""Reading the small text files of a model folder (config.json, the safetensors index, the
tokenizer's files) with one-line errors for every way a file can be wrong.

A file can be missing, a folder, unreadable (permissions, I/O), far too large (a link to
/dev/zero), not UTF-8, not JSON, or JSON of the wrong kind (a list where an object is expected); each is a ModelFormatError (or the class the
caller passes) naming the file, what is wrong and what to do, never a traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import KimiError, ModelFormatError


def expand_user(path: str | os.PathLike, fix: str) -> Path:
    """Path(path).expanduser(); ~user for a user that does not exist is a KimiError naming the
    path (Python raises RuntimeError 'Could not determine home directory'). `fix`: what to do."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise KimiError(f"{path}: no home folder for that ~user; {fix}") from None


# The largest small file read whole (config, index, tokenizer files, chat template): the released
# model's are under 3 MiB (tiktoken.model 2.6 MiB); a file past this is not one of them (a link to
# /dev/zero, a weights file under the wrong name) and was read until memory ran out (MemoryError).
MAX_SMALL_FILE_BYTES = 64 << 20


def read_bytes(path: str | Path, fix: str, error: type[KimiError] = ModelFormatError,
               missing: str = "not found") -> bytes:
    """The file's bytes, at most MAX_SMALL_FILE_BYTES; see read_text for the errors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SMALL_FILE_BYTES + 1)
    except FileNotFoundError:
        raise error(f"{path}: {missing}; {fix}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not a file; {fix}") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e}); {fix}") from None
    if len(data) > MAX_SMALL_FILE_BYTES:
        raise error(f"{path}: larger than {MAX_SMALL_FILE_BYTES >> 20} MiB, so not the small file this name "
                    f"should be; {fix}")
    return data


def read_text(path: str | Path, fix: str, error: type[KimiError] = ModelFormatError,
              missing: str = "not found") -> str:
    """The file's text (UTF-8). `fix` says what to do; `missing` what a missing file means."""
    path = Path(path)
    data = read_bytes(path, fix, error, missing)  # missing, a folder, unreadable, too large: its errors
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); {fix}") from None


def read_json_object(path: str | Path, fix: str, error: type[KimiError] = ModelFormatError,
                     missing: str = "not found") -> dict:
    """The file's JSON, which must be an object (a dict); see read_text for the errors."""
    path = Path(path)
    text = read_text(path, fix, error, missing)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); {fix}") from None
    except RecursionError:  # "[[[[...": nested past Python's limit
        raise error(f"{path}: not valid JSON (nested too deeply); {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: holds a JSON {type(data).__name__}, expected an object {{...}}; {fix}")
    return data


# The longest prompt read from a file or a chat line: 256 MiB of text is more than the released
# model's context (1,048,576 tokens) holds at any realistic bytes per token, so a longer input
# (a wrong file, /dev/zero) is refused instead of filling memory and then the tokenizer's time.
MAX_PROMPT_BYTES = 256 << 20


def read_prompt_file(path: str | Path) -> str:
    """A prompt file's text: UTF-8, at most MAX_PROMPT_BYTES. Refused in one KimiError line: a
    file that cannot be read (missing, a folder, permissions), one that is not UTF-8 (naming the
    first bad byte: the user can fix the file, and a silently altered prompt would be cached), or
    one past the limit. Pipes and process substitution (<(cmd)) are read like files."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROMPT_BYTES + 1)
    except OSError as e:
        raise KimiError(f"{path}: cannot read the prompt ({e.strerror or e})") from None
    if len(data) > MAX_PROMPT_BYTES:
        raise KimiError(f"{path}: longer than {MAX_PROMPT_BYTES >> 20} MiB, more text than a model context "
                        "holds; pass a smaller file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KimiError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                        "convert it, e.g. iconv -f latin1 -t utf-8") from None
