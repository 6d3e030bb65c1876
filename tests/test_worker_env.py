"""Forwarded variables (secrets among them) reach a local cluster's workers without entering Ray's logs
(finemed_ray.worker_env)."""

import os
import uuid
from pathlib import Path

import pytest

from finemed_ray.worker_env import FILE_VAR, forwarded, load_env_file, write_env_file


def test_forwarded_selects_by_prefix():
    env = {"AWS_REGION": "r", "AWS_SECRET_ACCESS_KEY": "s", "PATH": "/bin", "FINEMED_API_KEY": "k"}
    assert forwarded(env, ("AWS_", "FINEMED_")) == {"AWS_REGION": "r", "AWS_SECRET_ACCESS_KEY": "s",
                                                    "FINEMED_API_KEY": "k"}


def test_env_file_is_private_and_fills_only_missing_variables(monkeypatch):
    path = write_env_file({"FINEMED_TEST_TOKEN": "from-file", "FINEMED_TEST_KEEP": "from-file"})
    assert os.stat(path).st_mode & 0o777 == 0o600 and os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
    monkeypatch.setenv(FILE_VAR, path)
    monkeypatch.delenv("FINEMED_TEST_TOKEN", raising=False)
    monkeypatch.setenv("FINEMED_TEST_KEEP", "already-set")
    assert load_env_file() == 1
    assert os.environ["FINEMED_TEST_TOKEN"] == "from-file" and os.environ["FINEMED_TEST_KEEP"] == "already-set"
    monkeypatch.delenv("FINEMED_TEST_TOKEN")


@pytest.mark.timeout(300)
def test_variables_reach_workers_and_no_ray_log_holds_them(monkeypatch):
    import ray

    from finemed_ray.cluster import ensure_ray_address

    values = {"AWS_SECRET_ACCESS_KEY": f"dummy-s3-secret-{uuid.uuid4().hex}",
              "FINEMED_API_KEY": f"dummy-api-key-{uuid.uuid4().hex}",
              "FINEMED_SERVE_CREDS": f"dummy-oddly-named-secret-{uuid.uuid4().hex}"}  # no tell-tale name
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.shutdown()
    ensure_ray_address(None, 2)
    try:
        @ray.remote(num_cpus=0)
        def seen():
            print("worker started")  # something for the worker log
            return {k: os.environ.get(k) for k in values} | {FILE_VAR: os.environ.get(FILE_VAR)}

        got = ray.get(seen.remote(), timeout=120)
        env_file = got.pop(FILE_VAR)
        assert got == values
        session = Path(ray._private.worker._global_node.get_session_dir_path())
    finally:
        ray.shutdown()
    logs = [p for p in session.rglob("*") if p.is_file()]
    # the check means something: the runtime env (which names the private file) is in the logs
    assert any(env_file.encode() in p.read_bytes() for p in logs), "the runtime env was not logged"
    leaked = [str(p) for p in logs if any(v.encode() in p.read_bytes() for v in values.values())]
    assert not leaked, leaked


def test_a_ray_address_naming_another_cluster_than_the_connected_one_is_refused(monkeypatch):
    import ray

    from finemed_ray.cluster import ensure_ray_address
    from finemed_ray.errors import ConfigError

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        connected = ray.get_runtime_context().gcs_address
        host, port = connected.rsplit(":", 1)
        for same in (None, "auto", connected, f"localhost:{port}"):  # the connected cluster, by any name
            ensure_ray_address(same, 2)
        other = f"{host}:{int(port) + 1}"
        with pytest.raises(ConfigError, match=rf"ray.address='{other}' names another cluster .*\({connected}\)"):
            ensure_ray_address(other, 2)
        assert ray.get_runtime_context().gcs_address == connected  # still on the same cluster
    finally:
        ray.shutdown()


def test_a_killed_drivers_env_file_is_removed_by_the_next_driver(tmp_path, monkeypatch):
    import signal
    import subprocess
    import sys
    import tempfile

    from finemed_ray import worker_env

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code = ("import os, sys, tempfile; tempfile.tempdir = sys.argv[1]; "
            "from finemed_ray.worker_env import write_env_file; "
            "print(write_env_file({'FINEMED_X': 'secret'}), flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    path = proc.stdout.readline().strip()
    assert os.path.exists(path)
    proc.send_signal(signal.SIGKILL)  # no atexit: the file stays behind
    proc.wait()
    assert os.path.exists(path)
    mine = write_env_file({"FINEMED_Y": "v"})  # the next driver sweeps what dead drivers left
    assert not os.path.exists(os.path.dirname(path))
    assert os.path.exists(mine)  # its own (live PID) stays
    assert worker_env.remove_stale_env_dirs(str(tmp_path)) == []
