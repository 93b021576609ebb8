"""A chat session never dies on a failed command, and cache-prompt never leaves a traceback or half a file.

Driven through the harness of test_chat.py (tiny random model, byte-level Kimi tokenizer). The
expected value of each case: one `error:` line, the conversation unchanged (messages, ids), and
the session still working (a later /save writes a file that loads back to the same messages).
"""

import io
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from test_chat import ENV, ROOT, cli
from test_chat import folder as folder  # noqa: F401 (fixture)
from test_chat import loaded as loaded  # noqa: F401 (fixture)
from typer.testing import CliRunner

from kimi_mlx import KimiError
from kimi_mlx import chat as chat_module
from kimi_mlx.chat import ChatSession, chat_loop
from kimi_mlx.cli import app


def unwritable(tmp_path) -> Path:
    """A folder no file can be created in (root ignores permissions: use /proc there)."""
    if os.geteuid() == 0:
        return Path("/proc")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    return ro


def run_lines(session, lines, stdin=None):
    err = io.StringIO()
    stdin = stdin or io.StringIO("\n".join(lines) + "\n")
    code = chat_loop(session, stdin, io.StringIO(), err)
    return code, err.getvalue()


def error_lines(notes):
    return [line for line in notes.splitlines() if line.startswith("error:")]


def test_failed_commands_keep_the_session(loaded, folder, tmp_path):  # noqa: F811
    model, tok = loaded
    session = ChatSession(model, tok, max_tokens=3)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    bad_json = tmp_path / "badjson.safetensors"
    mx.save_safetensors(str(bad_json), {"tokens": mx.array([1], dtype=mx.int32)},
                        metadata={"format": "kimi-mlx-chat"})
    failing = [
        "/save .", "/save /", "/save ..", f"/save {tmp_path}", f"/save {unwritable(tmp_path) / 'c.safetensors'}",
        f"/save {tmp_path / 'no' / 'such' / 'c.safetensors'}",
        f"/load {garbage}", f"/load {tmp_path}", f"/load {tmp_path / 'missing'}", f"/load {bad_json}",
        "/save a\0b", "/load a\0b",
        f"/load {folder / 'model.safetensors'}", "/load .",
    ]
    good = tmp_path / "good.safetensors"
    code, notes = run_lines(session, ["first message", *failing, "second", f"/save {good}"])
    assert code == 0
    errors = error_lines(notes)
    assert len(errors) == len(failing), notes  # one line each
    assert not [e for e in errors if "report this" in e], errors  # user errors, not bugs
    assert "Traceback" not in notes
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["first message", "second"]
    assert good.is_file() and not list(tmp_path.glob("*.tmp*"))
    back = ChatSession(model, tok, max_tokens=3)
    back.load(good)
    assert back.messages == session.messages and back.tokens == session.tokens


def test_any_exception_in_a_command_is_one_line_and_the_conversation_stays(loaded, monkeypatch):  # noqa: F811
    model, tok = loaded
    session = ChatSession(model, tok, max_tokens=3)
    failures = iter([OSError(5, "Input/output error", "x.safetensors"), RuntimeError("boom"), MemoryError()])

    def fail(path):
        raise next(failures)

    code, notes = run_lines(session, ["hello"])
    before = (list(session.tokens), list(session.messages))
    monkeypatch.setattr(session, "save", fail)
    code, notes = run_lines(session, ["/save a", "/save b", "/save c"])
    assert code == 0
    errors = error_lines(notes)
    assert errors[0] == "error: x.safetensors: Input/output error"
    assert "RuntimeError: boom" in errors[1] and "MemoryError" in errors[2] and len(errors) == 3
    assert (session.tokens, session.messages) == before


def test_invalid_utf8_on_stdin_is_replaced_and_save_still_works(loaded, tmp_path):  # noqa: F811
    model, tok = loaded
    session = ChatSession(model, tok, max_tokens=3)
    path = tmp_path / "c.safetensors"
    raw = b"caf\xe9 \xff\xfe ok\n/save " + str(path).encode() + b"\n"
    stdin = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8")  # strict, as sys.stdin is
    code, notes = run_lines(session, [], stdin=stdin)
    assert code == 0 and not error_lines(notes), notes
    assert session.messages[0]["content"] == "caf\ufffd \ufffd\ufffd ok"
    back = ChatSession(model, tok, max_tokens=3)
    back.load(path)
    assert back.messages == session.messages


def test_undecodable_text_from_python_is_cleaned_and_saved(loaded, tmp_path):  # noqa: F811
    model, tok = loaded
    session = ChatSession(model, tok, max_tokens=2, system="sys \udcff")  # bytes kept by surrogateescape
    session.chat("a \udce9 b \ud83d")
    session.save(tmp_path / "c.safetensors")
    assert session.system == "sys \ufffd" and "\ufffd b \ufffd" in session.messages[1]["content"]


