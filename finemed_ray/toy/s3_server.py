"""moto's S3 server in-process: a real S3 HTTP endpoint on 127.0.0.1 for the tests, the demo and manual use.

A fixture, not part of the product: production code talks to S3 (or any S3-compatible store) only through
:mod:`finemed_ray.storage`. ``make s3`` / ``make s3-sample`` run it:
``python -m finemed_ray.toy.s3_server serve-s3 --port 9000 --bucket finemed-demo [--sample]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from botocore.exceptions import ClientError

from finemed_ray.errors import StorageError
from finemed_ray.storage import _error_code, clear_fs_cache

__all__ = ["EmbeddedS3", "main_s3_server"]


class EmbeddedS3:
    """moto's S3 server in a background thread: a real HTTP endpoint for tests, demos and manual use."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, buckets: tuple[str, ...] = (), verbose: bool = False
    ) -> None:
        self.host = host
        self.port = port
        self.buckets = tuple(buckets)
        self.verbose = verbose
        self.endpoint_url = ""
        self._server: Any = None
        self._saved_env: dict[str, str | None] = {}

    @property
    def env(self) -> dict[str, str]:
        if not self.endpoint_url:
            raise StorageError("EmbeddedS3: call start() before reading env")
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }

    def start(self) -> EmbeddedS3:
        from moto.server import ThreadedMotoServer  # dev dependency: imported only when a server is wanted

        if not self.verbose:
            # werkzeug logs every request at INFO; keep test and demo output readable.
            wz = logging.getLogger("werkzeug")
            if wz.level == logging.NOTSET:
                wz.setLevel(logging.WARNING)
        self._server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=self.verbose)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.port = port
        self.endpoint_url = f"http://{host}:{port}"
        for bucket in self.buckets:
            self.create_bucket(bucket)
        return self

    def client(self) -> Any:
        """A boto3 client bound to this server, whatever the process environment says."""
        import boto3

        env = self.env
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_REGION"],
        )

    def create_bucket(self, name: str) -> None:
        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as exc:
            if _error_code(exc) != "BucketAlreadyOwnedByYou":
                raise StorageError(f"s3://{name}: cannot create bucket: {exc}") from exc

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def apply_env(self) -> None:
        os.environ.update(self.env)
        clear_fs_cache()

    def __enter__(self) -> EmbeddedS3:
        self.start()
        self._saved_env = {k: os.environ.get(k) for k in self.env}
        self.apply_env()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        clear_fs_cache()


def main_s3_server(argv: Sequence[str] | None = None) -> int:
    """``python -m finemed_ray.toy.s3_server serve-s3 [--host H] [--port P] [--bucket NAME ...]`` (also ``finemed-s3``)."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["serve-s3"]:  # the console script `finemed-s3` is called without the sub-command
        args_in = args_in[1:]
    parser = argparse.ArgumentParser(
        prog="python -m finemed_ray.toy.s3_server serve-s3",
        description="Run an in-memory S3 server (moto) and print the environment that points clients at it.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port")
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    parser.add_argument("--sample", action="store_true",
                        help="upload the demo's inputs (tiny model, sample datasets, held-out MCQ, seed corpus) to "
                             "the first --bucket (default finemed-demo), so jobs/ commands can be run by hand")
    args = parser.parse_args(args_in)
    if args.sample and not args.bucket:
        args.bucket = ["finemed-demo"]

    server = EmbeddedS3(host=args.host, port=args.port, buckets=tuple(args.bucket), verbose=args.verbose)
    try:
        server.start()
    except (StorageError, OSError) as exc:
        server.stop()
        print(f"error: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()

    def stop_on_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())

    stop_on_signals()
    for key, value in server.env.items():
        print(f"export {key}={shlex.quote(value)}", flush=True)
    if args.sample:
        try:
            _upload_sample(server, args.bucket[0])
        except Exception as exc:
            server.stop()
            print(f"error: uploading the sample inputs failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        # The sample's synthesis ran a local Ray cluster in this process: ray.init replaces the SIGTERM handler
        # (and Ray's native failure-signal handler can re-raise it with the default action), so SIGTERM would kill
        # the server instead of stopping it cleanly. Ours again.
        stop_on_signals()
    print(f"# S3 server on {server.endpoint_url}; buckets: {', '.join(args.bucket) or '(none)'}; Ctrl-C stops it",
          file=sys.stderr, flush=True)
    while not stop.wait(0.5):
        pass
    server.stop()
    return 0


def _upload_sample(server: EmbeddedS3, bucket: str) -> None:
    """``serve-s3 --sample``: the demo's inputs into ``bucket``, then the URIs and example commands on stdout."""
    from finemed_ray.toy.demo_inputs import upload_demo_inputs

    server.apply_env()  # this process's own clients talk to the server it runs
    print(f"# uploading the demo's inputs to s3://{bucket}/ ...", file=sys.stderr, flush=True)
    uris = upload_demo_inputs(bucket, note=lambda text: print(f"# {text}", file=sys.stderr, flush=True))
    width = max(len(k) for k in uris)
    print("# uploaded:")
    for what, uri in uris.items():
        print(f"#   {what:<{width}}  {uri}")
    print("# in another shell: paste the export lines above, then e.g.")
    print("#   python -m jobs.sft --config configs/sft_tiny.yaml")
    print("#   python -m jobs.train_recipe --config configs/recipe_finemed_tiny.yaml")
    print("#   python -m jobs.build_index --config configs/index_tiny.yaml")
    print(f"# ready: {server.endpoint_url}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main_s3_server())
