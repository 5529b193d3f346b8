"""Which placement groups a Train run left behind (pure, over GCS-table-like dicts), and the
leak a killed trial leaves for the driver to remove (Ray)."""

from __future__ import annotations

import time

import pytest

from urbancross.train.placement import held_groups, train_controllers


def actor(actor_id, class_name, worker_id, owner):
    return {"actor_id": actor_id, "class_name": class_name, "state": "DEAD", "worker_id": worker_id, "owner_worker_id": owner}


def group(pg_id, creator, state="CREATED", detached=False):
    return {"placement_group_id": pg_id, "name": "", "state": state, "creator_actor_id": creator, "is_detached": detached}


# The driver (worker D) fits once itself and runs a Tune trial actor (worker T) that fits too;
# another driver (worker X) runs a concurrent sweep on the same cluster.
ACTORS = [
    actor("c1", "TrainController", "wc1", "D"),
    actor("w1", "RayTrainWorker", "ww1", "c1"),
    actor("t1", "ImplicitFunc", "T", "D"),
    actor("c2", "TrainController", "wc2", "T"),
    actor("q", "_QueueActor", "wq", "T"),
    actor("t9", "ImplicitFunc", "X9", "X"),
    actor("c9", "TrainController", "wc9", "X9"),
    actor("p", "PlacementGroupCleaner", "wp", "wc1"),
]


def test_controllers_are_those_started_here_or_by_actors_started_here():
    assert train_controllers(ACTORS, "D") == {"c1", "c2"}
    assert train_controllers(ACTORS, "T") == {"c2"}  # a trial sees its own run only
    assert train_controllers(ACTORS, "X") == {"c9"}
    assert train_controllers(ACTORS, "nobody") == set()


def test_a_dead_actor_without_a_worker_ends_the_walk():
    actors = [actor("t1", "ImplicitFunc", "", "D"), actor("c2", "TrainController", "wc2", "")]
    assert train_controllers(actors, "D") == set()  # an unknown ("") worker is nobody's


def test_held_groups_are_ours_not_removed_not_detached():
    groups = [
        group("g1", "c1"),
        group("g2", "c2", state="PENDING"),
        group("g3", "c2", state="REMOVED"),
        group("g4", "c1", detached=True),
        group("g9", "c9"),  # the other sweep's trial: never ours
        group("g0", "ffffffff"),  # created by a driver, not by a controller
    ]
    held = held_groups(groups, train_controllers(ACTORS, "D"))
    assert [g["placement_group_id"] for g in held] == ["g1", "g2"]
    assert held_groups(groups, set()) == []


@pytest.mark.ray
@pytest.mark.slow
def test_a_trial_killed_mid_fit_leaves_its_group_until_the_driver_releases_it(ray_session, placement_groups, tmp_path):
    """What Tune does to a trial it stops mid-fit: the trial actor (here `Trial`) goes, and its
    Train controller with it; the controller's placement group stays reserved (Ray removes an
    actor-created group only once its job has ended too). `release` from the driver leaves a
    running fit's group alone and removes the dead one's."""
    from urbancross.train.placement import gcs_tables, known_controllers, release, train_controllers

    def loop(config):
        time.sleep(config["sleep"])

    @ray_session.remote(num_cpus=0.25)
    class Trial:
        def fit(self):
            from ray.train import RunConfig, ScalingConfig
            from ray.train.torch import TorchTrainer

            scaling = ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5})
            TorchTrainer(loop, train_loop_config={"sleep": 600}, scaling_config=scaling,
                         run_config=RunConfig(name="killed", storage_path=str(tmp_path))).fit()

    def state_of(actor_ids):
        return {a["state"] for a in gcs_tables()[1] if a["actor_id"] in actor_ids}

    before, known = placement_groups(), known_controllers()
    trial = Trial.remote()
    trial.fit.remote()
    deadline = time.monotonic() + 120
    while not placement_groups() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    (group,) = placement_groups() - before
    time.sleep(2)  # the worker group is up and polled
    assert release(known, "test", wait_s=None) == []  # a running fit keeps its group

    ours = train_controllers(gcs_tables()[1], ray_session.get_runtime_context().get_worker_id()) - known
    ray_session.kill(trial)
    while state_of(ours) != {"DEAD"} and time.monotonic() < deadline:
        time.sleep(0.5)
    assert state_of(ours) == {"DEAD"} and group in placement_groups()  # dead controller, group still reserved
    assert release(known, "test", wait_s=None) == [group]
    assert placement_groups() - before == set()
