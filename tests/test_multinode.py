"""SFT and DPO on a simulated two-node Ray cluster, one training worker per node (STRICT_SPREAD).

Each worker works in its own temp dir; data, checkpoints and the export travel only through S3."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from finemed_ray import storage
from finemed_ray.config import load_config
from finemed_ray.toy.sample import sample_sft_rows, write_jsonl
from finemed_ray.train.configs import SFTJobConfig
from finemed_ray.train.stages.sft import SFTJob

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_node_cluster(s3):
    import ray
    from ray.cluster_utils import Cluster

    # Nodes inherit this process's environment (the S3 endpoint and credentials), as real nodes get them from
    # their pod spec.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
@pytest.mark.proof  # `make test-proof` only: tests/test_two_hosts.py (in CI's `make test-slow`) asserts the same SFT
# run across two nodes, one ZeRO-3 worker on each, with the second node's /tmp private: a stricter form of this one
def test_sft_across_two_nodes_through_s3(two_node_cluster, tiny_model_s3):
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    prefix = "s3://finemed-test/multinode"
    write_jsonl(sample_sft_rows(n=16, seed=3), f"{prefix}/sft.jsonl")
    cfg = load_config(
        SFTJobConfig,
        ROOT / "configs/sft_tiny.yaml",
        [f"model.path={tiny_model_s3}", f"data.path={prefix}/sft.jsonl", f"run.storage_path={prefix}/runs",
         "run.name=two-nodes", f"output.export_path={prefix}/export", "train.epochs=1", "train.report_to=[]",
         "scaling.placement_strategy=STRICT_SPREAD"],
    )
    job = SFTJob(cfg).setup()
    job.run()
    summary = job.save()
    meta = storage.read_json(f"{prefix}/export/finemed_export.json")
    nodes = {s["node_id"] for s in meta["sharding_per_rank"]}
    assert len(nodes) == 2, meta["sharding_per_rank"]  # one worker on each node
    assert all(s["optimizer"] == "DeepSpeedZeroOptimizer_Stage3" for s in meta["sharding_per_rank"])
    assert summary["global_step"] == summary["plan"]["max_steps"] == 2
    assert storage.is_complete(f"{prefix}/export")
    assert summary["checkpoint"].startswith(f"{prefix}/runs/two-nodes/")


@pytest.mark.slow
def test_dpo_across_two_nodes_through_s3(two_node_cluster, tiny_model_s3):
    """DPO from the SFT export above (as in the recipe): policy and frozen reference sharded across the nodes."""
    from finemed_ray.toy.sample import sample_dpo_rows
    from finemed_ray.train.configs import DPOJobConfig
    from finemed_ray.train.stages.dpo import DPOJob

    prefix = "s3://finemed-test/multinode"
    parent = f"{prefix}/export" if storage.is_complete(f"{prefix}/export") else tiny_model_s3
    write_jsonl(sample_dpo_rows(seed=3)[:16], f"{prefix}/dpo.jsonl")
    cfg = load_config(
        DPOJobConfig,
        ROOT / "configs/dpo_tiny.yaml",
        [f"model.path={parent}", f"data.path={prefix}/dpo.jsonl", f"run.storage_path={prefix}/runs",
         "run.name=two-nodes-dpo", f"output.export_path={prefix}/export-dpo", "train.report_to=[]",
         "data.eval_fraction=0", "train.per_device_batch_size=4", "scaling.placement_strategy=STRICT_SPREAD"],
    )
    job = DPOJob(cfg).setup()
    job.run()
    summary = job.save()
    meta = storage.read_json(f"{prefix}/export-dpo/finemed_export.json")
    assert len({s["node_id"] for s in meta["sharding_per_rank"]}) == 2
    assert all(s["local_numel"] < s["total_numel"] for s in meta["sharding_per_rank"])
    assert summary["global_step"] == summary["plan"]["max_steps"] == 2
    assert storage.is_complete(f"{prefix}/export-dpo")
