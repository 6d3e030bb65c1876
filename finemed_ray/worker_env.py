"""What a local Ray cluster's workers get from the driver's environment, without a secret ever entering a log.

Ray logs every ``runtime_env`` (``runtime_env_agent.log``, the dashboard, job records), so values passed as
``runtime_env["env_vars"]`` must be harmless. :func:`split_env` keeps the forwarded variables (``AWS_*``, ``HF_*``,
``FINEMED_*``, ...) whose *names* do not look secret (:func:`is_secret`: ``SECRET``, ``TOKEN``, ``PASSWORD``,
``KEY``, ``CREDENTIAL`` in the name); the secret ones go into a private file (mode 0600, removed when the driver
exits) whose *path* travels in ``FINEMED_WORKER_ENV_FILE``. :func:`setup_worker`, the
``worker_process_setup_hook`` of the cluster, reads that file in every worker process (``os.environ.setdefault``:
a value the worker already has wins) and installs :mod:`finemed_ray.ray_compat`. This is how KubeRay Secrets reach
pods too: through the environment or a mounted file, never through a logged runtime env.
"""

from __future__ import annotations

import atexit
import json
import os
import tempfile
from collections.abc import Iterable, Mapping

FILE_VAR = "FINEMED_WORKER_ENV_FILE"
SETUP_HOOK = "finemed_ray.worker_env.setup_worker"
_SECRET_MARKERS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL", "AUTH")


def is_secret(name: str) -> bool:
    """Whether an environment variable's name says it holds a secret (AWS_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID,
    AWS_SESSION_TOKEN, HF_TOKEN, FINEMED_API_KEY, ...). Errs on the side of secret."""
    upper = name.upper()
    return any(marker in upper for marker in _SECRET_MARKERS)


def split_env(environ: Mapping[str, str], prefixes: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``(plain, secret)``: the variables with one of ``prefixes``, split by :func:`is_secret`."""
    chosen = {k: v for k, v in environ.items() if k.startswith(tuple(prefixes))}
    plain = {k: v for k, v in chosen.items() if not is_secret(k)}
    return plain, {k: v for k, v in chosen.items() if is_secret(k)}


def write_env_file(secret: Mapping[str, str]) -> str:
    """Write ``secret`` to a new private file (0600 in a private 0700 directory); removed at interpreter exit."""
    directory = tempfile.mkdtemp(prefix="finemed-worker-env-")
    fd, path = tempfile.mkstemp(dir=directory, suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(dict(secret), fh)

    def _remove() -> None:
        for p in (path, directory):
            try:
                os.remove(p) if p == path else os.rmdir(p)
            except OSError:
                pass

    atexit.register(_remove)
    return path


def load_env_file() -> int:
    """In a worker: set the variables of the file named by ``FINEMED_WORKER_ENV_FILE`` that are not set yet;
    returns how many were set (0 without a file)."""
    path = os.environ.get(FILE_VAR)
    if not path or not os.path.exists(path):
        return 0
    with open(path) as fh:
        values = json.load(fh)
    n = 0
    for key, value in values.items():
        if key not in os.environ:
            os.environ[key] = value
            n += 1
    return n


def setup_worker() -> None:
    """``runtime_env["worker_process_setup_hook"]`` of local clusters: secrets from the private file, Ray fixes."""
    from finemed_ray import ray_compat

    load_env_file()
    ray_compat.install()
