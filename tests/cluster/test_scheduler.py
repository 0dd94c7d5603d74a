"""The scheduling policy (cluster.scheduler.Broker) as tables: no Ray, time passed in."""

from __future__ import annotations

import pytest

from cluster.config import ClusterConfig
from cluster.scheduler import (
    Broker,
    Failure,
    pool_capacity,
    pool_gpus,
    workers_to_request,
    workers_wanted,
)
from shards.errors import InputError, RenderError
from shards.plan import Shard


def shards(n: int) -> list[Shard]:
    return [Shard(index=i, start=10 * i, end=10 * i + 10) for i in range(n)]


def broker(n=4, slots=2, max_in_flight=1, max_attempts=3, timeout=60.0) -> Broker:
    return Broker(
        shards(n),
        slots=slots,
        max_in_flight=max_in_flight,
        max_attempts=max_attempts,
        start_timeout_s=timeout,
        now=0.0,
    )


def test_nothing_is_assigned_before_a_slot_is_up():
    b = broker()
    assert b.assignments() == []
    b.slot_up(1, now=1.0)
    got = b.assignments()
    assert [(a.shard.index, a.slot) for a in got] == [(0, 1)]


@pytest.mark.parametrize(
    ("slots", "max_in_flight", "expected"),
    [
        # least-loaded slot first, ties to the lowest slot, never beyond max_in_flight
        (2, 1, [(0, 0), (1, 1)]),
        (2, 2, [(0, 0), (1, 1), (2, 0), (3, 1)]),
        (3, 1, [(0, 0), (1, 1), (2, 2)]),
        (1, 3, [(0, 0), (1, 0), (2, 0)]),
    ],
)
def test_least_loaded_assignment_table(slots, max_in_flight, expected):
    b = broker(n=4, slots=slots, max_in_flight=max_in_flight)
    for i in range(slots):
        b.slot_up(i, now=0.0)
    assert [(a.shard.index, a.slot) for a in b.assignments()] == expected


def test_finished_work_frees_its_slot_for_the_next_shard():
    b = broker(n=3, slots=2)
    b.slot_up(0, 0.0)
    b.slot_up(1, 0.0)
    first = b.assignments()
    b.succeeded(first[1])  # slot 1 finishes first
    assert [(a.shard.index, a.slot) for a in b.assignments()] == [(2, 1)]
    assert not b.finished


@pytest.mark.parametrize(
    ("kind", "retried", "restart"),
    [
        (Failure.LOST, True, True),
        (Failure.ERROR, True, False),
    ],
)
def test_failed_shard_goes_back_to_the_front(kind, retried, restart):
    b = broker(n=3, slots=1)
    b.slot_up(0, 0.0)
    (a,) = b.assignments()
    assert b.failed(a, kind, "boom") is restart
    assert b.retries == 1
    assert b.pending[0] == (0, a.shard, 2)
    assert b.slots[0].up is (not restart)


def test_domain_error_is_never_retried():
    b = broker(n=2, slots=1)
    b.slot_up(0, 0.0)
    (a,) = b.assignments()
    err = InputError("video input not found: x.mp4; check the path")
    with pytest.raises(InputError, match="x.mp4"):
        b.failed(a, Failure.FATAL, err)
    assert b.retries == 0


@pytest.mark.parametrize("max_attempts", [1, 2, 3])
def test_shard_gives_up_after_max_attempts(max_attempts):
    b = broker(n=1, slots=1, max_attempts=max_attempts)
    b.slot_up(0, 0.0)
    for attempt in range(1, max_attempts):
        (a,) = b.assignments()
        assert a.attempt == attempt
        b.failed(a, Failure.ERROR, "boom")
    (a,) = b.assignments()
    with pytest.raises(RenderError, match=f"shard_00000 .*failed {max_attempts} times, last: boom"):
        b.failed(a, Failure.ERROR, "boom")


def test_a_lost_worker_is_restarted_once_for_all_its_shards():
    """Two shards in flight on a slot whose worker dies: both are requeued, one restart; the late second
    report does not touch the replacement's load."""
    b = broker(n=3, slots=1, max_in_flight=2)
    b.slot_up(0, 0.0)
    a1, a2 = b.assignments()
    assert b.failed(a1, Failure.LOST, "killed") is True
    b.slot_up(0, 5.0)  # the replacement came up before the second report arrived
    assert [(a.shard.index, a.attempt) for a in b.assignments()] == [(0, 2), (2, 1)]
    assert b.failed(a2, Failure.LOST, "killed") is False  # the old worker's second shard: no restart
    assert b.slots[0].up and b.slots[0].load == 2  # the replacement's load is untouched
    assert b.pending[0] == (0, a2.shard, 2) and b.retries == 2


