"""The scheduling policy (cluster.scheduler.Broker) as tables: no Ray, time passed in."""

from __future__ import annotations

import pytest

from cluster.config import ClusterConfig
from cluster.scheduler import Broker, Failure, pool_shape
from shards.errors import InputError, RenderError
from shards.plan import Shard


def shards(n: int) -> list[Shard]:
    return [Shard(index=i, start=10 * i, end=10 * i + 10, src_start=0, src_end=10) for i in range(n)]


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
    cfg = ClusterConfig(workers=workers, gpus_per_worker=per, cpu_workers=cpu_workers)
    assert pool_shape(cfg, gpus) == expected
