"""A training recipe: stages run in sequence, each starting from the previous stage's export.

FineMedLM-o1's recipe: three curriculum SFT stages (all medical data -> one primary department -> one secondary
department), reasoning SFT on long Thought/Summarization answers, then DPO (or GRPO: ``kind: grpo``). A recipe is a
shared ``defaults`` config plus per-stage overrides; every stage is an ordinary ``SFTJob``/``DPOJob``/``GRPOJob`` (so
each also runs alone through ``jobs.sft``/``jobs.dpo``/``jobs.grpo``) and writes its own export with its parent
recorded.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from pydantic import Field, field_validator

from finemed_ray import storage
from finemed_ray.config import StrictModel, validate
from finemed_ray.errors import ConfigError
from finemed_ray.train.configs import SFTJobConfig
from finemed_ray.train.stages import STAGES, run_stage


STAGE_KINDS = {kind: stage.config_class() for kind, stage in STAGES.items()}  # kind -> config class


class StageSpec(StrictModel):
    name: str = Field(description="Stage name; run name <recipe>-<stage> and export <export_root>/<stage>.")
    kind: str = Field("sft", description="Stage type: 'sft' (curriculum or reasoning SFT), 'dpo' or 'grpo'.")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Nested SFT config keys changed for this stage, e.g. data.department."
    )

    @field_validator("name")
    @classmethod
    def _safe(cls, v: str) -> str:
        if not v or "/" in v or ".." in v:
            raise ValueError("must be a plain name without '/' or '..'")
        return v

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v not in STAGE_KINDS:
            raise ValueError(f"unsupported stage kind {v!r}; supported: {sorted(STAGE_KINDS)}")
        return v


class RecipeConfig(StrictModel):
    name: str = Field(description="Recipe name; prefixes every stage's run name.")
    base_model: str = Field(description="Model the first stage starts from (local, s3:// or hub id).")
    export_root: str = Field(description="Stage exports go to <export_root>/<stage name> (local or s3://).")
    defaults: dict[str, Any] = Field(
        description="Config shared by all stages (keys of configs/sft_*.yaml, minus model/output; dpo/grpo keys "
        "go in a DPO/GRPO stage's overrides)."
    )
    stages: list[StageSpec] = Field(min_length=1, description="Stages in order; each starts from the last export.")

    def stage_configs(self) -> list[SFTJobConfig]:  # DPOJobConfig / GRPOJobConfig for kinds 'dpo' / 'grpo'

        """Validate every stage up front, so a typo in stage 3 fails before stage 1 trains."""
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stages: duplicate stage names {names}")
        out, parent = [], self.base_model
        for i, stage in enumerate(self.stages):
            data = copy.deepcopy(self.defaults)
            _deep_update(data, stage.overrides)
            data.setdefault("run", {})["name"] = f"{self.name}-{stage.name}"
            data.setdefault("model", {})["path"] = parent
            data.setdefault("output", {})["export_path"] = storage.join(self.export_root, stage.name)
            cfg = validate(STAGE_KINDS[stage.kind], data, source=f"stages[{i}] ({stage.name})")
            out.append(cfg)
            parent = cfg.output.export_path
        return out


def _deep_update(base: dict, update: dict) -> None:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def run_recipe(recipe: RecipeConfig, only: list[str] | None = None) -> dict[str, Any]:
    """Run the stages (all, or the named ones: a later stage alone needs its parent's export to exist)."""
    t0 = time.time()
    results = []
    for spec, cfg in zip(recipe.stages, recipe.stage_configs()):
        if only and spec.name not in only:
            continue
        if spec is not recipe.stages[0]:
            _check_parent(cfg)  # before any compute: a missing or half-written parent export
        results.append(run_stage(spec.kind, cfg, label=f"{spec.kind}:{spec.name}")[1])
    return {"recipe": recipe.name, "stages": results, "seconds": round(time.time() - t0, 3)}


def _check_parent(cfg: SFTJobConfig) -> None:
    """A stage's parent is the previous stage's export; refuse to start from an incomplete one."""
    if not storage.is_complete(cfg.model.path):
        raise ConfigError(f"stage {cfg.run.name}: its parent export {cfg.model.path} is missing or incomplete")
