"""The DeepSpeed config as the training job hands it to workers (finemed_ray.train.driver.load_deepspeed_config)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finemed_ray.errors import ConfigError
from finemed_ray.train.driver import load_deepspeed_config

ZERO3 = Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / "zero3.json"


def test_overlap_comm_is_off_on_cpu_workers_and_kept_on_gpus():
    on_gpu = load_deepspeed_config(str(ZERO3), use_gpu=True)
    on_cpu = load_deepspeed_config(str(ZERO3), use_gpu=False)
    assert on_gpu == json.loads(ZERO3.read_text()) and on_gpu["zero_optimization"]["overlap_comm"] is True
    assert on_cpu["zero_optimization"]["overlap_comm"] is False
    # nothing else changes
    on_cpu["zero_optimization"]["overlap_comm"] = True
    assert on_cpu == on_gpu


def test_shipped_zero3_buckets_are_explicit_sizes():
    z = json.loads(ZERO3.read_text())["zero_optimization"]
    assert z["stage"] == 3
    assert z["reduce_bucket_size"] == z["stage3_prefetch_bucket_size"] == 50_000_000


def test_missing_and_broken_configs_are_named(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_deepspeed_config(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_deepspeed_config(str(bad))
    assert load_deepspeed_config(None) is None
