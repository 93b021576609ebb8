"""A forced choice between implementations of one thing (KDA paths, expert paths).

Precedence: `force(name)` in this process > the environment variable > None (the caller's auto).
Unknown names are refused with the valid ones listed.
"""

from __future__ import annotations

import os


class PathSwitch:
    def __init__(self, what: str, env_var: str, choices: tuple[str, ...]):
        self.what, self.env_var, self.choices = what, env_var, choices
        self._forced: str | None = None

    def check(self, name: str, where: str) -> str:
        if name not in self.choices:
            raise ValueError(f"unknown {self.what} {name!r} ({where}); valid: {', '.join(self.choices)}")
        return name

    def force(self, name: str | None, where: str) -> None:
        """Use `name` from now on; None goes back to the env var / auto."""
        self._forced = None if name is None else self.check(name, where)

    def forced(self) -> str | None:
        """The forced choice, else the env var's (checked), else None."""
        if self._forced is not None:
            return self._forced
        env = os.environ.get(self.env_var)
        return self.check(env, f"${self.env_var}") if env else None
