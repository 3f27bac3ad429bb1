"""The one exception type for user mistakes: entry points print it as one line, never a traceback."""

from typing import Any


class DigitsError(ValueError):
    """A bad value or a broken input the user can fix; its message names the value and what is allowed."""


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise DigitsError(f"{name}={value!r} is not allowed; expected {allowed}")


class JobsRefusedError(RuntimeError):
    """A launcher could not start a batch of trials (a cluster refused the jobs): no trial of it ran."""