def test_cli_chat_survives_bad_bytes_and_bad_saves(folder, tmp_path):  # noqa: F811
    good = tmp_path / "good.safetensors"
    stdin = b"hi \xff there\n/save .\n/save " + str(good).encode() + b"\n/quit\n"
    proc = subprocess.run(cli("--model", str(folder), "--max-tokens", "2"), input=stdin, capture_output=True,
                          cwd=ROOT, env={**ENV, "PYTHONIOENCODING": "utf-8:strict"}, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and len(error_lines(err)) == 1 and "is a folder" in err
    assert good.is_file()


def test_long_messages_show_prefill_progress(loaded, capfd):  # noqa: F811
    model, tok = loaded
    session = ChatSession(model, tok, max_tokens=1)
    session.chat("short")
    assert "prefill" not in capfd.readouterr().err
    session.chat("x" * chat_module.PROGRESS_MIN_TOKENS)
    err = capfd.readouterr().err
    assert "prefill" in err and "100%" in err


# ---------------------------------------------------------------- cache-prompt and prompt files


def test_save_never_overwrites_a_file_that_is_not_ours(loaded, folder, tmp_path):  # noqa: F811
    """/save and cache-prompt replace only their own files (a chat or prompt-cache file, or an empty
    file): a document, a model's weights, another safetensors file or a link to one are kept, one
    error line each; nor is a file named like the temporary (X.tmp.safetensors) touched."""
    model, tok = loaded
    session = ChatSession(model, tok, max_tokens=3)
    notes_txt = tmp_path / "notes.txt"
    notes_txt.write_text("my notes")
    weights = tmp_path / "weights.safetensors"
    mx.save_safetensors(str(weights), {"w": mx.ones((2,))}, metadata={"format": "mlx"})
    link = tmp_path / "link.safetensors"
    link.symlink_to(notes_txt)
    twin = tmp_path / "chat.safetensors.tmp.safetensors"  # the temporary's old fixed name
    twin.write_text("someone's file")
    before = {p: p.read_bytes() for p in (notes_txt, weights, twin)}
    fifo = tmp_path / "pipe"  # not a regular file (nor is /dev/null, which os.replace as root would replace)
    os.mkfifo(fifo)
    theirs = [notes_txt, weights, link, fifo]
    code, notes = run_lines(session, ["hello", *[f"/save {p}" for p in theirs], f"/save {tmp_path / 'chat.safetensors'}",
                                      "again", f"/save {tmp_path / 'chat.safetensors'}"])
    errors = error_lines(notes)
    assert code == 0 and len(errors) == len(theirs) and all("not a kimi-mlx chat" in e for e in errors), notes
    assert {p: p.read_bytes() for p in before} == before and link.is_symlink() and stat.S_ISFIFO(fifo.lstat().st_mode)
    back = ChatSession(model, tok, max_tokens=3)
    back.load(tmp_path / "chat.safetensors")  # our own file is replaced: the second save holds both turns
    assert back.messages == session.messages and len(back.messages) == 4
    (tmp_path / "empty").touch()
    session.save(tmp_path / "empty")  # an empty file holds nothing to lose
    for target in (notes_txt, weights, tmp_path / "chat.safetensors"):  # cache-prompt: the same rule
        result = CliRunner().invoke(app, ["cache-prompt", str(target), "--model", str(folder), "-p", "some text"])
        ours = target.name == "chat.safetensors"
        assert result.exit_code == (0 if ours else 2), result.output
    assert {p: p.read_bytes() for p in before} == before
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name and p != twin]


@pytest.mark.parametrize("where", ["dot", "root", "folder", "missing", "unwritable"])
def test_cache_prompt_refuses_a_bad_output_in_one_line(folder, tmp_path, where):  # noqa: F811
    out = {"dot": ".", "root": "/", "folder": str(tmp_path), "missing": str(tmp_path / "no" / "c.safetensors"),
           "unwritable": str(unwritable(tmp_path) / "c.safetensors")}[where]
    before = set(tmp_path.rglob("*"))
    result = CliRunner().invoke(app, ["cache-prompt", out, "--model", str(folder), "-p", "some text"])
    err = result.stderr.strip()
    assert result.exit_code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, result.output
    assert set(tmp_path.rglob("*")) == before  # nothing written


