"""SIGTERM (kill, a service manager) and SIGHUP (a closed terminal) stop a command as Ctrl-C does.

Each command, in this process through the CLI (CliRunner), with the signal sent to this process at a
chosen point: one line 'terminated (SIGNAME)', exit 128 + signal, no traceback, no file half
written or left behind, and the CLI's handlers gone afterwards (the default action restored).
Convert's resume after a signal is in test_convert.py.
"""

import importlib
import os
import signal

import pytest
from test_chat import folder as folder  # noqa: F401 (fixture)
from typer.testing import CliRunner

from kimi_mlx import chat as chat_module
from kimi_mlx import prompt_cache as prompt_cache_module
from kimi_mlx.cli import app

SIGNALS = ["SIGTERM", "SIGHUP"]


def kill_self(name):
    os.kill(os.getpid(), getattr(signal, name))


def stopped_by(result, name):
    """The command ended on the signal: its one line last on stderr, the shell's exit code."""
    assert result.exit_code == 128 + getattr(signal, name), result.output
    assert result.stderr.splitlines()[-1] == f"terminated ({name})", result.stderr
    assert "Traceback" not in result.output and "Error" not in result.stderr, result.output
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL


@pytest.mark.parametrize("name", SIGNALS)
@pytest.mark.parametrize("where", ["prefill", "save"])
def test_cache_prompt_leaves_no_file(folder, tmp_path, monkeypatch, name, where):  # noqa: F811
    """Stopped while prefilling or while writing: neither the file nor its temporary remain."""
    if where == "prefill":
        generate_module = importlib.import_module("kimi_mlx.generate")  # the package's name is the function
        real = generate_module.prefill_all

        def prefill_all(*args, **kwargs):
            kill_self(name)
            return real(*args, **kwargs)
        monkeypatch.setattr(generate_module, "prefill_all", prefill_all)
    else:
        real = prompt_cache_module.mx.save_safetensors

        def save(path, *args, **kwargs):  # the temporary is written, then the signal comes
            real(path, *args, **kwargs)
            assert os.path.getsize(path) > 0
            kill_self(name)
        monkeypatch.setattr(prompt_cache_module.mx, "save_safetensors", save)
    out = tmp_path / "out" / "cache.safetensors"
    out.parent.mkdir()
    result = CliRunner().invoke(app, ["cache-prompt", str(out), "--model", str(folder), "-p", "hello there"])
    stopped_by(result, name)
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("name", SIGNALS)
def test_generate_stops(folder, monkeypatch, name):  # noqa: F811
    import kimi_mlx

    real = kimi_mlx.stream_generate

    def stream_generate(*args, **kwargs):
        for i, response in enumerate(real(*args, **kwargs)):
            if i == 1:
                kill_self(name)
            yield response
    monkeypatch.setattr(kimi_mlx, "stream_generate", stream_generate)
    result = CliRunner().invoke(app, ["generate", "--model", str(folder), "-p", "hi", "-n", "20"])
    stopped_by(result, name)


@pytest.mark.parametrize("name", SIGNALS)
def test_chat_ends_instead_of_stopping_the_reply(folder, tmp_path, monkeypatch, name):  # noqa: F811
    """Ctrl-C during a reply stops the reply and keeps the session; SIGTERM / SIGHUP end the
    session (a later line of input is not run: no /save file)."""
    real = chat_module.ChatSession.send

    def send(self, text):
        for i, response in enumerate(real(self, text)):
            if i == 1:
                kill_self(name)
            yield response
    monkeypatch.setattr(chat_module.ChatSession, "send", send)
    saved = tmp_path / "s.safetensors"
    result = CliRunner().invoke(app, ["chat", "--model", str(folder), "-n", "20"], input=f"hello\n/save {saved}\n")
    stopped_by(result, name)
    assert not saved.exists()


def test_ctrl_c_in_a_reply_still_keeps_the_session(folder, tmp_path, monkeypatch):  # noqa: F811
    real = chat_module.ChatSession.send

    def send(self, text):
        for i, response in enumerate(real(self, text)):
            if i == 1:
                kill_self("SIGINT")
            yield response
    monkeypatch.setattr(chat_module.ChatSession, "send", send)
    saved = tmp_path / "s.safetensors"
    result = CliRunner().invoke(app, ["chat", "--model", str(folder), "-n", "20"], input=f"hello\n/save {saved}\n")
    assert result.exit_code == 0 and "[reply stopped" in result.stderr and saved.exists(), result.output


def test_a_signal_ignored_by_the_parent_stays_ignored(folder, tmp_path, monkeypatch):  # noqa: F811
    """`nohup kimi-mlx ...` ignores SIGHUP; the CLI's handler must not undo that (the terminal
    closing would stop the command)."""
    generate_module = importlib.import_module("kimi_mlx.generate")
    real = generate_module.prefill_all

    def prefill_all(*args, **kwargs):
        kill_self("SIGHUP")
        return real(*args, **kwargs)
    monkeypatch.setattr(generate_module, "prefill_all", prefill_all)
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        out = tmp_path / "cache.safetensors"
        result = CliRunner().invoke(app, ["cache-prompt", str(out), "--model", str(folder), "-p", "hello there"])
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
    assert result.exit_code == 0 and out.stat().st_size > 0, result.output
