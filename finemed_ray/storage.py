"""One storage layer for ``s3://bucket/key`` URIs and local paths.

File IO goes through ``pyarrow.fs`` (the same filesystems Ray Data uses); boto3 does what it is better at:
bucket creation, listing, deletes and multi-part transfers of whole directories. Every user-facing failure is a
:class:`~finemed_ray.errors.StorageError` whose message names the URI and the problem.

S3 settings come from the standard AWS environment variables: ``AWS_ENDPOINT_URL_S3`` (wins) or
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``. The tests and the demo run a real S3-compatible server
in-process: :mod:`finemed_ray.toy.s3_server`.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError

from finemed_ray.errors import StorageError

try:  # POSIX only; without it materialize_local still relies on temp dir + rename
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "cache_dir_for",
    "clear_fs_cache",
    "delete",
    "download_dir",
    "ensure_bucket",
    "exists",
    "get_filesystem",
    "is_complete",
    "is_s3",
    "join",
    "list_files",
    "materialize_local",
    "publish_dir",
    "read_bytes",
    "read_json",
    "read_text",
    "s3_client",
    "upload_dir",
    "write_bytes",
    "write_json",
    "write_text",
]

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
CACHE_MARKER = ".complete"  # written last into a materialize_local cache dir
_TRANSFER_WORKERS = 8
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
_DENIED_CODES = {"403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}


# --------------------------------------------------------------------------------------------------- URIs


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def join(uri: str, *parts: str) -> str:
    """Join path parts under ``uri``. Leading slashes of parts are dropped so a part never escapes the base."""
    clean = [p.strip("/") for p in parts if p.strip("/")]
    if is_s3(uri):
        base = uri.rstrip("/")
        if base == "s3:":  # "s3://" itself
            base = "s3:/"
        return "/".join([base, *clean])
    return os.path.join(uri, *clean)


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: not a valid s3://bucket/key URI")
    return bucket, key


def _dir_prefix(key: str) -> str:
    # "model" -> "model/": a prefix must not match siblings such as "model2/..."
    key = key.strip("/")
    return key + "/" if key else ""


def _local_path(uri: str) -> str:
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return os.path.abspath(os.path.expanduser(uri))


# ---------------------------------------------------------------------------------- transient S3 errors

RETRY_WINDOW_VAR = "FINEMED_S3_RETRY_WINDOW_S"
DEFAULT_RETRY_WINDOW_S = 120.0
# Error codes and texts that say "try again later", not "this is wrong": the endpoint unreachable or resetting
# connections, 5xx, throttling. pyarrow reports them as OSError texts from the AWS SDK ("AWS Error
# NETWORK_CONNECTION ..."), botocore as ConnectionError subclasses or ClientError codes.
_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "Throttling",
                    "ThrottlingException", "RequestTimeout", "RequestLimitExceeded", "TooManyRequestsException"}
_TRANSIENT_TEXTS = ("NETWORK_CONNECTION", "SLOW_DOWN", "INTERNAL_FAILURE", "SERVICE_UNAVAILABLE", "THROTTLING",
                    "REQUEST_TIMEOUT", "HTTP status 5", "Could not connect", "Connection was closed",
                    "Connection reset", "Connection refused", "Read timeout", "Connect timeout")

_T = TypeVar("_T")


def retry_window_s() -> float:
    """How long a storage operation keeps retrying transient S3 errors: ``$FINEMED_S3_RETRY_WINDOW_S`` (default
    120 s; 0 turns retries off). Forwarded to Ray workers like every ``FINEMED_*`` variable."""
    raw = os.environ.get(RETRY_WINDOW_VAR, "")
    if not raw.strip():
        return DEFAULT_RETRY_WINDOW_S
    try:
        value = float(raw)
    except ValueError:
        raise StorageError(f"{RETRY_WINDOW_VAR}={raw!r}: not a number of seconds") from None
    if value < 0:
        raise StorageError(f"{RETRY_WINDOW_VAR}={raw!r}: must be >= 0")
    return value


def pyarrow_attempts_for_window(window_s: float) -> int:
    """``max_attempts`` of pyarrow's AWS standard retry strategy that keeps retrying for about ``window_s``.

    pyarrow has no time-based retry; its waits double up to a 20 s cap. Measured against a stopped endpoint
    (pyarrow 26): 3 attempts give up after ~3 s, 8 after ~30 s, 12 after ~105 s, 16 after ~190 s, i.e. ~20 s per
    attempt past the 8th."""
    if window_s <= 0:
        return 1
    if window_s <= 30:
        return max(3, min(8, 3 + int(window_s // 5)))
    return 8 + int(-(-(window_s - 30) // 20))


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is an S3 failure worth retrying (unreachable endpoint, reset connection, 5xx, throttling)."""
    if isinstance(exc, StorageError):
        return exc.transient
    if isinstance(exc, BotoConnectionError):
        return True
    if isinstance(exc, ClientError):
        return _error_code(exc) in _TRANSIENT_CODES
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    from_s3_library = isinstance(exc, (OSError, BotoCoreError)) or type(exc).__module__.startswith(
        ("boto3", "s3transfer"))
    return from_s3_library and any(t in str(exc) for t in _TRANSIENT_TEXTS)


