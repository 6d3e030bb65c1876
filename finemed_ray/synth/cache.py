"""Resumable, idempotent teacher calls: every response is stored under a content key before it is used.

A request's key is a hash of (step, prompt version, teacher identity, messages): the same question to the same
teacher with the same prompt always has the same key, whatever run or worker makes it. Responses are written to
``<cache>/<step>/`` as Parquet files, one per answered block, each written whole (an S3 object appears complete or
not at all; locally a temp file is renamed) and named by its keys. A rerun after a crash reads the keys already
there and sends only the others to the teacher: no repeated teacher calls for finished rows, and no duplicated or
lost rows, because every request row is answered exactly once -- by the teacher (its response stored first) or
by the cache (matched on the key) -- and the count is checked.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from pyarrow.fs import S3FileSystem as _S3

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
    return _stored(cache_uri)[0]


def _stored(cache_uri: str) -> tuple[set[str], list[str]]:
    """(keys stored for one step, the paths of its cache files inside their filesystem)."""
    import pyarrow.parquet as pq

    files = storage.list_files(cache_uri, suffixes=(".parquet",)) if storage.exists(cache_uri) else []
    keys: set[str] = set()
    paths = []
    for f in files:
        fs, path = storage.get_filesystem(f)
        keys.update(pq.read_table(path, filesystem=fs, columns=["key"]).column("key").to_pylist())
        paths.append(path)
    return keys, paths


def run_cached_step(requests, step: str, teacher: Any, cache_uri: str, stats: StepStats):
    """``requests``: a Ray Dataset with ``key``, ``messages`` and any state columns. Returns the same rows with the
    response columns added (``text``, ``error``, token counts), every row answered exactly once.

    Requests not cached yet go to the teacher, which passes every other column through; each answered block is
    stored in the cache (response columns only, one whole file per block) before the dataset is used, so these
    rows need no lookup (a shuffle: seconds of fixed Ray Data time per step). Only cache hits (a rerun) are
    matched with the stored responses."""
    import time

    import ray.data
    from ray.data.expressions import col

    t0 = time.time()
    requests = requests.materialize()
    stats.requests = requests.count()
    if stats.requests == 0:
        stats.seconds = round(time.time() - t0, 3)
        return requests
    schema = requests.schema()
    columns = [(c, t) for c, t in zip(schema.names, schema.types) if c not in RESPONSE_COLUMNS] + \
        [(f.name, f.type) for f in RESPONSE_SCHEMA]
    done, files = _stored(cache_uri)
    if done:
        is_done = col("key").is_in(list(done))
        todo, hits = requests.filter(expr=~is_done), requests.filter(expr=is_done)
        n_todo = todo.count()
    else:
        todo, hits, n_todo = requests, None, stats.requests
    stats.teacher_calls = n_todo
    stats.cache_hits = stats.requests - n_todo
    fs, path = storage.get_filesystem(cache_uri)
    parts = []
    if n_todo:
        if not storage.is_s3(cache_uri):
            fs.create_dir(path, recursive=True)
        answered = teacher.map_dataset(todo).map_batches(
            _store_responses, batch_format="pyarrow", batch_size=None,  # one file per answered block
            fn_kwargs={"filesystem": fs, "path": path, "columns": columns})
        try:  # materialised: the teacher answers each request once, however often the result is read
            parts.append(answered.materialize())
        except Exception as e:
            from finemed_ray.synth.teachers import find_teacher_unavailable

            down = find_teacher_unavailable(e)
            if down is not None:  # blocks finished before the failure stay in the cache for the rerun
                raise down from None
            raise
    if stats.cache_hits:
        # The cached rows get their responses by a groupby on the key over (request rows + stored responses):
        # a key's rows meet in one group, each request row takes the key's response (the first, should one run
        # have stored a key twice: two documents making the same request). A groupby runs on the pipeline's
        # sort-based shuffle; Ray Data's join always starts hash-shuffle aggregator actors (~5 s per step).
        # The stored files are read by plain tasks from the list made above (read_parquet would list and inspect
        # them again: ~3 s per step on S3).
        responses = ray.data.from_items([{"path": f} for f in files]).map_batches(
            _read_stored, batch_format="pyarrow", batch_size=16, fn_kwargs={"filesystem": fs, "columns": columns})
        tagged = hits.map_batches(_tag, batch_format="pyarrow", fn_kwargs={"columns": columns, "stored": False}).union(
            responses)
        tagged = _without_empty_blocks(tagged.materialize())
        parts.append(tagged.groupby("key", num_partitions=max(1, min(64, stats.cache_hits // 2048 + 1))).map_groups(
            _answer_from_cache, batch_format="pyarrow", fn_kwargs={"columns": columns}))
    answered = _without_empty_blocks((parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])).materialize())
    n = answered.count()
    if n != stats.requests:  # a key stored twice, or missing: never silently use such a result
        raise RuntimeError(f"step {step}: {n} responses for {stats.requests} requests "
                           f"(cache {cache_uri} is inconsistent)")
    for batch in answered.select_columns(["error", "prompt_tokens", "completion_tokens"]).iter_batches(
            batch_format="pyarrow", batch_size=4096):
        for row in batch.to_pylist():
            stats.prompt_tokens += row["prompt_tokens"] or 0
            stats.completion_tokens += row["completion_tokens"] or 0
            if row["error"]:
                stats.errors += 1
                kind = row["error"].split(":", 1)[0]
                stats.error_kinds[kind] = stats.error_kinds.get(kind, 0) + 1
    stats.seconds = round(time.time() - t0, 3)
    return answered


def _without_empty_blocks(ds):
    """The materialised ``ds`` without its empty blocks. A map over an empty block (e.g. the teacher's, where a
    block made no request) yields a block with no columns, on which a later shuffle (``groupby``) fails
    concatenating schemas. Uses only the blocks' metadata: nothing is fetched to the driver."""
    import ray.data

    refs, dropped = [], 0
    for bundle in ds.iter_internal_ref_bundles():
        for entry in bundle.blocks:
            ref, meta = entry if isinstance(entry, tuple) else (entry.ref, entry.metadata)
            if meta.num_rows == 0:
                dropped += 1
            else:
                refs.append(ref)
    if not dropped or not refs:
        return ds
    return ray.data.from_arrow_refs(refs)


