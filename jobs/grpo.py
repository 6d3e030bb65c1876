"""GRPO stage (RLVR: rewards from the answer's correctness and the reasoning layout), TRL GRPOTrainer on Ray Train
under DeepSpeed ZeRO-3.

    python -m jobs.grpo --config configs/grpo_tiny.yaml model.path=s3://.../exports/reasoning data.path=s3://...
    ray job submit --working-dir . -- python -m jobs.grpo --config configs/grpo_tiny.yaml ...
"""

from __future__ import annotations

from jobs._cli import main, parse
from finemed_ray.train.grpo import GRPOJob, GRPOJobConfig


def run(argv: list[str] | None = None) -> dict:
    cfg = parse(GRPOJobConfig, "finemed-ray GRPO (Ray Train + DeepSpeed ZeRO-3 + TRL)", argv)
    job = GRPOJob(cfg).setup()
    job.run()
    return job.save()


if __name__ == "__main__":
    raise SystemExit(main(run))
