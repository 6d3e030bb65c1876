"""jobs/preflight.py: `make install` / `make demo` stop early, with what to install, when no C++ compiler exists."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "jobs" / "preflight.py"


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--venv", str(ROOT / ".venv"), *args], env=env,
                          capture_output=True, text=True, timeout=180)


def test_missing_compiler_fails_and_names_gxx(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC")}
    env["PATH"] = str(tmp_path)  # an empty dir: no c++, g++ or anything else
    proc = _run(env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "no C++ compiler" in proc.stderr and "'c++'" in proc.stderr
    assert "apt-get install g++" in proc.stderr and "dnf install gcc-c++" in proc.stderr
    assert "xcode-select --install" in proc.stderr


def test_cxx_env_var_is_what_is_checked(tmp_path: Path) -> None:
    env = {**os.environ, "CXX": "no-such-compiler-xyz"}
    proc = _run(env)
    assert proc.returncode == 1
    assert "'no-such-compiler-xyz' ($CXX)" in proc.stderr


def test_broken_compiler_is_caught(tmp_path: Path) -> None:
    fake = tmp_path / "c++"
    fake.write_text("#!/bin/sh\necho 'fatal error: vector: No such file or directory' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CXX"}
    env["PATH"] = f"{tmp_path}{os.pathsep}{env.get('PATH', '')}"
    proc = _run(env)
    assert proc.returncode == 1
    assert "cannot compile a small C++17 program" in proc.stderr and "vector" in proc.stderr


def test_passes_with_the_real_path() -> None:
    assert shutil.which(os.environ.get("CXX") or "c++"), "this machine has no C++ compiler"
    proc = _run(dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("preflight: ok (C++ compiler ")
    quiet = _run(dict(os.environ), "--quiet")
    assert quiet.returncode == 0 and quiet.stdout == ""
