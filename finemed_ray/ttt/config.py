"""Typed config of the index-building job (``configs/index_*.yaml``), and of how TTT selects its training rows from
an index (:class:`RetrievalSelection`, part of ``ttt.adapt`` in the evaluation and serving configs); every field's
description is its documentation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from finemed_ray.config import StrictModel
from finemed_ray.ttt.embed import EncoderSpec
from finemed_ray.ttt.select import SIFT_CANDIDATES, SIFT_LAMBDA


class RetrievalSelection(StrictModel):
    """Which of the index's rows a question trains on (fields of ``ttt.adapt``; see :mod:`finemed_ray.ttt.select`)."""

    selection: Literal["nearest", "sift"] = Field(
        "nearest", description="nearest: the k rows closest to the question (the paper's retrieval); sift: SIFT "
        "(Hübotter et al., ICLR 2025), k greedy picks among the question's sift_candidates nearest rows that most "
        "reduce the posterior variance of its embedding (kernel: inner product of normalised embeddings), so "
        "near-duplicates are not picked twice over more informative rows; a row may be picked again (it then "
        "weighs double).")
    sift_lambda: float = Field(
        SIFT_LAMBDA, gt=0, allow_inf_nan=False, description="SIFT's regularisation λ (observation noise): small = "
        "diverse picks, large = the nearest row picked again and again (activeft's default 0.01).")
    sift_candidates: int = Field(
        SIFT_CANDIDATES, ge=1, le=100_000, description="SIFT chooses among this many nearest rows of the index "
        "(the pool is cut to its size; more = slower, O(candidates x dim) per pick).")

    def retrieval_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`finemed_ray.ttt.index.RetrievalIndex.neighbours` for this selection."""
        return {"selection": self.selection, "sift_lambda": self.sift_lambda, "sift_candidates": self.sift_candidates}


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
