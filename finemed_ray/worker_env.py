"""What a local Ray cluster's workers get from the driver's environment, without a value ever entering a log.

Ray logs every ``runtime_env`` (``runtime_env_agent.log``, job records), so no forwarded *value* goes there: the
variables :data:`finemed_ray.cluster.FORWARDED_ENV_PREFIXES` selects (``AWS_*``, ``HF_*``, ``FINEMED_*``, ...,
secrets among them: ``AWS_SECRET_ACCESS_KEY``, ``HF_TOKEN``, API keys) are written to a private file (mode 0600 in a
0700 directory, removed when the driver exits) and only its *path* travels, in ``FINEMED_WORKER_ENV_FILE``.
:func:`setup_worker`, the cluster's ``worker_process_setup_hook``, reads the file in every worker process before
any task runs (``os.environ.setdefault``: a value the worker already has wins) and installs
:mod:`finemed_ray.ray_compat`. No guessing from variable names which values are secret. KubeRay Secrets reach pods
the same way: through the environment or a mounted file, never through a logged runtime env.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping

FILE_VAR = "FINEMED_WORKER_ENV_FILE"
SETUP_HOOK = "finemed_ray.worker_env.setup_worker"


def forwarded(environ: Mapping[str, str], prefixes: Iterable[str]) -> dict[str, str]:
    """The variables of ``environ`` whose names start with one of ``prefixes``."""
    return {k: v for k, v in environ.items() if k.startswith(tuple(prefixes))}


DIR_PREFIX = "finemed-worker-env-"


def remove_stale_env_dirs(root: str | None = None) -> list[str]:
    """Remove env-file directories whose driver is gone. ``atexit`` never runs for a SIGKILLed driver, so each
    directory carries its driver's PID in its name and the next driver on the machine removes it; returns them."""
    root = root or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(DIR_PREFIX):
            continue
        pid_text = name[len(DIR_PREFIX):].split("-", 1)[0]
        path = os.path.join(root, name)
        if not pid_text.isdigit() or _pid_alive(int(pid_text)) or not os.path.isdir(path):
            continue
        try:
            if os.stat(path).st_uid != os.getuid():
                continue  # another user's: not ours to remove
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def write_env_file(values: Mapping[str, str]) -> str:
    """Write ``values`` to a new private file (0600 in a private 0700 directory); removed at interpreter exit, or
    by the next driver's :func:`remove_stale_env_dirs` if this one is killed."""
    remove_stale_env_dirs()
    directory = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    fd, path = tempfile.mkstemp(dir=directory, suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(dict(values), fh)
    return path


def load_env_file() -> int:
    """In a worker: set the variables of the file named by ``FINEMED_WORKER_ENV_FILE`` that are not set yet;
    returns how many were set (0 without a file)."""
    path = os.environ.get(FILE_VAR)
    if not path or not os.path.exists(path):
        return 0
    with open(path) as fh:
        values = json.load(fh)
    missing = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(missing)
    return len(missing)


def setup_worker() -> None:
    """``runtime_env["worker_process_setup_hook"]`` of local clusters: the forwarded variables, then Ray's fixes."""
    from finemed_ray import ray_compat

    load_env_file()
    ray_compat.install()
