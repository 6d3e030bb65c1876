"""finemed_ray.ray_compat: Ray Train's placement-group cleaner must not call a live controller dead."""

import os

import pytest


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from finemed_ray.cluster import ensure_ray_address

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.shutdown()
    ensure_ray_address(None, 2)
    yield ray
    ray.shutdown()


def test_only_a_dead_record_counts_as_dead(local_ray):
    import time

    from finemed_ray.ray_compat import controller_alive

    ray = local_ray

    @ray.remote(num_cpus=0)
    class Probe:
        def ping(self):
            return 1

    probe = Probe.remote()
    ray.get(probe.ping.remote())
    actor_id = probe._actor_id.hex()
    assert controller_alive(actor_id) is True
    ray.kill(probe)
    deadline = time.time() + 30
    while controller_alive(actor_id) and time.time() < deadline:
        time.sleep(0.2)
    assert controller_alive(actor_id) is False
    assert controller_alive("ff" * 16) is True  # unknown (Ray's own check calls this dead): keep the placement group


def test_every_worker_process_of_a_local_cluster_runs_the_patch(local_ray):
    ray = local_ray

    @ray.remote(num_cpus=0)
    class Cleanerlike:
        def check(self):
            from ray.train.v2._internal.execution.controller import placement_group_cleaner

            from finemed_ray.ray_compat import controller_alive

            return placement_group_cleaner.is_actor_alive is controller_alive

    # detached like Ray Train's cleaner, which the controller launches with lifetime="detached"
    actor = Cleanerlike.options(lifetime="detached", name="finemed-compat-probe").remote()
    try:
        assert ray.get(actor.check.remote(), timeout=120) is True
    finally:
        ray.kill(actor)
