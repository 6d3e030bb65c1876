"""The TTT retrieval index: the training pool embedded once (Ray Data), searched by L2 distance (exact or ANN).

FineMedLM-o1's test-time training embeds the test question (bge-large-en-v1.5, mean pooled), finds its nearest
neighbour by exact L2 distance among the *prompt + chosen* texts of all DPO rows, and trains on that neighbour
before answering. :func:`build_index` embeds such a pool; :class:`RetrievalIndex` loads it and answers queries
(the k nearest rows, or SIFT's picks among the nearest rows: :mod:`finemed_ray.ttt.select`).

Stored layout under ``out_uri`` (a local directory or an ``s3://`` prefix)::

    index.json        metadata, written last (its presence means the index is complete): format/version, created
                      time, count, dim, search method, the encoder (spec + identity incl. a probe embedding), the
                      pool (uri, kind, format, limit, files with bytes/sha256, one digest) and the row counts
    embeddings.npy    float32 [count, dim]; row i embeds pool.parquet row i
    pool.parquet      one row per indexed pool row, in input order (columns: POOL_SCHEMA below)
    quarantine.jsonl  every unusable input row: {"dataset", "reason", "raw"} (empty file when none)
    ann.faiss         index.kind ann only: a faiss IVF-Flat index over the same rows (ids = row numbers); its
                      parameters, build times and the recall@10 measured against exact search are in index.json
                      under "search"

Search (``index.kind`` of the build config, :class:`~finemed_ray.ttt.config.IndexSpec`): *exact* (default, the
paper's) scans every row with numpy; *ann* scans the query's ``nprobe`` nearest k-means cells of the IVF index,
``nprobe`` calibrated at build time to reach ``target_recall`` (recall@10 vs exact). Loading memory-maps
``embeddings.npy`` and ``ann.faiss`` (an ``s3://`` index through its local cache copy), so neither is held twice.
For pools too large to embed on one machine, Ray Data embeds them shard by shard, and for ANN its actors also
assign each shard of vectors to its cells (:class:`AssignShards`); :func:`build_vector_index` does the same for
vectors that are already embeddings (synthetic pools in ``bench/index_scale.py``).

``pool.parquet`` columns:

* ``id``: the row's ``id``, or ``h<sha1 of the raw row>`` when it has none (stable across runs);
* ``text``: exactly what was embedded (DPO: the prompt's non-system turns + the chosen reply; SFT: every
  non-system turn), turns joined by a newline. System prompts are left out: most rows share one, and it would
  pull every embedding towards the same point;
* ``prompt`` / ``completion``: the row as a TRL conversational prompt-completion example, which is what TTT
  trains on: ``prompt`` = the messages before the reply (system included), ``completion`` = the assistant reply
  (DPO: ``chosen``; SFT: the final assistant turn(s)). ``prompt + completion`` is the whole conversation;
* ``department``, ``subdepartment``, ``source``: copied from the row (null when absent);
* ``truncated``: the text was longer than the encoder's ``max_length`` and only its start was embedded.

Unusable rows (invalid JSON, no user question, no or empty ``chosen``, empty text, an SFT conversation that ends
without an assistant reply...) are counted by reason and written to ``quarantine.jsonl``, never dropped silently.
A DPO row's ``rejected`` answer is not used: a pair with a broken ``rejected`` is still a good retrieval entry.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from finemed_ray import storage
from finemed_ray.data.sft_prepare import _reason_kind, _row_id, read_input
from finemed_ray.errors import ConfigError, DataError, StorageError
from finemed_ray.schemas import MESSAGES, parse_jsonl_line, to_raw, validate_messages, validate_sft_row
from finemed_ray.ttt.config import IndexSpec
from finemed_ray.ttt.embed import Encoder, EncoderSpec, identity_mismatch
from finemed_ray.ttt.select import SIFT_CANDIDATES, SIFT_LAMBDA, check_selection, sift_select

log = logging.getLogger(__name__)

PoolKind = Literal["dpo", "sft"]
POOL_KINDS = ("dpo", "sft")
INDEX_FORMAT = "finemed-ray/retrieval-index"
INDEX_VERSION = 1
INDEX_FILE, EMBEDDINGS_FILE, POOL_FILE, QUARANTINE_FILE = "index.json", "embeddings.npy", "pool.parquet", \
    "quarantine.jsonl"
ANN_FILE = "ann.faiss"
EXACT_SEARCH = {"method": "exact", "metric": "l2", "library": "numpy",
                "distance": "Euclidean (not squared) between the stored and the query embeddings"}
NPY_HEADER_BYTES = 128  # numpy's own .npy v1.0 header for a [count, dim] float32 array
DEFAULT_SHARD_BYTES = 64 << 20  # ANN build: vectors per shard (read, assigned to cells, added) when not set
MAX_AUTO_NLIST = 2048  # auto nlist cap: assigning one row costs O(nlist x dim), so a cap keeps the build linear
TRAIN_ROWS_PER_CELL = 64  # k-means sample: rows per cell (faiss warns below 39)
KMEANS_ITERATIONS = 10
SAMPLE_SEED = 1234  # k-means sample, k-means init, calibration queries: reproducible indexes
CALIBRATION_K = 10  # recall@10, as issue 18 asks

POOL_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("prompt", MESSAGES),
        ("completion", MESSAGES),
        ("department", pa.string()),
        ("subdepartment", pa.string()),
        ("source", pa.string()),
        ("truncated", pa.bool_()),
    ]
)
# What an embedding worker returns for every input row: the pool columns, the embedding, or an error and the raw row.
_EMBEDDED_SCHEMA = pa.schema(
    [*POOL_SCHEMA, ("embedding", pa.list_(pa.float32())), ("error", pa.string()), ("raw", pa.string())]
)


# ------------------------------------------------------------------------------------------- pool rows


def _content(messages: list[dict], roles: tuple[str, ...] = ("user", "assistant")) -> list[str]:
    return [m["content"].strip() for m in messages if m["role"] in roles and m["content"].strip()]


def _dpo_entry(row: Any) -> tuple[dict | None, str | None]:
    """A DPO row -> (pool entry, None) or (None, reason). Needs a prompt ending with a non-empty user turn and a
    non-empty chosen reply; ``rejected`` is not looked at."""
    if not isinstance(row, dict):
        return None, f"row: expected a JSON object, got {type(row).__name__}"
    prompt, chosen = row.get("prompt"), row.get("chosen")
    if err := validate_messages(prompt, "prompt", need_assistant=False):
        return None, err
    if prompt[-1]["role"] != "user":
        return None, "prompt: the last message must be from the user"
    if not prompt[-1]["content"].strip():
        return None, "prompt: the user message is empty"
    if err := validate_messages(chosen, "chosen", need_assistant=False):
        return None, err
    if any(m["role"] != "assistant" for m in chosen):
        return None, "chosen: must hold assistant messages only"
    if not _content(chosen):
        return None, "chosen: the assistant message is empty"
    return {"prompt": prompt, "completion": chosen, "text": "\n".join(_content(prompt) + _content(chosen))}, None


def _sft_entry(row: Any) -> tuple[dict | None, str | None]:
    """An SFT conversation -> (pool entry, None) or (None, reason). The completion is the final assistant turn(s)."""
    if err := validate_sft_row(row):
        return None, err
    messages = row["messages"]
    if messages[-1]["role"] != "assistant":
        return None, "messages: the last message must be the assistant's reply (TTT trains on it)"
    start = len(messages)
    while start > 0 and messages[start - 1]["role"] == "assistant":
        start -= 1
    completion = messages[start:]
    if not _content(completion):
        return None, "messages: the final assistant reply is empty"
    return {"prompt": messages[:start], "completion": completion, "text": "\n".join(_content(messages))}, None


_ENTRY = {"dpo": _dpo_entry, "sft": _sft_entry}


def pool_entries(batch: pa.Table, kind: str, fmt: str) -> list[dict]:
    """Every input row of ``batch`` as a pool entry: POOL_SCHEMA columns (``truncated`` unset) + ``error`` / ``raw``.
    ``fmt="jsonl"``: one ``text`` column of raw lines; ``"parquet"``: the rows themselves."""
    if kind not in _ENTRY:
        raise ConfigError(f"pool kind {kind!r}: expected one of {', '.join(POOL_KINDS)}")
    if fmt == "jsonl":
        records = [(line, *parse_jsonl_line(line)) for line in batch.column("text").to_pylist()]
    else:
        records = [(None, row, None) for row in batch.to_pylist()]
    out = []
    for line, row, err in records:
        raw = line if line is not None else to_raw(row)
        entry = None
        if err is None:
            entry, err = _ENTRY[kind](row)
        rid = row.get("id") if isinstance(row, dict) and isinstance(row.get("id"), str) and row["id"].strip() else None
        meta = {k: (row.get(k) if isinstance(row, dict) and isinstance(row.get(k), str) else None)
                for k in ("department", "subdepartment", "source")}
        if entry is not None and not entry["text"].strip():
            entry, err = None, "text: nothing to embed (every turn is empty)"
        out.append({"id": rid or _row_id(raw), "text": None, "prompt": None, "completion": None, **meta,
                    **(entry or {}), "error": err, "raw": None if err is None else raw})
    return out


class EmbedPoolBatch:
    """Ray Data callable class: one encoder per actor; every input row yields one ``_EMBEDDED_SCHEMA`` row."""

    def __init__(self, spec: dict, kind: str, fmt: str, device: str = "cpu") -> None:
        self.encoder = EncoderSpec(**spec).build(device)
        self.kind, self.fmt = kind, fmt

    def __call__(self, batch: pa.Table) -> pa.Table:
        entries = pool_entries(batch, self.kind, self.fmt)
        good = [i for i, e in enumerate(entries) if e["error"] is None]
        vectors, cut = self.encoder.encode_with_flags([entries[i]["text"] for i in good])
        for j, i in enumerate(good):
            entries[i]["embedding"] = vectors[j]
            entries[i]["truncated"] = bool(cut[j])
        cols = {name: [e.get(name) for e in entries] for name in _EMBEDDED_SCHEMA.names}
        return pa.Table.from_pydict(cols, schema=_EMBEDDED_SCHEMA)


# ------------------------------------------------------------------------------------------------ build


@dataclass
class IndexSummary:
    index_uri: str
    pool_uri: str
    kind: str
    encoder: str
    dim: int = 0
    rows_in: int = 0
    rows_indexed: int = 0
    rows_quarantined: int = 0
    rows_truncated: int = 0  # texts longer than encoder.max_length: only their start was embedded
    quarantine_reasons: dict[str, int] = field(default_factory=dict)  # by kind, e.g. {"chosen": 2, "invalid JSON": 1}
    search: str = "exact"  # exact | ann (index.kind)
    ann: dict[str, Any] | None = None  # ann: nlist, nprobe, the calibrated recall@10, seconds per build phase
    seconds_vectors: float = 0.0  # embedding (or reading) the vectors and writing them, before any ANN work
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _file_digests(files: list[str]) -> list[dict[str, Any]]:
    """Size and sha256 of each pool file (streamed), so an index says exactly which data it was built from."""
    out = []
    for uri in files:
        fs, path = storage.get_filesystem(uri)
        h, size = hashlib.sha256(), 0
        try:
            with fs.open_input_stream(path) as f:
                while chunk := f.read(8 << 20):
                    h.update(chunk)
                    size += len(chunk)
        except OSError as exc:
            raise StorageError(f"{uri}: cannot read pool file: {exc}") from exc
        out.append({"uri": uri, "bytes": size, "sha256": h.hexdigest()})
    return out


def _write_npy_header(fh: Any, count: int, dim: int) -> None:
    np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (count, dim)})


def _keeping_input_order(ds: Any) -> Any:
    """A copy of ``ds`` whose own DataContext keeps input order; the caller's dataset is left as it is.

    A Dataset executes with the DataContext it was created with (a copy of the global one at that time), so
    setting ``preserve_order`` on the global context afterwards never reached it: Ray Data then yields blocks in
    completion order, and a multi-file input gave a different row order on every build."""
    from ray.data import Dataset

    ds = Dataset.copy(ds, _deep_copy=True)  # its own context object (a shallow copy shares the caller's)
    ds.context.execution_options.preserve_order = True
    return ds


def build_index(
    pool_uri: str,
    out_uri: str,
    encoder_spec: EncoderSpec | None = None,
    *,
    pool_kind: PoolKind = "dpo",
    limit: int | None = None,
    concurrency: int = 1,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    index: IndexSpec | None = None,
) -> IndexSummary:
    """Embed the pool under ``pool_uri`` (JSONL or Parquet, local or s3://) into an index at ``out_uri``.

    Ray Data reads the pool and embeds it on ``concurrency`` encoder actors (``cpus_per_worker`` CPUs each; a GPU
    each when ``gpus_per_worker`` > 0); the driver streams the results, in input order, into the files described
    in the module docstring, then writes ``index.json`` last. Raises :class:`DataError` when no row is usable.

    ``index`` (:class:`~finemed_ray.ttt.config.IndexSpec`, default exact): with ``kind="ann"`` an IVF-Flat index
    (faiss) is trained on a sample of the vectors and filled shard by shard (Ray Data actors assign the shards
    to cells when there is more than one), its ``nprobe`` calibrated to ``target_recall``, and saved as
    ``ann.faiss``.
    """
    import pyarrow.parquet as pq
    import ray.data

    spec = encoder_spec or EncoderSpec()
    index = index or IndexSpec()
    if index.kind == "ann":
        _import_faiss()  # missing faiss fails before any model loads
    if pool_kind not in POOL_KINDS:
        raise ConfigError(f"pool kind {pool_kind!r}: expected one of {', '.join(POOL_KINDS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"pool limit={limit}: must be >= 1 (or null for all rows)")
    if concurrency < 1:
        raise ConfigError(f"concurrency={concurrency}: must be >= 1")
    t0 = time.time()
    device = "cuda" if gpus_per_worker > 0 else "cpu"
    files, fmt, ds = read_input(pool_uri)  # a missing pool or an unwritable output fails before any model loads
    storage.check_writable(out_uri)
    # Load the encoder once here before any Ray work: a bad path fails now with a clear ModelError (not inside
    # an actor), and its identity goes into index.json.
    driver_encoder = spec.build("cpu")
    identity = driver_encoder.identity()
    del driver_encoder

    digests = _file_digests(files)
    if limit is not None:
        ds = ds.limit(limit)
    summary = IndexSummary(index_uri=out_uri, pool_uri=pool_uri, kind=pool_kind, encoder=spec.path,
                           dim=identity["dim"])
    storage.delete(storage.join(out_uri, INDEX_FILE))  # an old index.json must never describe new files

    embedded = ds.map_batches(
        EmbedPoolBatch,
        batch_format="pyarrow",
        batch_size=max(spec.batch_size, 256),  # the encoder sub-batches; a bigger batch sorted by length pads less
        fn_constructor_kwargs=dict(spec=spec.model_dump(), kind=pool_kind, fmt=fmt, device=device),
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker or None,
    )
    embedded = _keeping_input_order(embedded)  # index row order = input order: reproducible indexes
    tmp = _scratch_dir(out_uri)
    try:
        quarantine_path = os.path.join(tmp, QUARANTINE_FILE)
        with _NpyWriter(os.path.join(tmp, EMBEDDINGS_FILE), summary.dim) as npy, \
                open(quarantine_path, "w", encoding="utf-8") as q_fh, \
                pq.ParquetWriter(os.path.join(tmp, POOL_FILE), POOL_SCHEMA) as pool_writer:
            for batch in embedded.iter_batches(batch_format="pyarrow", batch_size=None):
                summary.rows_in += batch.num_rows
                errors = batch.column("error")
                good = pc.is_null(errors)
                for reason, raw in zip(errors.to_pylist(), batch.column("raw").to_pylist()):
                    if reason is not None:
                        kind = _reason_kind(reason)
                        summary.quarantine_reasons[kind] = summary.quarantine_reasons.get(kind, 0) + 1
                        q_fh.write(json.dumps({"dataset": pool_uri, "reason": reason, "raw": raw},
                                              ensure_ascii=False) + "\n")
                kept = batch.filter(good)
                if kept.num_rows == 0:
                    continue
                vectors = pc.list_flatten(kept.column("embedding")).to_numpy().astype(np.float32, copy=False)
                if vectors.size != kept.num_rows * summary.dim:
                    raise DataError(f"{pool_uri}: embedding worker returned {vectors.size} values for "
                                    f"{kept.num_rows} rows of dim {summary.dim}")
                npy.write(vectors.reshape(kept.num_rows, summary.dim))
                pool_writer.write_table(kept.select(POOL_SCHEMA.names).cast(POOL_SCHEMA))
                summary.rows_indexed += kept.num_rows
                summary.rows_truncated += int(pc.sum(kept.column("truncated")).as_py() or 0)
        summary.rows_quarantined = summary.rows_in - summary.rows_indexed
        summary.seconds_vectors = round(time.time() - t0, 3)
        quarantine_uri = storage.join(out_uri, QUARANTINE_FILE)

        if summary.rows_indexed == 0:
            for name in (EMBEDDINGS_FILE, POOL_FILE):  # nothing to index: upload the quarantine only
                os.remove(os.path.join(tmp, name))
            storage.upload_dir(tmp, out_uri)  # let the user see why
            if summary.rows_in == 0:
                raise DataError(f"{pool_uri}: the pool is empty (no rows in {', '.join(files)})")
            raise DataError(
                f"{pool_uri}: no usable {pool_kind} rows for the index ({summary.rows_quarantined} quarantined to "
                f"{quarantine_uri}; reasons: {json.dumps(summary.quarantine_reasons)})"
            )
        search, file_bytes = _finish_search(tmp, out_uri, index, summary.rows_indexed, summary.dim,
                                            concurrency=concurrency, cpus_per_worker=cpus_per_worker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summary.seconds = round(time.time() - t0, 3)
    summary.search = search["method"]
    summary.ann = _ann_summary(search)
    meta = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_id": uuid.uuid4().hex,
        "count": summary.rows_indexed,
        "dim": summary.dim,
        "dtype": "float32",
        "search": search,
        "encoder": {"spec": spec.model_dump(), "identity": identity},
        "pool": {
            "uri": pool_uri,
            "kind": pool_kind,
            "format": fmt,
            "limit": limit,
            "files": digests,
            "digest": hashlib.sha256("\n".join(f"{d['uri']}\t{d['sha256']}" for d in digests).encode()).hexdigest(),
        },
        "rows": {k: getattr(summary, k) for k in ("rows_in", "rows_indexed", "rows_quarantined", "rows_truncated",
                                                  "quarantine_reasons")},
        "files": _file_names(search),
        "file_bytes": file_bytes,
        "seconds": summary.seconds,
    }
    storage.write_json(storage.join(out_uri, INDEX_FILE), meta)  # last: its presence marks a complete index
    log.info("index %s: %d rows (dim %d, %s search), %d quarantined, %.1fs", out_uri, summary.rows_indexed,
             summary.dim, summary.search, summary.rows_quarantined, summary.seconds)
    return summary


def build_vector_index(
    vectors: Any,
    out_uri: str,
    *,
    dim: int,
    index: IndexSpec | None = None,
    column: str = "embedding",
    id_column: str | None = None,
    source: dict[str, Any] | None = None,
    concurrency: int = 1,
    cpus_per_worker: float = 1.0,
) -> IndexSummary:
    """An index over vectors that are already embeddings (no encoder, no pool rows): large synthetic pools for
    benchmarks, or embeddings computed elsewhere. ``vectors`` is a Ray Dataset whose batches hold ``column``
    (float32 ``[n, dim]``) and optionally ``id_column`` (strings; default ``v<row>``). Ray Data produces the
    shards; the driver streams them, in order, into ``embeddings.npy`` and ``pool.parquet`` (ids only, every
    other column null), then builds the search structure of ``index`` as :func:`build_index` does. Queries must
    be vectors (the index has no encoder); ``source`` is recorded in index.json under ``pool``."""
    import pyarrow.parquet as pq
    import ray.data

    index = index or IndexSpec()
    if dim < 1:
        raise ConfigError(f"dim={dim}: must be >= 1")
    t0 = time.time()
    storage.check_writable(out_uri)
    storage.delete(storage.join(out_uri, INDEX_FILE))
    summary = IndexSummary(index_uri=out_uri, pool_uri="(vectors)", kind="vectors", encoder="", dim=dim)
    vectors = _keeping_input_order(vectors)  # the caller's dataset, read in its order: reproducible indexes
    tmp = _scratch_dir(out_uri)
    try:
        with _NpyWriter(os.path.join(tmp, EMBEDDINGS_FILE), dim) as npy, \
                pq.ParquetWriter(os.path.join(tmp, POOL_FILE), POOL_SCHEMA) as pool_writer:
            for batch in vectors.iter_batches(batch_format="numpy", batch_size=None):
                x = np.asarray(batch[column])
                if x.dtype == object:  # ragged lists: stack them
                    x = np.stack(list(x))
                n = x.shape[0]
                if x.ndim != 2 or x.shape[1] != dim:
                    raise DataError(f"vectors: a batch of shape {x.shape} in column {column!r}: expected [n, {dim}]")
                if id_column is not None:
                    ids = pa.array([str(v) for v in batch[id_column]], pa.string())
                else:
                    ids = pc.binary_join_element_wise(
                        "v", pc.cast(pa.array(np.arange(npy.count, npy.count + n, dtype=np.int64)), pa.string()), "")
                npy.write(x)
                pool_writer.write_table(pa.table(
                    [ids if f.name == "id" else pa.nulls(n, f.type) for f in POOL_SCHEMA], schema=POOL_SCHEMA))
        summary.rows_in = summary.rows_indexed = npy.count
        if npy.count == 0:
            raise DataError("vectors: the dataset is empty")
        summary.seconds_vectors = round(time.time() - t0, 3)
        open(os.path.join(tmp, QUARANTINE_FILE), "w").close()
        search, file_bytes = _finish_search(tmp, out_uri, index, npy.count, dim, concurrency=concurrency,
                                            cpus_per_worker=cpus_per_worker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary.seconds = round(time.time() - t0, 3)
    summary.search = search["method"]
    summary.ann = _ann_summary(search)
    meta = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_id": uuid.uuid4().hex,
        "count": npy.count,
        "dim": dim,
        "dtype": "float32",
        "search": search,
        "encoder": None,
        "pool": {"uri": None, "kind": "vectors", "source": source or {}},
        "rows": {k: getattr(summary, k) for k in ("rows_in", "rows_indexed", "rows_quarantined", "rows_truncated",
                                                  "quarantine_reasons")},
        "files": _file_names(search),
        "file_bytes": file_bytes,
        "seconds": summary.seconds,
    }
    storage.write_json(storage.join(out_uri, INDEX_FILE), meta)
    log.info("vector index %s: %d rows (dim %d, %s search), %.1fs", out_uri, npy.count, dim, summary.search,
             summary.seconds)
    return summary


# ------------------------------------------------------------------------------------------- ANN build


class _NpyWriter:
    """``embeddings.npy`` written as the rows stream in: a header slot first, the rows, then the real header
    (numpy's own, 128 bytes for any realistic shape), so the file is never copied to add a header afterwards."""

    def __init__(self, path: str, dim: int) -> None:
        self.path, self.dim, self.count = path, dim, 0
        self.fh = open(path, "wb")
        self.fh.write(b"\0" * NPY_HEADER_BYTES)

    def write(self, vectors: np.ndarray) -> None:
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise DataError(f"{self.path}: rows of shape {v.shape}: expected [n, {self.dim}]")
        self.fh.write(memoryview(v).cast("B"))
        self.count += v.shape[0]

    def __enter__(self) -> _NpyWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        header = io.BytesIO()
        _write_npy_header(header, self.count, self.dim)
        head = header.getvalue()
        if len(head) == NPY_HEADER_BYTES:
            self.fh.seek(0)
            self.fh.write(head)
            self.fh.close()
            return
        self.fh.close()  # a shape too long for the slot (never in practice): rewrite with the right header
        tmp = self.path + ".tmp"
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            src.seek(NPY_HEADER_BYTES)
            dst.write(head)
            shutil.copyfileobj(src, dst, 16 << 20)
        os.replace(tmp, self.path)


def _npy_layout(path: str) -> tuple[int, int, int]:
    """``(data offset, rows, dim)`` of a float32 C-order ``.npy`` file."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(fh))
        if dtype != np.float32 or fortran or len(shape) != 2:
            raise DataError(f"{path}: expected float32 [count, dim] in C order, got {dtype} {shape}")
        return fh.tell(), int(shape[0]), int(shape[1])


def _read_rows(fh: Any, offset: int, dim: int, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of an open ``.npy`` file (Python file or pyarrow file), as a new float32 array."""
    nbytes = (stop - start) * dim * 4
    pos = offset + start * dim * 4
    if hasattr(fh, "read_at"):  # pyarrow (S3 or local): a ranged read
        data = fh.read_at(nbytes, pos)
    else:
        data = os.pread(fh.fileno(), nbytes, pos)
    if len(data) != nbytes:
        raise DataError(f"embeddings file ends early: rows {start}..{stop} need {nbytes} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=np.float32).reshape(stop - start, dim).copy()


def _sample_rows(fh: Any, offset: int, dim: int, rows: np.ndarray) -> np.ndarray:
    out = np.empty((len(rows), dim), np.float32)
    for j, r in enumerate(rows):
        out[j] = _read_rows(fh, offset, dim, int(r), int(r) + 1)
    return out


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ConfigError("index.kind ann needs faiss (pip install 'finemed-ray[ttt]', which brings faiss-cpu)"
                          ) from None
    return faiss


def auto_nlist(count: int) -> int:
    """The IVF cell count for ``count`` rows when ``index.nlist`` is null: the power of 2 nearest 4 x sqrt(rows),
    at most :data:`MAX_AUTO_NLIST`, and at most rows / 39 (k-means wants ~39 points a cell)."""
    nearest = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(count))))
    return max(1, min(nearest, MAX_AUTO_NLIST, count // 39))


def _shard_bounds(count: int, shard_rows: int) -> list[tuple[int, int]]:
    return [(s, min(count, s + shard_rows)) for s in range(0, count, shard_rows)]


class AssignShards:
    """Ray Data callable class of the ANN build: each input row names a shard ``[start, stop)`` of
    ``embeddings.npy`` (read from the index's own storage by a ranged read, so workers on any node can do it); the
    output row carries the IVF cell of every vector of the shard (int64 bytes), the O(rows x nlist x dim) part
    of the build."""

    def __init__(self, npy_uri: str, offset: int, dim: int, centroids: np.ndarray, threads: int = 1) -> None:
        faiss = _import_faiss()
        faiss.omp_set_num_threads(max(1, int(threads)))
        self.quantizer = faiss.IndexFlatL2(dim)
        self.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
        self.fs, self.path = storage.get_filesystem(npy_uri)
        self.uri, self.offset, self.dim = npy_uri, offset, dim

    def __call__(self, batch: pa.Table) -> pa.Table:
        starts, cells = [], []
        with storage.retrying(self.uri, lambda: self.fs.open_input_file(self.path), "open") as fh:
            for start, stop in zip(batch.column("start").to_pylist(), batch.column("stop").to_pylist()):
                x = _read_rows(fh, self.offset, self.dim, start, stop)
                _, cell = self.quantizer.search(x, 1)
                starts.append(start)
                cells.append(cell.reshape(-1).astype(np.int64).tobytes())
        return pa.table({"start": pa.array(starts, pa.int64()), "cells": pa.array(cells, pa.binary())})


def _build_ann(npy_path: str, npy_uri: str | None, spec: IndexSpec, *, concurrency: int, cpus_per_worker: float
               ) -> tuple[Any, dict[str, Any]]:
    """Train an IVF-Flat index on a sample of ``npy_path`` and add every row, shard by shard (cells from Ray Data
    :class:`AssignShards` actors reading ``npy_uri`` when there is more than one shard and ``npy_uri`` is given,
    else from the driver). Returns ``(faiss index, search metadata)``."""
    faiss = _import_faiss()
    offset, count, dim = _npy_layout(npy_path)
    nlist = min(spec.nlist, count) if spec.nlist is not None else auto_nlist(count)
    train_rows = max(nlist, min(count, spec.train_rows or TRAIN_ROWS_PER_CELL * nlist))
    shard_rows = spec.shard_rows or max(1024, DEFAULT_SHARD_BYTES // (4 * dim))
    shards = _shard_bounds(count, shard_rows)
    rng = np.random.default_rng(SAMPLE_SEED)
    timings: dict[str, float] = {}

    t = time.time()
    with open(npy_path, "rb") as fh:
        sample = (_read_rows(fh, offset, dim, 0, count) if train_rows >= count
                  else _sample_rows(fh, offset, dim, np.sort(rng.choice(count, train_rows, replace=False))))
    quantizer = faiss.IndexFlatL2(dim)
    ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_L2)
    ivf.cp.niter = KMEANS_ITERATIONS
    ivf.cp.seed = SAMPLE_SEED
    ivf.cp.max_points_per_centroid = max(256, -(-train_rows // nlist))  # use the whole sample, no re-sampling
    ivf.cp.min_points_per_centroid = 1  # tiny pools: no warning, the cut to rows / 39 already applies
    ivf.train(sample)
    del sample
    timings["train_s"] = round(time.time() - t, 3)

    t = time.time()
    use_ray = len(shards) > 1 and npy_uri is not None
    with open(npy_path, "rb") as fh:
        def add(start: int, cells: np.ndarray) -> None:
            x = _read_rows(fh, offset, dim, start, start + len(cells))
            ids = np.arange(start, start + len(cells), dtype=np.int64)
            ivf.add_core(len(cells), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(cells))

        if use_ray:
            import ray.data

            centroids = quantizer.reconstruct_n(0, nlist)
            cells_ds = ray.data.from_items([{"start": a, "stop": b} for a, b in shards],
                                           override_num_blocks=len(shards)).map_batches(
                AssignShards,
                batch_format="pyarrow",
                batch_size=1,
                fn_constructor_kwargs=dict(npy_uri=npy_uri, offset=offset, dim=dim, centroids=centroids,
                                           threads=max(1, int(cpus_per_worker))),
                compute=ray.data.ActorPoolStrategy(size=concurrency),
                num_cpus=cpus_per_worker,
            )
            for batch in cells_ds.iter_batches(batch_format="pyarrow", batch_size=None):
                for start, cells in zip(batch.column("start").to_pylist(), batch.column("cells").to_pylist()):
                    add(start, np.frombuffer(cells, dtype=np.int64).copy())
        else:
            for a, b in shards:
                _, cells = quantizer.search(_read_rows(fh, offset, dim, a, b), 1)
                add(a, np.ascontiguousarray(cells.reshape(-1), dtype=np.int64))
    if ivf.ntotal != count:
        raise DataError(f"ANN build: {ivf.ntotal} vectors added, expected {count}")
    timings["add_s"] = round(time.time() - t, 3)

    t = time.time()
    calibration = _calibrate(ivf, npy_path, offset, count, dim, spec, shard_rows, rng)
    timings["calibrate_s"] = round(time.time() - t, 3)
    sizes = np.array([ivf.invlists.list_size(i) for i in range(nlist)])
    search = {
        "method": "ann",
        "metric": "l2",
        "library": f"faiss {faiss.__version__}",
        "algorithm": "IVF-Flat (k-means cells, flat L2 quantizer); candidates re-ranked by exact distance",
        "distance": "Euclidean (not squared) between the stored and the query embeddings",
        "nlist": nlist,
        "nlist_requested": spec.nlist,
        "nprobe": calibration["nprobe"],
        "nprobe_source": "index.nprobe" if spec.nprobe is not None else "calibrated",
        "train_rows": train_rows,
        "kmeans_iterations": KMEANS_ITERATIONS,
        "shard_rows": shard_rows,
        "shards": len(shards),
        "cells_assigned_by": "ray data" if use_ray else "driver",
        "cell_sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max()),
                       "empty": int((sizes == 0).sum())},
        "calibration": calibration,
        "seconds": timings,
    }
    return ivf, search


def _exact_topk(npy_path: str, offset: int, count: int, dim: int, q: np.ndarray, k: int, shard_rows: int
                ) -> np.ndarray:
    """Row indices of the ``k`` nearest rows (float32 L2, nearest first) of every query, streaming the file."""
    best_d = np.full((q.shape[0], 0), np.inf, np.float32)
    best_i = np.zeros((q.shape[0], 0), np.int64)
    step = max(1, min(shard_rows, (64 << 20) // (4 * max(1, q.shape[0]))))
    with open(npy_path, "rb") as fh:
        for a in range(0, count, step):
            b = min(count, a + step)
            x = _read_rows(fh, offset, dim, a, b)
            d2 = np.einsum("ij,ij->i", x, x)[None, :] - 2.0 * (q @ x.T)
            kk = min(k, b - a)
            part = np.argpartition(d2, kk - 1, axis=1)[:, :kk] if kk < b - a else np.broadcast_to(
                np.arange(b - a), d2.shape)
            cand_d = np.concatenate([best_d, np.take_along_axis(d2, part, axis=1)], axis=1)
            cand_i = np.concatenate([best_i, part + a], axis=1)
            keep = np.argsort(cand_d, axis=1, kind="stable")[:, :k]
            best_d, best_i = np.take_along_axis(cand_d, keep, axis=1), np.take_along_axis(cand_i, keep, axis=1)
    return best_i


def _recall_without_self(found: np.ndarray, truth: np.ndarray, own: np.ndarray, k: int) -> float:
    """Mean recall@k of ``found`` against ``truth`` (both k+1 wide), each query's own row left out of both."""
    hits = 0
    for f, t, o in zip(found, truth, own):
        f = [i for i in f if i != o and i >= 0][:k]
        t = [i for i in t if i != o][:k]
        hits += len(set(f) & set(t))
    return hits / (k * len(own))


def _calibrate(ivf: Any, npy_path: str, offset: int, count: int, dim: int, spec: IndexSpec, shard_rows: int,
               rng: np.random.Generator) -> dict[str, Any]:
    """The nprobe to query with (``index.nprobe``, or the smallest power of 2 whose recall@10 reaches
    ``target_recall``) and the recall measured at every nprobe tried: pool rows as queries, each one's own row
    left out, against exact search over every row."""
    k = min(CALIBRATION_K, count - 1)
    m = min(spec.calibration_queries, count)
    nlist = ivf.nlist
    if k < 1:  # a single row: nothing to measure
        return {"queries": 0, "k": 0, "target_recall": spec.target_recall, "recall_by_nprobe": {},
                "nprobe": spec.nprobe or 1, "recall": None}
    own = np.sort(rng.choice(count, m, replace=False))
    with open(npy_path, "rb") as fh:
        q = _sample_rows(fh, offset, dim, own)
    truth = _exact_topk(npy_path, offset, count, dim, q, k + 1, shard_rows)
    ladder = [spec.nprobe] if spec.nprobe is not None else sorted(
        {min(nlist, 2 ** i) for i in range(int(math.ceil(math.log2(nlist))) + 1)})
    recalls: dict[str, float] = {}
    chosen = ladder[-1]
    for nprobe in ladder:
        ivf.nprobe = min(nprobe, nlist)
        _, found = ivf.search(q, k + 1)
        recalls[str(nprobe)] = round(_recall_without_self(found, truth, own, k), 4)
        if spec.nprobe is None and recalls[str(nprobe)] >= spec.target_recall:
            chosen = nprobe
            break
    ivf.nprobe = min(chosen, nlist)
    return {"queries": int(m), "k": k, "target_recall": spec.target_recall, "recall_by_nprobe": recalls,
            "nprobe": int(chosen), "recall": recalls[str(chosen)],
            "queries_are": "pool rows, their own row left out of the answer and the truth"}


def _scratch_dir(out_uri: str) -> str:
    """Where an index is assembled: beside a local ``out_uri`` (same filesystem: the files are then renamed into
    place, not copied: a 10^7-row index is GBs), else the system temp dir."""
    if not storage.is_s3(out_uri) and "://" not in out_uri:
        parent = os.path.dirname(os.path.abspath(out_uri)) or "."
        try:
            os.makedirs(parent, exist_ok=True)
            return tempfile.mkdtemp(prefix=".finemed-index-", dir=parent)
        except OSError:
            pass
    return tempfile.mkdtemp(prefix="finemed-index-")


def _publish(local_dir: str, out_uri: str) -> None:
    """Every file of ``local_dir`` to ``out_uri``: renamed when both are local on one filesystem, else copied or
    uploaded (:func:`finemed_ray.storage.upload_dir`)."""
    if storage.is_s3(out_uri) or "://" in out_uri:
        storage.upload_dir(local_dir, out_uri)
        return
    os.makedirs(out_uri, exist_ok=True)
    for name in sorted(os.listdir(local_dir)):
        src, dst = os.path.join(local_dir, name), os.path.join(out_uri, name)
        try:
            os.replace(src, dst)
        except OSError:
            shutil.copyfile(src, dst)


def _finish_search(tmp: str, out_uri: str, spec: IndexSpec, count: int, dim: int, *, concurrency: int,
                   cpus_per_worker: float) -> tuple[dict[str, Any], dict[str, int]]:
    """Publish the files assembled in ``tmp`` (embeddings.npy, pool.parquet, quarantine.jsonl) to ``out_uri``,
    with ``ann.faiss`` built first when ``spec.kind`` is ann; index.json is the caller's. Returns the ``search``
    section of index.json and the byte size of each file."""
    file_bytes = {key: os.path.getsize(os.path.join(tmp, name)) for key, name in
                  (("embeddings", EMBEDDINGS_FILE), ("pool", POOL_FILE))}
    if spec.kind == "exact":
        search = dict(EXACT_SEARCH)
        _publish(tmp, out_uri)
        return search, file_bytes
    faiss = _import_faiss()
    npy_path = os.path.join(tmp, EMBEDDINGS_FILE)
    npy_uri = None
    shard_rows = spec.shard_rows or max(1024, DEFAULT_SHARD_BYTES // (4 * dim))
    vec_dir = None
    local_npy = npy_path
    if count > shard_rows:  # shards go to Ray Data workers: they read the vectors from the index's storage
        vec_dir = tempfile.mkdtemp(prefix="vectors-", dir=tmp)
        local_npy = os.path.join(vec_dir, EMBEDDINGS_FILE)
        os.replace(npy_path, local_npy)
        _publish(vec_dir, out_uri)
        npy_uri = storage.join(out_uri, EMBEDDINGS_FILE)
        if not os.path.exists(local_npy):  # renamed into a local out_uri: read it there
            local_npy = os.path.join(out_uri, EMBEDDINGS_FILE)
    ivf, search = _build_ann(local_npy, npy_uri, spec, concurrency=concurrency, cpus_per_worker=cpus_per_worker)
    ann_path = os.path.join(tmp, ANN_FILE)
    faiss.write_index(ivf, ann_path)
    del ivf
    file_bytes["ann"] = os.path.getsize(ann_path)
    if vec_dir is not None:
        shutil.rmtree(vec_dir, ignore_errors=True)  # already published
    _publish(tmp, out_uri)
    return search, file_bytes


def _file_names(search: dict[str, Any]) -> dict[str, str]:
    names = {"embeddings": EMBEDDINGS_FILE, "pool": POOL_FILE, "quarantine": QUARANTINE_FILE}
    if search.get("method") == "ann":
        names["ann"] = ANN_FILE
    return names


def _ann_summary(search: dict[str, Any]) -> dict[str, Any] | None:
    if search.get("method") != "ann":
        return None
    cal = search["calibration"]
    return {"nlist": search["nlist"], "nprobe": search["nprobe"], "calibrated_recall_at_10": cal["recall"],
            "seconds": search["seconds"]}


# ----------------------------------------------------------------------------------------------- search


def _local_copy(file_uri: str, build: str, nbytes: int | None) -> str:
    """A local path of one index file, to memory-map: the file itself when the index is local, else its copy in
    the local cache (:func:`finemed_ray.storage.materialize_local`, keyed by URI). An index rebuilt at the same
    URI has another ``build`` id (index.json ``build_id``), recorded beside the cache: a copy of an older build is
    dropped and downloaded again (and so is one whose size is not ``nbytes``)."""
    if not storage.is_s3(file_uri):
        return file_uri
    cache = storage.cache_dir_for(file_uri)
    stamp = cache + ".build"
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache + ".build.lock", "a+") as lock:
        try:
            import fcntl

            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        try:
            with open(stamp, encoding="utf-8") as fh:
                cached_build = fh.read()
        except OSError:
            cached_build = None
        for attempt in range(2):
            if cached_build != build and os.path.lexists(cache):
                shutil.rmtree(cache, ignore_errors=True)  # an older build's copy (a mapped file stays readable)
            path = storage.materialize_local(file_uri)
            if nbytes is None or os.path.getsize(path) == nbytes:
                break
            cached_build = None  # wrong size: a stale or partial copy; download it again, once
        else:
            raise DataError(f"{file_uri}: {os.path.getsize(path)} bytes, index.json says {nbytes} (a rebuild "
                            "raced this load, or the index is damaged): load it again, or rebuild it")
        with open(stamp, "w", encoding="utf-8") as fh:
            fh.write(build)
    return path



class RetrievalIndex:
    """An index built by :func:`build_index`: k nearest rows by L2 distance, exact or approximate.

    Loading (:meth:`load`) memory-maps the vectors: ``embeddings.npy`` (from a local directory, or from the local
    cache copy of an ``s3://`` index: :func:`finemed_ray.storage.materialize_local`) and, for an ANN index, the
    inverted lists of ``ann.faiss`` (faiss ``IO_FLAG_MMAP``). Nothing is read twice or held twice: pages come in
    as searches touch them and the OS can drop them again. ``pool.parquet`` is read from a local file as one Arrow
    table (only the row texts and messages, never the vectors).

    *exact* (the default; the paper's nearest neighbour): ``||q||^2 - 2 q.X + ||X||^2``, one matrix product per
    query batch, which is faiss ``IndexFlatL2``'s own algorithm, so numpy does it without a compiled dependency;
    cost per query is linear in rows (about a second at 10^7 rows of dim 64 on one core). *ann*: faiss IVF-Flat
    (``index.kind: ann``): the query's ``nprobe`` nearest k-means cells are scanned, so a query costs
    O(nprobe x rows / nlist); recall against exact search is measured when the index is built
    (``search.calibration`` in index.json). Either way the top candidates' distances are then recomputed directly
    (``||q - x||`` in float64) and sorted with ties broken by the lower index, so a row's own text comes back at
    distance ~0 instead of the expansion's rounding noise (~1e-3 for unit vectors), and both kinds return the same
    rows and distances whenever the ANN candidates hold the exact top k.
    """

    def __init__(self, embeddings: np.ndarray, pool: pa.Table, meta: dict[str, Any], uri: str | None = None, *,
                 ann: Any = None, nprobe: int | None = None) -> None:
        if embeddings.ndim != 2 or embeddings.dtype != np.float32:
            raise DataError(f"{uri or 'index'}: embeddings must be float32 [count, dim], got "
                            f"{embeddings.dtype} {embeddings.shape}")
        if embeddings.shape != (meta.get("count"), meta.get("dim")) or pool.num_rows != embeddings.shape[0]:
            raise DataError(
                f"{uri or 'index'}: inconsistent index: index.json says {meta.get('count')} x {meta.get('dim')}, "
                f"{EMBEDDINGS_FILE} is {embeddings.shape[0]} x {embeddings.shape[1]}, {POOL_FILE} has "
                f"{pool.num_rows} rows (rebuild the index)"
            )
        if ann is not None and (ann.ntotal != embeddings.shape[0] or ann.d != embeddings.shape[1]):
            raise DataError(f"{uri or 'index'}: inconsistent index: {ANN_FILE} holds {ann.ntotal} x {ann.d}, "
                            f"{EMBEDDINGS_FILE} is {embeddings.shape[0]} x {embeddings.shape[1]} (rebuild the index)")
        self.embeddings = embeddings
        self.pool = pool
        self.meta = meta
        self.uri = uri
        self.ann = ann
        default_nprobe = (meta.get("search") or {}).get("nprobe") or 1
        self.nprobe = int(nprobe if nprobe is not None else default_nprobe)
        if self.nprobe < 1:
            raise ConfigError(f"nprobe={nprobe}: must be >= 1")
        self._sq_norms_cache: np.ndarray | None = None
        self._encoder: Encoder | None = None

    @classmethod
    def load(cls, uri: str, *, search: str | None = None, nprobe: int | None = None) -> RetrievalIndex:
        """Open an index in a local directory or under an ``s3://`` prefix (downloaded once to the local cache,
        then memory-mapped like a local one). ``search``: None = as built (index.json ``search.method``), or
        ``"exact"`` (any index: its ANN file, if any, is not opened) or ``"ann"`` (an index built with
        ``index.kind: ann``). ``nprobe`` overrides the built (calibrated) number of cells an ANN query scans."""
        import pyarrow.parquet as pq

        meta_uri = storage.join(uri, INDEX_FILE)
        try:
            meta = storage.read_json(meta_uri)
        except StorageError as exc:
            raise StorageError(f"{uri}: not a complete retrieval index ({exc}); build one with "
                               "python -m jobs.build_index") from exc
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
            raise DataError(f"{meta_uri}: not a finemed-ray retrieval index (format {meta.get('format')!r})"
                            if isinstance(meta, dict) else f"{meta_uri}: not a finemed-ray retrieval index")
        if meta.get("version") != INDEX_VERSION:
            raise DataError(f"{meta_uri}: index version {meta.get('version')} is not supported "
                            f"(this code reads version {INDEX_VERSION}); rebuild the index")
        built = (meta.get("search") or {}).get("method", "exact")
        use = search or built
        if use not in ("exact", "ann"):
            raise ConfigError(f"search={search!r}: expected exact or ann")
        if use == "ann" and built != "ann":
            raise ConfigError(f"{uri}: built for {built} search only (no {ANN_FILE}); rebuild it with "
                              "index.kind=ann to search it approximately")
        files, sizes = meta.get("files", {}), meta.get("file_bytes") or {}
        build = str(meta.get("build_id") or meta.get("created") or "")
        try:
            emb_path = _local_copy(storage.join(uri, files.get("embeddings", EMBEDDINGS_FILE)), build,
                                   sizes.get("embeddings"))
            pool_path = _local_copy(storage.join(uri, files.get("pool", POOL_FILE)), build, sizes.get("pool"))
            embeddings = np.load(emb_path, mmap_mode="r", allow_pickle=False)
            pool = pq.read_table(pool_path, memory_map=True)
        except (OSError, ValueError) as exc:
            raise DataError(f"{uri}: cannot read the index files: {type(exc).__name__}: {exc}") from exc
        ann = None
        if use == "ann":
            faiss = _import_faiss()
            ann_path = _local_copy(storage.join(uri, files.get("ann", ANN_FILE)), build, sizes.get("ann"))
            try:
                ann = faiss.read_index(ann_path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            except RuntimeError as exc:
                raise DataError(f"{uri}: cannot read {ANN_FILE}: {str(exc).splitlines()[0]}") from exc
        return cls(embeddings, pool, meta, uri, ann=ann, nprobe=nprobe)

    # -- properties

    @property
    def count(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def _encoder_meta(self) -> dict[str, Any]:
        enc = self.meta.get("encoder")
        if not enc:
            raise ConfigError(f"index {self.uri or '(in memory)'} was built from vectors (no encoder): query it "
                              "with vectors, not texts")
        return enc

    @property
    def identity(self) -> dict[str, Any]:
        return self._encoder_meta()["identity"]

    # -- encoder

    def check_encoder(self, encoder: Encoder) -> None:
        """Raise :class:`ConfigError` unless ``encoder`` embeds as the index's encoder did (model, pooling,
        normalisation, dim, max_length); the message names both encoders and each difference."""
        problems = identity_mismatch(self.identity, encoder.identity())
        if problems:
            raise ConfigError(
                f"query encoder {encoder.path!r} (pooling={encoder.pooling}, dim={encoder.dim}) does not match the "
                f"encoder of index {self.uri or '(in memory)'}: {self.identity.get('path')!r} "
                f"(pooling={self.identity.get('pooling')}, dim={self.identity.get('dim')}): " + "; ".join(problems)
            )

    def encoder(self, path: str | None = None, device: str = "cpu") -> Encoder:
        """The encoder this index was built with (from index.json), optionally loaded from another ``path`` (e.g.
        a local copy of the same model); checked against the index before it is returned."""
        spec = EncoderSpec(**self._encoder_meta()["spec"])
        if path is not None:
            spec = spec.model_copy(update={"path": path})
        enc = spec.build(device)
        self.check_encoder(enc)
        return enc

    # -- search

    def search(self, query_vectors: np.ndarray, k: int = 1, *, nprobe: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest rows by L2 distance: ``(distances float32 [q, k], indices int64 [q, k])``, nearest first,
        ties broken by the lower index. ``k`` larger than the pool is cut to the pool size. Exact, or approximate
        when the index was loaded with its ANN file (:attr:`kind`); ``nprobe`` overrides :attr:`nprobe` for this
        call (ANN only)."""
        q = np.asarray(query_vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ConfigError(f"query vectors of shape {q.shape}: expected [n, {self.dim}] (the index's dim)")
        if k < 1:
            raise ConfigError(f"k={k}: must be >= 1")
        k = min(k, self.count)
        if self.ann is None:
            return self._exact_search(q, k)
        if nprobe is not None and nprobe < 1:
            raise ConfigError(f"nprobe={nprobe}: must be >= 1")
        return self._ann_search(q, k, int(nprobe or self.nprobe))

    @property
    def kind(self) -> str:
        """``"ann"`` when queries go through the ANN file, else ``"exact"``."""
        return "exact" if self.ann is None else "ann"

    @property
    def _sq_norms(self) -> np.ndarray:
        if self._sq_norms_cache is None:  # first exact search: an ANN-only index never reads every row
            self._sq_norms_cache = np.einsum("ij,ij->i", self.embeddings, self.embeddings, dtype=np.float64)
        return self._sq_norms_cache

    def _rerank(self, q: np.ndarray, c: np.ndarray, k: int, vectors: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest of candidate rows ``c`` (their vectors: ``vectors``, else read from the embeddings),
        by float64 Euclidean distance, ties broken by the lower row."""
        x = self.embeddings[c] if vectors is None else vectors
        exact = np.linalg.norm(x.astype(np.float64) - q.astype(np.float64), axis=1)
        order = np.lexsort((c, exact))[:k]
        return exact[order], c[order]

    def _exact_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n_cand = min(self.count, max(2 * k, k + 8))  # re-ranked exactly below
        # Query chunks keep the [chunk, count] distance matrix near 256 MiB whatever the pool size.
        chunk = max(1, (256 << 20) // (8 * self.count))
        dists = np.empty((q.shape[0], k), np.float32)
        idx = np.empty((q.shape[0], k), np.int64)
        for s in range(0, q.shape[0], chunk):
            qc = q[s:s + chunk]
            d2 = self._sq_norms[None, :] - 2.0 * (qc @ self.embeddings.T).astype(np.float64)
            cand = (np.argpartition(d2, n_cand - 1, axis=1)[:, :n_cand] if n_cand < self.count
                    else np.broadcast_to(np.arange(self.count), d2.shape))
            for r in range(qc.shape[0]):
                dists[s + r], idx[s + r] = self._rerank(qc[r], cand[r], k)
        return dists, idx

    def _ann_search(self, q: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        n_cand = min(self.count, max(2 * k, k + 8))  # faiss ranks in float32; re-ranked exactly below
        params = faiss.SearchParametersIVF(nprobe=min(nprobe, self.ann.nlist))
        # The candidates' vectors come from the cells just scanned (IVF-Flat stores them as they are), so a search
        # touches no page of embeddings.npy: random row reads there would page in ~64-128 KiB each.
        _, cand, vectors = self.ann.search_and_reconstruct(np.ascontiguousarray(q), n_cand, params=params)
        dists = np.empty((q.shape[0], k), np.float32)
        idx = np.empty((q.shape[0], k), np.int64)
        short = []
        for r in range(q.shape[0]):
            found = cand[r] >= 0
            c = cand[r][found]
            if c.size < k:  # the scanned cells hold fewer than k rows: this query is answered exactly
                short.append(r)
                continue
            dists[r], idx[r] = self._rerank(q[r], c, k, vectors[r][found])
        if short:
            dists[short], idx[short] = self._exact_search(q[short], k)
        return dists, idx

    def select(self, query_vectors: np.ndarray, k: int = 1, *, selection: str = "nearest",
               sift_lambda: float = SIFT_LAMBDA, sift_candidates: int = SIFT_CANDIDATES
               ) -> tuple[np.ndarray, np.ndarray]:
        """The rows each query trains on: ``(distances float32 [q, k'], indices int64 [q, k'])``.

        ``selection="nearest"``: :meth:`search` (``k' = min(k, count)``). ``"sift"``: SIFT
        (:func:`finemed_ray.ttt.select.sift_select`, regularisation ``sift_lambda``) over the query's
        ``sift_candidates`` nearest rows, in the order picked; ``k' = k`` and an index may repeat (re-selection).
        The distances are each picked row's L2 distance to the query, as :meth:`search` reports it."""
        check_selection(selection, sift_lambda, sift_candidates)
        if selection == "nearest":
            return self.search(query_vectors, k)
        if k < 1:
            raise ConfigError(f"k={k}: must be >= 1")
        cand_d, cand_i = self.search(query_vectors, min(int(sift_candidates), self.count))
        q = np.asarray(query_vectors, dtype=np.float32).reshape(cand_i.shape[0], self.dim)
        dists = np.empty((q.shape[0], k), np.float32)
        idx = np.empty((q.shape[0], k), np.int64)
        for r in range(q.shape[0]):
            picks, _ = sift_select(q[r], self.embeddings[cand_i[r]], k, sift_lambda)
            dists[r], idx[r] = cand_d[r, picks], cand_i[r, picks]
        return dists, idx

    def rows(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Pool rows (``POOL_SCHEMA`` dicts) at ``indices``."""
        return self.pool.take(pa.array(np.asarray(indices, dtype=np.int64))).to_pylist()

    def neighbours(self, queries: Sequence[str] | np.ndarray, k: int = 1, encoder: Encoder | None = None, *,
                   selection: str = "nearest", sift_lambda: float = SIFT_LAMBDA,
                   sift_candidates: int = SIFT_CANDIDATES) -> tuple[list[list[dict[str, Any]]], np.ndarray]:
        """For each query (a text, or a vector already embedded by a matching encoder) its ``k`` pool rows:
        ``(rows, distances)`` with ``rows[q]`` a list of pool-row dicts (``POOL_SCHEMA`` + ``index``, the row's
        position in the index) and ``distances`` float32 ``[q, k]``. The rows are the ``k`` nearest, nearest first
        (``selection="nearest"``, the default), or SIFT's picks in the order picked (``"sift"``, see
        :meth:`select`; a row may come more than once). Texts are embedded with ``encoder`` (checked against the
        index) or, when none is given, the index's own encoder from index.json."""
        check_selection(selection, sift_lambda, sift_candidates)
        if isinstance(queries, np.ndarray):
            vectors = queries
        else:
            texts = [queries] if isinstance(queries, str) else list(queries)
            if not all(isinstance(t, str) for t in texts):
                raise ConfigError("neighbours: queries must be texts or an array of vectors")
            if encoder is None:
                if self._encoder is None:
                    self._encoder = self.encoder()
                encoder = self._encoder
            else:
                self.check_encoder(encoder)
            vectors = encoder.encode(texts)
        dists, idx = self.select(vectors, k, selection=selection, sift_lambda=sift_lambda,
                                 sift_candidates=sift_candidates)
        rows = [[{**row, "index": int(i)} for row, i in zip(self.rows(i_row), i_row)] for i_row in idx]
        return rows, dists


def load_index_and_encoder(uri: str, encoder_path: str | None = None, device: str = "cpu"
                           ) -> tuple[RetrievalIndex, Encoder]:
    """The index at ``uri`` and the encoder it was built with (from its index.json; ``encoder_path`` loads the same
    model from elsewhere, e.g. a local copy), already checked against each other."""
    index = RetrievalIndex.load(uri)
    return index, index.encoder(encoder_path, device)


__all__ = [
    "AssignShards",
    "EmbedPoolBatch",
    "IndexSummary",
    "POOL_SCHEMA",
    "RetrievalIndex",
    "auto_nlist",
    "build_index",
    "build_vector_index",
    "load_index_and_encoder",
    "pool_entries",
]
