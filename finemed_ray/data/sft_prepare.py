"""Ray Data: raw SFT conversations (JSONL or Parquet, local or S3) -> a tokenised Parquet dataset + quarantine.

One pass validates and tokenises every row, in parallel, and writes them all (good and bad, tagged with
``error``) to ``<run>/prepared/``. The quarantine dataset and the counts are then cheap reads of that one
output. Trainers stream only the good rows; nothing is held in one process's memory.

JSONL is read as text lines and parsed per row, so one malformed line is quarantined instead of failing the
whole file (Arrow's JSON reader would reject the block).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from finemed_ray import storage
from finemed_ray.data.tokenize import IGNORE_INDEX, TemplateError, tokenize_conversation, with_system_prompt
from finemed_ray.errors import DataError
from finemed_ray.schemas import QUARANTINE_SCHEMA, parse_jsonl_line, to_raw, validate_sft_row

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)

PREPARED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("num_tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("department", pa.string()),
        ("subdepartment", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),  # good rows: "train" | "eval" | "filtered" (outside the department filter)
        ("error", pa.string()),  # null for good rows; the quarantine reason otherwise
        ("raw", pa.string()),  # the row as read, kept for bad rows only
    ]
)


@dataclass
class PrepareSummary:
    input_uri: str
    prepared_uri: str
    quarantine_uri: str
    rows_in: int = 0
    rows_valid: int = 0
    rows_quarantined: int = 0
    rows_truncated: int = 0
    rows_filtered_out: int = 0  # valid rows outside data.department / data.subdepartment
    rows_train: int = 0
    rows_eval: int = 0
    tokens_valid: int = 0
    tokens_train: int = 0
    departments: dict[str, int] = field(default_factory=dict)  # valid rows per "primary / secondary" label
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def input_files(uri: str) -> tuple[list[str], str]:
    """The data files under ``uri`` and their format ("jsonl" | "parquet"); errors name the path."""
    if not storage.exists(uri):
        raise DataError(f"dataset not found: {uri}")
    files = storage.list_files(uri, suffixes=JSONL_SUFFIXES + PARQUET_SUFFIXES)
    if not files:
        raise DataError(f"{uri}: no .jsonl/.json/.parquet files found")
    kinds = {"parquet" if f.endswith(PARQUET_SUFFIXES) else "jsonl" for f in files}
    if len(kinds) > 1:
        raise DataError(f"{uri}: mixes JSONL and Parquet files; point to one format")
    return files, kinds.pop()


def read_input(uri: str):
    """``(files, fmt, dataset)``: the JSONL lines (one ``text`` column) or Parquet rows under ``uri``, lazily."""
    import ray.data

    files, fmt = input_files(uri)
    fs, _ = storage.get_filesystem(files[0])
    paths = [storage.get_filesystem(f)[1] for f in files]
    if fmt == "jsonl":
        return files, fmt, ray.data.read_text(paths, filesystem=fs, drop_empty_lines=True)
    return files, fmt, ray.data.read_parquet(paths, filesystem=fs)


def _row_id(raw: str) -> str:
    # Stable across runs and workers: the same row always gets the same id (used to track samples seen).
    return "h" + hashlib.sha1(raw.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass(frozen=True)
class RowSelection:
    """Which valid rows a stage trains on, and which it holds out for eval loss."""

    department: str | None = None  # primary department, compared case-insensitively
    subdepartment: str | None = None  # secondary department, compared case-insensitively
    eval_fraction: float = 0.0

    def describe(self) -> str:
        parts = [f"data.{k}={v!r}" for k, v in (("department", self.department),
                                                ("subdepartment", self.subdepartment)) if v]
        return ", ".join(parts) or "no filter"

    def split_of(self, row_id: str, department: str | None, subdepartment: str | None) -> str:
        if self.department and _norm(department) != _norm(self.department):
            return "filtered"
        if self.subdepartment and _norm(subdepartment) != _norm(self.subdepartment):
            return "filtered"
        # A stable hash of the id, not a random draw: the same row lands in the same split on every run/worker.
        bucket = int(hashlib.sha1(row_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        return "eval" if bucket < self.eval_fraction else "train"


def _norm(label: str | None) -> str:
    return " ".join((label or "").split()).casefold()


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(path: str):
    from finemed_ray.models.loading import load_tokenizer

    return load_tokenizer(path)


def prepare_batch(batch: pa.Table, tokenizer_path: str, max_length: int, system_prompt: str | None,
                  fmt: str, selection: RowSelection = RowSelection(), overlong: str = "truncate") -> pa.Table:
    """Validate + tokenise one Arrow batch; every input row yields exactly one output row."""
    tok = _cached_tokenizer(tokenizer_path)
    if fmt == "jsonl":
        records = []
        for line in batch.column("text").to_pylist():
            parsed, err = parse_jsonl_line(line)
            records.append((line, parsed, err))
    else:
        records = [(None, row, None) for row in batch.to_pylist()]

    out = {name: [] for name in PREPARED_SCHEMA.names}
    for line, row, err in records:
        raw = line if line is not None else to_raw(row)
        err = err or validate_sft_row(row)
        result = None
        if err is None:
            try:
                result = tokenize_conversation(tok, with_system_prompt(row["messages"], system_prompt), max_length)
            except TemplateError as e:
                err = f"chat template: {e}"
            except Exception as e:  # tokenizer failure on this row only: quarantine it, keep going
                err = f"tokenization failed: {type(e).__name__}: {e}"
        if result is not None and overlong == "drop" and result["truncated"]:
            err = f"overlong: {result['num_tokens']} tokens > data.max_length={max_length} (data.overlong=drop)"
        elif result is not None and all(lbl == IGNORE_INDEX for lbl in result["labels"]):
            err = (f"no assistant tokens within max_length={max_length} "
                   f"(conversation has {result['num_tokens']} tokens)")
        good = err is None
        rid = row.get("id") if isinstance(row, dict) and isinstance(row.get("id"), str) else None
        rid = rid or _row_id(raw)
        out["id"].append(rid)
        out["input_ids"].append(result["input_ids"] if good else None)
        out["labels"].append(result["labels"] if good else None)
        out["num_tokens"].append(result["num_tokens"] if good else None)
        out["truncated"].append(result["truncated"] if good else None)
        for key in ("department", "subdepartment", "source"):
            v = row.get(key) if isinstance(row, dict) else None
            out[key].append(v if isinstance(v, str) else None)
        out["split"].append(selection.split_of(rid, out["department"][-1], out["subdepartment"][-1]) if good else None)
        out["error"].append(err)
        out["raw"].append(None if good else raw)
    return pa.Table.from_pydict(out, schema=PREPARED_SCHEMA)


def _reason_kind(reason: str) -> str:
    # Group counts by the kind of problem ("messages[1].role", "invalid JSON", ...) not the exact text.
    return reason.split(":", 1)[0]


STATS_COLUMNS = ["num_tokens", "truncated", "split", "department", "subdepartment", "error"]


def tally_prepared(prepared_uri: str, schema: pa.Schema, summary: Any) -> None:
    """Add the counts of the prepared dataset at ``prepared_uri`` to ``summary`` (a :class:`PrepareSummary` or
    ``DPOPrepareSummary``: rows in / valid / quarantined by reason / truncated / per split, tokens, departments).

    The counts need six small columns only: the driver streams them batch by batch straight from the files (a Ray
    Data read-back would cost a whole execution for what is a cheap column scan)."""
    import pyarrow.dataset as pads

    files = storage.list_files(prepared_uri, suffixes=(".parquet",))  # an input without lines may write none
    fs = storage.get_filesystem(prepared_uri)[0]
    stats = pads.dataset([storage.get_filesystem(f)[1] for f in files], schema=schema, filesystem=fs,
                         format="parquet")
    for batch in stats.to_batches(columns=STATS_COLUMNS, batch_size=65536):
        summary.rows_in += batch.num_rows
        for row in batch.to_pylist():
            if row["error"] is not None:
                kind = _reason_kind(row["error"])
                summary.quarantine_reasons[kind] = summary.quarantine_reasons.get(kind, 0) + 1
                continue
            summary.rows_valid += 1
            summary.tokens_valid += row["num_tokens"]
            summary.rows_truncated += int(row["truncated"])
            label = f"{row['department'] or '-'} / {row['subdepartment'] or '-'}"
            summary.departments[label] = summary.departments.get(label, 0) + 1
            if row["split"] == "filtered":
                summary.rows_filtered_out += 1
            elif row["split"] == "eval":
                summary.rows_eval += 1
            else:
                summary.rows_train += 1
                summary.tokens_train += row["num_tokens"]
    summary.rows_quarantined = summary.rows_in - summary.rows_valid


def write_quarantine(prepared_uri: str, quarantine_uri: str, input_uri: str) -> None:
    """The bad rows of a prepared dataset (``error`` set) as ``{dataset, reason, raw}`` rows at ``quarantine_uri``."""
    import ray.data
    from ray.data.expressions import col

    fs, path = storage.get_filesystem(prepared_uri)
    bad = ray.data.read_parquet(path, filesystem=fs).select_columns(["error", "raw"]).filter(
        expr=col("error").is_not_null())
    q_fs, q_path = storage.get_filesystem(quarantine_uri)
    bad.map_batches(
        lambda t: pa.table(
            {"dataset": pa.array([input_uri] * t.num_rows, pa.string()), "reason": t["error"], "raw": t["raw"]},
            schema=QUARANTINE_SCHEMA,
        ),
        batch_format="pyarrow",
    ).write_parquet(q_path, filesystem=q_fs)


def check_selected(summary: Any, selection: RowSelection, what: str = "rows") -> None:
    """DataError when nothing valid was read, or when the department filter leaves no training row."""
    if summary.rows_valid == 0:
        raise DataError(
            f"{summary.input_uri}: no valid {what} ({summary.rows_quarantined} quarantined to "
            f"{summary.quarantine_uri}; reasons: {json.dumps(summary.quarantine_reasons)})"
        )
    if summary.rows_train == 0:
        raise DataError(
            f"{summary.input_uri}: the filter {selection.describe()} selects no training rows "
            f"({summary.rows_valid} valid rows; departments present: {json.dumps(summary.departments)})"
        )


def write_prepared(ds: Any, out_uri: str, batch_fn: Any, **fn_kwargs: Any) -> tuple[str, str]:
    """Run ``batch_fn`` over ``ds`` into ``<out_uri>/prepared`` (every row, good and bad); returns the prepared and
    quarantine URIs. Both are emptied first: a re-run must not mix old and new files."""
    prepared_uri = storage.join(out_uri, "prepared")
    quarantine_uri = storage.join(out_uri, "quarantine")
    for uri in (prepared_uri, quarantine_uri):
        storage.delete(uri)
    out_fs, prepared_path = storage.get_filesystem(prepared_uri)
    ds.map_batches(batch_fn, batch_format="pyarrow", fn_kwargs=fn_kwargs).write_parquet(prepared_path,
                                                                                         filesystem=out_fs)
    return prepared_uri, quarantine_uri


def prepare_sft(input_uri: str, tokenizer_path: str, out_uri: str, max_length: int,
                system_prompt: str | None = None, selection: RowSelection = RowSelection(),
                overlong: str = "truncate") -> PrepareSummary:
    """Tokenise ``input_uri`` into ``<out_uri>/prepared`` and quarantine bad rows into ``<out_uri>/quarantine``."""
    t0 = time.time()
    files, fmt, ds = read_input(input_uri)

    prepared_uri, quarantine_uri = write_prepared(
        ds, out_uri, prepare_batch, tokenizer_path=tokenizer_path, max_length=max_length,
        system_prompt=system_prompt, fmt=fmt, selection=selection, overlong=overlong,
    )

    if not storage.list_files(prepared_uri, suffixes=(".parquet",)):  # Ray Data writes no file for 0 rows
        raise DataError(f"{input_uri}: the dataset is empty (no rows in {', '.join(files)})")
    summary = PrepareSummary(input_uri=input_uri, prepared_uri=prepared_uri, quarantine_uri=quarantine_uri)
    tally_prepared(prepared_uri, PREPARED_SCHEMA, summary)
    if summary.rows_quarantined:
        write_quarantine(prepared_uri, quarantine_uri, input_uri)
    summary.seconds = round(time.time() - t0, 3)
    check_selected(summary, selection)
    return summary


def read_prepared(prepared_uri: str, split: str = "train"):
    """One split of a prepared dataset's good rows, as a Ray Dataset of ``id``, ``input_ids``, ``labels``."""
    import ray.data
    from ray.data.expressions import col

    fs, path = storage.get_filesystem(prepared_uri)
    return (
        ray.data.read_parquet(path, filesystem=fs)
        .select_columns(["id", "input_ids", "labels", "split", "error"])
        .filter(expr=col("error").is_null() & (col("split") == split))
        .select_columns(["id", "input_ids", "labels"])
    )
