"""Shared entrypoint plumbing for every ``python -m jobs.X``: ``--config FILE key=value ...`` -> typed config, and how
a failed job ends.

How a job ends (:func:`main`):

* success: the summary as JSON on stdout, exit code 0;
* a problem with what the user gave (a :class:`~finemed_ray.errors.FinemedError` -- bad config, missing or bad data,
  unusable model -- found anywhere in the exception's chain, also when raised inside a Ray task; or a
  ``UnicodeDecodeError``): one line ``error: <message>`` on stderr, exit code 2, no traceback on the terminal;
* anything else is unexpected (a bug, or the platform failing): one line
  ``error: internal error: <Type>: <message> (full traceback in <log>)`` on stderr, exit code 1; the traceback goes
  to the log file only. (Ray may still print a failed Ray task's remote traceback through its own loggers.)

The log file: ``$FINEMED_LOG_DIR/<job>-<YYYYmmdd-HHMMSS>-<pid>.log`` (default directory:
``<tempdir>/finemed-ray-logs``). While the job runs it also receives every ``logging`` record at INFO and above (the
same records still go to stderr as before), so the traceback sits after the job's own log lines. It is created on
the first record, so a job that logs nothing and succeeds leaves no file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from typing import Callable, TypeVar

from finemed_ray.config import load_config
from finemed_ray.errors import FinemedError, user_error, user_message

T = TypeVar("T")

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse(cls: type[T], description: str, argv: list[str] | None = None) -> T:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.learning_rate=1e-5")
    ns = parser.parse_args(argv)
    return load_config(cls, ns.config, ns.overrides)


def run_stage_job(kind: str, argv: list[str] | None = None) -> dict:
    """``python -m jobs.<kind>`` for a training stage of :data:`~finemed_ray.train.stages.STAGES`: parse its
    config, then setup -> run -> save; the summary."""
    from finemed_ray.train.stages import STAGES, run_stage

    stage = STAGES[kind]
    return run_stage(kind, parse(stage.config_class(), stage.title, argv))[1]


def log_dir() -> str:
    return os.environ.get("FINEMED_LOG_DIR") or os.path.join(tempfile.gettempdir(), "finemed-ray-logs")


def _job_name(body: Callable) -> str:
    module = getattr(body, "__module__", "") or ""
    name = module.rsplit(".", 1)[-1]
    return name if name and name != "__main__" else os.path.splitext(os.path.basename(sys.argv[0] or "job"))[0]


def _open_log(job: str) -> tuple[str | None, logging.Handler | None]:
    """The log path and a root handler writing to it (created lazily), or (None, None) when no file can be made."""
    try:
        os.makedirs(log_dir(), exist_ok=True)
        path = os.path.join(log_dir(), f"{job}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
        handler = logging.FileHandler(path, encoding="utf-8", delay=True)
    except OSError:
        return None, None
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    handler.setLevel(logging.INFO)
    return path, handler


def _write_traceback(path: str | None, exc: BaseException) -> bool:
    if path is None:
        return False
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} job failed:\n")
            fh.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return True
    except OSError:
        return False


def _summary(exc: BaseException) -> str:
    """``Type: first line`` of the exception (for Ray's task errors: of the worker's exception)."""
    from jobs._console import summarize_exception

    return summarize_exception(exc)


def main(body: Callable[[list[str] | None], dict], argv: list[str] | None = None) -> int:
    """Run a stage; print its summary as JSON. User errors: one ``error:`` line, exit 2. Bugs: one ``error:``
    line naming the log that holds the traceback, exit 1 (see the module docstring)."""
    logging.basicConfig(level=logging.INFO, format=_LOG_FORMAT)
    root = logging.getLogger()
    log_path, handler = _open_log(_job_name(body))
    if handler is not None:
        root.addHandler(handler)
    try:
        try:
            summary = body(argv)
        except Exception as exc:  # noqa: BLE001 - every failure ends as one line; the traceback goes to the log
            message = user_message(exc)
            logged = _write_traceback(log_path, exc)
            if message is not None:
                # Our own errors name what is wrong; a bare decode error does not, so say where its traceback is.
                ours = isinstance(user_error(exc), FinemedError)
                where = "" if ours or not logged else f" (traceback in {log_path})"
                print(f"error: {message}{where}", file=sys.stderr, flush=True)
                return 2
            if logged:
                print(f"error: internal error: {_summary(exc)} (full traceback in {log_path})", file=sys.stderr,
                      flush=True)
            else:  # no log file could be written: the traceback must not be lost
                traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
                print(f"error: internal error: {_summary(exc)}", file=sys.stderr, flush=True)
            return 1
        print(json.dumps(summary, indent=2, default=str))
        return 0
    finally:
        if handler is not None:
            root.removeHandler(handler)
            handler.close()
