"""Serving: start the OpenAI-compatible Serve application and keep it up; see how its deployments are doing.

    python -m jobs.serve --config configs/serve_tiny.yaml model.path=s3://.../export
    python -m jobs.serve --config configs/serve_tiny.yaml ttt.enabled=true ttt.index=s3://.../index
    python -m jobs.serve status [--address HOST:PORT] [--name APP]

Start prints the base URL once every replica is ready, with the Ray cluster's address and the status command for it;
Ctrl-C shuts the application down. In a cluster prefer ``serve deploy`` / the RayService in deploy/kuberay
(``serve.app:app_builder``).

``status`` prints, as JSON, what ``serve status`` prints (applications, their deployments, replica counts per state,
proxies), but joins the cluster as a Ray driver and asks the Serve controller (``serve.status()``) instead of going
through the dashboard's HTTP API: ``serve status`` fails where the dashboard is off (``python -m jobs.serve`` starts
its local cluster without one). With token authentication (Ray 2.60's default) the token comes from where Ray reads
it (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, with ``RAY_AUTH_MODE=token``); it is never
printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import logging
import os
import signal
import sys
import threading
from typing import Any

from finemed_ray.errors import FinemedError
from finemed_ray.serving.config import ServeConfig
from jobs._cli import main, parse

STATUS_USAGE = "python -m jobs.serve status"


def start(cfg: ServeConfig, blocking: bool = True) -> dict:
    import ray
    from ray import serve

    from finemed_ray.serving.app import build_app
    from finemed_ray.cluster import ensure_ray_address

    # ray.address, RAY_ADDRESS (a RayService / `ray job submit`), else a fresh local cluster -- never address="auto",
    # which can pick up a stale cluster address left in /tmp/ray and hang.
    ensure_ray_address(cfg.ray.address, cfg.ray.local_num_cpus)
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(build_app(cfg), name=cfg.name, route_prefix=cfg.http.route_prefix)
    prefix = cfg.http.route_prefix.rstrip("/")
    url = f"http://{cfg.http.host}:{cfg.http.port}{prefix}/v1"
    cluster = ray.get_runtime_context().gcs_address
    print(f"serving {cfg.model.id} at {url} (Ray cluster {cluster}; status: {STATUS_USAGE} --address {cluster})",
          flush=True)
    if blocking:
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()
        serve.shutdown()
    return {"url": url, "model": cfg.model.id, "ray_address": cluster}


# ================================================================================================ status
def _plain(value: Any) -> Any:
    """serve.status()'s dataclasses and enums -> JSON values."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(_plain(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _scrub(text: str) -> str:
    """A message without the token in it (should Ray ever echo it)."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    return text.replace(token, "<RAY_AUTH_TOKEN>") if token else text


def _connect(address: str) -> None:
    import ray

    if address.startswith(("http://", "https://")):
        raise FinemedError(f"--address {address}: that is a dashboard URL (what `ray job submit` and `serve status` "
                           "use); give the cluster's address, host:port of its GCS (`python -m jobs.serve` prints "
                           "it at start; `ray start --head` prints it too)")
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as e:  # noqa: BLE001 - every way of not getting in is one line for the user
        from ray.exceptions import AuthenticationError

        texts, cur = [], e
        while cur is not None and len(texts) < 5:
            texts.append(str(cur))
            cur = cur.__cause__
        what = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        if any("InvalidAuthToken" in t or "Unauthenticated" in t for t in texts):
            what = "the cluster refused this process's authentication token (missing or incorrect)"
        hint = ""
        if isinstance(e, (AuthenticationError, ConnectionError)):
            # A refused token surfaces as "Failed to connect" after Ray's retries (~30 s).
            hint = ("; check the address and, with token authentication (Ray's default since 2.60), the token: "
                    "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (or ~/.ray/auth_token)")
        raise FinemedError(_scrub(f"cannot join the Ray cluster at {address}: {what}{hint}")) from None


def status(argv: list[str]) -> dict:
    """The state of Serve on a running cluster (module docstring): applications, deployments, replicas, proxies."""
    parser = argparse.ArgumentParser(
        prog=STATUS_USAGE, description="Applications, deployments and replica states of Ray Serve on a cluster, "
        "without the dashboard (works with Ray token authentication).")
    parser.add_argument("--address", help="the Ray cluster (host:port of its GCS, or ray://host:10001); default "
                        "RAY_ADDRESS, else the cluster this machine runs ('auto')")
    parser.add_argument("--name", help="only this application")
    ns = parser.parse_args(argv)
    address = ns.address or os.environ.get("RAY_ADDRESS") or "auto"
    _connect(address)
    import ray
    from ray import serve

    try:
        state = _plain(serve.status())
    finally:
        ray.shutdown()
    apps = state.get("applications", {})
    if ns.name is not None:
        if ns.name not in apps:
            raise FinemedError(f"--name {ns.name}: no such Serve application on {address} "
                               f"(running: {', '.join(sorted(apps)) or 'none'})")
        apps = {ns.name: apps[ns.name]}
    return {"ray_address": address, "serve_running": bool(state.get("proxies") or apps), "applications": apps,
            "proxies": state.get("proxies", {}), "target_capacity": state.get("target_capacity")}


def run(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["status"]:
        return status(argv[1:])
    cfg = parse(ServeConfig, "finemed-ray serving (Ray Serve, OpenAI-compatible, TTT per request); "
                f"`{STATUS_USAGE} --help`: the deployment's state", argv)
    return start(cfg)


if __name__ == "__main__":
    raise SystemExit(main(run))
