"""Bad input files (issue 16): every case ends as quarantined rows with a reason naming the file and line, or as a
one-line error naming the file, never a traceback. Rows lost is always 0: each row is trained or quarantined (or the
stage fails and trains nothing).

Real S3 (the embedded moto server of conftest) and a small local Ray cluster; one subprocess runs a job entrypoint.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finemed_ray import storage
from finemed_ray.toy.sample import sample_dpo_rows, sample_sft_rows
from finemed_ray.data.sft_prepare import MAX_ROW_BYTES, input_files, prepare_sft, read_jsonl_lines
from finemed_ray.errors import DataError, ModelError

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 128


def _line(row) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode("utf-8")


def _put(uri: str, data: bytes) -> str:
    """Write ``data`` byte for byte, as a user's upload would (``storage.write_bytes`` goes through pyarrow's
    ``open_output_stream``, which gzip-compresses again any name ending in ``.gz``)."""
    if storage.is_s3(uri):
        bucket, key = uri[len("s3://"):].split("/", 1)
        storage.s3_client().put_object(Bucket=bucket, Key=key, Body=data)
    else:
        os.makedirs(os.path.dirname(uri), exist_ok=True)
        Path(uri).write_bytes(data)
    return uri


def _parquet_bytes(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def _quarantine(uri: str) -> list[dict]:
    fs, path = storage.get_filesystem(uri)
    return pq.read_table(path, filesystem=fs).to_pylist()


def _by_line(quarantine: list[dict], data_uri: str) -> dict[int, dict]:
    """Quarantine rows keyed by the line number their reason ends with; every reason must name the file."""
    out = {}
    for q in quarantine:
        m = re.search(rf"\({re.escape(data_uri)} line (\d+)\)$", q["reason"])
        assert m, q["reason"]
        out[int(m.group(1))] = q
    return out


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text, text


# ------------------------------------------------------------------------------------ JSONL lines: quarantined
def test_bad_jsonl_lines_are_quarantined_with_file_and_line(tiny_model_dir, ray_cluster, s3_prefix):
    good = sample_sft_rows(n=3, seed=1)
    data = b"\n".join([
        b"\xef\xbb\xbf" + _line(good[0]) + b"\r",  # 1: a BOM at the start of the file, CRLF ending: trains
        b"",  # 2: blank, not a row
        _line(good[1]),  # 3
        # 4: not UTF-8 (Latin-1 "é"): quarantined, the rest of the file still trains
        _line({"messages": [{"role": "user", "content": "cafe"}, {"role": "assistant", "content": "ok"}]}
              ).replace(b"cafe", b"caf\xe9"),
        b"[1, 2]",  # 5: valid JSON, not an object
        b'"x"',  # 6
        b"null",  # 7
        b"42",  # 8
        b"[" * 100_000,  # 9: nested too deep for the JSON parser (RecursionError)
        b'{"id": "\\ud800", "messages": []}',  # 10: an unpaired surrogate escape
        b'{"id": "bad-json", "messages": [',  # 11: invalid JSON
        _line(good[2]),  # 12: no newline at the end of the file
    ])
    uri = _put(f"{s3_prefix}/sft.jsonl", data)
    s = prepare_sft(uri, str(tiny_model_dir), f"{s3_prefix}/run", MAX_LENGTH)
    assert s.rows_in == 11 and s.rows_valid == 3 and s.rows_quarantined == 8  # nothing lost: 3 + 8 = 11 rows
    q = _by_line(_quarantine(s.quarantine_uri), uri)
    assert sorted(q) == [4, 5, 6, 7, 8, 9, 10, 11]  # lines 1 (BOM), 3 and 12 trained
    assert q[4]["reason"].startswith("encoding: not valid UTF-8 (byte 0xe9 at byte ")
    assert "caf\\xe9" in q[4]["raw"]  # the bad byte kept, escaped
    assert q[5]["reason"].startswith("row: expected a JSON object {...}, got an array")
    assert q[6]["reason"].startswith("row: expected a JSON object {...}, got a string")
    assert q[7]["reason"].startswith("row: expected a JSON object {...}, got null")
    assert q[8]["reason"].startswith("row: expected a JSON object {...}, got a number")
    assert q[9]["reason"].startswith("invalid JSON: nested too deeply")
    assert q[10]["reason"].startswith("encoding: an unpaired surrogate escape")
    assert q[11]["reason"].startswith("invalid JSON:")
    assert all(r["dataset"] == uri for r in q.values())
    for r in q.values():
        _no_traceback(r["reason"])
    assert s.quarantine_reasons == {"encoding": 2, "row": 4, "invalid JSON": 2}


def test_dpo_bad_lines_are_quarantined_with_file_and_line(tiny_model_dir, ray_cluster, s3_prefix):
    from finemed_ray.data.dpo_prepare import prepare_dpo

    good = sample_dpo_rows(seed=0)[:3]
    bad_bytes = _line(good[0]).replace(b'"prompt"', b'"id": "latin1-\xe9", "prompt"', 1)
    data = b"\xef\xbb\xbf" + b"\n".join([_line(good[0]), bad_bytes, b"null", _line(good[1]), b"[]",
                                         _line(good[2])]) + b"\n"
    uri = _put(f"{s3_prefix}/dpo.jsonl", data)
    s = prepare_dpo(uri, str(tiny_model_dir), f"{s3_prefix}/run", max_length=512)
    assert s.rows_in == 6 and s.rows_valid == 3 and s.rows_quarantined == 3
    q = _by_line(_quarantine(s.quarantine_uri), uri)
    assert q[2]["reason"].startswith("encoding: not valid UTF-8")
    assert q[3]["reason"].startswith("row: expected a JSON object {...}, got null")
    assert q[5]["reason"].startswith("row: expected a JSON object {...}, got an array")


def test_huge_line_is_quarantined_without_parsing(tiny_model_dir, ray_cluster, tmp_path):
    """A 50 MB line (over MAX_ROW_BYTES = 16 MiB) is never held whole nor tokenised: "row too large"."""
    good = sample_sft_rows(n=2, seed=2)
    huge = _line({"messages": [{"role": "user", "content": "x" * (50 * 1024 * 1024)},
                               {"role": "assistant", "content": "ok"}]})
    uri = _put(str(tmp_path / "data" / "huge.jsonl"), b"\n".join([_line(good[0]), huge, _line(good[1])]) + b"\n")
    s = prepare_sft(uri, str(tiny_model_dir), str(tmp_path / "run"), MAX_LENGTH)
    assert s.rows_in == 3 and s.rows_valid == 2 and s.rows_quarantined == 1
    (q,) = _quarantine(s.quarantine_uri)
    assert q["reason"] == (f"row too large: {len(huge)} bytes > {MAX_ROW_BYTES} (the limit per row); not parsed, its "
                           f"first 65536 bytes kept as raw ({uri} line 2)")
    assert q["raw"].startswith('{"messages": [{"role": "user", "content": "xxx') and len(q["raw"]) < 70_000


def test_parquet_large_row_quarantined_and_empty_file_skipped(tiny_model_dir, ray_cluster, s3_prefix):
    rows = sample_sft_rows(n=4, seed=3)
    big = dict(rows[0], id="big", messages=[{"role": "user", "content": "y" * 10_000},
                                            {"role": "assistant", "content": "ok"}])
    _put(f"{s3_prefix}/pq/a.parquet", _parquet_bytes(rows))
    _put(f"{s3_prefix}/pq/b.parquet", _parquet_bytes([big]))
    _put(f"{s3_prefix}/pq/c.parquet", b"")  # a 0-byte object: no rows, skipped
    s = prepare_sft(f"{s3_prefix}/pq/", str(tiny_model_dir), f"{s3_prefix}/run", MAX_LENGTH, max_row_bytes=4096)
    assert s.rows_in == 5 and s.rows_valid == 4 and s.rows_quarantined == 1
    (q,) = _quarantine(s.quarantine_uri)
    assert q["reason"].startswith("row too large: ") and "> 4096 (the limit per row)" in q["reason"]


# --------------------------------------------------------------------------------------- gzip and unreadable
def test_gzip_jsonl_is_read(tiny_model_dir, ray_cluster, s3_prefix):
    rows = sample_sft_rows(n=5, seed=4)
    uri = _put(f"{s3_prefix}/sft.jsonl.gz", gzip.compress(b"\n".join(_line(r) for r in rows) + b"\n"))
    s = prepare_sft(uri, str(tiny_model_dir), f"{s3_prefix}/run", MAX_LENGTH)
    assert s.rows_in == 5 and s.rows_valid == 5 and s.rows_quarantined == 0


def test_unreadable_gzip_fails_naming_file_and_line(tiny_model_dir, ray_cluster, s3_prefix):
    rows = sample_sft_rows(n=40, seed=5) * 200  # ~3 MB of text: the cut comes after the first 1 MiB chunks
    whole = gzip.compress(b"\n".join(_line(r) for r in rows) + b"\n")
    truncated = _put(f"{s3_prefix}/in/b.jsonl.gz", whole[: len(whole) * 2 // 3])  # cut mid-stream
    _put(f"{s3_prefix}/in/a.jsonl.gz", whole)
    _put(f"{s3_prefix}/in/c.jsonl.gz", b"\n".join(_line(r) for r in rows))  # named .gz, not compressed
    with pytest.raises(DataError) as err:
        prepare_sft(f"{s3_prefix}/in/", str(tiny_model_dir), f"{s3_prefix}/run", MAX_LENGTH)
    msg = str(err.value)
    assert "\n" not in msg
    assert re.match(rf"{re.escape(truncated)}: cannot decompress as gzip: .* \(at line \d+\) \(and 1 more "
                    r"unreadable files; all in s3://.*/run/quarantine\); supported: JSONL", msg), msg
    assert int(re.search(r"at line (\d+)", msg).group(1)) > 1  # where reading stopped


def test_wide_bom_and_chunk_boundaries_in_the_line_reader():
    """The reader itself (no Ray): a UTF-16 file is one 'unreadable file' row; chunking never changes the rows."""
    (t,) = list(read_jsonl_lines(io.BytesIO("\ufeff{}\n".encode("utf-16")), "x.jsonl"))
    assert t.to_pylist()[0]["read_error"].startswith("unreadable file: x.jsonl: starts with a UTF-16/UTF-32 "
                                                     "byte-order mark")
    data = b'\xef\xbb\xbf{"a": 1}\r\n\n{"b": "\xe9"}\n' + b"z" * 300 + b'\n{"c": 2}'
    ref = [r for t in read_jsonl_lines(io.BytesIO(data), "x", 100) for r in t.to_pylist()]
    assert [(r["line"], (r["read_error"] or "").split(":")[0]) for r in ref] == [
        (1, ""), (3, "encoding"), (4, "row too large"), (5, "")]
    for chunk in (1, 2, 3, 7, 64):
        got = [r for t in read_jsonl_lines(io.BytesIO(data), "x", 100, chunk=chunk) for r in t.to_pylist()]
        assert got == ref, chunk


# ------------------------------------------------------------------------------------ file-level rules (driver)
def test_conflicting_parquet_schemas_name_both_files_and_the_column(s3_prefix):
    rows = sample_sft_rows(n=3, seed=6)
    a = _put(f"{s3_prefix}/pq/a.parquet", _parquet_bytes(rows))
    b = _put(f"{s3_prefix}/pq/b.parquet", _parquet_bytes([dict(r, messages=json.dumps(r["messages"])) for r in rows]))
    with pytest.raises(DataError) as err:
        input_files(f"{s3_prefix}/pq/")
    msg = str(err.value)
    assert "column 'messages'" in msg and a in msg and b in msg and "\n" not in msg
    # Differences Arrow can unify are fine: an all-null column, int32 vs int64.
    _put(f"{s3_prefix}/ok/a.parquet", _parquet_bytes([dict(r, score=1) for r in rows]))
    _put(f"{s3_prefix}/ok/b.parquet", _parquet_bytes_typed(rows))
    assert input_files(f"{s3_prefix}/ok/") == ([f"{s3_prefix}/ok/a.parquet", f"{s3_prefix}/ok/b.parquet"], "parquet")


def _parquet_bytes_typed(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist([dict(r, department=None, score=1) for r in rows])
    table = table.set_column(table.schema.get_field_index("score"), "score", pa.array([1] * len(rows), pa.int32()))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def test_file_rules_mixed_unsupported_empty_and_not_parquet(s3_prefix):
    line = _line(sample_sft_rows(n=1)[0]) + b"\n"
    p = s3_prefix
    _put(f"{p}/mixed/a.jsonl", line)
    _put(f"{p}/mixed/b.parquet", _parquet_bytes(sample_sft_rows(n=1)))
    _put(f"{p}/mixed/notes.txt", b"hello")
    with pytest.raises(DataError, match=rf"unsupported file format: {re.escape(p)}/mixed/notes.txt; supported: "
                                        r"JSONL \(\.jsonl, \.json; gzip-compressed \.jsonl\.gz, \.json\.gz\) or "
                                        r"Parquet \(\.parquet\)"):
        input_files(f"{p}/mixed/")
    storage.delete(f"{p}/mixed/notes.txt")
    with pytest.raises(DataError, match=rf"mixes JSONL and Parquet files \({re.escape(p)}/mixed/a.jsonl and "
                                        rf"{re.escape(p)}/mixed/b.parquet\); point to one format"):
        input_files(f"{p}/mixed/")
    # Markers are not data: _SUCCESS, .DS_Store, an S3 "folder" object.
    _put(f"{p}/marked/a.jsonl", line)
    _put(f"{p}/marked/_SUCCESS", b"")
    _put(f"{p}/marked/.DS_Store", b"\x00")
    _put(f"{p}/marked/sub/", b"")
    assert input_files(f"{p}/marked/") == ([f"{p}/marked/a.jsonl"], "jsonl")
    with pytest.raises(DataError, match=r"sft\.jsonl\.bz2; supported: JSONL"):
        input_files(_put(f"{p}/sft.jsonl.bz2", b"BZh9"))
    with pytest.raises(DataError, match=r"the dataset is empty \(every file is 0 bytes: .*/empty/e\.parquet\)"):
        input_files(_put(f"{p}/empty/e.parquet", b""))
    with pytest.raises(DataError, match=r"/text\.parquet: not a readable Parquet file \("):
        input_files(_put(f"{p}/text.parquet", line))


def test_empty_jsonl_files_fail_naming_them(tiny_model_dir, ray_cluster, s3_prefix):
    from finemed_ray.data.dpo_prepare import prepare_dpo

    zero = _put(f"{s3_prefix}/zero.jsonl", b"")  # a 0-byte S3 object
    with pytest.raises(DataError, match=rf"^{re.escape(zero)}: the dataset is empty \(no rows in {re.escape(zero)}\)$"):
        prepare_sft(zero, str(tiny_model_dir), f"{s3_prefix}/run", MAX_LENGTH)
    blank = _put(f"{s3_prefix}/blank.jsonl", b"\xef\xbb\xbf\n  \r\n\n")  # only a BOM and blank lines: 0 rows
    with pytest.raises(DataError, match=rf"^{re.escape(blank)}: no rows .*{re.escape(blank)}\)$"):
        prepare_dpo(blank, str(tiny_model_dir), f"{s3_prefix}/run-dpo", max_length=512)


# ------------------------------------------------------------------------------------------ model path in errors
def test_model_without_chat_template_names_the_s3_path(bare_model_dir, s3, s3_prefix):
    from finemed_ray.config import load_config
    from finemed_ray.train.configs import SFTJobConfig
    from finemed_ray.train.stages.sft import SFTJob

    model_uri = f"{s3_prefix}/models/bare"
    storage.publish_dir(str(bare_model_dir), model_uri)
    data = _put(f"{s3_prefix}/d.jsonl", _line(sample_sft_rows(n=1)[0]) + b"\n")
    cfg = load_config(SFTJobConfig, ROOT / "configs/sft_tiny.yaml",
                      [f"run.storage_path={s3_prefix}/runs", f"model.path={model_uri}", f"data.path={data}",
                       f"output.export_path={s3_prefix}/export", "train.report_to=[]"])
    with pytest.raises(ModelError) as err:
        SFTJob(cfg).setup()  # resolves the s3:// model to its local cache first, then loads the tokenizer
    assert re.match(rf"{re.escape(model_uri)} \(local copy /.+\): tokenizer has no chat template", str(err.value))


# ------------------------------------------------------------------------------------ job entrypoints (jobs/_cli)
def test_cli_user_error_inside_a_ray_task_is_one_line_exit_2(capsys, tmp_path, monkeypatch):
    from ray.exceptions import RayTaskError

    from jobs._cli import main

    monkeypatch.setenv("FINEMED_LOG_DIR", str(tmp_path))
    inner = DataError("s3://b/x.jsonl.gz: cannot decompress as gzip (at line 7)\nFailed to read stream iteratively")
    wrapped = RayTaskError("ReadJsonlLines", "Traceback (most recent call last):\n  File \"x.py\"", inner)

    def body(argv):
        raise wrapped.as_instanceof_cause()

    assert main(body, []) == 2
    err = capsys.readouterr().err
    assert err == "error: s3://b/x.jsonl.gz: cannot decompress as gzip (at line 7)\n"

    def decode(argv):
        b"\xe9".decode("utf-8")

    assert main(decode, []) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9")


def test_cli_internal_error_goes_to_the_log_exit_1(capsys, tmp_path, monkeypatch):
    import logging

    from jobs._cli import main

    monkeypatch.setenv("FINEMED_LOG_DIR", str(tmp_path))

    def body(argv):
        logging.getLogger("finemed.test").warning("before the failure")
        raise RuntimeError("boom\nsecond line")

    assert main(body, []) == 1
    err = capsys.readouterr().err.strip().splitlines()
    (line,) = [ln for ln in err if ln.startswith("error:")]
    m = re.fullmatch(r"error: internal error: RuntimeError: boom \(full traceback in (.+\.log)\)", line)
    assert m, line
    _no_traceback("\n".join(err))
    log = Path(m.group(1)).read_text()
    assert Path(m.group(1)).parent == tmp_path
    assert "before the failure" in log and "Traceback (most recent call last)" in log and "second line" in log


def test_job_entrypoint_exits_2_with_one_error_line(tiny_model_dir, s3, s3_prefix, tmp_path):
    """`python -m jobs.sft` on Parquet files that disagree on a column: exit 2, one `error:` line, no traceback."""
    rows = sample_sft_rows(n=3, seed=7)
    a = _put(f"{s3_prefix}/pq/a.parquet", _parquet_bytes(rows))
    b = _put(f"{s3_prefix}/pq/b.parquet", _parquet_bytes([dict(r, messages=json.dumps(r["messages"])) for r in rows]))
    env = {**os.environ, "FINEMED_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.sft", "--config", "configs/sft_tiny.yaml", f"data.path={s3_prefix}/pq/",
         f"model.path={tiny_model_dir}", f"run.storage_path={s3_prefix}/runs", f"output.export_path={s3_prefix}/x",
         "train.report_to=[]"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    assert "column 'messages'" in errors[0] and a in errors[0] and b in errors[0]
    _no_traceback(proc.stderr + proc.stdout)


def test_missing_bucket_and_missing_path_are_told_apart(s3_prefix):
    with pytest.raises(DataError, match=r"dataset not found: s3://no-such-bucket-zz/d\.jsonl \(bucket 'no-such-bucket-zz' does not exist\)"):
        input_files("s3://no-such-bucket-zz/d.jsonl")
    with pytest.raises(DataError, match=r"dataset not found: .*/nothing\.jsonl \(not found\)"):
        input_files(f"{s3_prefix}/nothing.jsonl")
