"""Shared pytest fixtures."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from finemed_ray.toy.s3_server import EmbeddedS3


@pytest.fixture(scope="session")
def s3() -> Iterator[EmbeddedS3]:
    """A real S3 endpoint (moto server) with bucket ``finemed-test``; its env is applied for the whole session."""
    from finemed_ray.storage import clear_fs_cache
    from finemed_ray.toy.s3_server import EmbeddedS3

    server = EmbeddedS3(buckets=("finemed-test",)).start()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in server.env.items():
            mp.setenv(key, value)
        # A developer's real AWS profile/token must not leak into requests to the test server.
        for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
            mp.delenv(key, raising=False)
        clear_fs_cache()
        try:
            yield server
        finally:
            server.stop()
            clear_fs_cache()


class S3Outage:
    """Stops the session's S3 server for ``seconds`` in a background thread, then restarts it on the same port
    (moto keeps its objects in-process, so nothing is lost). ``blocked`` records that a request made during the
    outage really failed to connect: a fault test asserts it before it asserts recovery."""

    def __init__(self, server: "EmbeddedS3"):
        self.server = server
        self.blocked: str | None = None
        self.stopped_at = self.restarted_at = 0.0
        self._thread: threading.Thread | None = None

    def start(self, seconds: float) -> "S3Outage":
        self.server.stop()
        self.stopped_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(seconds,), daemon=True)
        self._thread.start()
        return self

    def _run(self, seconds: float) -> None:
        import boto3
        from botocore.config import Config

        try:  # one request, no retries: it must fail while the server is down
            env = self.server.env
            boto3.session.Session().client(
                "s3", endpoint_url=self.server.endpoint_url, region_name=env["AWS_REGION"],
                aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=1),
            ).list_buckets()
        except Exception as exc:  # noqa: BLE001 - any failure to reach the server is the outage
            self.blocked = f"{type(exc).__name__}: {exc}"
        time.sleep(max(0.0, seconds - (time.monotonic() - self.stopped_at)))
        port = self.server.port
        self.server.start()  # same port: clients keep their endpoint
        assert self.server.port == port
        self.restarted_at = time.monotonic()

    def wait(self, timeout: float = 60) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        assert self.restarted_at, "the S3 server did not come back"


@pytest.fixture
def s3_outage(s3: EmbeddedS3) -> Iterator[S3Outage]:
    """Start an outage of the session's S3 server with ``s3_outage.start(seconds)``; the server is always back
    when the test ends."""
    outage = S3Outage(s3)
    try:
        yield outage
    finally:
        if outage._thread is not None:
            outage.wait()


@pytest.fixture
def s3_prefix(s3: EmbeddedS3, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh ``s3://finemed-test/<test-name>-<uuid8>`` prefix for one test."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name).strip("-")[:60]
    yield f"s3://finemed-test/{name}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------------------------- environment
import os  # noqa: E402

# Offline, local and quiet: no hub lookups, no Ray token auth on throwaway local clusters, DeepSpeed on CPU.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_V2_ENABLED": "1",
}.items():
    os.environ.setdefault(_key, _value)


# ---------------------------------------------------------------------------------------------- tiny model
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny Llama-style model + tokenizer, built once per session in a local directory."""
    from finemed_ray.toy.tiny_model import save_tiny_model

    path = tmp_path_factory.mktemp("tiny-model")
    save_tiny_model(str(path))
    return path


@pytest.fixture
def bare_model_dir(tiny_model_dir, tmp_path):
    """A copy of the tiny model whose tokenizer has no chat template (a model the jobs must refuse clearly)."""
    import json
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    tok_cfg = json.loads((bare / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    for f in bare.glob("chat_template*"):
        f.unlink()
    return bare


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="session")
def tiny_model_s3(tiny_model_dir, s3):
    """The same tiny model published to the embedded S3 server."""
    from finemed_ray import storage

    uri = "s3://finemed-test/models/tiny"
    storage.publish_dir(str(tiny_model_dir), uri)
    return uri


@pytest.fixture(scope="module")
def ray_cluster(s3):
    """A local Ray cluster for in-process jobs, one module at a time (so it never runs beside the `ray start`
    cluster of tests/test_ray_job.py). Started after the S3 fixture so its workers inherit the S3
    environment; 4 logical CPUs so two training workers leave room for Ray Data tasks (2 would deadlock)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "HF_", "DS_"))}})
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------------------------------------- ../shared
# The data beside the clone (benchmarks, KubeRay CRDs): tests that need it skip without it (a bare clone), but where
# ../shared exists, as in CI, such a skip means a test silently checks nothing (a wrong path, a moved file), so it
# is reported as a failure instead.
SHARED = Path(__file__).resolve().parents[2] / "shared"


def skip_needs_shared(reason: str, shared: Path = SHARED) -> bool:
    """True when a skip ``reason`` is about files under ``shared`` (its absolute path, ``../shared``,
    ``shared/data``) while ``shared`` exists: such a skip must fail."""
    return shared.is_dir() and any(mark in reason for mark in (str(shared), "../shared", "shared/data"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if skip_needs_shared(reason):
            report.outcome = "failed"
            report.longrepr = (f"{item.nodeid}: skipped for missing shared data although {SHARED} exists "
                               f"(fix the path or add the files): {reason}")