def retrying(uri: str, operation: Callable[[], _T], what: str = "") -> _T:
    """Run ``operation`` (idempotent), retrying transient S3 errors with capped exponential backoff until the
    retry window (:func:`retry_window_s`) is spent; then raise a StorageError that names ``uri`` and the wait."""
    window = retry_window_s()
    start = time.monotonic()
    delay, attempt = 0.5, 0
    while True:
        try:
            return operation()
        except Exception as exc:
            if not is_transient(exc):
                raise
            attempt += 1
            waited = time.monotonic() - start
            detail = _first_line(exc).removeprefix(f"{uri}: ")
            if waited + delay > window:
                if window <= 0:
                    raise
                raise StorageError(f"{uri}: S3 still unavailable after {waited:.0f} s of retries "
                                   f"({RETRY_WINDOW_VAR}={window:g}): {detail}", transient=True) from exc
            if attempt == 1:
                log.warning("%s: S3 unavailable (%s); retrying for up to %g s%s", uri, detail, window,
                            f" ({what})" if what else "")
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _retry_s3(func: Callable[..., _T]) -> Callable[..., _T]:
    """Decorator: an operation on an ``s3://`` URI (its first argument) is retried by :func:`retrying`."""
    import functools

    @functools.wraps(func)
    def wrapper(uri: str, *args: Any, **kwargs: Any) -> _T:
        if not is_s3(uri):
            return func(uri, *args, **kwargs)
        return retrying(uri, lambda: func(uri, *args, **kwargs), func.__name__)

    return wrapper


# ------------------------------------------------------------------------------------------- S3 settings


