"""User-facing errors: one line, naming the field, the value and what is allowed; exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user (config, file, CLI argument). The CLI prints it on one line, exit 2."""

    exit_code = 2

    def __init__(self, message: str):
        # One line always: a multi-line message would look like a traceback to the user.
        super().__init__(" ".join(str(message).split()))


class ConfigError(UserError):
    """A configuration value is missing, of the wrong type, or out of range."""


class DataError(UserError):
    """An input file or artifact (corpus, shards, logit store, model dir) is missing or corrupt."""


def did_you_mean(value: object, allowed: Iterable[str]) -> str:
    """Return " (did you mean 'x'?)" for the closest allowed name, or "" if nothing is close."""
    matches = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def choice_error(field: str, value: object, allowed: Iterable[str]) -> ConfigError:
    """Build the standard error for a value that is not one of a fixed set of names."""
    allowed = list(allowed)
    return ConfigError(
        f"{field}={value!r} is not allowed; expected one of {', '.join(allowed)}{did_you_mean(value, allowed)}"
    )