def test_worker_that_raises_while_starting_fails_the_job_at_once():
    b = broker()
    with pytest.raises(RenderError, match="worker 0 failed to start: no such device 'tpu'"):
        b.slot_failed_to_start(0, "no such device 'tpu'")


def test_worker_that_keeps_dying_while_starting_gives_up():
    b = broker(max_attempts=3)
    b.slot_died_starting(0, "oom")
    b.slot_died_starting(0, "oom")
    with pytest.raises(RenderError, match="died 3 times while starting"):
        b.slot_died_starting(0, "oom")


def test_coming_up_resets_the_start_death_count():
    b = broker(max_attempts=2)
    b.slot_died_starting(0, "oom")
    b.slot_up(0, 1.0)
    b.slot_died_starting(0, "oom")  # a fresh count: no error


@pytest.mark.parametrize(
    ("up_at", "now", "fails"),
    [
        (None, 59.0, False),  # still within the start timeout
        (None, 61.0, True),  # nothing came up for longer than it
        (30.0, 61.0, False),  # a slot is up
    ],
)
def test_start_timeout_table(up_at, now, fails):
    b = broker(timeout=60.0)
    if up_at is not None:
        b.slot_up(0, up_at)
    if fails:
        with pytest.raises(RenderError, match="no render worker came up within 61 s"):
            b.check_start(now)
    else:
        b.check_start(now)


def test_start_timeout_counts_from_the_last_slot_up():
    b = broker(n=2, slots=1, timeout=60.0)
    b.slot_up(0, 100.0)
    (a,) = b.assignments()
    b.failed(a, Failure.LOST, "node gone")  # slot down; its replacement may never be placed
    b.check_start(150.0)
    with pytest.raises(RenderError):
        b.check_start(161.0)


def test_start_timeout_counts_from_the_last_check_that_saw_a_slot_up():
    """Every node lost late in a long job: the timeout counts from when a worker was last seen up."""
    b = broker(n=2, slots=1, timeout=60.0)
    b.slot_up(0, 0.0)
    (a,) = b.assignments()
    b.check_start(1000.0)  # the worker renders a long shard
    b.failed(a, Failure.LOST, "node gone")
    b.check_start(1050.0)
    with pytest.raises(RenderError):
        b.check_start(1061.0)


def test_finished_after_every_shard_succeeded():
    b = broker(n=2, slots=2)
    b.slot_up(0, 0.0)
    b.slot_up(1, 0.0)
    for a in b.assignments():
        b.succeeded(a)
    assert b.finished and b.done == {(0, "shard_00000"), (0, "shard_00001")}
    b.check_start(10_000.0)  # nothing left to do: no timeout


# ---------------------------------------------------------------- many jobs on one pool


def batch_broker(jobs: dict[int, int], slots=2, max_in_flight=1, max_attempts=2) -> Broker:
    b = Broker(
        slots=slots,
        max_in_flight=max_in_flight,
        max_attempts=max_attempts,
        start_timeout_s=60.0,
        now=0.0,
        isolate_jobs=True,
    )
    for job, n in jobs.items():
        b.add_job(job, shards(n))
    for i in range(slots):
        b.slot_up(i, 0.0)
    return b


def test_units_of_different_jobs_interleave_job_after_job():
    """Job 1's shards fill the slots job 0's tail leaves idle; every (job, shard) unit is its own."""
    b = batch_broker({0: 3, 1: 2}, slots=2)
    first = b.assignments()
    assert [(a.job, a.shard.index, a.slot) for a in first] == [(0, 0, 0), (0, 1, 1)]
    b.succeeded(first[0])
    (nxt,) = b.assignments()
    assert (nxt.job, nxt.shard.index) == (0, 2)
    b.succeeded(first[1])
    (nxt2,) = b.assignments()
    assert (nxt2.job, nxt2.shard.index) == (1, 0)  # job 0's last shard still runs beside it
    assert not b.job_finished(0) and not b.job_finished(1)
    b.succeeded(nxt)
    assert b.job_finished(0) and not b.job_finished(1)
    assert (0, "shard_00000") in b.done and (1, "shard_00000") not in b.done


