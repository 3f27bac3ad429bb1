"""Entry points' error handling: a user's mistake ends in one line on stderr, a bug in a traceback."""

import os
import sys
from collections.abc import Callable
from typing import Any

import yaml
from hydra.errors import HydraException

from digits.config import check_choices
from digits.errors import DigitsError


def one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def describe(err: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for one that is a bug."""
    if isinstance(err, DigitsError):
        return str(err)
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{mark.name}, line {mark.line + 1}: not valid YAML ({err.problem})"
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror}"
    if isinstance(err, HydraException):
        return one_line(str(err).split("Set the environment variable HYDRA_FULL_ERROR")[0])
    return None


def run_cli(main: Callable[[], Any]) -> None:
    """Run a Hydra `main`, turning user mistakes into `error: ...` and exit code 1."""
    full_traces = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing, so we can judge
    try:
        check_choices(sys.argv[1:])
        main()
    except Exception as err:
        message = None if full_traces else describe(err)
        if message is None:
            raise
        sys.exit(f"error: {message}")
