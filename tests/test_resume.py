"""Exact resume and fault tolerance, for real: a training worker process is SIGKILLed mid-run, and a run is
re-submitted under the same name. Both must end with exactly the samples of a run that was never interrupted.

Costs ~4 short 2-worker ZeRO-3 runs on the tiny model."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from finemed_ray import storage
from finemed_ray.toy.sample import sample_sft_rows, write_jsonl
from finemed_ray.errors import FinemedError
from finemed_ray.train.resume import POSITION_FILE
from finemed_ray.train.driver import plan_steps
from finemed_ray.train.stages.sft import SFTJob

from test_sft import sft_config

# Every test here trains on top of the module's reference run (~3.5 min in all on 2 cores): the whole module runs in
# `make test-slow` (CI runs it) to keep the default suite under 25 min. The data-order and position logic they
# rely on has fast tests in tests/test_resume_rescale.py and tests/test_ray_shard.py.
pytestmark = pytest.mark.slow

N_ROWS = 40  # 2 workers x 20 rows; batch 4 -> 5 steps per epoch
EPOCHS = 3


@pytest.fixture(scope="module")
def setup(tiny_model_s3, ray_cluster, s3):
    prefix = f"s3://finemed-test/resume-{id(ray_cluster):x}"
    data_uri = f"{prefix}/data/sft.jsonl"
    write_jsonl(sample_sft_rows(n=N_ROWS, seed=1, paraphrases="train", system_prompt=None), data_uri)
    return prefix, tiny_model_s3, data_uri


def config(setup, name: str, *extra: str):
    prefix, model, data = setup
    return sft_config(
        prefix, model, data, f"run.name={name}", f"output.export_path={prefix}/export-{name}",
        f"train.epochs={EPOCHS}", "train.per_device_batch_size=4", "train.learning_rate=1e-3",
        "train.save_steps=3", "train.save_total_limit=null", *extra,
    )


def run(cfg) -> dict:
    job = SFTJob(cfg).setup()
    job.run()
    job.save()
    meta = storage.read_json(storage.join(cfg.output.export_path, "finemed_export.json"))
    seen = storage.read_json(storage.join(cfg.run.storage_path, cfg.run.name, "samples_seen.json"))["per_rank"]
    return {"meta": meta, "seen": seen}


@pytest.fixture(scope="module")
def reference(setup):
    """A run that is never interrupted."""
    return run(config(setup, "reference"))


def checkpoints_with_position(cfg) -> list[str]:
    run_uri = storage.join(cfg.run.storage_path, cfg.run.name)
    if not storage.exists(run_uri):
        return []
    return [f for f in storage.list_files(run_uri) if f.endswith("/" + POSITION_FILE)]


def checkpoint_registered(cfg) -> bool:
    """Ray Train writes its checkpoint bookkeeping after a checkpoint is fully uploaded and registered; files of a
    checkpoint still uploading may already be visible, and killing then would (rightly) restart from scratch."""
    from finemed_ray.train.driver import RAY_CHECKPOINT_STATE_FILE

    uri = storage.join(cfg.run.storage_path, cfg.run.name, RAY_CHECKPOINT_STATE_FILE)
    return storage.exists(uri) and "checkpoint_" in storage.read_text(uri)


def train_worker_pids() -> list[int]:
    """PIDs of this test session's live Ray Train workers: processes titled 'ray::RayTrainWorker...' that descend
    from this pytest process. ``ray.init(address="local")`` (the ``ray_cluster`` fixture) starts the raylet as our
    child and the raylet forks the workers, so another job's or another session's workers are never picked. (The
    state API could tell runs apart too, but it timed out on this machine under load.)"""
    import psutil

    pids = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith("ray::RayTrainWorker"):
                pids.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def kill_one_worker_after_a_checkpoint(cfg, thread: threading.Thread) -> int:
    """Once a checkpoint of ``cfg``'s run is registered, SIGKILL one of its two workers; return its PID after
    checking that it is really gone (the fault happened)."""
    deadline = time.time() + 300
    killed = None
    while time.time() < deadline and thread.is_alive():
        if checkpoint_registered(cfg):  # a checkpoint is on S3 and Ray has registered it: kill mid-run
            pids = train_worker_pids()
            if len(pids) == 2:
                killed = sorted(pids)[-1]
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.2)
    assert killed, "never found a checkpoint and two live training workers of this run to kill"
    for _ in range(50):  # the process is gone (a zombie until Ray reaps it counts as gone)
        try:
            with open(f"/proc/{killed}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"worker {killed} still alive after SIGKILL")
    return killed


def run_in_thread(cfg) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = run(cfg)
        except BaseException as e:  # surfaced by the test
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_reference_run_sees_every_row_once_per_epoch(reference, setup):
    cfg = config(setup, "reference")
    plan = plan_steps(N_ROWS, cfg)
    assert reference["meta"]["global_step"] == plan.max_steps == 5 * EPOCHS
    assert reference["meta"]["resumed_from_step"] is None
    for ids in reference["seen"]:
        assert len(ids) == plan.rows_per_worker * EPOCHS
        epochs = [ids[i * plan.rows_per_worker:(i + 1) * plan.rows_per_worker] for i in range(EPOCHS)]
        assert all(sorted(e) == sorted(epochs[0]) for e in epochs)  # the deterministic split: same rows every epoch
        assert len({tuple(e) for e in epochs}) == EPOCHS  # each epoch in its own seeded order (data.shuffle_buffer)
    assert sorted(reference["seen"][0][:20] + reference["seen"][1][:20]) == sorted(
        r["id"] for r in sample_sft_rows(n=N_ROWS, seed=1, paraphrases="train", system_prompt=None)
    )


@pytest.mark.slow  # ~1.5 min on top of the module's reference run (moved out of the default suite's 25 min)
def test_killed_worker_restarts_from_checkpoint_with_the_same_samples(reference, setup):
    cfg = config(setup, "killed", "run.max_failures=2", "train.packing=true")  # packed, same samples
    thread, outcome = run_in_thread(cfg)
    kill_one_worker_after_a_checkpoint(cfg, thread)
    thread.join(timeout=600)
    assert not thread.is_alive()
    if "error" in outcome:
        raise outcome["error"]
    meta = outcome["result"]["meta"]
    plan = plan_steps(N_ROWS, cfg)
    assert meta["resumed_from_step"] is not None and 0 < meta["resumed_from_step"] < plan.max_steps
    assert meta["global_step"] == plan.max_steps
    # Exactly the samples, per worker and in order, of the run that was never killed: none repeated or skipped.
    assert outcome["result"]["seen"] == reference["seen"]


@pytest.mark.slow  # keeps the default suite under 25 min; CI runs it in `make test-slow`
def test_a_kill_with_no_restarts_left_ends_with_a_clear_error(setup):
    cfg = config(setup, "no-restarts", "run.max_failures=0")
    thread, outcome = run_in_thread(cfg)
    killed = kill_one_worker_after_a_checkpoint(cfg, thread)
    thread.join(timeout=600)
    assert not thread.is_alive()
    error = outcome.get("error")
    assert isinstance(error, FinemedError), f"expected the run to fail after worker {killed} died, got {outcome}"
    message = str(error)
    assert "run no-restarts failed after run.max_failures=0 restarts" in message
    assert "Traceback" not in message and len(message.splitlines()) <= 3  # the cause in a line, not a dump
    assert not storage.exists(storage.join(cfg.output.export_path, "finemed_export.json"))  # nothing half-exported


def test_same_run_name_resumes_where_it_stopped(reference, setup):
    first = run(config(setup, "again", "train.max_steps=7"))  # stops mid-epoch (epoch 1, step 2 of 5)
    assert first["meta"]["global_step"] == 7
    second = run(config(setup, "again"))  # same name, the full plan
    assert second["meta"]["resumed_from_step"] == 7  # HF also saves at the last step
    assert second["meta"]["global_step"] == 5 * EPOCHS
    assert second["seen"] == reference["seen"]


def test_changed_data_settings_refuse_to_resume(reference, setup):
    with pytest.raises(FinemedError, match="different data settings"):
        SFTJob(config(setup, "reference", "data.max_length=64")).setup().run()


def test_corrupted_checkpoint_gives_a_clear_error(reference, setup):
    cfg = config(setup, "reference", "run.max_failures=0")
    positions = sorted(checkpoints_with_position(cfg))
    for p in positions:  # whichever checkpoint Ray picks as the latest, its data position is garbage
        storage.write_text(p, "{not json")
    with pytest.raises(FinemedError, match=f"corrupted {POSITION_FILE}"):
        SFTJob(cfg).setup().run()


@pytest.mark.slow  # keeps the default suite under 25 min; CI runs it in `make test-slow`
def test_s3_outage_mid_run_is_waited_out_with_the_same_samples(reference, setup, s3_outage):
    """A 10 s S3 outage once the first checkpoint is registered: checkpoint uploads, the export and the run's own
    writes retry (``FINEMED_S3_RETRY_WINDOW_S``) instead of failing, so the run neither restarts nor loses a row."""
    cfg = config(setup, "outage", "run.max_failures=0")  # a failure would end the run: retries must carry it
    thread, outcome = run_in_thread(cfg)
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive() and not checkpoint_registered(cfg):
        time.sleep(0.2)
    assert thread.is_alive(), "the run ended before its first checkpoint was registered"
    s3_outage.start(10.0)
    s3_outage.wait()
    assert s3_outage.blocked, "the outage did not block S3 traffic"
    alive_after_outage = thread.is_alive()
    thread.join(timeout=600)
    assert not thread.is_alive()
    if "error" in outcome:
        raise outcome["error"]
    assert alive_after_outage, "the run finished during the outage: it cannot have needed S3 (nothing tested)"
    meta = outcome["result"]["meta"]
    assert meta["resumed_from_step"] is None  # waited out, not failed and restarted
    assert meta["global_step"] == plan_steps(N_ROWS, cfg).max_steps
    assert outcome["result"]["seen"] == reference["seen"]  # 0 rows lost, 0 duplicated, same order