@pytest.mark.parametrize(
    ("kind", "attempts_before", "ends_job"),
    [
        (Failure.FATAL, 0, True),  # a bad input: the job ends at once
        (Failure.ERROR, 0, False),  # retried
        (Failure.ERROR, 1, True),  # max_attempts=2 reached
    ],
)
def test_a_failed_job_is_recorded_and_the_others_go_on(kind, attempts_before, ends_job):
    b = batch_broker({0: 2, 1: 2}, slots=1)
    (a,) = b.assignments()
    for _ in range(attempts_before):
        b.failed(a, Failure.ERROR, "flaky")
        (a,) = b.assignments()
    b.failed(a, kind, InputError("not media") if kind is Failure.FATAL else "boom")
    assert (0 in b.job_errors) is ends_job
    queued = [(j, s.index) for j, s, _ in b.pending]
    if ends_job:
        assert queued == [(1, 0), (1, 1)] and b.job_finished(0)
        assert b.job_retries.get(0, 0) == attempts_before
    else:
        assert queued[0] == (0, 0) and b.job_retries[0] == 1


@pytest.mark.parametrize("late", ["succeeded", "failed"])
def test_late_results_of_a_failed_job_are_dropped(late):
    b = batch_broker({0: 2, 1: 1}, slots=2)
    a0, a1 = b.assignments()
    b.failed(a0, Failure.FATAL, InputError("bad"))
    if late == "succeeded":
        b.succeeded(a1)
    else:
        b.failed(a1, Failure.ERROR, "late")  # neither retried nor raised
    assert (0, "shard_00001") not in b.done and b.job_finished(0) and b.retries == 0
    assert [(j, s.index) for j, s, _ in b.pending] == [(1, 0)]


def test_without_isolation_a_failed_unit_raises():
    b = broker(n=2, slots=1)
    b.slot_up(0, 0.0)
    (a,) = b.assignments()
    with pytest.raises(InputError):
        b.failed(a, Failure.FATAL, InputError("bad"))


@pytest.mark.parametrize(
    ("workers", "per", "cpu_workers", "gpus", "expected"),
    [
        (None, 1.0, 1, 0, (1, 0.0)),  # no GPUs: CPU workers, no GPU asked for
        (None, 1.0, 3, 0, (3, 0.0)),
        (None, 1.0, 1, 4, (4, 1.0)),  # one worker per GPU
        (None, 0.5, 1, 4, (8, 0.5)),  # two workers share each GPU
        (None, 0.25, 1, 1, (4, 0.25)),
        (None, 2.0, 1, 1, (1, 2.0)),  # never zero workers
        (2, 1.0, 1, 8, (2, 1.0)),  # a fixed size wins
        (2, 1.0, 5, 0, (2, 0.0)),
    ],
)
def test_pool_shape_table(workers, per, cpu_workers, gpus, expected):
    """The shape a new pool takes on a cluster that cannot grow (plenty of CPUs, ``gpus`` GPUs, many units)."""
    cfg = ClusterConfig(workers=workers, gpus_per_worker=per, cpu_workers=cpu_workers)
    per_worker = pool_gpus(cfg, gpus, can_grow=False)
    size = workers_wanted(cfg, pool_capacity(cfg, per_worker, {"CPU": 64.0, "GPU": float(gpus)}), units=100)
    assert (size, per_worker) == expected


# ---------------------------------------------------------------- autoscaling rules


@pytest.mark.parametrize(
    ("gpus", "require", "can_grow", "expected"),
    [
        (4, False, False, 0.5),  # GPUs present: a GPU pool
        (0, False, True, 0.0),  # none: CPU workers
        (0, True, True, 0.5),  # none yet, GPUs required, the cluster can gain nodes: wait for them
        (0, True, False, 0.0),  # an embedded cluster never gains one (the driver refuses before this)
    ],
)
def test_pool_gpus_table(gpus, require, can_grow, expected):
    cfg = ClusterConfig(gpus_per_worker=0.5, require_gpus=require)
    assert pool_gpus(cfg, gpus, can_grow=can_grow) == expected


