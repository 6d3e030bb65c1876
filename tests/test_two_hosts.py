"""Two Ray nodes that do NOT share a filesystem view: the second node runs in its own mount namespace with a
private, empty /tmp (its own Ray temp dir, its own working files), as a second host would. A training run placed
one worker on each node (STRICT_SPREAD) must pass with everything travelling through S3; any code path where a
worker reads a path that exists only on the head (a driver's temp file, a local cache, the head's Ray session dir)
fails here, where it passes on the simulated cluster of tests/test_multinode.py (one /tmp for all nodes).

Needs `unshare` with mount namespaces (root, or unprivileged user namespaces): present on the CI machine, so
this test fails rather than skips without it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from finemed_ray import storage
from finemed_ray.config import load_config
from finemed_ray.toy.sample import sample_sft_rows, write_jsonl
from finemed_ray.train.configs import SFTJobConfig
from finemed_ray.train.stages.sft import SFTJob

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow  # a 2-node cluster and one training run: ~2 min


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unshare_prefix() -> list[str]:
    """The command prefix that gives a process its own mount namespace (root, else a user namespace)."""
    exe = shutil.which("unshare")
    if exe is None:
        pytest.fail("`unshare` (util-linux) is needed to give the second node its own /tmp")
    for prefix in ([exe, "-m", "--propagation", "private"], [exe, "-Urm", "--propagation", "private"]):
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    pytest.fail("cannot create a mount namespace (`unshare -m` and `unshare -Urm` both refused)")


def wait_for_nodes(n: int, timeout: float = 120) -> None:
    import ray

    deadline = time.time() + timeout
    while len([x for x in ray.nodes() if x["Alive"]]) < n:
        if time.time() > deadline:
            pytest.fail(f"only {len([x for x in ray.nodes() if x['Alive']])} of {n} Ray nodes came up")
        time.sleep(1)


@pytest.fixture(scope="module")
def two_hosts(s3, tmp_path_factory):
    import ray

    port = free_port()
    logs = tmp_path_factory.mktemp("two-hosts")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    head_tmp = tempfile.mkdtemp(prefix="finemed-head-")  # the head's Ray temp dir: invisible to the second node
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=3",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={head_tmp}"],
        env=env, stdout=open(logs / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    # The second "host": a private tmpfs over /tmp, its own cwd, nothing of the head's /tmp visible.
    script = (f"mount -t tmpfs tmpfs /tmp && mkdir -p /tmp/node2 && cd /tmp/node2 && exec {BIN / 'ray'} start "
              f"--address=127.0.0.1:{port} --num-cpus=2 --resources='{{\"second_host\": 2}}' --block "
              "--disable-usage-stats")
    node2 = subprocess.Popen([*unshare_prefix(), "sh", "-c", script], env=env,
                             stdout=open(logs / "node2.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        time.sleep(3)
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
        wait_for_nodes(2)
        yield {"address": f"127.0.0.1:{port}", "logs": logs}
    finally:
        ray.shutdown()
        for proc in (node2, head):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(head_tmp, ignore_errors=True)


def test_the_second_host_cannot_see_the_heads_files(two_hosts, tmp_path):
    """The control: the isolation is real, so a head-local read on the second node fails."""
    import ray

    marker = Path(tempfile.mkdtemp(prefix="finemed-head-only-")) / "file.txt"
    marker.write_text("head only")

    @ray.remote(resources={"second_host": 1}, num_cpus=0)
    def probe(path: str) -> tuple[bool, str]:
        return os.path.exists(path), ray.get_runtime_context().get_node_id()

    seen, node = ray.get(probe.remote(str(marker)))
    assert not seen, "the second node sees the head's /tmp: the test cannot catch head-local paths"
    assert node != ray.get_runtime_context().get_node_id()


def test_sft_with_one_worker_per_host_travels_only_through_s3(two_hosts, tiny_model_s3):
    import ray

    prefix = "s3://finemed-test/two-hosts"
    write_jsonl(sample_sft_rows(n=16, seed=4), f"{prefix}/sft.jsonl")
    cfg = load_config(SFTJobConfig, ROOT / "configs/sft_tiny.yaml", [
        f"model.path={tiny_model_s3}", f"data.path={prefix}/sft.jsonl", f"run.storage_path={prefix}/runs",
        "run.name=two-hosts", f"output.export_path={prefix}/export", "train.epochs=2", "train.save_steps=1",
        "train.report_to=[]", "scaling.placement_strategy=STRICT_SPREAD", f"ray.address={two_hosts['address']}"])
    job = SFTJob(cfg).setup()
    job.run()
    summary = job.save()
    meta = storage.read_json(f"{prefix}/export/finemed_export.json")
    second = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("second_host")}
    nodes = {s["node_id"] for s in meta["sharding_per_rank"]}
    assert len(nodes) == 2 and nodes & second, (nodes, second)  # one rank really ran on the isolated host
    assert all(s["optimizer"] == "DeepSpeedZeroOptimizer_Stage3" for s in meta["sharding_per_rank"])
    assert summary["global_step"] == summary["plan"]["max_steps"] == 4
    assert storage.is_complete(f"{prefix}/export")
