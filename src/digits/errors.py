"""The one exception type for user mistakes: entry points print it as one line, never a traceback."""

from typing import Any


class DigitsError(ValueError):
    """A bad value or a broken input the user can fix; its message names the value and what is allowed."""


def is_int(value: Any) -> bool:
    """An int, not a bool (YAML's `true` is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise DigitsError(f"{name}={value!r} is not allowed; expected {allowed}")


class JobsRefusedError(RuntimeError):
    """A launcher could not start a batch of trials (a cluster refused the jobs): no trial of it ran."""
