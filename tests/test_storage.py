"""Storage layer against a real S3 endpoint (moto server) and local paths; nothing in storage is mocked."""

from __future__ import annotations

import json
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finemed_ray import storage
from finemed_ray.toy.s3_server import EmbeddedS3
from finemed_ray.errors import StorageError

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["s3", "local"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on an S3 prefix and on a local directory."""
    if request.param == "s3":
        return request.getfixturevalue("s3_prefix")
    return str(tmp_path / "store")


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("FINEMED_CACHE_DIR", str(path))
    return path


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"model_type": "llama"}',
        "model.safetensors": os.urandom(3000),
        "tokenizer.json": "{\"v\": \"é\"}".encode(),
        "sub/deeper/notes.txt": b"hello\n",
        "sub/empty.bin": b"",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def s3_keys(uri: str) -> list[str]:
    """Every object key under a prefix, dir markers included (storage.list_files hides those)."""
    bucket, key = uri[len("s3://"):].split("/", 1)
    resp = storage.s3_client().list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/")
    return sorted(o["Key"] for o in resp.get("Contents", []))


# ------------------------------------------------------------------------------------------ URIs


def test_is_s3_and_join() -> None:
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/x") and not storage.is_s3("s3bucket/x")
    assert storage.join("s3://b", "a", "b.json") == "s3://b/a/b.json"
    assert storage.join("s3://b/p/", "/a/", "b") == "s3://b/p/a/b"
    assert storage.join("/tmp/x", "a", "/b.json") == "/tmp/x/a/b.json"
    assert storage.join("rel", "a") == os.path.join("rel", "a")


def test_get_filesystem_paths(s3: EmbeddedS3, tmp_path: Path) -> None:
    fs, path = storage.get_filesystem("s3://finemed-test/a/b.json")
    assert fs.type_name == "s3" and path == "finemed-test/a/b.json"
    assert storage.get_filesystem("s3://finemed-test/a/b.json")[0] is fs  # cached per settings
    fs, path = storage.get_filesystem("rel/x.json")
    assert fs.type_name == "local" and path == os.path.abspath("rel/x.json")


# ----------------------------------------------------------------------------------- basic round trips


def test_roundtrip_bytes_text_json(base: str) -> None:
    blob = bytes(range(256)) * 10
    storage.write_bytes(storage.join(base, "deep/dir/blob.bin"), blob)
    assert storage.read_bytes(storage.join(base, "deep/dir/blob.bin")) == blob

    storage.write_text(storage.join(base, "t.txt"), "naïve ✓\nline 2")
    assert storage.read_text(storage.join(base, "t.txt")) == "naïve ✓\nline 2"

    obj = {"z": 1, "a": [1, 2, {"x": None}], "text": "µg"}
    uri = storage.join(base, "o.json")
    storage.write_json(uri, obj)
    assert storage.read_json(uri) == obj
    raw = storage.read_text(uri)
    assert raw.index('"z"') < raw.index('"a"'), "keys keep insertion order"
    assert '\n  "z": 1' in raw, "indent=2"

    storage.write_bytes(uri, b"[]")  # overwrite
    assert storage.read_json(uri) == []
    assert storage.exists(uri) and storage.exists(base) and storage.exists(storage.join(base, "deep"))
    assert not storage.exists(storage.join(base, "nope.json"))


def test_list_files_recursive_with_suffixes(base: str) -> None:
    for rel in ["a.jsonl", "b.parquet", "n/c.jsonl", "n/m/d.json", "skip.txt"]:
        storage.write_text(storage.join(base, rel), rel)
    expect = sorted(storage.join(base, r) for r in ["a.jsonl", "n/c.jsonl", "n/m/d.json"])
    assert storage.list_files(base, suffixes=(".jsonl", ".json")) == expect
    assert len(storage.list_files(base)) == 5
    assert storage.list_files(storage.join(base, "n")) == sorted(
        [storage.join(base, "n/c.jsonl"), storage.join(base, "n/m/d.json")]
    )
    single = storage.join(base, "a.jsonl")
    assert storage.list_files(single) == [single]
    assert storage.list_files(storage.join(base, "missing")) == []


def test_list_files_s3_ignores_dir_markers_and_siblings(s3_prefix: str) -> None:
    fs, path = storage.get_filesystem(s3_prefix)
    fs.create_dir(f"{path}/d")  # pyarrow writes an empty "d/" marker object, as Ray Data writers may
    storage.write_text(storage.join(s3_prefix, "d/x.json"), "{}")
    storage.write_text(s3_prefix + "2/other.json", "{}")  # sibling prefix sharing the name
    assert storage.list_files(s3_prefix) == [storage.join(s3_prefix, "d/x.json")]
    fs.create_dir(f"{path}/only-markers/e")
    assert not storage.exists(storage.join(s3_prefix, "only-markers")), "a prefix of dir markers holds no files"


def test_delete_file_prefix_and_missing(base: str) -> None:
    storage.write_text(storage.join(base, "m/a.txt"), "a")
    storage.write_text(storage.join(base, "m/b/c.txt"), "c")
    storage.write_text(storage.join(base, "m2/keep.txt"), "k")
    storage.delete(storage.join(base, "m/a.txt"))
    assert not storage.exists(storage.join(base, "m/a.txt"))
    assert storage.exists(storage.join(base, "m/b/c.txt"))
    storage.delete(storage.join(base, "m"))
    assert not storage.exists(storage.join(base, "m"))
    assert storage.exists(storage.join(base, "m2/keep.txt")), "a sibling with a common name prefix survives"
    storage.delete(storage.join(base, "m"))  # missing: no error
    if storage.is_s3(base):
        storage.delete("s3://finemed-no-such-bucket/x")  # missing bucket: no error either
        assert s3_keys(base) == [base.split("/", 3)[3] + "/m2/keep.txt"], "no empty dir markers left behind"


def test_delete_refuses_bucket_root(s3: EmbeddedS3) -> None:
    with pytest.raises(StorageError, match="whole bucket"):
        storage.delete("s3://finemed-test")


# --------------------------------------------------------------------------------------------- errors


def test_missing_key_and_bucket_errors_name_the_uri(s3_prefix: str, tmp_path: Path) -> None:
    missing = storage.join(s3_prefix, "missing.json")
    with pytest.raises(StorageError, match=rf"^{missing}: not found$"):
        storage.read_bytes(missing)
    with pytest.raises(StorageError, match=rf"^{missing}: not found$"):
        storage.read_json(missing)

    nob = "s3://finemed-no-such-bucket/x/y.json"
    with pytest.raises(StorageError, match=rf"^{nob}: bucket 'finemed-no-such-bucket' does not exist$"):
        storage.read_bytes(nob)
    with pytest.raises(StorageError, match=rf"^{nob}: bucket 'finemed-no-such-bucket' does not exist$"):
        storage.write_bytes(nob, b"x")
    with pytest.raises(StorageError, match="does not exist"):
        storage.list_files("s3://finemed-no-such-bucket/x")
    with pytest.raises(StorageError, match=rf"^{s3_prefix}/nothing: not found"):
        storage.download_dir(storage.join(s3_prefix, "nothing"), str(tmp_path / "dl"))
    assert not storage.exists(nob)

    local = str(tmp_path / "nope.txt")
    with pytest.raises(StorageError, match=rf"^{local}: not found$"):
        storage.read_text(local)
    with pytest.raises(StorageError, match="is a directory"):
        storage.read_bytes(str(tmp_path))

    storage.write_text(storage.join(s3_prefix, "bad.json"), "{not json")
    with pytest.raises(StorageError, match=rf"^{s3_prefix}/bad.json: invalid JSON"):
        storage.read_json(storage.join(s3_prefix, "bad.json"))
    with pytest.raises(StorageError, match="not a valid s3://bucket/key"):
        storage.read_bytes("s3:///key")


@pytest.fixture
def iam_enforcing_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, dict[str, str]]]:
    """A moto server of its own (a subprocess: moto's auth switch is process-global, so the session's server is
    left alone) holding ``s3://finemed-denied/data/a.txt``, with IAM enforced: requests signed by IAM user
    ``no-perms`` (no policy) get the server's real AccessDenied; ``reader`` (s3:* allowed) is the control.
    Yields each user's AWS environment."""
    env = {k: v for k, v in os.environ.items() if k != "INITIAL_NO_AUTH_ACTION_COUNT"}  # auth off while seeding
    proc = subprocess.Popen(
        [sys.executable, "-m", "finemed_ray.toy.s3_server", "serve-s3", "--port", "0", "--bucket", "finemed-denied"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO_ROOT,
        env={**env, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = ""
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("export AWS_ENDPOINT_URL_S3="):
                url = line.strip().partition("=")[2]
                break
        assert url.startswith("http://127.0.0.1:"), "serve-s3 did not print its endpoint"
        owner = {"endpoint_url": url, "region_name": "us-east-1", "aws_access_key_id": "testing",
                 "aws_secret_access_key": "testing"}
        boto3.client("s3", **owner).put_object(Bucket="finemed-denied", Key="data/a.txt", Body=b"secret")
        iam = boto3.client("iam", **owner)
        users = {}
        for user in ("no-perms", "reader"):
            iam.create_user(UserName=user)
            key = iam.create_access_key(UserName=user)["AccessKey"]
            users[user] = {"AWS_ENDPOINT_URL": url, "AWS_ENDPOINT_URL_S3": url, "AWS_REGION": "us-east-1",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                           "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        iam.put_user_policy(UserName="reader", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        # moto's server-mode switch (what @set_initial_no_auth_action_count posts): from now on every request is
        # authenticated and checked against IAM.
        reset = urllib.request.Request(f"{url}/moto-api/reset-auth", data=b"0", method="POST",
                                       headers={"Content-Type": "text/plain"})  # a form body would be parsed away
        assert json.loads(urllib.request.urlopen(reset, timeout=30).read())["status"] == "ok"
        for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(key, raising=False)
        yield users
    finally:
        storage.clear_fs_cache()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_access_denied_from_the_server_is_translated(
    iam_enforcing_s3: dict[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def use(user: str) -> None:
        for key, value in iam_enforcing_s3[user].items():
            monkeypatch.setenv(key, value)
        storage.clear_fs_cache()

    obj, prefix = "s3://finemed-denied/data/a.txt", "s3://finemed-denied/data/"
    use("reader")  # control: the same calls with permission work, so what follows is about permissions only
    assert storage.read_bytes(obj) == b"secret" and storage.exists(obj) and storage.list_files(prefix) == [obj]

    use("no-perms")
    # pyarrow GET (S3 answers the HeadObject with a bare 403), pyarrow PUT, boto3 HEAD (code "403", no body),
    # boto3 LIST (code "AccessDenied"): each is an access-denied StorageError naming the URI, never "not found",
    # never False, never an untranslated pyarrow/botocore error.
    calls = {
        obj: [storage.read_bytes, storage.read_json, storage.exists],
        "s3://finemed-denied/data/b.txt": [lambda uri: storage.write_bytes(uri, b"x")],
        prefix: [storage.list_files],
    }
    for uri, fns in calls.items():
        for fn in fns:
            with pytest.raises(StorageError) as denied:
                fn(uri)
            assert str(denied.value).startswith(f"{uri}: access denied ("), (fn, str(denied.value))


def test_ensure_bucket(s3: EmbeddedS3, tmp_path: Path) -> None:
    uri = "s3://finemed-ensure-bucket/a.txt"
    assert not storage.exists(uri)
    storage.ensure_bucket(uri)
    storage.ensure_bucket(uri)  # idempotent
    storage.write_text(uri, "ok")
    assert storage.read_text(uri) == "ok"
    storage.ensure_bucket(str(tmp_path / "x"))  # local: no-op
    with pytest.raises(StorageError, match="invalid bucket name"):
        storage.ensure_bucket("s3://b1/x")


# ------------------------------------------------------------------------------------ directory copies


@pytest.mark.parametrize("remote", ["s3", "local"])
def test_upload_download_dir_tree_equality(remote: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    src = tmp_path / "src"
    files = make_tree(src)
    uri = request.getfixturevalue("s3_prefix") if remote == "s3" else str(tmp_path / "remote")
    storage.upload_dir(str(src), uri)
    assert storage.list_files(uri) == sorted(storage.join(uri, rel) for rel in files)
    out = tmp_path / "out"
    assert storage.download_dir(uri, str(out)) == str(out)
    assert read_tree(out) == files


def test_upload_dir_requires_a_directory(s3_prefix: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="not a local directory"):
        storage.upload_dir(str(tmp_path / "missing"), s3_prefix)


# --------------------------------------------------------------------------------------- local caching


def test_cache_dir_for_is_deterministic(cache_dir: Path) -> None:
    a = storage.cache_dir_for("s3://finemed-test/m")
    assert a == storage.cache_dir_for("s3://finemed-test/m/") and a.startswith(str(cache_dir))
    assert a != storage.cache_dir_for("s3://finemed-test/m2")


def test_materialize_local_downloads_once(s3_prefix: str, tmp_path: Path, cache_dir: Path) -> None:
    assert storage.materialize_local(str(tmp_path)) == str(tmp_path)  # local: as-is, nothing copied
    files = make_tree(tmp_path / "src")
    storage.upload_dir(str(tmp_path / "src"), s3_prefix)

    local = storage.materialize_local(s3_prefix)
    assert local == storage.cache_dir_for(s3_prefix)
    marker = Path(local, storage.CACHE_MARKER)
    assert {k: v for k, v in read_tree(Path(local)).items() if k != storage.CACHE_MARKER} == files
    first_mtime = marker.stat().st_mtime_ns

    # Change the remote copy: a cached directory must be served as is, without downloading again.
    storage.write_bytes(storage.join(s3_prefix, "config.json"), b"{}")
    time.sleep(0.01)
    assert storage.materialize_local(s3_prefix) == local
    assert marker.stat().st_mtime_ns == first_mtime
    assert Path(local, "config.json").read_bytes() == files["config.json"]

    # Without the marker the cache counts as unfinished and is fetched again.
    marker.unlink()
    assert storage.materialize_local(s3_prefix) == local
    assert Path(local, "config.json").read_bytes() == b"{}"
    assert sorted(p.name for p in cache_dir.iterdir() if ".tmp-" in p.name) == [], "no temp dirs left"


def test_materialize_local_single_object(s3_prefix: str, cache_dir: Path) -> None:
    uri = storage.join(s3_prefix, "data.jsonl")
    storage.write_text(uri, '{"a": 1}\n')
    path = storage.materialize_local(uri)
    assert path.endswith("data.jsonl") and Path(path).read_text() == '{"a": 1}\n'
    with pytest.raises(StorageError, match="not found"):
        storage.materialize_local(storage.join(s3_prefix, "absent"))


def test_materialize_local_concurrent_callers(s3_prefix: str, tmp_path: Path, cache_dir: Path) -> None:
    files = make_tree(tmp_path / "src")
    storage.upload_dir(str(tmp_path / "src"), s3_prefix)
    with ThreadPoolExecutor(4) as pool:  # flock on separate open()s serialises threads as it does processes
        paths = list(pool.map(lambda _: storage.materialize_local(s3_prefix), range(4)))
    assert len(set(paths)) == 1
    got = read_tree(Path(paths[0]))
    got.pop(storage.CACHE_MARKER)
    assert got == files
    assert [p.name for p in cache_dir.iterdir() if ".tmp-" in p.name] == []


# -------------------------------------------------------------------------------------------- publish


def test_publish_dir_s3(s3_prefix: str, tmp_path: Path) -> None:
    storage.write_text(storage.join(s3_prefix, "stale-from-old-run.bin"), "old")
    src = tmp_path / "export"
    files = make_tree(src)
    assert not storage.is_complete(s3_prefix)
    storage.publish_dir(str(src), s3_prefix)
    assert storage.is_complete(s3_prefix)
    expect = sorted(storage.join(s3_prefix, rel) for rel in [*files, "_COMPLETE"])
    assert storage.list_files(s3_prefix) == expect, "old objects are cleared, every file plus the marker"
    assert storage.read_bytes(storage.join(s3_prefix, "_COMPLETE")) == b""
    assert storage.read_json(storage.join(s3_prefix, "config.json")) == {"model_type": "llama"}
    assert (src / "_COMPLETE").is_file(), "the local copy is marked complete too"

    # Republishing from a directory that carries the marker still writes the marker last, once.
    storage.publish_dir(str(src), s3_prefix, marker="_COMPLETE")
    assert storage.list_files(s3_prefix) == expect


def test_publish_dir_s3_failure_leaves_nothing(s3: EmbeddedS3, tmp_path: Path) -> None:
    # A versioned bucket keeps a history, which proves the failure came after real uploads had happened.
    bucket = "finemed-versioned"
    storage.ensure_bucket(f"s3://{bucket}")
    client = storage.s3_client()
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    uri = f"s3://{bucket}/model"

    good = tmp_path / "good"
    make_tree(good)
    storage.publish_dir(str(good), uri)  # a previous finished publish
    assert storage.is_complete(uri)

    src = tmp_path / "broken"
    make_tree(src)
    os.symlink(src / "vanished.bin", src / "zz-dangling.bin")  # sorted last: fails after the others started
    with pytest.raises(StorageError) as info:
        storage.publish_dir(str(src), uri)
    msg = str(info.value)
    assert msg.startswith(f"{uri}: publish failed") and "zz-dangling.bin" in msg

    assert storage.list_files(uri) == [] and s3_keys(uri) == []
    assert not storage.is_complete(uri) and not storage.exists(uri)
    assert not (src / "_COMPLETE").exists()
    versions = client.list_object_versions(Bucket=bucket, Prefix="model/").get("Versions", [])
    uploads = {}
    for v in versions:
        uploads[v["Key"]] = uploads.get(v["Key"], 0) + 1
    assert uploads["model/model.safetensors"] == 2, "the failed publish did upload files before failing"
    assert uploads["model/config.json"] == 1 and uploads["model/_COMPLETE"] == 1, "config/marker only go last"


def test_publish_dir_local(tmp_path: Path) -> None:
    target = tmp_path / "published" / "model"
    target.mkdir(parents=True)
    (target / "stale.bin").write_bytes(b"old")
    src = tmp_path / "export"
    files = make_tree(src)
    storage.publish_dir(str(src), str(target))
    assert storage.is_complete(str(target))
    assert read_tree(target) == {**files, "_COMPLETE": b""}
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"], "no temp or old dirs left"


def test_publish_dir_local_failure_keeps_previous_copy(tmp_path: Path) -> None:
    target = tmp_path / "published"
    good = tmp_path / "good"
    files = make_tree(good)
    storage.publish_dir(str(good), str(target))

    src = tmp_path / "broken"
    make_tree(src)
    (src / "config.json").write_bytes(b'{"new": true}')
    os.symlink(src / "vanished.bin", src / "zz-dangling.bin")
    with pytest.raises(StorageError, match=f"^{target}: publish failed"):
        storage.publish_dir(str(src), str(target))
    assert read_tree(target) == {**files, "_COMPLETE": b""}, "the previous finished copy is untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "good", "published"]


# ----------------------------------------------------------------------------------- pyarrow filesystem


def test_s3_filesystem_pickles_and_works_elsewhere(s3_prefix: str) -> None:
    uri = storage.join(s3_prefix, "p.txt")
    storage.write_text(uri, "pickled")
    fs, path = storage.get_filesystem(uri)
    clone = pickle.loads(pickle.dumps(fs))
    with clone.open_input_stream(path) as f:
        assert f.read() == b"pickled"

    # Like a Ray worker: another process, no AWS variables at all; endpoint and credentials travel in the pickle.
    code = (
        # Unpickling alone imports only pyarrow._s3fs, which does not register pyarrow's atexit S3 finalizer, and
        # the process then dies with SIGSEGV at exit (seen in CI). A Ray worker imports finemed_ray.storage
        # (and so pyarrow.fs) before it touches a filesystem; do the same here.
        "import pickle, sys, finemed_ray.storage; fs = pickle.loads(sys.stdin.buffer.read()); "
        f"sys.stdout.write(fs.open_input_stream({path!r}).read().decode())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    out = subprocess.run(
        [sys.executable, "-c", code], input=pickle.dumps(fs), capture_output=True, env=env, timeout=60, check=True
    )
    assert out.stdout == b"pickled"


def test_parquet_roundtrip_through_get_filesystem(s3_prefix: str) -> None:
    table = pa.table({"id": [1, 2, 3], "messages": [[{"role": "user", "content": "hi"}], [], None]})
    fs, path = storage.get_filesystem(storage.join(s3_prefix, "t/part-0.parquet"))
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    dir_fs, dir_path = storage.get_filesystem(storage.join(s3_prefix, "t"))
    assert pq.read_table(dir_path, filesystem=dir_fs).to_pylist() == table.to_pylist()
    assert storage.list_files(s3_prefix, suffixes=(".parquet",)) == [storage.join(s3_prefix, "t/part-0.parquet")]


# ------------------------------------------------------------------------------------ embedded server


def test_embedded_s3_context_manager_restores_env(s3: EmbeddedS3) -> None:
    before = os.environ["AWS_ENDPOINT_URL_S3"]
    with EmbeddedS3(buckets=("finemed-inner",)) as inner:
        assert inner.endpoint_url != s3.endpoint_url
        assert os.environ["AWS_ENDPOINT_URL_S3"] == inner.endpoint_url
        storage.write_text("s3://finemed-inner/x.txt", "inner")
        assert storage.read_text("s3://finemed-inner/x.txt") == "inner"
    assert os.environ["AWS_ENDPOINT_URL_S3"] == before
    assert storage.get_filesystem("s3://finemed-test/x")[0] is not None
    storage.write_text("s3://finemed-test/after-inner.txt", "outer")  # the session server is used again
    assert storage.read_text("s3://finemed-test/after-inner.txt") == "outer"
    storage.delete("s3://finemed-test/after-inner.txt")


def test_cli_serve_s3_starts_and_stops() -> None:
    # moto rejects bucket names under 3 characters (as AWS does), so "b1" would be refused: use "cli-b1".
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "finemed_ray.toy.s3_server", "serve-s3", "--port", "0", "--bucket", "cli-b1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        exports: dict[str, str] = {}
        deadline = time.monotonic() + 60
        while len(exports) < 6:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line.startswith("export "), line
            key, _, value = line[len("export "):].strip().partition("=")
            exports[key] = value
        assert exports["AWS_ENDPOINT_URL_S3"].startswith("http://127.0.0.1:")
        assert exports["AWS_ACCESS_KEY_ID"] == "testing" and exports["AWS_REGION"] == "us-east-1"
        client = boto3.client(
            "s3", endpoint_url=exports["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )
        assert "cli-b1" in [b["Name"] for b in client.list_buckets()["Buckets"]]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_cli_rejects_bad_bucket_name() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "finemed_ray.toy.s3_server", "serve-s3", "--port", "0", "--bucket", "b1"],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=60,
    )
    assert out.returncode == 2 and "s3://b1" in out.stderr
