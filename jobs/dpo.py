"""DPO stage (chosen = reasoning answer, rejected = direct answer) against a frozen, ZeRO-3-sharded reference.

    python -m jobs.dpo --config configs/dpo_tiny.yaml model.path=s3://.../exports/reasoning data.path=s3://...
    ray job submit --working-dir . -- python -m jobs.dpo --config configs/dpo_tiny.yaml ...
"""

from __future__ import annotations

from jobs._cli import main, parse
from finemed_ray.train.configs import DPOJobConfig
from finemed_ray.train.sft import DPOJob


def run(argv: list[str] | None = None) -> dict:
    cfg = parse(DPOJobConfig, "finemed-ray DPO (Ray Train + DeepSpeed ZeRO-3 + TRL)", argv)
    job = DPOJob(cfg).setup()
    job.run()
    return job.save()


if __name__ == "__main__":
    raise SystemExit(main(run))
