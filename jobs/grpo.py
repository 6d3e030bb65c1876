"""GRPO stage (RLVR: rewards from the answer's correctness and the reasoning layout), TRL GRPOTrainer on Ray Train
under DeepSpeed ZeRO-3.

    python -m jobs.grpo --config configs/grpo_tiny.yaml model.path=s3://.../exports/reasoning data.path=s3://...
    ray job submit --working-dir . -- python -m jobs.grpo --config configs/grpo_tiny.yaml ...
"""

from __future__ import annotations

from jobs._cli import main, run_stage_job


def run(argv: list[str] | None = None) -> dict:
    return run_stage_job("grpo", argv)


if __name__ == "__main__":
    raise SystemExit(main(run))
