"""Ray cluster helpers shared by every job: join the cluster a job was submitted to, or start a local one whose
workers get the driver's environment without it ever reaching Ray's logs."""

from __future__ import annotations

import os

from finemed_ray import worker_env
from finemed_ray.errors import ConfigError

# Environment forwarded to a local Ray cluster's workers so they reach the same storage and stay offline: through a
# private file, never the (logged) runtime env (finemed_ray/worker_env.py).
FORWARDED_ENV_PREFIXES = ("AWS_", "HF_", "FINEMED_", "DS_", "TRANSFORMERS_", "VLLM_")


def ensure_ray_address(address: str | None, local_num_cpus: int) -> None:
    """Join the job's cluster (``ray job submit`` sets RAY_ADDRESS), ``address``, or start a local one."""
    import ray

    if ray.is_initialized():
        _check_same_cluster(address, ray.get_runtime_context().gcs_address)
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # Ray logs runtime envs, so the forwarded variables (secrets among them) go in a private file and only its path
    # in the runtime env; the setup hook loads it in every worker and installs finemed_ray/ray_compat.py's fixes.
    env_file = worker_env.write_env_file(worker_env.forwarded(os.environ, FORWARDED_ENV_PREFIXES))
    # address="local": always a fresh cluster, never a stray `ray start` cluster found on this machine.
    ray.init(address="local", num_cpus=local_num_cpus, include_dashboard=False,
             runtime_env={"env_vars": {worker_env.FILE_VAR: env_file},
                          "worker_process_setup_hook": worker_env.SETUP_HOOK})


def _check_same_cluster(address: str | None, connected: str) -> None:
    """This process already runs Ray (a caller's ``ray.init``, a notebook): a ``ray.address`` that names another
    cluster must not be ignored silently, or the job would run where the user did not send it. Only the port is
    compared: one cluster may be reached by several host names or interfaces, but another port is another cluster."""
    if not address or address in ("auto", "local") or address.startswith("ray://"):
        return  # "auto" / "local" / a Ray Client address: nothing to compare with the GCS address
    want, have = address.rsplit(":", 1)[-1], connected.rsplit(":", 1)[-1]
    if want != have:
        raise ConfigError(f"ray.address={address!r} names another cluster than the one this process is already "
                          f"connected to ({connected}); call ray.shutdown() first, or drop ray.address to use the "
                          f"connected cluster")


__all__ = ["FORWARDED_ENV_PREFIXES", "ensure_ray_address"]
