"""S3 outages, for real: the session's S3 server is stopped and restarted (tests/conftest.py ``s3_outage``), and
every storage path must wait it out within ``FINEMED_S3_RETRY_WINDOW_S``, or fail with an error that says so.

Each test first checks that the outage really blocked traffic (a request without retries failed to connect)."""

from __future__ import annotations

import pickle
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from finemed_ray import storage
from finemed_ray.errors import StorageError

OUTAGE_S = 6.0


def test_every_storage_operation_waits_out_an_outage(s3_prefix, s3_outage, tmp_path):
    storage.write_text(f"{s3_prefix}/in/a.txt", "a")
    local = tmp_path / "up"
    local.mkdir()
    (local / "f.txt").write_text("f")
    s3_outage.start(OUTAGE_S)
    t0 = time.monotonic()
    # Each call is made while the server is down (the first waits it out; the rest may find it back).
    assert storage.read_text(f"{s3_prefix}/in/a.txt") == "a"
    waited = time.monotonic() - t0
    storage.write_text(f"{s3_prefix}/in/b.txt", "b")
    assert storage.exists(f"{s3_prefix}/in/b.txt")
    assert storage.list_files(f"{s3_prefix}/in/") == [f"{s3_prefix}/in/a.txt", f"{s3_prefix}/in/b.txt"]
    storage.upload_dir(str(local), f"{s3_prefix}/up")
    storage.download_dir(f"{s3_prefix}/up", str(tmp_path / "down"))
    s3_outage.wait()
    assert s3_outage.blocked and "connect" in s3_outage.blocked.lower(), s3_outage.blocked
    assert waited >= OUTAGE_S - 1.0, f"the first read returned after {waited:.1f} s, inside the outage"
    assert (tmp_path / "down" / "f.txt").read_text() == "f"


@pytest.mark.parametrize("operation", ["read", "write", "exists", "upload"])
def test_an_outage_longer_than_the_window_fails_naming_uri_and_window(operation, s3_prefix, s3_outage, tmp_path,
                                                                      monkeypatch):
    uri = f"{s3_prefix}/x.txt"
    storage.write_text(uri, "x")
    (tmp_path / "f.txt").write_text("f")
    monkeypatch.setenv(storage.RETRY_WINDOW_VAR, "2")
    storage.clear_fs_cache()
    calls = {
        "read": lambda: storage.read_text(uri),
        "write": lambda: storage.write_text(uri, "y"),
        "exists": lambda: storage.exists(uri),
        "upload": lambda: storage.upload_dir(str(tmp_path), s3_prefix + "/up"),
    }
    s3_outage.start(8.0)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=rf"S3 still unavailable after \d+ s of retries \({storage.RETRY_WINDOW_VAR}=2\)") as err:
        calls[operation]()
    elapsed = time.monotonic() - t0
    assert s3_prefix in str(err.value)
    assert 1.0 <= elapsed < 7.0, f"gave up after {elapsed:.1f} s with a 2 s window"
    assert s3_outage.blocked


def test_a_real_error_is_not_retried(s3_prefix):
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(f"{s3_prefix}/missing.txt")
    assert time.monotonic() - t0 < 2.0  # a missing key is an answer, not an outage


def test_bad_window_setting_is_named(monkeypatch):
    monkeypatch.setenv(storage.RETRY_WINDOW_VAR, "soon")
    with pytest.raises(StorageError, match=f"{storage.RETRY_WINDOW_VAR}='soon'"):
        storage.retry_window_s()


def test_pyarrow_attempts_grow_with_the_window():
    attempts = [storage.pyarrow_attempts_for_window(w) for w in (0, 5, 30, 120, 600)]
    assert attempts == sorted(attempts) and attempts[0] == 1 and attempts[-1] > attempts[-2]


def test_a_pickled_filesystem_keeps_its_retries(s3_prefix, s3_outage):
    """What Ray Data and Ray Train (checkpoint uploads) get: the filesystem pickled into a worker. pyarrow's own
    S3FileSystem drops its retry strategy when pickled (the control below gives up within seconds); ours keeps it."""
    uri = f"{s3_prefix}/p.txt"
    storage.write_text(uri, "p")
    fs, path = storage.get_filesystem(uri)
    ours = pickle.loads(pickle.dumps(fs))
    assert isinstance(ours, storage.RetryingS3FileSystem) and isinstance(ours, pafs.S3FileSystem)
    plain = pickle.loads(pickle.dumps(pafs.S3FileSystem(**fs._finemed_args[1])))
    s3_outage.start(OUTAGE_S)
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):  # the control: pyarrow's default, ~3 s
        plain.open_input_stream(path).read()
    t0 = time.monotonic()
    assert ours.open_input_stream(path).read() == b"p"
    s3_outage.wait()
    assert s3_outage.blocked
    assert time.monotonic() - t0 > 0.5  # it did wait for the server


def test_ray_data_read_survives_an_outage(s3_prefix, s3_outage, ray_cluster):
    import ray.data

    fs, root = storage.get_filesystem(f"{s3_prefix}/table")
    rows = 2000
    for part in range(4):
        table = pa.table({"id": list(range(part * rows // 4, (part + 1) * rows // 4))})
        pq.write_table(table, f"{root}/part-{part}.parquet", filesystem=fs)
    ds = ray.data.read_parquet(f"{root}/", filesystem=fs)
    s3_outage.start(OUTAGE_S)
    ids = sorted(r["id"] for r in ds.take_all())
    s3_outage.wait()
    assert s3_outage.blocked
    assert ids == list(range(rows))  # 0 lost, 0 duplicated