@dataclass(frozen=True)
class _S3Settings:
    endpoint_url: str | None
    access_key: str | None
    secret_key: str | None
    session_token: str | None
    region: str | None

    @classmethod
    def from_env(cls) -> _S3Settings:
        env = os.environ
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        if endpoint and "://" not in endpoint:
            endpoint = "https://" + endpoint  # boto3 needs a scheme; AWS-style endpoints default to https
        return cls(
            endpoint_url=endpoint,
            access_key=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        )

    def effective_region(self) -> str | None:
        # Custom endpoints (moto, MinIO) still need a region to sign requests.
        return self.region or ("us-east-1" if self.endpoint_url else None)


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem with a retry strategy sized to :func:`retry_window_s`, kept across pickling.

    pyarrow's own ``__reduce__`` drops ``retry_strategy``, so a filesystem handed to Ray Data or Ray Train
    (checkpoint uploads) would fall back to 3 attempts (~3 s) in every worker. This subclass rebuilds itself with
    the window's strategy wherever it is unpickled, and is still an ``S3FileSystem`` for Ray's type checks."""

    def __init__(self, window_s: float, **kwargs: Any) -> None:
        strategy = pafs.AwsStandardS3RetryStrategy(max_attempts=pyarrow_attempts_for_window(window_s))
        super().__init__(retry_strategy=strategy, **kwargs)
        self._finemed_args = (window_s, kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        window_s, kwargs = self._finemed_args
        return (_rebuild_retrying_s3, (window_s, kwargs))


def _rebuild_retrying_s3(window_s: float, kwargs: dict[str, Any]) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(window_s, **kwargs)


_cache_lock = threading.Lock()
_fs_cache: dict[tuple[_S3Settings, float], pafs.S3FileSystem] = {}
_client_cache: dict[tuple[_S3Settings, int], Any] = {}


def clear_fs_cache() -> None:
    """Forget cached S3 filesystems and clients (call after changing the AWS environment variables)."""
    with _cache_lock:
        _fs_cache.clear()
        _client_cache.clear()


# pyarrow.fs finalizes the AWS SDK in an atexit hook (registered at its import, above). atexit runs hooks
# last-in-first-out, so this one runs first and releases our cached filesystems while the SDK is still alive.
atexit.register(clear_fs_cache)


def _s3_filesystem(settings: _S3Settings) -> pafs.S3FileSystem:
    window = retry_window_s()
    with _cache_lock:
        fs = _fs_cache.get((settings, window))
        if fs is None:
            kwargs: dict[str, Any] = {}
            if settings.endpoint_url:
                parsed = urlparse(settings.endpoint_url)
                kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
            # Explicit credentials travel inside the pickled filesystem, so Ray workers need no env of their own;
            # without them pyarrow falls back to the AWS default chain on each worker.
            if settings.access_key and settings.secret_key:
                kwargs.update(access_key=settings.access_key, secret_key=settings.secret_key)
                if settings.session_token:
                    kwargs["session_token"] = settings.session_token
            if settings.effective_region():
                kwargs["region"] = settings.effective_region()
            fs = RetryingS3FileSystem(window, **kwargs)
            _fs_cache[(settings, window)] = fs
        return fs


def get_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)``: ``"bucket/key"`` for S3, an absolute path for local URIs."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        return _s3_filesystem(_S3Settings.from_env()), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), _local_path(uri)


def s3_client() -> Any:
    """A boto3 S3 client honouring the AWS environment variables (cached per settings and process)."""
    import boto3
    from botocore.config import Config

    settings = _S3Settings.from_env()
    key = (settings, os.getpid())  # clients must not be shared across fork()
    with _cache_lock:
        client = _client_cache.get(key)
        if client is None:
            config = Config(
                retries={"max_attempts": 3, "mode": "standard"},  # short: retrying() owns the window
                max_pool_connections=max(10, _TRANSFER_WORKERS * 2),
                # Custom endpoints rarely do virtual-host buckets (no wildcard DNS for 127.0.0.1).
                s3={"addressing_style": "path"} if settings.endpoint_url else None,
            )
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=settings.endpoint_url,
                region_name=settings.effective_region(),
                aws_access_key_id=settings.access_key,
                aws_secret_access_key=settings.secret_key,
                aws_session_token=settings.session_token,
                config=config,
            )
            _client_cache[key] = client
        return client


# ----------------------------------------------------------------------------------------- error mapping


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return str(err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return ""


def _bucket_exists(bucket: str) -> bool | None:
    """True/False when S3 says so; None when it cannot tell (e.g. access denied on the bucket)."""
    try:
        s3_client().head_bucket(Bucket=bucket)
        return True
    except ClientError as exc:
        return False if _error_code(exc) in _NOT_FOUND_CODES | {"NoSuchBucket"} else None
    except BotoCoreError:
        return None


def missing_reason(uri: str) -> str:
    """Why ``uri`` does not exist, for an error message: its S3 bucket does not exist, or the path is not there."""
    if is_s3(uri):
        bucket = _split_s3(uri)[0]
        if _bucket_exists(bucket) is False:
            return f"bucket '{bucket}' does not exist"
    return "not found"


def _to_storage_error(uri: str, exc: BaseException) -> StorageError:
    """Translate pyarrow/botocore/OS errors into a StorageError naming ``uri`` and the problem; a transient
    cause (:func:`is_transient`) makes a transient StorageError, which :func:`retrying` retries."""
    if isinstance(exc, StorageError):
        return exc
    err = _classify_storage_error(uri, exc)
    err.transient = is_transient(exc)
    return err


def _classify_storage_error(uri: str, exc: BaseException) -> StorageError:
    code = _error_code(exc)
    text = str(exc)
    bucket = _split_s3(uri)[0] if is_s3(uri) else None
    if code == "NoSuchBucket" or "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return StorageError(f"{uri}: bucket '{bucket}' does not exist")
    if (
        code in _DENIED_CODES
        or isinstance(exc, PermissionError)
        or any(s in text for s in ("ACCESS_DENIED", "AccessDenied", "Forbidden", "HTTP response code: 403"))
    ):
        return StorageError(f"{uri}: access denied ({code or text})")
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"{uri}: no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    if isinstance(exc, BotoCoreError) and "Could not connect" in text:
        return StorageError(f"{uri}: cannot reach the S3 endpoint: {text}")
    if code in _NOT_FOUND_CODES or isinstance(exc, FileNotFoundError):
        # S3 answers 404 for a missing key and for a missing bucket alike: ask which one it is.
        if bucket is not None and _bucket_exists(bucket) is False:
            return StorageError(f"{uri}: bucket '{bucket}' does not exist")
        return StorageError(f"{uri}: not found")
    if isinstance(exc, IsADirectoryError):
        return StorageError(f"{uri}: is a directory, not a file")
    return StorageError(f"{uri}: {type(exc).__name__}: {text}")


@contextlib.contextmanager
def _translate(uri: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except (ClientError, BotoCoreError, OSError) as exc:
        raise _to_storage_error(uri, exc) from exc
    except Exception as exc:
        # boto3's S3UploadFailedError and friends are not ClientErrors but carry the same codes in their text.
        if type(exc).__module__.startswith(("boto3", "s3transfer", "botocore")):
            raise _to_storage_error(uri, exc) from exc
        raise


# ------------------------------------------------------------------------------------------ S3 listing


def _iter_s3_keys(bucket: str, prefix: str) -> Iterator[str]:
    """Object keys under ``prefix``, skipping the empty ``dir/`` marker objects some writers create."""
    paginator = s3_client().get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):
                yield obj["Key"]


def _s3_object_exists(bucket: str, key: str) -> bool:
    if not key or key.endswith("/"):
        return False
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if _error_code(exc) in _NOT_FOUND_CODES | {"NoSuchBucket"}:
            return False
        raise


@_retry_s3
def _is_file(uri: str) -> bool:
    if is_s3(uri):
        with _translate(uri):
            return _s3_object_exists(*_split_s3(uri))
    return os.path.isfile(_local_path(uri))


# ------------------------------------------------------------------------------------------- basic IO


@_retry_s3
def exists(uri: str) -> bool:
    """True for a file or a non-empty prefix/directory. A missing bucket is False; access denied raises."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        with _translate(uri):
            try:
                if _s3_object_exists(bucket, key):
                    return True
                # Empty "dir/" markers do not count: a prefix holding only those has no files (as list_files says).
                return next(_iter_s3_keys(bucket, _dir_prefix(key)), None) is not None
            except ClientError as exc:
                if _error_code(exc) == "NoSuchBucket":
                    return False
                raise
    path = _local_path(uri)
    if os.path.isdir(path):
        with os.scandir(path) as entries:
            return any(True for _ in entries)
    return os.path.exists(path)