_STORED = "__stored_response"


def _tag(batch: pa.Table, columns: list[tuple[str, pa.DataType]], stored: bool) -> pa.Table:
    """Request rows (``stored=False``, response columns null) or stored responses (request columns null) in one
    schema, marked, so that both can be unioned and grouped by key."""
    table = _select(batch, columns)
    return table.append_column(_STORED, pa.array([stored] * table.num_rows, pa.bool_()))


def _read_stored(batch: pa.Table, filesystem: Any, columns: list[tuple[str, pa.DataType]]) -> pa.Table:
    """Cache files (a ``path`` column) -> their responses, tagged as stored (see ``_tag``)."""
    import pyarrow.parquet as pq

    tables = [_select(pq.read_table(p, filesystem=filesystem), columns) for p in batch.column("path").to_pylist()]
    return _tag(pa.concat_tables(tables) if tables else _select(RESPONSE_SCHEMA.empty_table(), columns), columns,
                stored=True)


def _answer_from_cache(group: pa.Table, columns: list[tuple[str, pa.DataType]]) -> pa.Table:
    """One key's request rows and stored responses -> the request rows with the (first) stored response."""
    rows = group.to_pylist()
    stored = next((r for r in rows if r[_STORED]), None)
    out = []
    if stored is not None:  # a key with no stored response yields nothing: the count check fails the step
        for row in rows:
            if not row.pop(_STORED):
                row.update({c: stored[c] for c in RESPONSE_COLUMNS})
                out.append(row)
    return pa.Table.from_pylist(out, schema=pa.schema(columns))


