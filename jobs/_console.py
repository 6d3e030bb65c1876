"""The demo's terminal: our own lines on the terminal, every runtime message in a log file.

What goes where while a :class:`RunConsole` is entered, and why:

* **Terminal**: only what :meth:`RunConsole.say` / :meth:`RunConsole.stage` / :meth:`RunConsole.table` write. They
  write to a private duplicate of the original fd 1, taken before the redirect.
* **Log file** (``log_path``, appended): everything else. fd 1 and fd 2 of the process are pointed at the file
  with ``os.dup2``, so this covers ``print()``, ``sys.stderr``, writes from C/C++ code (DeepSpeed's op builds,
  gloo, oneDNN/vLLM prints), and every child process started afterwards (they inherit fds 1 and 2: the Ray
  head's ``raylet``/GCS, pip/ninja/g++ spawned by torch's cpp_extension, vLLM engine processes). ``logging`` gets
  one root handler on the file at INFO (``_cli.main``'s ``basicConfig`` then adds nothing) and
  ``logging.captureWarnings(True)`` sends ``warnings.warn`` there too. Each of our terminal lines is copied into
  the log with a timestamp, so the log reads as one story; a failed stage's traceback is written to the log only.
* **Ray** (2.60, measured in its source): Ray workers and actors (Ray Train workers, Ray Data tasks, Serve
  replicas) write to files in the session dir (``/tmp/ray/session_latest/logs/worker-*.out|err``) whatever the
  driver does. With ``ray.init(log_to_driver=True)`` (the default) the driver's log monitor re-prints those lines
  on its own ``sys.stdout``/``sys.stderr`` with a ``(pid=..., ip=...)`` prefix, i.e. into the log file here: that
  is what we want (one file to read), so leave it on. Ray Train V2's controller logs its status through the
  ``ray.train`` loggers and prints reports from the workers through the same driver log path; Ray Data's progress
  bars (``DataContext.enable_progress_bars``, rich/tqdm on fd 2) and its "Execution plan"/"Dataset ... execution
  finished" INFO lines go to the driver's stderr (the ``ray.data`` logger's console handler; DEBUG and up also to
  ``session_latest/logs/ray-data/ray-data.log``), so also into the file. ``RAY_DEDUP_LOGS`` (default on)
  folds repeated worker lines into one "[repeated Nx across cluster]"; that is fine in a log file.

Two things the caller must do, measured with Ray 2.60: call ``ray.shutdown()`` inside the ``with`` block (with
deduplication on, Ray's log monitor holds repeated worker lines and prints them at shutdown; from an ``atexit``
hook that is after the console has given fds 1/2 back, so they would reach the terminal), and catch the exception
that a failed stage re-raises before it leaves the block (the stage has already said FAILED and logged the
traceback; an exception that escapes the program is printed again by Python on the restored terminal).

:func:`quiet_runtime_env` sets environment defaults (``os.environ.setdefault``: a user's own setting wins) that
reduce that noise without changing behaviour; errors and warnings still reach the log.

Use::

    quiet_runtime_env()
    with RunConsole("demo.log") as con:
        con.say("log: demo.log")
        with con.stage("1/8", "start S3") as h:
            ...
            h.done("http://127.0.0.1:9000")
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

__all__ = ["RunConsole", "StageHandle", "format_duration", "format_table", "quiet_runtime_env", "summarize_exception"]

# Consoles entered in this process, innermost last: a console entered inside another writes to the outer one's
# terminal, not to the outer one's log file (which is what fd 1 is by then).
_ACTIVE: list[RunConsole] = []
_ACTIVE_LOCK = threading.Lock()

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def quiet_runtime_env() -> dict[str, str]:
    """Set (only where unset) environment variables that cut runtime chatter without changing results.

    Returns the variables this call set. Call it before importing ray / vllm / transformers / deepspeed (some read
    their settings at import) and before ``ray.init`` (workers inherit the driver's environment).
    """
    defaults = {
        # Ray: no usage-stats prompt/banner; fold repeated worker lines (the default, made explicit).
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "1",
        # Ray Data: no rich/tqdm progress bars (they redraw many times a second and fill a log file with
        # carriage-return frames); the per-dataset "execution finished" summaries still go to the log.
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        # transformers / datasets / huggingface_hub: no tqdm bars (loading checkpoints, map(), downloads).
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        # tokenizers: no "process just got forked ... disabling parallelism" warning on every fork.
        "TOKENIZERS_PARALLELISM": "false",
        # Python: flush prints at once, so what lands in the log is in order with native output.
        "PYTHONUNBUFFERED": "1",
    }
    done = {}
    for key, value in defaults.items():
        if key not in os.environ:
            os.environ[key] = value
            done[key] = value
    return done


def format_duration(seconds: float) -> str:
    """``12.3 s`` under a minute, ``4 min 12 s`` above, ``1 h 02 min`` above an hour."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    total = int(round(seconds))
    if total < 3600:
        return f"{total // 60} min {total % 60} s"
    return f"{total // 3600} h {total % 3600 // 60:02d} min"


def _numeric(cell: str) -> bool:
    text = cell.strip().rstrip("%x").replace(",", "").replace("+", "", 1).replace("-", "", 1).replace(".", "", 1)
    return text.isdigit()


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: columns padded to their widest cell, numbers right-aligned, a dashed rule under the
    header. Cells are passed through ``str``; a short row is padded with empty cells."""
    ncols = max([len(headers), *(len(r) for r in rows)]) if rows or headers else 0
    head = [str(h) for h in headers] + [""] * (ncols - len(headers))
    body = [[str(c) for c in r] + [""] * (ncols - len(r)) for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(ncols)]
    right = [bool(body) and all(_numeric(r[i]) or not r[i].strip() for r in body) and
             any(r[i].strip() for r in body) for i in range(ncols)]

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return "  ".join(out).rstrip()

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(r) for r in body)])


class StageHandle:
    """Yielded by :meth:`RunConsole.stage`: ``done(text)`` sets what the closing line reports."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.result: str | None = None
        self.started = time.monotonic()

    def done(self, result: str) -> None:
        self.result = result

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


class RunConsole:
    """Context manager: fds 1/2, ``logging`` and ``warnings`` go to ``log_path``; ``say``/``stage`` reach the
    terminal.

    On enter it opens ``log_path`` (append), keeps a private dup of the terminal's fd 1, then ``os.dup2``-s the log
    file onto fds 1 and 2. On exit it flushes, puts fds 1 and 2 back, restores the logging/warnings setup and closes
    the file, also when the body raised. Entering the same console again while it is entered is a no-op (counted);
    a console entered inside another one writes to the outer one's terminal and restores the outer redirect on
    exit. Outside the ``with`` block ``say`` writes to ``sys.stdout``.
    """

    def __init__(self, log_path: str | Path, *, heartbeat_s: float = 30.0) -> None:
        self.log_path = Path(log_path)
        self.heartbeat_s = heartbeat_s
        self._depth = 0
        self._lock = threading.RLock()
        self._log: io.TextIOWrapper | None = None
        self._term: io.TextIOWrapper | None = None
        self._saved_fds: dict[int, int] = {}
        self._saved_logging: tuple[list[logging.Handler], int] | None = None
        self._saved_capture = False
        self._handler: logging.Handler | None = None

    # ------------------------------------------------------------------------------------------ enter / exit

    def __enter__(self) -> RunConsole:
        with self._lock:
            self._depth += 1
            if self._depth > 1:
                return self
            try:
                self._redirect()
            except BaseException:
                self._restore()
                self._depth -= 1
                raise
        with _ACTIVE_LOCK:
            _ACTIVE.append(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._lock:
            if self._depth == 0:
                return
            self._depth -= 1
            if self._depth > 0:
                return
            if exc is not None and not getattr(exc, "_finemed_console_reported", False):
                # Not reported by a stage: say so here, while the terminal and the log are still ours.
                try:
                    self._report_failure(None, exc, None)
                except Exception:  # never mask the original exception
                    pass
            with _ACTIVE_LOCK:
                if self in _ACTIVE:
                    _ACTIVE.remove(self)
            self._restore()

    def _redirect(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        _flush_std()
        self._log = open(self.log_path, "a", buffering=1, encoding="utf-8", errors="replace")
        with _ACTIVE_LOCK:
            outer = _ACTIVE[-1] if _ACTIVE else None
        term_src = outer._term.fileno() if outer is not None and outer._term is not None else 1
        self._term = open(os.dup(term_src), "w", buffering=1, encoding="utf-8", errors="replace", closefd=True)
        for fd in (1, 2):
            self._saved_fds[fd] = os.dup(fd)
        for fd in (1, 2):
            os.dup2(self._log.fileno(), fd)
        root = logging.getLogger()
        self._saved_logging = (list(root.handlers), root.level)
        self._handler = logging.StreamHandler(self._log)
        self._handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        for h in list(root.handlers):
            root.removeHandler(h)
        root.addHandler(self._handler)
        root.setLevel(logging.INFO)
        self._saved_capture = getattr(logging, "_warnings_showwarning", None) is not None
        logging.captureWarnings(True)
        self._log_line(f"==== {self.__class__.__name__} started (pid {os.getpid()}, log {self.log_path}) ====")

    def _restore(self) -> None:
        """Undo whatever ``_redirect`` did (also a partial one); each step on its own so one failure skips none."""
        try:
            _flush_std()
        except Exception:
            pass
        if self._handler is not None:
            root = logging.getLogger()
            root.removeHandler(self._handler)
            if self._saved_logging is not None:
                handlers, level = self._saved_logging
                for h in handlers:
                    if h not in root.handlers:
                        root.addHandler(h)
                root.setLevel(level)
            self._handler = None
            self._saved_logging = None
            if not self._saved_capture:
                logging.captureWarnings(False)
        for fd, saved in list(self._saved_fds.items()):
            try:
                os.dup2(saved, fd)
            finally:
                os.close(saved)
                del self._saved_fds[fd]
        for name in ("_term", "_log"):
            f = getattr(self, name)
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
                setattr(self, name, None)

    # ------------------------------------------------------------------------------------------------ output

    def _log_line(self, text: str) -> None:
        if self._log is None:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with self._lock:
            for line in text.splitlines() or [""]:
                self._log.write(f"{stamp} [console] {line}\n")
            self._log.flush()

    def say(self, text: str) -> None:
        """Write ``text`` (one or more lines) to the terminal, and to the log with a timestamp."""
        with self._lock:
            if self._term is None:
                print(text, flush=True)
                return
            self._term.write(text + "\n")
            self._term.flush()
            self._log_line(text)

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
        """Format with :func:`format_table`, ``say`` it, return it."""
        text = format_table(headers, rows)
        self.say(text)
        return text

    format_table = staticmethod(format_table)

    def log(self, text: str) -> None:
        """Write ``text`` to the log only (timestamped), e.g. a full result dump."""
        if self._log is None:
            print(text, file=sys.stderr, flush=True)
        else:
            self._log_line(text)

    # ------------------------------------------------------------------------------------------------ stages

    @contextmanager
    def stage(self, label: str, what: str) -> Iterator[StageHandle]:
        """``[label] what ...`` now; ``[label] done in T: result`` or ``[label] FAILED after T: ...`` at the end.

        While the body runs longer than ``heartbeat_s``, a daemon thread says ``[label] still running (T) ...``
        every ``heartbeat_s``. A failure's traceback goes to the log only; the exception is re-raised.
        """
        handle = StageHandle(label)
        self.say(f"[{label}] {what} ...")
        stop = threading.Event()
        beat = None
        if self.heartbeat_s and self.heartbeat_s > 0:
            beat = threading.Thread(target=self._heartbeat, args=(handle, stop), daemon=True,
                                    name=f"console-heartbeat-{label}")
            beat.start()
        try:
            yield handle
        except BaseException as exc:
            stop.set()
            if not getattr(exc, "_finemed_console_reported", False):
                self._report_failure(label, exc, handle.elapsed)
            raise
        else:
            stop.set()
            tail = f": {handle.result}" if handle.result else ""
            self.say(f"[{label}] done in {format_duration(handle.elapsed)}{tail}")
        finally:
            stop.set()
            if beat is not None:
                beat.join(timeout=5)

    def _heartbeat(self, handle: StageHandle, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            elapsed = int(handle.elapsed)
            self.say(f"[{handle.label}] still running ({elapsed // 60} min {elapsed % 60} s) ...")

    def _report_failure(self, label: str | None, exc: BaseException, elapsed: float | None) -> None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.log(f"{'[' + label + '] ' if label else ''}traceback:\n{tb}")
        summary = summarize_exception(exc)
        where = f" (full traceback in {self.log_path})" if self._log is not None else ""
        prefix = f"[{label}] " if label else ""
        after = f" after {format_duration(elapsed)}" if elapsed is not None else ""
        verb = "interrupted" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        self.say(f"{prefix}{verb}{after}: {summary}{where}")
        try:
            exc._finemed_console_reported = True  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            pass


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def summarize_exception(exc: BaseException) -> str:
    """``Type: first line of the message``, without terminal colour codes. For Ray's task errors (``cause``
    holds the worker's exception; the message starts with ``ray::task() (pid=..., ip=...)``) the cause's message."""
    cause = getattr(exc, "cause", None)
    source = cause if isinstance(cause, BaseException) else exc
    lines = [ln.strip() for ln in _ANSI.sub("", str(source)).splitlines() if ln.strip()]
    name = _ANSI.sub("", type(exc).__name__)
    return f"{name}: {lines[0]}" if lines else name


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
