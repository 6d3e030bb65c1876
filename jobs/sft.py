"""Supervised fine-tuning stage.

    python -m jobs.sft --config configs/sft_tiny.yaml data.path=s3://bucket/sft/ output.export_path=s3://...
    ray job submit --working-dir . -- python -m jobs.sft --config configs/sft_tiny.yaml ...
"""

from __future__ import annotations

from jobs._cli import main, run_stage_job


def run(argv: list[str] | None = None) -> dict:
    return run_stage_job("sft", argv)


if __name__ == "__main__":
    raise SystemExit(main(run))