@pytest.mark.parametrize(
    ("settings", "per", "resources", "expected"),
    [
        ({}, 1.0, {"GPU": 3, "CPU": 24}, 3),  # one worker per GPU
        ({}, 0.5, {"GPU": 3, "CPU": 24}, 6),
        ({}, 0.1, {"GPU": 1}, 10),  # float shares do not lose a worker to rounding
        ({}, 2.0, {"GPU": 3}, 1),
        ({}, 1.0, {"CPU": 8}, 0),  # a GPU pool on a cluster without GPU (yet): no room
        ({"max_workers": 2}, 1.0, {"GPU": 8}, 2),
        ({"workers": 5}, 1.0, {"GPU": 1}, 5),  # a fixed size, whatever the cluster holds
        ({"cpu_workers": 3}, 0.0, {"CPU": 8}, 3),  # a CPU pool: cpu_workers ...
        ({"cpu_workers": 3}, 0.0, {"CPU": 2}, 2),  # ... as many as the CPUs hold
        ({"cpu_workers": 3, "cpus_per_worker": 4.0}, 0.0, {"CPU": 8}, 2),
        ({"cpu_workers": 3, "max_workers": 1}, 0.0, {"CPU": 8}, 1),
    ],
)
def test_pool_capacity_table(settings, per, resources, expected):
    assert pool_capacity(ClusterConfig(**settings), per, resources) == expected


@pytest.mark.parametrize(
    ("workers", "capacity", "units", "expected"),
    [
        (None, 4, 10, 4),  # what the cluster holds
        (None, 4, 2, 2),  # never more workers than units left
        (None, 0, 5, 1),  # never zero: a job with no room fails by start_timeout_s
        (None, 4, 0, 1),
        (3, 8, 1, 3),  # a fixed size: no scaling
    ],
)
def test_workers_wanted_table(workers, capacity, units, expected):
    assert workers_wanted(ClusterConfig(workers=workers), capacity, units) == expected


@pytest.mark.parametrize(
    ("settings", "per", "units", "expected"),
    [
        ({}, 1.0, 3, [{"GPU": 1.0, "CPU": 1.0}] * 3),  # one GPU worker per unit left
        ({"cpus_per_worker": 4.0}, 0.5, 2, [{"GPU": 0.5, "CPU": 4.0}] * 2),
        ({"max_workers": 2}, 1.0, 9, [{"GPU": 1.0, "CPU": 1.0}] * 2),
        ({}, 1.0, 0, []),  # nothing left: the request is cleared
        ({"workers": 2}, 1.0, 9, [{"GPU": 1.0, "CPU": 1.0}] * 2),
        ({"cpu_workers": 2}, 0.0, 9, [{"CPU": 1.0}] * 2),  # a CPU pool asks for CPU bundles
        ({"cpu_workers": 4}, 0.0, 1, [{"CPU": 1.0}]),
    ],
)
def test_workers_to_request_table(settings, per, units, expected):
    assert workers_to_request(ClusterConfig(**settings), per, units) == expected


def test_an_added_slot_takes_units_once_up_and_is_least_loaded():
    b = broker(n=4, slots=1, max_in_flight=2)
    b.slot_up(0, 0.0)
    assert [a.slot for a in b.assignments()] == [0, 0]
    new = b.add_slot()
    assert new == 1 and b.assignments() == []  # not up yet
    b.slot_up(new, 5.0)
    got = b.assignments()
    assert [(a.shard.index, a.slot) for a in got] == [(2, 1), (3, 1)]
    assert b.active_slots == 2 and b.units_left == 4


def test_a_retired_slot_is_never_assigned_nor_counted_up():
    b = broker(n=3, slots=2, timeout=10.0)
    b.slot_up(0, 0.0)
    b.slot_up(1, 0.0)
    a0, a1 = b.assignments()
    assert b.failed(a1, Failure.LOST, "node gone")  # slot 1's worker is restarted ...
    b.retire(1)  # ... and finds no room: the pool shrinks
    assert b.active_slots == 1
    b.slot_up(1, 1.0)  # a late report of the killed replacement changes nothing
    b.succeeded(a0)
    got = b.assignments()
    assert [(a.shard.index, a.slot) for a in got] == [(1, 0)]  # the requeued unit goes to the survivor
    assert b.retries == 1
    b.check_start(100.0)  # slot 0 is up: no start failure


def test_late_units_of_a_retired_slot_are_requeued_without_a_restart():
    b = broker(n=3, slots=2, max_in_flight=2)
    b.slot_up(0, 0.0)
    b.slot_up(1, 0.0)
    got = b.assignments()
    on1 = [a for a in got if a.slot == 1]
    assert len(on1) == 1
    b.retire(1)
    assert b.failed(on1[0], Failure.LOST, "node gone") is False  # no restart for a retired slot
    assert [(j, s.index) for j, s, _ in b.pending][0] == (0, on1[0].shard.index)


def test_no_slot_up_still_fails_after_start_timeout_when_slots_retire():
    b = broker(n=2, slots=2, timeout=10.0)
    b.retire(1)
    b.check_start(5.0)
    with pytest.raises(RenderError, match="no render worker came up within 11 s"):
        b.check_start(11.0)
