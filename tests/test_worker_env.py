"""Secrets reach a local cluster's workers without entering Ray's logs (finemed_ray.worker_env)."""

import os
import uuid
from pathlib import Path

import pytest

from finemed_ray.worker_env import FILE_VAR, is_secret, load_env_file, split_env, write_env_file


def test_secret_names_are_recognised():
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN", "FINEMED_API_KEY",
                 "FINEMED_DB_PASSWORD"):
        assert is_secret(name), name
    for name in ("AWS_REGION", "AWS_ENDPOINT_URL_S3", "HF_HUB_OFFLINE", "DS_ACCELERATOR", "FINEMED_DEMO_OUTPUT"):
        assert not is_secret(name), name
    plain, secret = split_env({"AWS_REGION": "r", "AWS_SECRET_ACCESS_KEY": "s", "PATH": "/bin"}, ("AWS_",))
    assert plain == {"AWS_REGION": "r"} and secret == {"AWS_SECRET_ACCESS_KEY": "s"}


def test_env_file_is_private_and_fills_only_missing_variables(monkeypatch):
    path = write_env_file({"FINEMED_TEST_TOKEN": "from-file", "FINEMED_TEST_KEEP_KEY": "from-file"})
    assert os.stat(path).st_mode & 0o777 == 0o600 and os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
    monkeypatch.setenv(FILE_VAR, path)
    monkeypatch.delenv("FINEMED_TEST_TOKEN", raising=False)
    monkeypatch.setenv("FINEMED_TEST_KEEP_KEY", "already-set")
    assert load_env_file() == 1
    assert os.environ["FINEMED_TEST_TOKEN"] == "from-file" and os.environ["FINEMED_TEST_KEEP_KEY"] == "already-set"
    monkeypatch.delenv("FINEMED_TEST_TOKEN")


@pytest.mark.timeout(300)
def test_secrets_reach_workers_and_no_ray_log_holds_them(monkeypatch):
    import ray

    from finemed_ray.train.sft import ensure_ray_address

    secret_s3 = f"dummy-s3-secret-{uuid.uuid4().hex}"
    secret_api = f"dummy-api-key-{uuid.uuid4().hex}"
    plain = f"plain-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_s3)
    monkeypatch.setenv("FINEMED_API_KEY", secret_api)
    monkeypatch.setenv("FINEMED_TEST_PLAIN_SETTING", plain)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.shutdown()
    ensure_ray_address(None, 2)
    try:
        @ray.remote(num_cpus=0)
        def seen():
            print("worker started")  # something for the worker log
            return {k: os.environ.get(k) for k in ("AWS_SECRET_ACCESS_KEY", "FINEMED_API_KEY",
                                                    "FINEMED_TEST_PLAIN_SETTING")}

        got = ray.get(seen.remote(), timeout=120)
        assert got == {"AWS_SECRET_ACCESS_KEY": secret_s3, "FINEMED_API_KEY": secret_api,
                       "FINEMED_TEST_PLAIN_SETTING": plain}
        session = Path(ray._private.worker._global_node.get_session_dir_path())
    finally:
        ray.shutdown()
    logs = [p for p in session.rglob("*") if p.is_file()]
    blob = b"".join(p.read_bytes() for p in logs)
    # the check means something: the runtime env (with the plain forwarded variable) is in the logs
    assert plain.encode() in blob, "the runtime env was not logged: this test would prove nothing"
    leaked = [str(p) for p in logs if secret_s3.encode() in p.read_bytes() or secret_api.encode() in p.read_bytes()]
    assert not leaked, leaked
