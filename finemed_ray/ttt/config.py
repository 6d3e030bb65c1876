"""Typed config of the index-building job (``configs/index_*.yaml``); every field's description is its documentation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from finemed_ray.config import StrictModel
from finemed_ray.ttt.embed import EncoderSpec


class PoolSection(StrictModel):
    path: str = Field(description="Pool rows: a .jsonl/.parquet file or a prefix of them, local or s3://.")
    kind: Literal["dpo", "sft"] = Field(
        "dpo", description="dpo: text = prompt + chosen (paper's pool); sft: text = the whole conversation."
    )
    limit: int | None = Field(None, ge=1, description="Index only the first N input rows (smoke runs); null = all.")


class IndexOutputSection(StrictModel):
    path: str = Field(
        description="Index prefix (local or s3://): index.json, embeddings.npy, pool.parquet, quarantine.jsonl."
    )


class IndexRaySection(StrictModel):
    address: str | None = Field(None, description="Ray cluster; null = the `ray job submit` cluster, else local.")
    local_num_cpus: int = Field(4, ge=1, description="Logical CPUs of a local cluster.")
    concurrency: int = Field(1, ge=1, description="Encoder actors embedding in parallel (each loads the model).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per encoder actor (its torch threads).")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per encoder actor; > 0 embeds on CUDA.")


class IndexJobConfig(StrictModel):
    name: str = Field("index", description="Job name (logs only).")
    pool: PoolSection = Field(description="The rows to index.")
    encoder: EncoderSpec = Field(default_factory=EncoderSpec, description="The embedding model and its settings.")
    output: IndexOutputSection = Field(description="Where the index goes.")
    ray: IndexRaySection = Field(default_factory=IndexRaySection, description="Which Ray cluster embeds, and how wide.")
