"""A forced choice between implementations of one thing (KDA paths, expert paths).

Precedence: `force(name)` in this process > the environment variable > None (the caller's auto).
Unknown names are refused with the valid ones listed.
"""

from __future__ import annotations

import os

from .errors import KimiError


class UnknownChoiceError(KimiError, ValueError):
    """A forced path or mode that does not exist (from code or an environment variable)."""


_ENV_CHOICES: dict[str, tuple[str, tuple[str, ...]]] = {}  # env var -> (what it picks, valid values)


def register_env(env_var: str, what: str, choices: tuple[str, ...]) -> None:
    """Declare an environment variable that picks one of `choices`, for check_environment."""
    _ENV_CHOICES[env_var] = (what, choices)


def check_environment() -> None:
    """Refuse an unknown value in any declared variable now (load_model calls this), not at the
    first use, which on some devices never comes (KIMI_MLX_KERNELS is read only with Metal)."""
    for env_var, (what, choices) in _ENV_CHOICES.items():
        value = os.environ.get(env_var)
        if value and value not in choices:
            raise UnknownChoiceError(f"${env_var}={value!r}: unknown {what}; valid: {', '.join(choices)} "
                                     "(or unset it)")


class PathSwitch:
    def __init__(self, what: str, env_var: str, choices: tuple[str, ...]):
        self.what, self.env_var, self.choices = what, env_var, choices
        self._forced: str | None = None
        register_env(env_var, what, choices)

    def check(self, name: str, where: str) -> str:
        if name not in self.choices:
            raise UnknownChoiceError(f"unknown {self.what} {name!r} ({where}); valid: {', '.join(self.choices)}")
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