@_retry_s3
def read_bytes(uri: str) -> bytes:
    fs, path = get_filesystem(uri)
    with _translate(uri):
        if not is_s3(uri) and os.path.isdir(path):
            raise IsADirectoryError(path)
        # compression=None: bytes as stored. pyarrow would otherwise gunzip a name ending in .gz (and gzip it
        # again on write), so a .jsonl.gz written here would be double-compressed for every other reader.
        with fs.open_input_stream(path, compression=None) as f:
            return f.read()


@_retry_s3
def write_bytes(uri: str, data: bytes) -> None:
    fs, path = get_filesystem(uri)
    with _translate(uri):
        if is_s3(uri):
            # An S3 object appears atomically when the upload completes; no temp object needed.
            with fs.open_output_stream(path, compression=None) as f:
                f.write(data)
            return
        # Local: write a sibling temp file and rename, so readers never see a half-written file.
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with fs.open_output_stream(tmp, compression=None) as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def read_text(uri: str) -> str:
    data = read_bytes(uri)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StorageError(f"{uri}: not UTF-8 text ({exc})") from exc


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    text = read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise StorageError(f"{uri}: invalid JSON ({exc})") from exc


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


@_retry_s3
def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Files under ``uri`` (recursive) as sorted full URIs; a single file gives ``[uri]``; a missing prefix ``[]``."""
    suffixes = tuple(suffixes) if suffixes else None

    def keep(name: str) -> bool:
        return suffixes is None or name.endswith(suffixes)

    if is_s3(uri):
        bucket, key = _split_s3(uri)
        with _translate(uri):
            if _s3_object_exists(bucket, key):
                return [uri]
            return sorted(f"s3://{bucket}/{k}" for k in _iter_s3_keys(bucket, _dir_prefix(key)) if keep(k))
    path = _local_path(uri)
    if os.path.isfile(path):
        return [path]
    out = []
    for root, _dirs, files in os.walk(path, followlinks=True):
        out.extend(os.path.join(root, name) for name in files if keep(name))
    return sorted(out)


def _local_files(local_dir: str) -> list[tuple[str, str]]:
    """``(absolute path, relative posix path)`` of every file under ``local_dir``, sorted by relative path."""
    root = _local_path(local_dir)
    if not os.path.isdir(root):
        raise StorageError(f"{local_dir}: not a local directory")
    out = []
    for dirpath, _dirs, files in os.walk(root, followlinks=True):  # follow links: HF snapshots are symlinks
        for name in files:
            full = os.path.join(dirpath, name)
            out.append((full, os.path.relpath(full, root).replace(os.sep, "/")))
    return sorted(out, key=lambda item: item[1])


def _run_parallel(tasks: Sequence[Callable[[], None]]) -> None:
    """Run ``tasks`` on a thread pool; on the first failure cancel what has not started and raise it."""
    if not tasks:
        return
    with ThreadPoolExecutor(max_workers=min(_TRANSFER_WORKERS, len(tasks))) as pool:
        futures = [pool.submit(task) for task in tasks]
        try:
            for fut in as_completed(futures):
                fut.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _upload_tasks(files: Sequence[tuple[str, str]], uri: str) -> list[Callable[[], None]]:
    bucket, key = _split_s3(uri)
    prefix = _dir_prefix(key)

    def task(src: str, rel: str) -> Callable[[], None]:
        def run() -> None:
            dest = f"s3://{bucket}/{prefix}{rel}"
            if not os.path.isfile(src):  # e.g. a dangling symlink: name the local file, not the S3 target
                raise StorageError(f"{src}: cannot read local file to upload to {dest}")
            def upload() -> None:
                with _translate(dest):
                    try:
                        s3_client().upload_file(src, bucket, prefix + rel)
                    except OSError as exc:
                        if is_transient(exc):
                            raise
                        raise StorageError(f"{src}: cannot read local file to upload to {dest}: {exc}") from exc

            retrying(dest, upload, "upload")

        return run

    return [task(src, rel) for src, rel in files]


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy every file under ``local_dir`` to ``uri`` (S3 prefix or local directory), keeping relative paths."""
    files = _local_files(local_dir)
    if is_s3(uri):
        _run_parallel(_upload_tasks(files, uri))
        return
    dest = _local_path(uri)
    if dest == _local_path(local_dir):
        return
    with _translate(uri):
        shutil.copytree(_local_path(local_dir), dest, dirs_exist_ok=True)


