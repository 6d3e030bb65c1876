"""Ray Data: raw SFT conversations (JSONL or Parquet, local or S3) -> a tokenised Parquet dataset + quarantine.

One pass validates and tokenises every row, in parallel, and writes them all (good and bad, tagged with
``error``) to ``<run>/prepared/``. The quarantine dataset and the counts are then cheap reads of that one
output. Trainers stream only the good rows; nothing is held in one process's memory.

What a data path may hold (:func:`input_files`; the same rules for DPO data, TTT pools and synthesis seeds):

* one file, or a prefix/directory read recursively. Data files are recognised by suffix (case-sensitive):
  JSONL ``.jsonl`` / ``.json`` (one JSON object per line), gzip-compressed JSONL ``.jsonl.gz`` / ``.json.gz``
  (decompressed while streaming), Parquet ``.parquet``;
* one format per dataset: JSONL and Parquet files under one prefix are an error that names one file of each;
* any other file under the prefix (``.txt``, ``.csv``, ``.jsonl.bz2``, ...) is an error that names it and the
  supported formats, since skipping it would silently drop its rows. Ignored: S3 "folder" markers (keys ending
  in ``/``) and marker/hidden files without a data suffix whose name starts with ``_`` or ``.`` (``_SUCCESS``,
  ``_COMPLETE``, ``.DS_Store``);
* Parquet files are checked on the driver before any compute (their footers only): a file that is not Parquet
  is an error naming it; a column whose type differs between two files in a way Arrow cannot unify (e.g.
  ``messages`` a list in one file and a string in another) is an error naming the column and both files
  (all-null columns and promotable types such as int32/int64 are fine); 0-byte files hold no rows and are
  skipped; a dataset with no rows at all is an error naming its files.

JSONL is read by :class:`JsonlLinesDatasource` as bytes, line by line, streaming, and parsed per row, so one bad
line is quarantined instead of failing the whole file (Arrow's JSON reader would reject the block). Every JSONL
quarantine reason ends with ``(<file> line <n>)`` (physical line number, 1-based). Per line:

* blank lines are not rows (skipped, still counted for line numbers); ``\\r\\n`` endings are fine; a UTF-8
  byte-order mark at the start of a line (the start of the file) is dropped;
* bytes that are not UTF-8 -> quarantined, reason ``encoding: ...`` naming the first bad byte; the raw row keeps
  the bad bytes as ``\\xNN`` escapes; the other lines of the file still train;
* a line over ``max_row_bytes`` (default :data:`MAX_ROW_BYTES`, 16 MiB) is never held whole in memory nor
  tokenised: quarantined as ``row too large: ...`` with its first 64 KiB as raw. The same limit applies to a
  Parquet row (measured as its JSON text);
* invalid JSON (also nesting too deep for the parser), valid JSON that is not an object (``[1,2]``, ``"x"``,
  ``null``), unpaired ``\\udXXX`` surrogate escapes -> quarantined with that reason;
* a file that cannot be read at all -- a ``.gz`` that is not gzip or is truncated, a UTF-16/UTF-32 file (its
  byte-order mark) -- yields one ``unreadable file: ...`` row, and the stage then fails with that one-line
  :class:`DataError` naming the file (and the line where reading stopped): the rest of that file cannot be
  read, so training on the other files would silently lose its rows.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import pyarrow as pa

from finemed_ray import storage
from finemed_ray.data.tokenize import IGNORE_INDEX, TemplateError, tokenize_conversation, with_system_prompt
from finemed_ray.errors import DataError, StorageError
from finemed_ray.schemas import QUARANTINE_SCHEMA, parse_jsonl_line, to_raw, validate_sft_row

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_FORMATS = "JSONL (.jsonl, .json; gzip-compressed .jsonl.gz, .json.gz) or Parquet (.parquet)"
MAX_ROW_BYTES = 16 * 1024 * 1024  # a JSONL line / Parquet row larger than this is quarantined, never parsed
RAW_KEEP_BYTES = 64 * 1024  # how much of a too-large row the quarantine keeps
UNREADABLE = "unreadable file"  # the reason kind of a file that could not be read to its end: the stage fails
_UTF8_BOM = b"\xef\xbb\xbf"
_WIDE_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")  # UTF-16 LE/BE, UTF-32 LE (FF FE 00 00)/BE
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

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

# The rows of a JSONL dataset as :func:`read_input` gives them: the line (``text``, as earlier readers had it) plus
# where it came from, and why it could not be read as text (null for a line that decoded fine).
LINES_SCHEMA = pa.schema(
    [
        ("text", pa.string()),
        ("read_error", pa.string()),
        ("file", pa.string()),
        ("line", pa.int64()),
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
    unreadable_files: list[str] = field(default_factory=list)  # files that could not be read to their end
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ input files
def _basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _some(files: list[str], n: int = 3) -> str:
    more = f" and {len(files) - n} more" if len(files) > n else ""
    return ", ".join(files[:n]) + more


def input_files(uri: str) -> tuple[list[str], str]:
    """The data files under ``uri`` and their format ("jsonl" | "parquet"); errors name the path.

    The rules (unsupported or mixed files, Parquet checks) are in the module docstring."""
    if not storage.exists(uri):
        raise DataError(f"dataset not found: {uri} ({storage.missing_reason(uri)})")
    data, unsupported = [], []
    for f in storage.list_files(uri):
        name = _basename(f)
        if f.endswith("/") or not name:
            continue  # an S3 "folder" marker object
        if name.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
            data.append(f)
        elif not name.startswith(("_", ".")):
            unsupported.append(f)
    if unsupported:
        raise DataError(f"{uri}: unsupported file format: {_some(unsupported)}; supported: {SUPPORTED_FORMATS} "
                        "(remove or convert these files, or point to the data files only)")
    if not data:
        raise DataError(f"{uri}: no {'/'.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)} files found")
    parquet = [f for f in data if f.endswith(PARQUET_SUFFIXES)]
    jsonl = [f for f in data if not f.endswith(PARQUET_SUFFIXES)]
    if parquet and jsonl:
        raise DataError(f"{uri}: mixes JSONL and Parquet files ({jsonl[0]} and {parquet[0]}); point to one format")
    if parquet:
        return check_parquet_files(uri, parquet), "parquet"
    return jsonl, "jsonl"


def _parquet_schema(uri: str) -> pa.Schema | None:
    """The Arrow schema of one Parquet file from its footer, or None for a 0-byte file."""
    import pyarrow.parquet as pq

    fs, path = storage.get_filesystem(uri)
    try:
        with fs.open_input_file(path) as fh:
            if fh.size() == 0:
                return None
            return pq.ParquetFile(fh).schema_arrow
    except pa.ArrowInvalid as exc:  # not Parquet: bad magic bytes, a cut footer, ...
        raise DataError(f"{uri}: not a readable Parquet file ({_first_line(exc)})") from None
    except OSError as exc:
        raise StorageError(f"{uri}: cannot read: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def check_parquet_files(uri: str, files: list[str]) -> list[str]:
    """``files`` minus 0-byte ones, after checking every footer: a non-Parquet file, or a column whose types in
    two files cannot be unified, is a :class:`DataError` naming the file(s) and the column."""
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        schemas = list(pool.map(_parquet_schema, files))
    empty = [f for f, s in zip(files, schemas) if s is None]
    if empty:
        log.warning("%s: skipping %d empty (0-byte) Parquet file(s), which hold no rows: %s", uri, len(empty),
                    _some(empty))
    kept = [(f, s) for f, s in zip(files, schemas) if s is not None]
    if not kept:
        raise DataError(f"{uri}: the dataset is empty (every file is 0 bytes: {_some(files)})")
    types: dict[str, dict[str, tuple[pa.DataType, str]]] = {}  # column -> str(type) -> (type, first file)
    for f, schema in kept:
        for fld in schema:
            if not pa.types.is_null(fld.type):  # an all-null column takes any other file's type
                types.setdefault(fld.name, {}).setdefault(str(fld.type), (fld.type, f))
    for name, seen in types.items():
        variants = list(seen.values())
        for i, (t1, f1) in enumerate(variants):
            for t2, f2 in variants[i + 1:]:
                try:  # what Ray's Parquet reader does with differing fragment schemas
                    pa.unify_schemas([pa.schema([(name, t1)]), pa.schema([(name, t2)])], promote_options="permissive")
                except (pa.ArrowTypeError, pa.ArrowInvalid, NotImplementedError):
                    raise DataError(
                        f"{uri}: Parquet files disagree on column {name!r}: {t1} in {f1} but {t2} in {f2}; every "
                        "file of a dataset must give a column the same type (rewrite one of them)") from None
    return [f for f, _ in kept]


# ------------------------------------------------------------------------------------------- JSONL line reader
def _jsonl_datasource_class():
    from ray.data.datasource import FileBasedDatasource

    class JsonlLinesDatasource(FileBasedDatasource):
        """JSONL files -> rows of :data:`LINES_SCHEMA`, one per non-blank line, streaming (a file is read in 1 MiB
        chunks; a line over ``max_line_bytes`` is never held whole). Never raises for what is in a file: bad lines
        and unreadable files become rows with ``read_error`` set (see the module docstring)."""

        _CHUNK = 1 << 20
        _BLOCK_BYTES = 32 << 20

        def __init__(self, paths: list[str], *, uri_prefix: str = "", max_line_bytes: int = MAX_ROW_BYTES,
                     **kwargs: Any) -> None:
            super().__init__(paths, **kwargs)
            self._uri_prefix = uri_prefix
            self._max_line_bytes = max_line_bytes

        def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
            yield from read_jsonl_lines(f, self._uri_prefix + path, self._max_line_bytes,
                                        compressed=path.endswith(".gz"), chunk=self._CHUNK,
                                        block_bytes=self._BLOCK_BYTES)

    return JsonlLinesDatasource


def read_jsonl_lines(f: Any, uri: str, max_line_bytes: int = MAX_ROW_BYTES, compressed: bool = False,
                     chunk: int = 1 << 20, block_bytes: int = 32 << 20) -> Iterator[pa.Table]:
    """Blocks of :data:`LINES_SCHEMA` rows from the open (already decompressing) stream ``f`` of ``uri``."""
    cols: dict[str, list] = {name: [] for name in LINES_SCHEMA.names}
    size = 0

    def add(text: str, err: str | None, lineno: int | None) -> None:
        nonlocal size
        cols["text"].append(text)
        cols["read_error"].append(err)
        cols["file"].append(uri if lineno is not None else None)
        cols["line"].append(lineno)
        size += len(text)

    def line_row(line: bytes, lineno: int) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.startswith(_UTF8_BOM):
            line = line[len(_UTF8_BOM):]
        if not line.strip():
            return  # a blank line is not a row
        try:
            add(line.decode("utf-8"), None, lineno)
        except UnicodeDecodeError as e:
            add(line.decode("utf-8", "backslashreplace"),
                f"encoding: not valid UTF-8 (byte 0x{line[e.start]:02x} at byte {e.start + 1} of the line); "
                "the file must be UTF-8", lineno)

    def too_large(head: bytes, total: int, lineno: int) -> None:
        add(head.decode("utf-8", "backslashreplace") + f" ...[cut: {total} bytes in all]",
            f"row too large: {total} bytes > {max_line_bytes} (the limit per row); not parsed, its first "
            f"{len(head)} bytes kept as raw", lineno)

    def unreadable(why: str, lineno: int) -> None:
        msg = f"{uri}: {why} (at line {lineno})"
        add(msg, f"{UNREADABLE}: {msg}", None)

    def block() -> pa.Table:
        nonlocal cols, size
        table = pa.table(cols, schema=LINES_SCHEMA)
        cols, size = {name: [] for name in LINES_SCHEMA.names}, 0
        return table

    lineno = 0
    pending = bytearray()  # the start of a line whose end is in a later chunk
    over = 0  # > 0: the current line passed max_line_bytes; bytes seen so far (only `head` kept)
    head = b""
    first = True
    while True:
        try:
            data = f.read(chunk)
        except OSError as e:  # a corrupt or cut compressed stream; plain files' I/O errors are Ray's to retry
            if not compressed:
                raise
            unreadable(f"cannot decompress as gzip: {_first_line(e)}", lineno + 1)
            break
        if first:
            first = False
            if data.startswith(_WIDE_BOMS):
                unreadable("starts with a UTF-16/UTF-32 byte-order mark; JSONL must be UTF-8 "
                           "(convert it, e.g. iconv -f UTF-16 -t UTF-8)", 1)
                break
        if not data:
            if pending or over:  # a last line without a newline
                lineno += 1
                if over:
                    too_large(head, over, lineno)
                else:
                    line_row(bytes(pending), lineno)
            break
        pieces = data.split(b"\n")
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            if over:
                over += len(piece)
                if len(head) < RAW_KEEP_BYTES:
                    head += piece[:RAW_KEEP_BYTES - len(head)]
            elif pending or last:
                pending += piece
                if len(pending) > max_line_bytes:
                    over, head, pending = len(pending), bytes(pending[:RAW_KEEP_BYTES]), bytearray()
            elif len(piece) > max_line_bytes:
                over, head = len(piece), bytes(piece[:RAW_KEEP_BYTES])
            if last:
                break
            lineno += 1  # `piece` ended a line
            if over:
                too_large(head, over, lineno)
                over, head = 0, b""
            elif pending:
                line_row(bytes(pending), lineno)
                pending = bytearray()
            else:
                line_row(piece, lineno)
            if size >= block_bytes:
                yield block()
    if cols["text"]:
        yield block()


def read_input(uri: str, max_row_bytes: int = MAX_ROW_BYTES):
    """``(files, fmt, dataset)``: the JSONL lines (:data:`LINES_SCHEMA`: ``text`` plus ``read_error``, ``file``,
    ``line``) or Parquet rows under ``uri``, lazily. Use :func:`batch_records` to turn a batch into rows."""
    import ray.data

    files, fmt = input_files(uri)
    fs, _ = storage.get_filesystem(files[0])
    paths = [storage.get_filesystem(f)[1] for f in files]
    if fmt == "jsonl":
        source = _jsonl_datasource_class()(paths, filesystem=fs, uri_prefix="s3://" if storage.is_s3(files[0]) else "",
                                           max_line_bytes=max_row_bytes)
        ds = ray.data.read_datasource(source)
    else:
        ds = ray.data.read_parquet(paths, filesystem=fs)
    # Rows in input order (files sorted, rows in file order) on every run, for every reader: training's data order,
    # the TTT index's row order and a `limit` (which rows are kept) are defined over it. Without this Ray Data reads
    # a multi-file input in completion order. The setting lives in this dataset's own DataContext copy (reads copy
    # the current one), which every dataset derived from it shares.
    ds.context.execution_options.preserve_order = True
    return files, fmt, ds


# ------------------------------------------------------------------------------------------------ row parsing
def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def parse_row(text: str) -> tuple[Any, str | None]:
    """``(row, None)`` for a JSONL line holding a JSON object, else ``(None, reason)``."""
    try:
        parsed, err = parse_jsonl_line(text)
    except RecursionError:
        return None, "invalid JSON: nested too deeply to parse"
    if err is not None:
        return None, err
    if not isinstance(parsed, dict):
        return None, f"row: expected a JSON object {{...}}, got {_json_kind(parsed)}"
    if _SURROGATE_ESCAPE.search(text):  # paired escapes are fine; a lone one cannot be stored as UTF-8
        try:
            json.dumps(parsed, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return None, "encoding: an unpaired surrogate escape (\\ud800-\\udfff) is not valid Unicode"
    return parsed, None


def _cut(raw: str) -> str:
    return raw[:RAW_KEEP_BYTES] + f" ...[cut: {len(raw)} characters in all]"


def batch_records(batch: pa.Table, fmt: str, max_row_bytes: int = MAX_ROW_BYTES
                  ) -> list[tuple[str, Any, str | None, str | None]]:
    """``(raw, row, reason, where)`` per row of a :func:`read_input` batch: ``row`` the parsed object (None when
    ``reason`` says why it is unusable), ``where`` ``"<file> line <n>"`` for JSONL rows (None for Parquet)."""
    out = []
    if fmt == "jsonl":
        n = batch.num_rows
        names = set(batch.column_names)
        texts = batch.column("text").to_pylist()
        errors = batch.column("read_error").to_pylist() if "read_error" in names else [None] * n
        files = batch.column("file").to_pylist() if "file" in names else [None] * n
        lines = batch.column("line").to_pylist() if "line" in names else [None] * n
        for text, err, f, ln in zip(texts, errors, files, lines):
            where = f"{f} line {ln}" if f is not None else None
            row, err = (None, err) if err is not None else parse_row(text)
            out.append((text, row, err, where))
        return out
    for row in batch.to_pylist():
        raw = to_raw(row)
        if len(raw) > max_row_bytes // 4 and len(raw.encode("utf-8", "surrogatepass")) > max_row_bytes:
            out.append((_cut(raw), None, f"row too large: {len(raw.encode('utf-8', 'surrogatepass'))} bytes as "
                        f"JSON > {max_row_bytes} (the limit per row); not tokenised", None))
        else:
            out.append((raw, row, None, None))
    return out


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
                  fmt: str, selection: RowSelection = RowSelection(), overlong: str = "truncate",
                  max_row_bytes: int = MAX_ROW_BYTES) -> pa.Table:
    """Validate + tokenise one Arrow batch; every input row yields exactly one output row."""
    tok = _cached_tokenizer(tokenizer_path)
    out = {name: [] for name in PREPARED_SCHEMA.names}
    for raw, row, err, where in batch_records(batch, fmt, max_row_bytes):
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
        if not good and where:
            err = f"{err} ({where})"
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
                if kind == UNREADABLE:
                    summary.unreadable_files.append(row["error"][len(UNREADABLE) + 2:])
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


def check_readable(summary: Any) -> None:
    """DataError naming the file (and line) when a file could not be read to its end: its other rows are unknown,
    so training on the rest would silently lose them."""
    if summary.unreadable_files:
        more = (f" (and {len(summary.unreadable_files) - 1} more unreadable files; all in {summary.quarantine_uri})"
                if len(summary.unreadable_files) > 1 else "")
        raise DataError(f"{summary.unreadable_files[0]}{more}; supported: {SUPPORTED_FORMATS}")


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
    # `ds` comes from read_input, which keeps the input order: the run's data order (train/resume.py DataOrder) is
    # defined over the prepared rows (6 files prepared 4 times without it gave 4 different orders).
    ds.map_batches(batch_fn, batch_format="pyarrow", fn_kwargs=fn_kwargs).write_parquet(prepared_path,
                                                                                         filesystem=out_fs)
    return prepared_uri, quarantine_uri


def prepare_sft(input_uri: str, tokenizer_path: str, out_uri: str, max_length: int,
                system_prompt: str | None = None, selection: RowSelection = RowSelection(),
                overlong: str = "truncate", max_row_bytes: int = MAX_ROW_BYTES) -> PrepareSummary:
    """Tokenise ``input_uri`` into ``<out_uri>/prepared`` and quarantine bad rows into ``<out_uri>/quarantine``.

    Raises :class:`DataError` (one line naming the file or dataset) for input that cannot be used: see the module
    docstring for the rules per kind of file and line."""
    t0 = time.time()
    files, fmt, ds = read_input(input_uri, max_row_bytes)

    prepared_uri, quarantine_uri = write_prepared(
        ds, out_uri, prepare_batch, tokenizer_path=tokenizer_path, max_length=max_length,
        system_prompt=system_prompt, fmt=fmt, selection=selection, overlong=overlong, max_row_bytes=max_row_bytes,
    )

    if not storage.list_files(prepared_uri, suffixes=(".parquet",)):  # Ray Data writes no file for 0 rows
        raise DataError(f"{input_uri}: the dataset is empty (no rows in {_some(files)})")
    summary = PrepareSummary(input_uri=input_uri, prepared_uri=prepared_uri, quarantine_uri=quarantine_uri)
    return finish_prepare(summary, PREPARED_SCHEMA, selection, t0)


def finish_prepare(summary: Any, schema: pa.Schema, selection: RowSelection, t0: float, what: str = "rows") -> Any:
    """The tail of every prepare step: count the prepared rows, write the quarantine, check that something is
    left to train on."""
    tally_prepared(summary.prepared_uri, schema, summary)
    if summary.rows_quarantined:
        write_quarantine(summary.prepared_uri, summary.quarantine_uri, summary.input_uri)
    summary.seconds = round(time.time() - t0, 3)
    check_readable(summary)
    check_selected(summary, selection, what=what)
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
