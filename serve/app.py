"""Import path of the Serve application, for ``serve run`` / ``serve deploy`` and KubeRay's RayService.

    serve run serve.app:app_builder config=configs/serve_tiny.yaml
    # RayService serveConfigV2: import_path: serve.app:app_builder, args: {config: ..., overrides: [k=v, ...]}

The builder validates the config (unknown keys and bad values fail before any replica starts) and returns the
bound application of ``finemed_ray.serving.app.build_app``.
"""

from __future__ import annotations

from typing import Any


def app_builder(args: dict[str, Any]):
    from finemed_ray.config import load_config
    from finemed_ray.serving.app import build_app
    from finemed_ray.serving.config import ServeConfig

    config = args.get("config") or "configs/serve_tiny.yaml"
    overrides = args.get("overrides") or []
    if isinstance(overrides, str):  # `serve run ... overrides=a=1,b=2` arrives as one string
        overrides = [o for o in overrides.split(",") if o]
    return build_app(load_config(ServeConfig, config, list(overrides)))
