"""Resumable, idempotent teacher calls: every response is stored under a content key before it is used.

A request's key is a hash of (step, prompt version, teacher identity, messages): the same question to the same
teacher with the same prompt always has the same key, whatever run or worker makes it. Responses are written to
``<cache>/<step>/`` as Parquet files, one per Ray Data block, each written whole (an S3 object appears complete or
not at all). A rerun after a crash reads the keys already there and sends only the others to the teacher: no
repeated teacher calls for finished rows, and no duplicated or lost rows, because outputs are rebuilt from
requests joined with the cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from finemed_ray import storage

RESPONSE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("text", pa.string()),
        ("error", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("attempts", pa.int64()),
    ]
)
RESPONSE_COLUMNS = tuple(RESPONSE_SCHEMA.names)


def request_key(step: str, prompt_version: str, teacher_identity: str, messages: list[dict[str, str]]) -> str:
    payload = json.dumps([step, prompt_version, teacher_identity, messages], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@dataclass
class StepStats:
    step: str
    teacher: str
    requests: int = 0
    cache_hits: int = 0
    teacher_calls: int = 0  # requests sent to the teacher by this run
    errors: int = 0  # responses that carry an error (after retries)
    prompt_tokens: int = 0  # over all responses used (cached ones included)
    completion_tokens: int = 0
    seconds: float = 0.0
    error_kinds: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def cached_keys(cache_uri: str) -> set[str]:
    """Keys of the responses already stored for one step (reads only the ``key`` column)."""
    import pyarrow.parquet as pq

    files = storage.list_files(cache_uri, suffixes=(".parquet",)) if storage.exists(cache_uri) else []
    keys: set[str] = set()
    for f in files:
        fs, path = storage.get_filesystem(f)
        keys.update(pq.read_table(path, filesystem=fs, columns=["key"]).column("key").to_pylist())
    return keys


def run_cached_step(requests, step: str, teacher: Any, cache_uri: str, stats: StepStats):
    """``requests``: a Ray Dataset with ``key``, ``messages`` and any state columns. Returns the same rows with the
    response columns added (``text``, ``error``, token counts), every row answered exactly once."""
    import time

    import ray.data
    from ray.data.expressions import col

    t0 = time.time()
    requests = requests.materialize()
    stats.requests = requests.count()
    done = cached_keys(cache_uri)
    todo = requests.filter(expr=~col("key").is_in(list(done))) if done else requests
    n_todo = todo.count()
    stats.teacher_calls = n_todo
    stats.cache_hits = stats.requests - n_todo
    if n_todo:
        fs, path = storage.get_filesystem(cache_uri)
        answered = teacher.map_dataset(todo.select_columns(["key", "messages"]))
        try:
            answered.map_batches(_to_response_table, batch_format="pyarrow").write_parquet(path, filesystem=fs)
        except Exception as e:
            from finemed_ray.synth.teachers import find_teacher_unavailable

            down = find_teacher_unavailable(e)
            if down is not None:  # blocks finished before the failure stay in the cache for the rerun
                raise down from None
            raise
    if stats.requests == 0:
        stats.seconds = round(time.time() - t0, 3)
        return requests
    fs, path = storage.get_filesystem(cache_uri)
    responses = ray.data.read_parquet(path, filesystem=fs)
    joined = requests.join(responses, join_type="inner", num_partitions=max(1, min(64, stats.requests // 2048 + 1)),
                           on=("key",)).materialize()
    if joined.count() != stats.requests:  # a key stored twice, or missing: never silently use such a result
        raise RuntimeError(f"step {step}: {joined.count()} responses joined for {stats.requests} requests "
                           f"(cache {cache_uri} is inconsistent)")
    for batch in joined.select_columns(["error", "prompt_tokens", "completion_tokens"]).iter_batches(
            batch_format="pyarrow", batch_size=4096):
        for row in batch.to_pylist():
            stats.prompt_tokens += row["prompt_tokens"] or 0
            stats.completion_tokens += row["completion_tokens"] or 0
            if row["error"]:
                stats.errors += 1
                kind = row["error"].split(":", 1)[0]
                stats.error_kinds[kind] = stats.error_kinds.get(kind, 0) + 1
    stats.seconds = round(time.time() - t0, 3)
    return joined


def _to_response_table(batch: pa.Table) -> pa.Table:
    data = {}
    for name in RESPONSE_COLUMNS:
        if name in batch.column_names:
            data[name] = batch.column(name).cast(RESPONSE_SCHEMA.field(name).type)
        else:
            data[name] = pa.nulls(batch.num_rows, RESPONSE_SCHEMA.field(name).type)
    return pa.table(data, schema=RESPONSE_SCHEMA)
