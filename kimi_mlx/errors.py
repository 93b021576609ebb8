"""The one exception type users see. The CLI turns it into a message and an exit code."""


class KimiError(Exception):
    """A user-facing error: one line naming the file and what to do."""

    exit_code = 2


class ModelFormatError(KimiError):
    """A checkpoint on disk is not what we can load (wrong type, missing/extra tensor, bad shape)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C raises KeyboardInterrupt (the CLI installs the
    handler, cli._stop_signals), so every cleanup and resume note that Ctrl-C gets runs for these
    too. Code that goes on after Ctrl-C (a chat reply stopped, the session kept) lets this through:
    the process is asked to end. exit_code: 128 + the signal's number, as a shell reports it."""

    def __init__(self, signum: int):
        import signal

        self.signum, self.exit_code = signum, 128 + signum
        super().__init__(signal.Signals(signum).name)
