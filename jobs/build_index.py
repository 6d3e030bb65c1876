"""TTT retrieval index: embed a DPO (or SFT) pool with an encoder and store it for L2 search, exact (default) or
approximate (``index.kind=ann``: a faiss IVF index beside the vectors, see finemed_ray/ttt/index.py).

    python -m jobs.build_index --config configs/index_tiny.yaml pool.path=s3://bucket/dpo/ output.path=s3://...
    python -m jobs.build_index --config configs/index_tiny.yaml index.kind=ann
    ray job submit --working-dir . -- python -m jobs.build_index --config configs/index_bge.yaml ...
"""

from __future__ import annotations

from jobs._cli import main, parse
from finemed_ray.ttt.config import IndexJobConfig


def run(argv: list[str] | None = None) -> dict:
    from finemed_ray import storage
    from finemed_ray.cluster import ensure_ray_address
    from finemed_ray.ttt.index import build_index

    cfg = parse(IndexJobConfig, "finemed-ray TTT retrieval index (Ray Data + an encoder)", argv)
    storage.check_writable(cfg.output.path)  # fail before loading any model
    ensure_ray_address(cfg.ray.address, cfg.ray.local_num_cpus)
    summary = build_index(
        cfg.pool.path,
        cfg.output.path,
        cfg.encoder,
        pool_kind=cfg.pool.kind,
        limit=cfg.pool.limit,
        concurrency=cfg.ray.concurrency,
        cpus_per_worker=cfg.ray.cpus_per_worker,
        gpus_per_worker=cfg.ray.gpus_per_worker,
        index=cfg.index,
    )
    return summary.to_dict()


if __name__ == "__main__":
    raise SystemExit(main(run))
