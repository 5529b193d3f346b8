"""Placement groups a Ray Train run leaves behind: found after `fit()` and removed.

Ray Train V2 (2.60) reserves each worker group's resources with an unnamed placement group that
its `TrainController` actor creates (`WorkerGroup._create_placement_group`), and removes it when
the worker group shuts down. Ray itself removes an actor-created group only once both its creator
actor and its job have ended, so a group the controller did not remove (a worker group whose
start failed after it was built, a controller killed with the Tune trial actor that owned it)
holds its CPUs for the rest of the driver's session, and a later fit waits for them forever.
Train's own `PlacementGroupCleaner` watches for a dead controller through the State API, which a
runtime started without the dashboard does not serve.

Ours: the groups whose creator is a `TrainController` started by this process, directly or
through actors it started (a Tune driver's trial actors). `placement_group_table()` names no
creator and `ray.util.state` needs the dashboard, so the GCS records are read directly. Groups of
other drivers' controllers, and of controllers that existed before (`known`), are never touched.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterable, Iterator

log = logging.getLogger(__name__)

CONTROLLER = "TrainController"  # ray.train.v2._internal.execution.controller.TrainController
REMOVED = "REMOVED"
DEAD = "DEAD"


def train_controllers(actors: Iterable[dict], owner: str) -> set[str]:
    """Ids of the `TrainController` actors started by worker `owner`, or by an actor started
    (transitively) from it. `actors`: {"actor_id", "class_name", "worker_id" (the actor's own
    worker), "owner_worker_id"}, as `gcs_tables` gives them."""
    by_owner = defaultdict(list)
    for actor in actors:
        by_owner[actor["owner_worker_id"]].append(actor)
    workers, frontier, found = {owner}, [owner], set()
    while frontier:
        for actor in by_owner.get(frontier.pop(), ()):
            if actor["class_name"] == CONTROLLER:
                found.add(actor["actor_id"])
            if actor["worker_id"] and actor["worker_id"] not in workers:
                workers.add(actor["worker_id"])
                frontier.append(actor["worker_id"])
    return found


def held_groups(groups: Iterable[dict], controllers: set[str]) -> list[dict]:
    """The placement groups `controllers` created that are not removed yet. `groups`: dicts like
    `placement_group_table()`'s values plus "creator_actor_id" and "is_detached"; a detached group
    is meant to outlive its creator and is left alone."""
    return [g for g in groups if g["creator_actor_id"] in controllers and g["state"] != REMOVED and not g["is_detached"]]


def gcs_tables() -> tuple[list[dict], list[dict]]:
    """(placement groups, this job's actors), as the dicts the functions above take.

    Parses the same GCS records `ray.util.placement_group_table()` does (`ray._private.state`),
    keeping the creator and owner fields it drops. A Tune trial's actors are in its driver's job.
    """
    import ray
    from ray._private.state import state
    from ray.core.generated.gcs_pb2 import ActorTableData, PlacementGroupTableData

    accessor = state._connect_and_get_accessor()
    groups = []
    for raw in accessor.get_placement_group_table():
        g = PlacementGroupTableData.FromString(raw)
        groups.append({
            "placement_group_id": g.placement_group_id.hex(),
            "name": g.name,
            "state": PlacementGroupTableData.PlacementGroupState.Name(g.state),
            "creator_actor_id": g.creator_actor_id.hex(),
            "is_detached": g.is_detached,
        })
    actors = []
    for raw in accessor.get_actor_table(ray.JobID.from_hex(ray.get_runtime_context().get_job_id()), None):
        a = ActorTableData.FromString(raw)
        actors.append({
            "actor_id": a.actor_id.hex(),
            "class_name": a.class_name,
            "state": ActorTableData.ActorState.Name(a.state),
            "worker_id": a.address.worker_id.hex(),
            "owner_worker_id": a.owner_address.worker_id.hex(),
        })
    return groups, actors


def _me() -> str:
    import ray

    return ray.get_runtime_context().get_worker_id()


def release(known: set[str], where: str, wait_s: float | None = 10.0) -> list[str]:
    """Remove the placement groups still held by Train controllers this process started that are
    not in `known`; returns their ids.

    After a fit: a controller still alive may yet remove its own, so wait for that (at most
    `wait_s`) before removing what is left. `wait_s` None (during a sweep): only the groups of dead
    controllers, since a running trial's controller is using its own. One warning line names what
    was removed.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    deadline = time.monotonic() + (wait_s or 0.0)
    while True:
        groups, actors = gcs_tables()
        ours = train_controllers(actors, _me()) - known
        alive = {a["actor_id"] for a in actors if a["actor_id"] in ours and a["state"] != DEAD}
        held = held_groups(groups, ours - alive if wait_s is None else ours)
        if not held or not alive or wait_s is None or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    for g in held:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(g["placement_group_id"])))
    ids = [g["placement_group_id"] for g in held]
    if ids:
        log.warning("%s: removed %d placement group(s) its Ray Train controller left behind: %s", where, len(ids), ", ".join(ids))
    return ids


def known_controllers() -> set[str]:
    """The Train controllers this process has started so far (what `release` must not count)."""
    return train_controllers(gcs_tables()[1], _me())


@contextmanager
def releasing(where: str, wait_s: float = 10.0) -> Iterator[set[str] | None]:
    """Around a `TorchTrainer.fit()` (or a sweep of them): afterwards, returned or raised, the
    placement groups its controllers created are gone (see `release`). Yields `known` (None: the
    cluster's tables could not be read, and nothing is released)."""
    try:
        known = known_controllers()
    except Exception as e:  # e.g. a Ray Client connection: training goes on, unguarded
        log.warning("%s: cannot read the cluster's placement groups, none will be released: %s", where, e)
        known = None
    try:
        yield known
    finally:
        if known is not None:
            try:
                release(known, where, wait_s)
            except Exception as e:  # never hide what fit() raised; a GCS away is a warning
                log.warning("%s: could not check its placement groups: %s", where, e)
