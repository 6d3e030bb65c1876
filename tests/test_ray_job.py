"""The SFT stage through `ray job submit` against a real `ray start --head` cluster (its own process group)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from finemed_ray import storage
from finemed_ray.toy.sample import sample_sft_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(s3, tmp_path_factory):
    gcs, dash, agent, client = free_port(), free_port(), free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    log = open(tmp_path_factory.mktemp("ray-head") / "head.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
         "--num-cpus=4", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except OSError:
            if time.time() > deadline or head.poll() is not None:
                os.killpg(head.pid, signal.SIGKILL)
                pytest.fail(f"ray head did not come up; see {log.name}")
            time.sleep(1)
    yield {"url": url, "env": env}
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    log.close()


def submit(ray_head, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head["url"], "--working-dir", str(ROOT), "--",
         "python", "-m", "jobs.sft", *args],
        env=ray_head["env"], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )


@pytest.mark.slow  # ~1.5-2 min: a real `ray job submit` of an SFT run (the default suite keeps the bad-config one)
def test_sft_job_submit_succeeds_and_exports(ray_head, tiny_model_s3, s3_prefix):
    data = f"{s3_prefix}/sft.jsonl"
    write_jsonl(sample_sft_rows(n=16, seed=1), data)
    export = f"{s3_prefix}/export"
    res = submit(
        ray_head, "--config", "configs/sft_tiny.yaml", f"model.path={tiny_model_s3}", f"data.path={data}",
        f"run.storage_path={s3_prefix}/runs", "run.name=submitted", f"output.export_path={export}",
        "train.epochs=1", "train.report_to=[]",
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "succeeded" in out
    assert storage.is_complete(export)
    summary = storage.read_json(f"{s3_prefix}/runs/submitted/summary.json")
    assert summary["global_step"] == summary["plan"]["max_steps"] == 2  # 16 rows / 2 workers / batch 4
    assert summary["data"]["rows_valid"] == 16


def test_bad_config_fails_the_submitted_job(ray_head):
    res = submit(ray_head, "--config", "configs/sft_tiny.yaml", "train.learning_rat=1", timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "train.learning_rat: unknown key" in out


@pytest.mark.slow  # ~3.5 min: two submissions
def test_stopped_job_resubmitted_resumes_from_its_checkpoint(ray_head, tiny_model_s3, s3_prefix):
    """`ray job stop` mid-run, then the same command again: the run resumes from its last checkpoint and every
    epoch still holds each row exactly once (0 lost, 0 duplicated)."""
    n_rows, epochs = 32, 4  # 2 workers x 16 rows, batch 4 -> 4 steps per epoch, 16 steps
    data = f"{s3_prefix}/sft.jsonl"
    write_jsonl(sample_sft_rows(n=n_rows, seed=2), data)
    run_uri = f"{s3_prefix}/runs/stopped"
    args = ["--config", "configs/sft_tiny.yaml", f"model.path={tiny_model_s3}", f"data.path={data}",
            f"run.storage_path={s3_prefix}/runs", "run.name=stopped", f"output.export_path={s3_prefix}/export",
            f"train.epochs={epochs}", "train.save_steps=2", "train.save_total_limit=null", "train.report_to=[]",
            "data.eval_fraction=0"]
    ray = [str(BIN / "ray"), "job"]
    first = f"stop-{os.getpid()}-{time.time_ns()}"
    subprocess.run([*ray, "submit", "--address", ray_head["url"], "--working-dir", str(ROOT), "--no-wait",
                    "--submission-id", first, "--", "python", "-m", "jobs.sft", *args],
                   env=ray_head["env"], capture_output=True, text=True, timeout=120, cwd=ROOT, check=True)
    from finemed_ray.train.driver import RAY_CHECKPOINT_STATE_FILE

    state = storage.join(run_uri, RAY_CHECKPOINT_STATE_FILE)
    deadline = time.time() + 400
    while time.time() < deadline:
        if storage.exists(state) and "checkpoint_" in storage.read_text(state):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the first submission never registered a checkpoint")
    stop = subprocess.run([*ray, "stop", "--address", ray_head["url"], first], env=ray_head["env"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    status = subprocess.run([*ray, "status", "--address", ray_head["url"], first], env=ray_head["env"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "was stopped" in status.stdout + status.stderr, stop.stdout + stop.stderr + status.stdout + status.stderr
    assert not storage.exists(f"{run_uri}/summary.json")  # the stop hit a run still in progress

    res = submit(ray_head, *args)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    summary = storage.read_json(f"{run_uri}/summary.json")
    assert summary["resumed_from_step"] is not None and 0 < summary["resumed_from_step"] < 16
    assert summary["global_step"] == 16
    seen = storage.read_json(f"{run_uri}/samples_seen.json")["per_rank"]
    rows_per_worker = n_rows // 2
    all_ids = sorted(r["id"] for r in sample_sft_rows(n=n_rows, seed=2))
    for epoch in range(epochs):
        ids = [i for rank in seen for i in rank[epoch * rows_per_worker:(epoch + 1) * rows_per_worker]]
        assert sorted(ids) == all_ids, f"epoch {epoch}: rows lost or duplicated across the stop"
