"""`python -m jobs.serve status`: the deployment's state with Ray token authentication on and no dashboard.

`serve status` (Ray's CLI) reads the dashboard's HTTP API, and `python -m jobs.serve` starts its local cluster
without a dashboard, so it fails there ("Failed to connect to Ray at address: http://localhost:8265"). The status
subcommand joins the cluster as a driver and asks the Serve controller. Here the real start path runs in its own
session (`python -m jobs.serve` with the transformers engine on the tiny model, RAY_AUTH_MODE=token and a token of
this test's own), and the status command is run against it with the token, without one, and with a wrong one."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_session(leader: subprocess.Popen) -> None:
    """SIGTERM the job (it shuts Serve down), then SIGKILL whatever of its session is left (Ray puts its workers in
    process groups of their own, but they keep the job's session)."""
    import psutil

    if leader.poll() is None:
        leader.send_signal(signal.SIGTERM)
        try:
            leader.wait(timeout=45)
        except subprocess.TimeoutExpired:
            pass
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == leader.pid:
                p.kill()
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass
    leader.wait(timeout=30)


@pytest.fixture(scope="module")
def token_cluster(tiny_model_dir, tmp_path_factory):
    """`python -m jobs.serve` (local cluster: token auth on, dashboard off) until the module ends."""
    token = secrets.token_hex(32)
    port = _free_port()
    logs = tmp_path_factory.mktemp("serve-status")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               FINEMED_LOG_DIR=str(logs))
    out = open(logs / "serve.log", "w+")
    job = subprocess.Popen(
        [sys.executable, "-m", "jobs.serve", "--config", "configs/serve_tiny.yaml", f"model.path={tiny_model_dir}",
         "model.engine=hf", "model.device=cpu", "model.max_model_len=512", "security.api_key_env=null",
         f"http.port={port}", "ray.local_num_cpus=4", "resources.engine_num_cpus=1",
         "resources.ingress_num_cpus=0.1", "autoscaling.max_replicas=1"],
        cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            text = Path(out.name).read_text()
            m = re.search(r"^serving \S+ at (\S+) \(Ray cluster (\S+); status: (.+)\)$", text, re.M)
            if m:
                break
            if job.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"python -m jobs.serve did not come up (exit {job.poll()}):\n{text[-3000:]}")
            time.sleep(1)
        yield {"url": m.group(1), "address": m.group(2), "hint": m.group(3), "token": token, "env": env,
               "log": Path(out.name), "home": tmp_path_factory.mktemp("home")}
    finally:
        _kill_session(job)
        out.close()


def status(cluster: dict, *args: str, timeout: int = 120, **env_changes: str | None) -> subprocess.CompletedProcess:
    env = dict(cluster["env"])
    for k, v in env_changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return subprocess.run([sys.executable, "-m", "jobs.serve", "status", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_status_shows_the_deployment_with_token_auth_and_no_dashboard(token_cluster):
    import httpx

    c = token_cluster
    assert c["hint"] == f"python -m jobs.serve status --address {c['address']}"  # what the start line tells users
    assert httpx.get(c["url"].removesuffix("/v1") + "/health", timeout=30).status_code == 200
    r = status(c, "--address", c["address"])
    assert r.returncode == 0, r.stderr[-3000:]
    st = json.loads(r.stdout)
    assert st["ray_address"] == c["address"] and st["serve_running"]
    app = st["applications"]["finemed"]
    assert app["status"] == "RUNNING"
    for dep in ("engine", "ingress"):
        assert app["deployments"][dep]["status"] == "HEALTHY"
        assert app["deployments"][dep]["replica_states"] == {"RUNNING": 1}
    assert list(st["proxies"].values()) == ["HEALTHY"]
    # token auth is on: without a token (none in the env, none in ~/.ray) the command says so in one line
    r = status(c, "--address", c["address"], RAY_AUTH_TOKEN=None, HOME=str(c["home"]))
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith(f"error: cannot join the Ray cluster at {c['address']}"), r.stderr
    assert "no authentication token was found" in last and "RAY_AUTH_TOKEN" in last
    for text in (r.stdout, r.stderr, c["log"].read_text()):
        assert c["token"] not in text


@pytest.mark.slow
def test_a_wrong_token_is_refused_by_the_cluster(token_cluster):
    """The cluster itself enforces the token (Ray retries ~30 s before it reports the refusal)."""
    c = token_cluster
    wrong = secrets.token_hex(32)
    r = status(c, "--address", c["address"], RAY_AUTH_TOKEN=wrong, HOME=str(c["home"]), timeout=180)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "refused this process's authentication token" in last, r.stderr[-2000:]
    assert wrong not in r.stdout + r.stderr and c["token"] not in r.stdout + r.stderr


# ================================================================================================ without a cluster
class _FakeStatus:
    """What serve.status() returns, built from Serve's own dataclasses."""

    @staticmethod
    def make():
        from ray.serve.schema import (
            ApplicationStatus,
            ApplicationStatusOverview,
            DeploymentStatusOverview,
            ServeStatus,
        )

        dep = DeploymentStatusOverview(status="HEALTHY", status_trigger="CONFIG_UPDATE_COMPLETED",
                                       replica_states={"RUNNING": 2}, message="")
        app = ApplicationStatusOverview(status=ApplicationStatus.RUNNING, message="", last_deployed_time_s=1.0,
                                        deployments={"engine": dep})
        return ServeStatus(proxies={"n1": "HEALTHY"}, applications={"finemed": app, "other": app},
                           target_capacity=None)


@pytest.fixture
def no_cluster(monkeypatch):
    """jobs.serve status with the connection and serve.status() replaced: records the address it would join."""
    import ray
    from ray import serve

    import jobs.serve as job

    joined: list[str] = []
    monkeypatch.setattr(job, "_connect", joined.append)
    monkeypatch.setattr(serve, "status", _FakeStatus.make)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    return joined


def test_status_address_name_and_output_without_a_cluster(no_cluster, monkeypatch):
    from jobs.serve import run

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    out = run(["status", "--name", "finemed"])
    assert no_cluster == ["10.0.0.1:6379"]  # RAY_ADDRESS when --address is not given
    assert list(out["applications"]) == ["finemed"]
    assert out["applications"]["finemed"]["deployments"]["engine"] == {
        "status": "HEALTHY", "status_trigger": "CONFIG_UPDATE_COMPLETED", "replica_states": {"RUNNING": 2},
        "message": ""}
    assert out["applications"]["finemed"]["status"] == "RUNNING" and out["proxies"] == {"n1": "HEALTHY"}
    json.dumps(out)  # plain JSON values
    assert set(run(["status", "--address", "h:1"])["applications"]) == {"finemed", "other"}
    assert no_cluster[-1] == "h:1"
    monkeypatch.delenv("RAY_ADDRESS")
    run(["status"])
    assert no_cluster[-1] == "auto"


def test_status_errors_are_one_line_user_errors(no_cluster, capsys):
    from jobs._cli import main
    from jobs.serve import run

    assert main(run, ["status", "--address", "h:1", "--name", "nope"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --name nope: no such Serve application on h:1 (running: finemed, other)")


def test_status_refuses_a_dashboard_url(capsys):
    from jobs._cli import main
    from jobs.serve import run

    assert main(run, ["status", "--address", "http://127.0.0.1:8265"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --address http://127.0.0.1:8265: that is a dashboard URL") and "GCS" in err
