"""Which config class a YAML in ``configs/`` validates against, by its file-name prefix (``sft_tiny.yaml`` ->
``sft``). Later stages add themselves here; ``tests/test_config.py`` loads every file through this table."""

from __future__ import annotations

from pathlib import Path

from finemed_ray.errors import ConfigError


def config_classes() -> dict[str, type]:
    from finemed_ray.synth.config import SynthJobConfig
    from finemed_ray.train.recipe import RecipeConfig
    from finemed_ray.ttt.config import IndexJobConfig
    from finemed_ray.eval.config import EvalJobConfig
    from finemed_ray.serving.config import ServeConfig
    from finemed_ray.train.stages import STAGES

    stages = {kind: stage.config_class() for kind, stage in STAGES.items()}
    return {**stages, "recipe": RecipeConfig, "synth": SynthJobConfig,
            "eval": EvalJobConfig, "index": IndexJobConfig, "serve": ServeConfig}


def config_class_for(path: str | Path) -> type:
    stem = Path(path).stem
    for prefix, cls in sorted(config_classes().items(), key=lambda kv: -len(kv[0])):
        if stem == prefix or stem.startswith(prefix + "_"):
            return cls
    raise ConfigError(f"{path}: no config schema for this file name (known prefixes: {sorted(config_classes())})")
