"""The TTT retrieval index: the training pool embedded once (Ray Data), searched exactly by L2 distance.

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
import os
import shutil
import tempfile
import time
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
from finemed_ray.ttt.embed import Encoder, EncoderSpec, identity_mismatch
from finemed_ray.ttt.select import SIFT_CANDIDATES, SIFT_LAMBDA, check_selection, sift_select

log = logging.getLogger(__name__)

PoolKind = Literal["dpo", "sft"]
POOL_KINDS = ("dpo", "sft")
INDEX_FORMAT = "finemed-ray/retrieval-index"
INDEX_VERSION = 1
INDEX_FILE, EMBEDDINGS_FILE, POOL_FILE, QUARANTINE_FILE = "index.json", "embeddings.npy", "pool.parquet", \
    "quarantine.jsonl"

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
) -> IndexSummary:
    """Embed the pool under ``pool_uri`` (JSONL or Parquet, local or s3://) into an index at ``out_uri``.

    Ray Data reads the pool and embeds it on ``concurrency`` encoder actors (``cpus_per_worker`` CPUs each; a GPU
    each when ``gpus_per_worker`` > 0); the driver streams the results, in input order, into the files described
    in the module docstring, then writes ``index.json`` last. Raises :class:`DataError` when no row is usable.
    """
    import pyarrow.parquet as pq
    import ray.data

    spec = encoder_spec or EncoderSpec()
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
    ctx = ray.data.DataContext.get_current()
    saved_order = ctx.execution_options.preserve_order
    tmp = tempfile.mkdtemp(prefix="finemed-index-")
    try:
        raw_path = os.path.join(tmp, "embeddings.f32")
        quarantine_path = os.path.join(tmp, QUARANTINE_FILE)
        ctx.execution_options.preserve_order = True  # index row order = input order: reproducible indexes
        with open(raw_path, "wb") as raw_fh, open(quarantine_path, "w", encoding="utf-8") as q_fh, \
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
                raw_fh.write(vectors.tobytes())
                pool_writer.write_table(kept.select(POOL_SCHEMA.names).cast(POOL_SCHEMA))
                summary.rows_indexed += kept.num_rows
                summary.rows_truncated += int(pc.sum(kept.column("truncated")).as_py() or 0)
        summary.rows_quarantined = summary.rows_in - summary.rows_indexed
        quarantine_uri = storage.join(out_uri, QUARANTINE_FILE)

        if summary.rows_indexed == 0:
            for name in ("embeddings.f32", POOL_FILE):  # nothing to index: upload the quarantine only
                os.remove(os.path.join(tmp, name))
            storage.upload_dir(tmp, out_uri)  # let the user see why
            if summary.rows_in == 0:
                raise DataError(f"{pool_uri}: the pool is empty (no rows in {', '.join(files)})")
            raise DataError(
                f"{pool_uri}: no usable {pool_kind} rows for the index ({summary.rows_quarantined} quarantined to "
                f"{quarantine_uri}; reasons: {json.dumps(summary.quarantine_reasons)})"
            )
        with open(os.path.join(tmp, EMBEDDINGS_FILE), "wb") as npy, open(raw_path, "rb") as raw_fh:
            _write_npy_header(npy, summary.rows_indexed, summary.dim)
            shutil.copyfileobj(raw_fh, npy, 16 << 20)
        os.remove(raw_path)
        storage.upload_dir(tmp, out_uri)
    finally:
        ctx.execution_options.preserve_order = saved_order
        shutil.rmtree(tmp, ignore_errors=True)

    summary.seconds = round(time.time() - t0, 3)
    meta = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "count": summary.rows_indexed,
        "dim": summary.dim,
        "dtype": "float32",
        "search": {"method": "exact", "metric": "l2", "library": "numpy",
                   "distance": "Euclidean (not squared) between the stored and the query embeddings"},
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
        "files": {"embeddings": EMBEDDINGS_FILE, "pool": POOL_FILE, "quarantine": QUARANTINE_FILE},
        "seconds": summary.seconds,
    }
    storage.write_json(storage.join(out_uri, INDEX_FILE), meta)  # last: its presence marks a complete index
    log.info("index %s: %d rows (dim %d), %d quarantined, %.1fs", out_uri, summary.rows_indexed, summary.dim,
             summary.rows_quarantined, summary.seconds)
    return summary


# ----------------------------------------------------------------------------------------------- search


class RetrievalIndex:
    """An index built by :func:`build_index`, in memory: exact L2 search over its embeddings.

    Why numpy and not faiss: exact search is ``||q||^2 - 2 q.X + ||X||^2``, one matrix product per query batch;
    for the pools TTT uses (DPO/SFT sets of up to a few million rows of 384-1024 dims) BLAS does that in
    milliseconds to a second per query batch, which is faiss ``IndexFlatL2``'s own algorithm. faiss would only
    pay off with approximate indexes (IVF/HNSW), which the paper's exact nearest neighbour does not want, and it
    is one more compiled dependency for every worker. The top candidates' distances are then recomputed directly
    (``||q - x||`` in float64), so a row's own text comes back at distance ~0 instead of the expansion's rounding
    noise (~1e-3 for unit vectors).
    """

    def __init__(self, embeddings: np.ndarray, pool: pa.Table, meta: dict[str, Any], uri: str | None = None) -> None:
        if embeddings.ndim != 2 or embeddings.dtype != np.float32:
            raise DataError(f"{uri or 'index'}: embeddings must be float32 [count, dim], got "
                            f"{embeddings.dtype} {embeddings.shape}")
        if embeddings.shape != (meta.get("count"), meta.get("dim")) or pool.num_rows != embeddings.shape[0]:
            raise DataError(
                f"{uri or 'index'}: inconsistent index: index.json says {meta.get('count')} x {meta.get('dim')}, "
                f"{EMBEDDINGS_FILE} is {embeddings.shape[0]} x {embeddings.shape[1]}, {POOL_FILE} has "
                f"{pool.num_rows} rows (rebuild the index)"
            )
        self.embeddings = embeddings
        self.pool = pool
        self.meta = meta
        self.uri = uri
        self._sq_norms = np.einsum("ij,ij->i", embeddings, embeddings, dtype=np.float64)
        self._encoder: Encoder | None = None

    @classmethod
    def load(cls, uri: str) -> RetrievalIndex:
        """Read an index from a local directory or an ``s3://`` prefix (whole, into memory)."""
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
        files = meta.get("files", {})
        emb_uri = storage.join(uri, files.get("embeddings", EMBEDDINGS_FILE))
        pool_uri = storage.join(uri, files.get("pool", POOL_FILE))
        try:
            source = emb_uri if not storage.is_s3(emb_uri) else io.BytesIO(storage.read_bytes(emb_uri))
            embeddings = np.load(source, allow_pickle=False)
            pool = pq.read_table(io.BytesIO(storage.read_bytes(pool_uri)))
        except (OSError, ValueError) as exc:
            raise DataError(f"{uri}: cannot read the index files: {type(exc).__name__}: {exc}") from exc
        return cls(embeddings, pool, meta, uri)

    # -- properties

    @property
    def count(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def identity(self) -> dict[str, Any]:
        return self.meta["encoder"]["identity"]

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
        spec = EncoderSpec(**self.meta["encoder"]["spec"])
        if path is not None:
            spec = spec.model_copy(update={"path": path})
        enc = spec.build(device)
        self.check_encoder(enc)
        return enc

    # -- search

    def search(self, query_vectors: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Exact k nearest neighbours by L2 distance: ``(distances float32 [q, k], indices int64 [q, k])``, nearest
        first, ties broken by the lower index. ``k`` larger than the pool is cut to the pool size."""
        q = np.asarray(query_vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ConfigError(f"query vectors of shape {q.shape}: expected [n, {self.dim}] (the index's dim)")
        if k < 1:
            raise ConfigError(f"k={k}: must be >= 1")
        k = min(k, self.count)
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
                c = cand[r]
                exact = np.linalg.norm(self.embeddings[c].astype(np.float64) - qc[r].astype(np.float64), axis=1)
                order = np.lexsort((c, exact))[:k]
                dists[s + r], idx[s + r] = exact[order], c[order]
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
    "EmbedPoolBatch",
    "IndexSummary",
    "POOL_SCHEMA",
    "RetrievalIndex",
    "build_index",
    "load_index_and_encoder",
    "pool_entries",
]