def _safe_join(root: str, rel: str, uri: str) -> str:
    # Keys such as "../x" must not write outside the target directory.
    dest = os.path.normpath(os.path.join(root, *rel.split("/")))
    if os.path.commonpath([root, dest]) != root:
        raise StorageError(f"{uri}: object key '{rel}' escapes the target directory")
    return dest


def download_dir(uri: str, local_dir: str) -> str:
    """Copy every file under ``uri`` into ``local_dir`` (created if needed); returns ``local_dir``."""
    root = _local_path(local_dir)
    if not is_s3(uri):
        src = _local_path(uri)
        if not os.path.isdir(src):
            raise StorageError(f"{uri}: not found (no such directory)")
        if src != root:
            with _translate(uri):
                shutil.copytree(src, root, dirs_exist_ok=True)
        return local_dir
    bucket, key = _split_s3(uri)
    prefix = _dir_prefix(key)
    def list_keys() -> list[str]:
        with _translate(uri):
            return list(_iter_s3_keys(bucket, prefix))

    keys = retrying(uri, list_keys, "list")
    if not keys:
        raise StorageError(f"{uri}: not found (no objects under this prefix)")
    os.makedirs(root, exist_ok=True)

    def task(k: str) -> Callable[[], None]:
        def run() -> None:
            dest = _safe_join(root, k[len(prefix):], uri)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            def download() -> None:
                with _translate(f"s3://{bucket}/{k}"):
                    s3_client().download_file(bucket, k, dest)

            retrying(f"s3://{bucket}/{k}", download, "download")

        return run

    _run_parallel([task(k) for k in keys])
    return local_dir