def test_a_failed_write_leaves_no_file(folder, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "c.safetensors"

    def half_then_full_disk(path, arrays, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise RuntimeError("[save_safetensors] No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", half_then_full_disk)
    result = CliRunner().invoke(app, ["cache-prompt", str(out), "--model", str(folder), "-p", "some text"])
    err = result.stderr  # the prefill bar, then the error
    assert result.exit_code == 2 and len(error_lines(err)) == 1 and "No space left" in err, result.output
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["generate"], ["cache-prompt", "out.safetensors"]])
@pytest.mark.parametrize("source", ["/dev/zero", "big_file", "folder", "missing"])
def test_a_prompt_file_without_end_or_too_big_is_one_line(folder, tmp_path, monkeypatch, command, source):  # noqa: F811
    """--prompt-file is read up to files.MAX_PROMPT_BYTES (here lowered to 1 MiB): /dev/zero or a
    file past it is refused in one line instead of filling memory; a folder or a missing file too."""
    from kimi_mlx import files

    monkeypatch.setattr(files, "MAX_PROMPT_BYTES", 1 << 20)
    path = {"/dev/zero": "/dev/zero", "folder": str(tmp_path)}.get(source, str(tmp_path / "prompt.txt"))
    if source == "big_file":
        Path(path).write_text("word " * (1 << 18) + "end")  # 1.25 MiB
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*command, "--model", str(folder), "--prompt-file", path])
    err = result.stderr.strip()
    assert result.exit_code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, result.output
    assert path in err and "Traceback" not in result.output and not (tmp_path / "out.safetensors").exists()


def test_a_chat_line_without_end_is_skipped_in_one_line(loaded, monkeypatch):  # noqa: F811
    """A line past MAX_PROMPT_BYTES (stdin from /dev/zero, a runaway pipe) is skipped with one error
    line, read 1 MiB at a time (memory stays bounded); the lines after it are read as usual."""
    model, tok = loaded
    monkeypatch.setattr(chat_module, "MAX_PROMPT_BYTES", 1000)
    session = ChatSession(model, tok, max_tokens=3)
    stdin = io.StringIO("a" * 5000 + "\n" + "short message\n")
    code, notes = run_lines(session, [], stdin=stdin)
    assert code == 0 and len(error_lines(notes)) == 1 and "longer than" in notes, notes
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["short message"]
@pytest.mark.parametrize("command", [["generate"], ["cache-prompt", "out.safetensors"]])
def test_a_prompt_file_that_is_not_utf8_is_one_line_naming_it(folder, tmp_path, command):  # noqa: F811
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    result = CliRunner().invoke(app, [*command, "--model", str(folder), "--prompt-file", str(bad)])
    err = result.stderr.strip()
    assert result.exit_code == 2 and len(err.splitlines()) == 1, result.output
    assert str(bad) in err and "not UTF-8" in err and "0xe9 at offset 3" in err


@pytest.mark.parametrize("flag", ["-p", "--system"])
def test_a_text_argument_that_is_not_utf8_is_one_line(folder, flag):  # noqa: F811
    args = [flag, b"caf\xe9"] + (["-p", "hi"] if flag == "--system" else [])
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "generate", "--model", str(folder), *args],
                          capture_output=True, cwd=ROOT, env=ENV, timeout=120)
    err = proc.stderr.decode().strip()
    name = "--prompt" if flag == "-p" else flag
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and f"{name} is not valid UTF-8" in err, err


def test_cli_generate_shows_prefill_progress_for_long_prompts_only(folder, tmp_path):  # noqa: F811
    long = tmp_path / "long.txt"
    long.write_text("x" * chat_module.PROGRESS_MIN_TOKENS)
    result = CliRunner().invoke(app, ["generate", "--model", str(folder), "--prompt-file", str(long), "-n", "1"])
    assert result.exit_code == 0 and "prefill" in result.stderr and "100%" in result.stderr, result.output
    result = CliRunner().invoke(app, ["generate", "--model", str(folder), "-p", "short", "-n", "1"])
    assert result.exit_code == 0 and "prefill" not in result.stderr, result.output


@pytest.mark.parametrize("command", ["generate -p hi -n 2000", "chat -n 50"])
def test_a_reader_that_goes_away_is_a_quiet_exit(folder, command):  # noqa: F811
    # `| head -c 1`: the pipe closes after the first byte; the tool stops without a traceback
    script = (f"yes hello | head -n 200 | {sys.executable} {ROOT / 'cli.py'} {command} --model {folder} "
              f"2>&1 >/dev/stdout | head -c 1 >/dev/null; exit ${{PIPESTATUS[2]}}")
    proc = subprocess.run(["bash", "-c", script.replace("2>&1 >/dev/stdout", "2>err.txt")], capture_output=True,
                          cwd=folder, env=ENV, timeout=120)
    err = [line for line in (folder / "err.txt").read_text().splitlines() if "context 1048576 tokens" not in line]
    assert proc.returncode == 141 and err == [], err  # nothing but chat's opening line


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("command", ["generate -p hi -n 3", "info", "plan -c 10", "chat -n 3"])
def test_output_on_a_full_disk_is_one_line_exit_1(folder, command):  # noqa: F811
    """stdout that cannot be written (> /dev/full: what a full disk does to `> reply.txt`) was an
    OSError traceback (and a second one at exit), and chat said 'cannot read the input'; now one
    line, exit 1."""
    proc = subprocess.run(["bash", "-c", f"{sys.executable} {ROOT / 'cli.py'} {command} --model {folder} > /dev/full"],
                          capture_output=True, text=True, env=ENV, timeout=120, input="hello\n")
    err = [line for line in proc.stderr.splitlines() if "context 1048576 tokens" not in line]  # chat's opening line
    assert proc.returncode == 1 and len(err) == 1, proc.stderr
    assert re.fullmatch(r"error: cannot write the output(: | \()No space left on device\)?", err[0]), err