def _select(batch: pa.Table, columns: list[tuple[str, pa.DataType]]) -> pa.Table:
    """``batch`` with exactly these columns, in this order and of these types (the teacher's answered rows and
    the cache hits joined with stored responses are unioned: one schema); a missing response column is null."""
    data = {}
    for name, typ in columns:
        if name in batch.column_names:
            column = batch.column(name)
            data[name] = column if column.type == typ else column.cast(typ)
        else:
            data[name] = pa.nulls(batch.num_rows, typ)
    return pa.table(data)


def _store_responses(batch: pa.Table, filesystem: Any, path: str, columns: list[tuple[str, pa.DataType]]
                     ) -> pa.Table:
    """Write the responses of one answered block to the cache, whole, and pass the block on. The file is named by
    its keys: a retried task rewrites the same file instead of adding a second copy of its responses."""
    import pyarrow.parquet as pq

    batch = _select(batch, columns)
    if batch.num_rows:
        keys = batch.column("key").to_pylist()
        name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:32] + ".parquet"
        table = _to_response_table(batch)
        if isinstance(filesystem, _S3):  # an S3 object appears whole when its upload completes
            pq.write_table(table, f"{path}/{name}", filesystem=filesystem)
        else:  # local: a hidden temp file (no .parquet suffix, so never read), then a rename
            tmp = f"{path}/.{name}.tmp"
            pq.write_table(table, tmp, filesystem=filesystem)
            filesystem.move(tmp, f"{path}/{name}")
    return batch


def _to_response_table(batch: pa.Table) -> pa.Table:
    data = {}
    for name in RESPONSE_COLUMNS:
        if name in batch.column_names:
            data[name] = batch.column(name).cast(RESPONSE_SCHEMA.field(name).type)
        else:
            data[name] = pa.nulls(batch.num_rows, RESPONSE_SCHEMA.field(name).type)
    return pa.table(data, schema=RESPONSE_SCHEMA)


# ------------------------------------------------------------------------------------------ per batch (streaming)
def stored_index(cache_uri: str) -> dict[str, str]:
    """key -> the cache file (path inside its filesystem) holding its response, for one step; {} when none.
    The streaming pipeline ships this to its step tasks, which read only the files of the keys they need."""
    import pyarrow.parquet as pq

    index: dict[str, str] = {}
    files = storage.list_files(cache_uri, suffixes=(".parquet",)) if storage.exists(cache_uri) else []
    for f in files:
        fs, path = storage.get_filesystem(f)
        for key in pq.read_table(path, filesystem=fs, columns=["key"]).column("key").to_pylist():
            index.setdefault(key, path)  # a key stored twice: the first file wins, as in run_cached_step
    return index


_FILE_CACHE: dict[str, dict[str, dict[str, Any]]] = {}  # per worker process: recently read cache files


def read_stored(index: dict[str, str], keys: list[str], filesystem: Any) -> dict[str, dict[str, Any]]:
    """The stored responses of ``keys`` (all in ``index``), read from their cache files."""
    import pyarrow.parquet as pq

    out: dict[str, dict[str, Any]] = {}
    for path in dict.fromkeys(index[k] for k in keys):
        rows = _FILE_CACHE.get(path)
        if rows is None:
            table = _to_response_table(pq.read_table(path, filesystem=filesystem))
            rows = {}
            for r in table.to_pylist():
                rows.setdefault(r["key"], r)
            if len(_FILE_CACHE) > 256:
                _FILE_CACHE.clear()
            _FILE_CACHE[path] = rows
        for k in keys:
            if index[k] == path and k in rows:
                out[k] = rows[k]
    missing = [k for k in keys if k not in out]
    if missing:  # never silently use a result without its response
        raise RuntimeError(f"cache: {len(missing)} keys listed but not found in their files (e.g. {missing[0]})")
    return out


def store_results(results: list[dict[str, Any]], filesystem: Any, path: str) -> None:
    """Write teacher results (key + response columns) to the cache as one whole file, named by its keys, before
    they are used (see ``_store_responses``)."""
    if results:
        _store_responses(pa.Table.from_pylist(results, schema=RESPONSE_SCHEMA), filesystem, path,
                         [(f.name, f.type) for f in RESPONSE_SCHEMA])
