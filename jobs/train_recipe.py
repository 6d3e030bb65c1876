"""Run a multi-stage training recipe (e.g. FineMedLM's three-stage curriculum SFT).

    python -m jobs.train_recipe --config configs/recipe_curriculum_tiny.yaml [key=value ...] [--only stage2]
    ray job submit --working-dir . -- python -m jobs.train_recipe --config configs/recipe_curriculum_8b.yaml
"""

from __future__ import annotations

import argparse

from finemed_ray.config import load_config
from finemed_ray.train.recipe import RecipeConfig, run_recipe
from jobs._cli import main


def run(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="finemed-ray training recipe (stages in sequence)")
    parser.add_argument("--config", required=True, help="recipe YAML (see configs/recipe_*.yaml)")
    parser.add_argument("--only", action="append", help="run only this stage (repeatable)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. defaults.train.epochs=2")
    ns = parser.parse_args(argv)
    recipe = load_config(RecipeConfig, ns.config, ns.overrides)
    return run_recipe(recipe, only=ns.only)


if __name__ == "__main__":
    raise SystemExit(main(run))
