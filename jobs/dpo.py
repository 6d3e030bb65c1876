"""DPO stage (chosen = reasoning answer, rejected = direct answer) against a frozen, ZeRO-3-sharded reference.

    python -m jobs.dpo --config configs/dpo_tiny.yaml model.path=s3://.../exports/reasoning data.path=s3://...
    ray job submit --working-dir . -- python -m jobs.dpo --config configs/dpo_tiny.yaml ...
"""

from __future__ import annotations

from jobs._cli import main, run_stage_job


def run(argv: list[str] | None = None) -> dict:
    return run_stage_job("dpo", argv)


if __name__ == "__main__":
    raise SystemExit(main(run))
