"""Channels between the pipelined worker's threads (musetalk.stages)."""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import torch

from musetalk.stages import END, StageClock, ThreadGroup
from musetalk.stats import model_call, model_cpu_seconds


def test_a_channel_yields_items_until_end_then_stays_exhausted():
    with ThreadGroup("t") as group:
        ch = group.channel(4)
        for item in (1, 2, 3, END):
            ch.put(item)
        assert list(ch) == [1, 2, 3]
        assert list(ch) == []  # a second pass does not wait for items that never come


def test_a_consumer_that_drops_an_item_is_not_holding_it_through_the_channel():
    """The consumer's loop is all that keeps an item alive: once it lets go, the item is gone, even
    before the next one is asked for (a prepare unit keeps crops, not 6 MiB frames)."""
    with ThreadGroup("t") as group:
        ch = group.channel(4)
        ch.put(np.zeros((1080, 1920, 3), np.uint8))
        ch.put(END)
        it = iter(ch)
        frame = next(it)
        ref = weakref.ref(frame)
        del frame
        gc.collect()
        assert ref() is None
        assert next(it, None) is None


def _spin(rounds: int) -> int:
    """CPU work in this thread (a loop, so thread time moves whatever the machine's load)."""
    total = 0
    for i in range(rounds):
        total += i * i
    return total


def test_stage_clock_splits_thread_cpu_into_model_calls_and_the_rest():
    clock = StageClock(torch.device("cpu"))
    with clock.stage("detect"):
        _spin(200_000)  # host work
        with model_call():
            _spin(200_000)
            with model_call():  # nested: counted once
                _spin(200_000)
    with clock.stage("blend"):
        _spin(100_000)
    report = clock.report()
    assert set(report) == {"seconds", "host_cpu", "model_cpu"}
    assert report["host_cpu"]["detect"] > 0 and report["model_cpu"]["detect"] > 0
    assert report["host_cpu"]["blend"] > 0 and report["model_cpu"]["blend"] == 0
    # model CPU is thread CPU: it cannot exceed the thread's CPU while the stage ran (wall seconds bound it)
    assert report["host_cpu"]["detect"] + report["model_cpu"]["detect"] <= report["seconds"]["detect"] + 1e-3


def test_model_cpu_is_counted_per_thread():
    before = model_cpu_seconds()
    seen = []

    def other() -> None:
        with model_call():
            _spin(300_000)
        seen.append(model_cpu_seconds())

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen[0] > 0 and model_cpu_seconds() == before


def test_stage_clock_times_host_and_device_stages_without_a_stream_off_cuda():
    """Off CUDA there is no side stream and a device stage (with or without a stream) is host-timed."""
    import torch

    from musetalk.stages import StageClock, side_stream

    cpu = torch.device("cpu")
    assert side_stream(cpu) is None
    clock = StageClock(cpu)
    with clock.stage("blend", device=True, stream=side_stream(cpu)):
        pass
    with clock.stage("generate", device=True):
        pass
    totals = clock.totals()
    assert set(totals) == {"blend", "generate"} and all(v >= 0 for v in totals.values())
