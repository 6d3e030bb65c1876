"""Evaluation stage: medical multiple-choice benchmarks, with and without test-time training, into a report.

    python -m jobs.evaluate --config configs/eval_tiny.yaml engine.model=s3://.../export output.path=s3://.../eval
    python -m jobs.evaluate --config configs/eval_tiny.yaml ttt.enabled=true ttt.index=s3://.../index
    ray job submit --working-dir . -- python -m jobs.evaluate --config configs/eval_vllm.yaml ...

Writes report.json, report.md, accuracy.png and predictions.jsonl under output.path; output.baseline=<an earlier
report> adds the difference from it.
"""

from __future__ import annotations

from jobs._cli import main, parse
from finemed_ray.eval.config import EvalJobConfig


def run(argv: list[str] | None = None) -> dict:
    from finemed_ray import storage
    from finemed_ray.eval.runner import Evaluation
    from finemed_ray.cluster import ensure_ray_address

    cfg = parse(EvalJobConfig, "finemed-ray evaluation (Ray Data batch inference, optional TTT)", argv)
    storage.check_writable(cfg.output.path)  # fail before any model is loaded
    ensure_ray_address(cfg.ray.address, cfg.ray.local_num_cpus)
    report = Evaluation(cfg).run()
    return {"output": cfg.output.path, "scores": report["scores"], "baseline": report.get("baseline")}


if __name__ == "__main__":
    raise SystemExit(main(run))
