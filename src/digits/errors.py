"""The one exception type for user mistakes: entry points print it as one line, never a traceback."""

import contextlib
import sys
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


def named_class(name: Any, kind: type) -> type | None:
    """The class a config's string names, if it is a subclass of `kind` outside the standard library (whose
    modules may act on import: `antigravity` opens a browser); None otherwise. Imports the class's module."""
    from hydra.utils import get_object

    if not isinstance(name, str) or name.split(".")[0] in sys.stdlib_module_names:
        return None
    found = None
    with contextlib.suppress(Exception):  # a name that resolves to nothing is no class
        found = get_object(name)
    return found if isinstance(found, type) and issubclass(found, kind) else None


class JobsRefusedError(RuntimeError):
    """A launcher could not start a batch of trials (a cluster refused the jobs): no trial of it ran."""
