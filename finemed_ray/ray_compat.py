"""Workarounds for Ray behaviour that was measured to break our jobs. Each says what breaks and when to drop it.

**Ray Train V2's placement-group cleaner kills live runs on a loaded machine** (Ray 2.60). Every run starts a
detached ``PlacementGroupCleaner`` that polls ``is_actor_alive(controller)`` through the State API (an HTTP query
that may answer with partial results under load) and treats "not found" as dead (the flaw is named in the review of
ray-project/ray#65447). On 2 busy CPU cores it removed the running job's placement group in the middle of stage 1:
both training workers were destroyed ("Destroying worker since its placement group was removed"), then
``FailurePolicy RETRY`` restarted the run from its last checkpoint. :func:`controller_alive` asks the GCS instead
(the authority on actor state, no dashboard needed) and counts only a ``DEAD`` record as dead: when in doubt it
keeps the placement group, which Ray frees anyway when the job ends. :func:`install` puts it in place in the
current process; local clusters call it in every worker process (the cleaner actor included) through
:func:`finemed_ray.worker_env.setup_worker`, their ``worker_process_setup_hook``; on a cluster of your own name
``finemed_ray.ray_compat.install`` as the job's hook. Drop this once Ray's cleaner only acts on a DEAD state.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def controller_alive(actor_id: str, timeout: float | None = None) -> bool:
    """False only when the GCS records the actor as DEAD (``timeout`` kept for the replaced signature)."""
    import ray

    try:
        info = ray._private.state.actors(actor_id=actor_id)
    except Exception as exc:  # noqa: BLE001 - unknown is not dead
        log.warning("controller liveness unknown (%s): keeping the placement group", exc)
        return True
    return not info or info.get("State") != "DEAD"


def install() -> None:
    """Make Ray Train's placement-group cleaner use :func:`controller_alive` (idempotent; no-op if Ray moved it)."""
    try:
        from ray.train.v2._internal.execution.controller import placement_group_cleaner
    except ImportError:
        return
    if hasattr(placement_group_cleaner, "is_actor_alive"):
        placement_group_cleaner.is_actor_alive = controller_alive
