"""Serving: start the OpenAI-compatible Serve application and keep it up.

    python -m jobs.serve --config configs/serve_tiny.yaml model.path=s3://.../export
    python -m jobs.serve --config configs/serve_tiny.yaml ttt.enabled=true ttt.index=s3://.../index

Prints the base URL once every replica is ready; Ctrl-C shuts the application down. In a cluster prefer
``serve deploy`` / the RayService in deploy/kuberay (``serve.app:app_builder``).
"""

from __future__ import annotations

import signal
import threading

from jobs._cli import main, parse
from finemed_ray.serving.config import ServeConfig


def start(cfg: ServeConfig, blocking: bool = True) -> dict:
    from ray import serve

    from finemed_ray.serving.app import build_app

    from finemed_ray.train.sft import ensure_ray_address

    # ray.address, RAY_ADDRESS (a RayService / `ray job submit`), else a fresh local cluster -- never address="auto",
    # which can pick up a stale cluster address left in /tmp/ray and hang.
    ensure_ray_address(cfg.ray.address, cfg.ray.local_num_cpus)
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(build_app(cfg), name=cfg.name, route_prefix=cfg.http.route_prefix)
    prefix = cfg.http.route_prefix.rstrip("/")
    url = f"http://{cfg.http.host}:{cfg.http.port}{prefix}/v1"
    print(f"serving {cfg.model.id} at {url}", flush=True)
    if blocking:
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()
        serve.shutdown()
    return {"url": url, "model": cfg.model.id}


def run(argv: list[str] | None = None) -> dict:
    cfg = parse(ServeConfig, "finemed-ray serving (Ray Serve, OpenAI-compatible, TTT per request)", argv)
    return start(cfg)


if __name__ == "__main__":
    raise SystemExit(main(run))
