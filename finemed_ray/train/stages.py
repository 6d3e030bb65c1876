"""The table of training stages. Each kind names its config class and its job class; the recipe, the
``jobs.<kind>`` entrypoints and the config registry all read this table, so a new stage is one module (its
``XJobConfig`` and ``XJob``, see ``finemed_ray/train/grpo.py``), one entry here and one YAML in ``configs/``.

Classes are named by import path and loaded on use: reading the table imports neither torch nor TRL.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stage:
    kind: str
    config: str  # "module:Class" of the stage's typed config (validated YAML)
    job: str  # "module:Class" with setup() -> run() -> save() -> summary dict
    title: str  # one line for --help and logs

    @staticmethod
    def _load(path: str) -> Any:
        module, _, name = path.partition(":")
        return getattr(importlib.import_module(module), name)

    def config_class(self) -> type:
        return self._load(self.config)

    def job_class(self) -> type:
        return self._load(self.job)


STAGES: dict[str, Stage] = {s.kind: s for s in (
    Stage("sft", "finemed_ray.train.configs:SFTJobConfig", "finemed_ray.train.sft:SFTJob",
          "finemed-ray SFT (Ray Train + DeepSpeed ZeRO-3 + TRL)"),
    Stage("dpo", "finemed_ray.train.configs:DPOJobConfig", "finemed_ray.train.sft:DPOJob",
          "finemed-ray DPO (Ray Train + DeepSpeed ZeRO-3 + TRL)"),
    Stage("grpo", "finemed_ray.train.grpo:GRPOJobConfig", "finemed_ray.train.grpo:GRPOJob",
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
