"""jobs/_console.py: our lines on the terminal, all runtime noise (native, children, warnings, logging,
tracebacks) in the log file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jobs._console import RunConsole, format_duration, format_table, quiet_runtime_env

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    r"""
    import logging, os, subprocess, sys, time, warnings
    from jobs._console import RunConsole

    log_path = sys.argv[1]
    print("BEFORE-ENTER", flush=True)
    con = RunConsole(log_path, heartbeat_s=0.2)
    with con:
        con.say("OURS: hello")
        print("NOISE-print")
        print("NOISE-print-stderr", file=sys.stderr)
        os.write(1, b"NOISE-fd1\n")
        os.write(2, b"NOISE-fd2\n")
        subprocess.run([sys.executable, "-c",
                        "import os, sys; print('NOISE-child-out'); os.write(2, b'NOISE-child-err\\n')"], check=True)
        warnings.warn("NOISE-warning")
        logging.getLogger("some.lib").info("NOISE-logging")
        with con.stage("1/2", "OURS: slow stage") as h:
            time.sleep(0.7)
            h.done("OURS: result text")
        with con:  # re-entrant: a no-op
            con.say("OURS: nested")
        try:
            with con.stage("2/2", "OURS: failing stage"):
                print("NOISE-inside-stage")
                raise ValueError("OURS: bad thing\nsecond line NOISE-second")
        except ValueError:
            pass
        con.table(["name", "acc"], [["base", "0.25"], ["dpo-final", "0.875"]])
    print("AFTER-EXIT", flush=True)
    os.write(1, b"AFTER-EXIT-fd1\n")
    """
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, str]:
    tmp = tmp_path_factory.mktemp("console")
    script = tmp / "script.py"
    script.write_text(SCRIPT)
    log = tmp / "logs" / "run.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(log)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, log.read_text()


def test_terminal_has_only_our_lines(run: tuple[subprocess.CompletedProcess, str]) -> None:
    proc, _ = run
    out = proc.stdout
    assert "NOISE" not in out and "NOISE" not in proc.stderr
    assert "Traceback" not in out and "Traceback" not in proc.stderr
    assert "UserWarning" not in out
    lines = out.splitlines()
    assert lines[0] == "BEFORE-ENTER" and lines[-2:] == ["AFTER-EXIT", "AFTER-EXIT-fd1"]  # fds restored
    assert "OURS: hello" in lines and "OURS: nested" in lines
    assert "[1/2] OURS: slow stage ..." in lines
    assert any(line.startswith("[1/2] done in ") and line.endswith(" s: OURS: result text") for line in lines)
    assert any(line.startswith("[1/2] still running (0 min 0 s) ...") for line in lines)  # heartbeat
    failed = [line for line in lines if line.startswith("[2/2] FAILED after ")]
    assert len(failed) == 1
    assert ": ValueError: OURS: bad thing (full traceback in " in failed[0]
    assert failed[0].endswith("logs/run.log)")
    # The table: aligned columns, numbers right-aligned.
    i = lines.index(next(line for line in lines if line.startswith("name")))
    assert lines[i:i + 4] == ["name         acc", "---------  -----", "base        0.25", "dpo-final  0.875"]


def test_log_has_the_noise_and_our_lines(run: tuple[subprocess.CompletedProcess, str]) -> None:
    _, log = run
    for noise in ("NOISE-print", "NOISE-print-stderr", "NOISE-fd1", "NOISE-fd2", "NOISE-child-out",
                  "NOISE-child-err", "NOISE-warning", "NOISE-logging", "NOISE-inside-stage", "NOISE-second"):
        assert noise in log, noise
    assert "UserWarning" in log and "INFO some.lib: NOISE-logging" in log
    assert "Traceback (most recent call last)" in log and 'raise ValueError("OURS: bad thing' in log
    # our lines, timestamped
    assert "[console] OURS: hello" in log and "[console] [2/2] FAILED after" in log
    assert "BEFORE-ENTER" not in log and "AFTER-EXIT" not in log


def test_restores_logging_and_fds_in_process(tmp_path: Path) -> None:
    import logging

    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    con = RunConsole(tmp_path / "a.log", heartbeat_s=0)
    with pytest.raises(RuntimeError):
        with con:
            with con.stage("x", "boom"):
                raise RuntimeError("boom")
    assert (list(root.handlers), root.level) == before
    with con:  # usable again after exit
        os.write(2, b"second-run\n")
    text = (tmp_path / "a.log").read_text()
    assert "RuntimeError: boom" in text and "second-run" in text
    assert text.count("Traceback") == 1  # the stage reported it; __exit__ did not repeat it


def test_format_table_and_duration() -> None:
    t = format_table(["a", "long header", "n"], [["x", "y", "1"], ["longer", "", "-2.5"], ["z"]])
    rows = t.splitlines()
    assert rows[0] == "a       long header     n"
    assert rows[1] == "------  -----------  ----"
    assert rows[2] == "x       y               1"
    assert rows[3] == "longer               -2.5"
    assert rows[4] == "z"
    assert RunConsole.format_table(["h"], [["v"]]) == "h\n-\nv"
    assert format_duration(12.34) == "12.3 s" and format_duration(252) == "4 min 12 s"
    assert format_duration(3725) == "1 h 02 min"


def test_quiet_runtime_env_respects_user_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    monkeypatch.delenv("RAY_DATA_DISABLE_PROGRESS_BARS", raising=False)
    set_now = quiet_runtime_env()
    assert os.environ["RAY_DEDUP_LOGS"] == "0" and "RAY_DEDUP_LOGS" not in set_now
    assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
    for key in set_now:
        monkeypatch.delenv(key)


def test_summarize_exception_uses_the_cause_and_drops_colour_codes() -> None:
    from jobs._console import summarize_exception

    class RayTaskError(Exception):  # shaped like ray.exceptions.RayTaskError: cause = the worker's exception
        def __init__(self, cause: BaseException) -> None:
            super().__init__("\x1b[36mray::task()\x1b[39m (pid=1, ip=1.2.3.4)\n  File ...\nZeroDivisionError: x")
            self.cause = cause

    assert summarize_exception(RayTaskError(ZeroDivisionError("division by zero"))) == \
        "RayTaskError: division by zero"
    assert summarize_exception(ValueError("\n\x1b[1mbad\x1b[0m value\nmore")) == "ValueError: bad value"
    assert summarize_exception(KeyboardInterrupt()) == "KeyboardInterrupt"
