"""Entry points' error handling: a user's mistake ends in one line on stderr, a bug in a traceback."""

import functools
import logging
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from digits.config import check_choices
from digits.errors import DigitsError


def one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def describe(err: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for one that is a bug."""
    if (mistake := _user_mistake(err)) is not None:
        return str(mistake)
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{mark.name}, line {mark.line + 1}: not valid YAML ({err.problem})"
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror}"
    if isinstance(err, MissingMandatoryValue):
        return f"{err.full_key} is required; give {err.full_key}=<value> on the command line"
    if isinstance(err, HydraException):
        return one_line(str(err).split("Set the environment variable HYDRA_FULL_ERROR")[0])
    return None


def _user_mistake(err: BaseException | None) -> DigitsError | None:
    """A DigitsError, or one that OmegaConf or Hydra wrapped (raised inside a config resolver)."""
    while err is not None:
        if isinstance(err, DigitsError):
            return err
        err = err.__cause__ or err.__context__
    return None


FULL_TRACES = os.environ.get("HYDRA_FULL_ERROR") == "1"  # the user asked for tracebacks of everything


def task(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """A Hydra task whose user mistakes end the process with their one line, before Hydra adds its own
    "Error executing job" line; in a multirun they go to the sweeper, which records the job as failed."""

    @functools.wraps(fn)
    def wrapped(cfg: DictConfig) -> Any:
        with _hydra_full_error(FULL_TRACES):  # processes the task starts (DDP ranks, launchers) get the user's
            try:
                return fn(cfg)
            except Exception as err:
                message = None if FULL_TRACES else describe(err)
                if message is None or HydraConfig.get().mode == RunMode.MULTIRUN:
                    raise
                raise SystemExit(f"error: {message}") from None

    return wrapped


@contextmanager
def _hydra_full_error(on: bool) -> Iterator[None]:
    """HYDRA_FULL_ERROR as given (or not) by the user, inside; "1" outside, so Hydra re-raises errors for
    `run_cli` to judge instead of printing a trimmed traceback."""
    os.environ.pop("HYDRA_FULL_ERROR", None)
    if on:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        os.environ["HYDRA_FULL_ERROR"] = "1"


def run_cli(main: Callable[[], Any]) -> None:
    """Run a Hydra `main`, turning user mistakes into `error: ...` and exit code 1."""
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        check_choices(sys.argv[1:])
        main()
    except Exception as err:
        message = None if FULL_TRACES else describe(err)
        if message is None:
            raise
        sys.exit(f"error: {message}")


def exit_without_teardown() -> None:
    """End a finished command at once, its output flushed and its log files closed: Python's teardown of
    torch's and every module's objects takes over a second and writes nothing. Not while child processes
    or a torch process group are up: they end as usual."""
    import torch.distributed as dist

    if multiprocessing.active_children() or (dist.is_available() and dist.is_initialized()):
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
