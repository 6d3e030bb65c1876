"""Synthesis stage: seed medical texts -> SFT, reasoning-SFT and DPO datasets (Ray Data + teacher LLMs).

    python -m jobs.synthesize --config configs/synth_tiny.yaml input.path=s3://bucket/seeds/ output.path=s3://...
    ray job submit --working-dir . -- python -m jobs.synthesize --config configs/synth_http.yaml ...

Rerunning with the same output.path resumes: cached teacher responses are reused, never requested again.
"""

from __future__ import annotations

from jobs._cli import main, parse
from finemed_ray.synth.config import SynthJobConfig


def run(argv: list[str] | None = None) -> dict:
    from finemed_ray import storage
    from finemed_ray.synth.pipeline import SynthesisPipeline
    from finemed_ray.cluster import ensure_ray_address

    cfg = parse(SynthJobConfig, "finemed-ray synthesis (Ray Data + teacher LLMs)", argv)
    storage.check_writable(cfg.output.path)  # fail before any teacher call
    ensure_ray_address(cfg.ray.address, cfg.ray.local_num_cpus)
    return SynthesisPipeline(cfg).run()


if __name__ == "__main__":
    raise SystemExit(main(run))