@pytest.mark.parametrize("command", ["generate -p hi -n 3", "chat -n 3"])
def test_a_closed_stdin_is_not_taken_by_the_weights(folder, command):  # noqa: F811
    """With stdin closed (`<&-`) the weights' file took descriptor 0 and MLX read that as a failed
    open ('cannot read model.safetensors'); now stdin is /dev/null: generate runs, chat sees EOF."""
    proc = subprocess.run(["bash", "-c", f"{sys.executable} {ROOT / 'cli.py'} {command} --model {folder} <&-"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0 and "error" not in proc.stderr, proc.stderr


# A shell can hand a command a standard stream that is closed (`2>&-`) or open the wrong way
# (`2<file`: what a pyenv shim leaves at descriptor 2 after `2>&-`, its own script read-only).
# Either way the command must do what it does with the streams open.
BAD_STREAMS = {"closed": "<&- >&- 2>&-", "wrong way": "0>in.txt 1<ro.txt 2<ro.txt"}


@pytest.mark.parametrize("streams", BAD_STREAMS)
def test_standard_streams_closed_or_open_the_wrong_way_are_dev_null(tmp_path, streams):
    """Each stream alone, without a model: reads see EOF, writes vanish, exit 0 (stderr read-only
    made every write fail with EBADF: cache-prompt's progress bar ended the run, exit 1, no file)."""
    (tmp_path / "ro.txt").write_text("not yours\n")
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import cli; cli._standard_streams(); "
              "assert sys.stdin.read() == ''; print('out'); sys.stdout.flush(); "
              "sys.stderr.write('err'); sys.stderr.flush(); open('done', 'w').close()")
    for redirect in BAD_STREAMS[streams].split():
        (tmp_path / "done").unlink(missing_ok=True)
        proc = subprocess.run(["bash", "-c", f'{sys.executable} -c "{script}" {ROOT} {redirect}'], cwd=tmp_path,
                              capture_output=True, text=True, env=ENV, timeout=60)
        assert proc.returncode == 0 and (tmp_path / "done").exists(), (redirect, proc.stderr)
    assert (tmp_path / "ro.txt").read_text() == "not yours\n"


@pytest.mark.parametrize("streams", BAD_STREAMS)
@pytest.mark.parametrize("command", ["cache-prompt out.safetensors -p hello"])  # each CLI run ~4 s: one command
def test_commands_run_with_every_standard_stream_unusable(folder, tmp_path, streams, command):  # noqa: F811
    """By hand, all with each stream closed or the wrong way: info, plan, generate, chat, cache-prompt,
    convert, doctor exit 0 and write their files; serve answers."""
    (tmp_path / "ro.txt").write_text("not yours\n")
    proc = subprocess.run(["bash", "-c", f"{sys.executable} {ROOT / 'cli.py'} {command} --model {folder} "
                           f"{BAD_STREAMS[streams]}"], cwd=tmp_path, capture_output=True, env=ENV, timeout=120)
    assert proc.returncode == 0
    if command.startswith("cache-prompt"):
        assert (tmp_path / "out.safetensors").stat().st_size > 0
    assert (tmp_path / "ro.txt").read_text() == "not yours\n"


@pytest.mark.parametrize("value", [5, None, b"hi", ["hi"]], ids=repr)
def test_chat_api_values_of_the_wrong_kind_are_one_line(loaded, value):  # noqa: F811
    """ChatSession(system=5) and send(5) were a regex TypeError ('expected string or bytes-like
    object'); save(None) / load(5) a TypeError from Path(); now KimiError lines naming the value."""
    model, tok = loaded
    with pytest.raises(KimiError, match="the system message must be text"):
        ChatSession(model, tok, system=value or 5)
    session = ChatSession(model, tok, max_tokens=2)
    with pytest.raises(KimiError, match="a message must be text"):
        list(session.send(value))
    if not isinstance(value, (bytes, list)):  # bytes and lists are paths' business elsewhere
        with pytest.raises(KimiError, match="not a file name"):
            session.save(value)
        with pytest.raises(KimiError, match="not a file name"):
            session.load(value)
    assert session.messages == []
