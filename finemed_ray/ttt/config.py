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
        description="Index prefix (local or s3://): index.json, embeddings.npy, pool.parquet, quarantine.jsonl "
        "(+ ann.faiss with index.kind ann)."
    )


class IndexSpec(StrictModel):
    """How the index is searched: exact (every row, the paper's retrieval) or approximate (faiss IVF), and the
    approximate index's parameters. Stored in the index's index.json; queries read it from there."""

    kind: Literal["exact", "ann"] = Field(
        "exact", description="exact: L2 distance to every row (numpy; the paper's nearest neighbour; memory and "
        "time linear in rows per query) | ann: faiss IVF-Flat (k-means cells; a query scans its nprobe nearest "
        "cells), saved beside the vectors as ann.faiss; both re-rank their candidates by exact distance.")
    nlist: int | None = Field(
        None, ge=1, le=1 << 20, description="ann: k-means cells (inverted lists); null = the power of 2 nearest "
        "4 x sqrt(rows), at most 2048 (assigning a row costs O(nlist x dim), so a fixed cap keeps the build linear "
        "in rows; set it higher for 10^8 rows). Cut to rows / 39 for tiny pools (k-means needs the points).")
    nprobe: int | None = Field(
        None, ge=1, le=1 << 20, description="ann: cells scanned per query (the recall / speed knob; a query can "
        "override it); null = calibrated at build time: the smallest power of 2 that reaches target_recall.")
    target_recall: float = Field(
        0.95, gt=0, le=1, allow_inf_nan=False, description="ann, nprobe null: recall@10 against exact search the "
        "calibration must reach, measured on calibration_queries pool rows as queries (their own row left out).")
    calibration_queries: int = Field(
        200, ge=1, le=100_000, description="ann: pool rows used as calibration queries (fewer when the pool is "
        "smaller); the recall at each nprobe tried is recorded in index.json.")
    train_rows: int | None = Field(
        None, ge=1, description="ann: rows sampled (uniformly, seeded) to train k-means; null = 64 x nlist.")
    shard_rows: int | None = Field(
        None, ge=1, description="ann: rows per shard when adding the vectors; null = 64 MiB of vectors. A pool of "
        "more than one shard is assigned to cells by Ray Data actors (ray.concurrency of them), shard by shard.")


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
    index: IndexSpec = Field(default_factory=IndexSpec, description="Exact or approximate (ANN) search, and the "
                             "ANN parameters.")
    ray: IndexRaySection = Field(default_factory=IndexRaySection, description="Which Ray cluster embeds, and how wide.")
