"""The training stages: one module each in this package, and their table. Each kind names its config class and
its job class; the recipe, the ``jobs.<kind>`` entrypoints and the config registry all read this table, so a new
stage is one module here (its ``XJobConfig``, an ``XJob`` extending ``finemed_ray.train.driver.StageJob`` and an
``XWorker`` extending ``finemed_ray.train.loop.StageWorker``; ``grpo.py`` is the fullest example), one entry in
``STAGES`` and one YAML in ``configs/``.

Classes are named by import path and loaded on use: reading the table imports neither torch nor TRL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finemed_ray.train.loop import load_class


@dataclass(frozen=True)
class Stage:
    kind: str
    config: str  # "module:Class" of the stage's typed config (validated YAML)
    job: str  # "module:Class" with setup() -> run() -> save() -> summary dict
    title: str  # one line for --help and logs

    def config_class(self) -> type:
        return load_class(self.config)

    def job_class(self) -> type:
        return load_class(self.job)


STAGES: dict[str, Stage] = {s.kind: s for s in (
    Stage("sft", "finemed_ray.train.configs:SFTJobConfig", "finemed_ray.train.stages.sft:SFTJob",
          "finemed-ray SFT (Ray Train + DeepSpeed ZeRO-3 + TRL)"),
    Stage("dpo", "finemed_ray.train.configs:DPOJobConfig", "finemed_ray.train.stages.dpo:DPOJob",
          "finemed-ray DPO (Ray Train + DeepSpeed ZeRO-3 + TRL)"),
    Stage("grpo", "finemed_ray.train.stages.grpo:GRPOJobConfig", "finemed_ray.train.stages.grpo:GRPOJob",
          "finemed-ray GRPO (Ray Train + DeepSpeed ZeRO-3 + TRL)"),
)}


def run_stage(kind: str, cfg: Any, label: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Run one stage from its validated config: ``(job, summary)``."""
    job = STAGES[kind].job_class()(cfg)
    if label:
        job.stage = label
    job.setup()
    job.run()
    return job, job.save()


__all__ = ["STAGES", "Stage", "run_stage"]