@_retry_s3
def delete(uri: str) -> None:
    """Delete a file or a whole prefix/directory; a missing one is not an error."""
    if not is_s3(uri):
        path = _local_path(uri)
        with _translate(uri):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
        return
    bucket, key = _split_s3(uri)
    if not key.strip("/"):
        raise StorageError(f"{uri}: refusing to delete a whole bucket; name a prefix")
    client = s3_client()
    with _translate(uri):
        try:
            # Listing includes "dir/" markers here (unlike _iter_s3_keys): they must go too.
            keys = [key.rstrip("/")] if not key.endswith("/") else []
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=_dir_prefix(key)):
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
            # boto3, not pyarrow: pyarrow's delete recreates an empty parent "dir/" marker object.
            for i in range(0, len(keys), 1000):
                batch = [{"Key": k} for k in keys[i:i + 1000]]
                resp = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
                if resp.get("Errors"):
                    err = resp["Errors"][0]
                    raise StorageError(f"s3://{bucket}/{err.get('Key')}: delete failed: {err.get('Code')}")
        except ClientError as exc:
            if _error_code(exc) == "NoSuchBucket":
                return
            raise


@_retry_s3
def ensure_bucket(uri: str) -> None:
    """Create the bucket of an ``s3://`` URI if it does not exist (no-op for local paths)."""
    if not is_s3(uri):
        return
    bucket, _ = _split_s3(uri)
    client = s3_client()
    target = f"s3://{bucket}"
    with _translate(target):
        try:
            client.head_bucket(Bucket=bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in _NOT_FOUND_CODES | {"NoSuchBucket"}:
                raise
        region = _S3Settings.from_env().effective_region() or client.meta.region_name
        kwargs: dict[str, Any] = {"Bucket": bucket}
        if region and region != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            client.create_bucket(**kwargs)
        except ClientError as exc:
            code = _error_code(exc)
            if code == "BucketAlreadyOwnedByYou":  # lost a creation race with ourselves: fine
                return
            if code == "BucketAlreadyExists":
                raise StorageError(f"{target}: bucket name is taken by another account") from exc
            if code == "InvalidBucketName":
                raise StorageError(f"{target}: invalid bucket name (3-63 lowercase letters, digits, '-', '.')") from exc
            raise


# ---------------------------------------------------------------------------------------- local cache


def cache_dir_for(uri: str) -> str:
    """Deterministic local cache directory for a remote ``uri``: ``$FINEMED_CACHE_DIR/<sha>``.

    The S3 endpoint is part of the hash so that the same ``s3://`` URI on two endpoints (AWS and a test server)
    never shares a cache.
    """
    base = os.environ.get("FINEMED_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "finemed_ray")
    ident = uri.rstrip("/")
    if is_s3(uri):
        endpoint = _S3Settings.from_env().endpoint_url
        if endpoint:
            ident = f"{endpoint}|{ident}"
    return os.path.join(os.path.abspath(base), hashlib.sha256(ident.encode("utf-8")).hexdigest()[:32])


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    # Serialises concurrent downloads of the same URI on one machine; the loser then finds the finished cache.
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _cached_path(cache: str) -> str | None:
    marker = os.path.join(cache, CACHE_MARKER)
    try:
        with open(marker, encoding="utf-8") as fh:
            rel = json.load(fh).get("path", ".")
    except (OSError, ValueError, AttributeError):
        return None
    return os.path.normpath(os.path.join(cache, rel))


def materialize_local(uri: str) -> str:
    """A local path for ``uri``: local paths as they are; S3 prefixes (or single objects) downloaded once.

    The download lands in a temp dir next to the cache dir, gets a ``.complete`` marker, then is renamed into
    place, so a crash never leaves a cache that looks finished. A single object is returned as the file path.
    """
    if not is_s3(uri):
        return uri
    cache = cache_dir_for(uri)
    hit = _cached_path(cache)
    if hit is not None:
        return hit
    parent = os.path.dirname(cache)
    os.makedirs(parent, exist_ok=True)
    with _file_lock(cache + ".lock"):
        hit = _cached_path(cache)  # another process may have finished while we waited for the lock
        if hit is not None:
            return hit
        tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(cache) + ".tmp-")
        try:
            bucket, key = _split_s3(uri)
            rel = "."
            with _translate(uri):
                if _s3_object_exists(bucket, key):
                    rel = posixpath.basename(key)
                    s3_client().download_file(bucket, key, os.path.join(tmp, rel))
            if rel == ".":
                download_dir(uri, tmp)
            with open(os.path.join(tmp, CACHE_MARKER), "w", encoding="utf-8") as fh:
                json.dump({"uri": uri, "path": rel}, fh)
            if os.path.lexists(cache):  # an unfinished cache from an older crash (no marker): replace it
                shutil.rmtree(cache, ignore_errors=True)
            os.rename(tmp, cache)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    hit = _cached_path(cache)
    assert hit is not None
    return hit


# -------------------------------------------------------------------------------------------- publish


def _touch(path: str) -> None:
    with open(path, "wb"):
        pass


def publish_dir(local_dir: str, uri: str, marker: str = "_COMPLETE") -> None:
    """Publish a finished directory so that a half-written copy is never left where a finished one would be.

    Local target: copy into a sibling temp dir, write ``marker``, then swap it in by rename. S3 target: clear
    the prefix, upload every file but ``config.json``, then ``config.json`` (loaders look for it), then an empty
    ``<uri>/<marker>`` object. Any failure removes the partial copy and raises StorageError. On success the
    marker is also written into ``local_dir`` (best effort) so the local copy reads as complete too.
    """
    src = _local_path(local_dir)
    if not os.path.isdir(src):
        raise StorageError(f"{local_dir}: not a local directory, cannot publish it to {uri}")
    if is_s3(uri):
        _publish_s3(src, uri, marker)
    else:
        _publish_local(src, uri, marker)
    with contextlib.suppress(OSError):
        _touch(os.path.join(src, marker))


def _publish_s3(src: str, uri: str, marker: str) -> None:
    bucket, key = _split_s3(uri)
    if not key.strip("/"):
        raise StorageError(f"{uri}: publish to a prefix, not a bucket root")
    files = [f for f in _local_files(src) if f[1] != marker]  # the marker is only ever written last
    body = [f for f in files if posixpath.basename(f[1]) != "config.json"]
    configs = [f for f in files if posixpath.basename(f[1]) == "config.json"]
    try:
        delete(uri)
        _run_parallel(_upload_tasks(body, uri))
        _run_parallel(_upload_tasks(configs, uri))
        write_bytes(join(uri, marker), b"")
    except BaseException as exc:
        try:
            delete(uri)
        except Exception as cleanup_exc:  # keep the original error; say that cleanup failed too
            log.error("%s: could not remove partial publish: %s", uri, cleanup_exc)
        if isinstance(exc, Exception):
            raise StorageError(f"{uri}: publish failed, partial upload removed: {exc}") from exc
        raise


def _publish_local(src: str, uri: str, marker: str) -> None:
    target = _local_path(uri)
    if target == src:  # already in place: only mark it
        _touch(os.path.join(target, marker))
        return
    if os.path.commonpath([src, target]) in (src, target):
        raise StorageError(f"{uri}: cannot publish {src} into itself or its parent")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.publish-")
    old = None
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        _touch(os.path.join(tmp, marker))
        if os.path.lexists(target):
            # Move the old copy aside rather than deleting it first: the swap is then two renames.
            old = f"{tmp}.old"
            os.rename(target, old)
        os.rename(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.lexists(target):
            os.rename(old, target)  # put the previous finished copy back
            old = None
        if isinstance(exc, Exception):
            raise StorageError(f"{uri}: publish failed, partial copy removed: {exc}") from exc
        raise
    finally:
        if old is not None:
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old, ignore_errors=True)
            elif os.path.lexists(old):
                os.remove(old)


def is_complete(uri: str, marker: str = "_COMPLETE") -> bool:
    """Whether ``uri`` was fully published (its marker file/object exists)."""
    return _is_file(join(uri, marker))


def check_writable(uri: str) -> None:
    """Fail fast (before hours of training) if ``uri`` cannot be written: write and delete a probe object."""
    probe = join(uri, f".finemed-write-probe-{os.getpid()}")
    write_bytes(probe, b"")
    delete(probe)
