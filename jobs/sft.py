"""Supervised fine-tuning stage.

    python -m jobs.sft --config configs/sft_tiny.yaml data.path=s3://bucket/sft/ output.export_path=s3://...
    ray job submit --working-dir . -- python -m jobs.sft --config configs/sft_tiny.yaml ...
"""

from __future__ import annotations

from jobs._cli import main, parse
from finemed_ray.train.configs import SFTJobConfig
from finemed_ray.train.sft import SFTJob


def run(argv: list[str] | None = None) -> dict:
    cfg = parse(SFTJobConfig, "finemed-ray SFT (Ray Train + DeepSpeed ZeRO-3 + TRL)", argv)
    job = SFTJob(cfg).setup()
    job.run()
    return job.save()


if __name__ == "__main__":
    raise SystemExit(main(run))
