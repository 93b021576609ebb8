"""The one exception type users see. The CLI turns it into a message and an exit code."""


class KimiError(Exception):
    """A user-facing error: one line naming the file and what to do."""

    exit_code = 2


class ModelFormatError(KimiError):
    """A checkpoint on disk is not what we can load (wrong type, missing/extra tensor, bad shape)."""
