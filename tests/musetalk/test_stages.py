"""Channels between the pipelined worker's threads (musetalk.stages)."""

from __future__ import annotations

import gc
import weakref

import numpy as np

from musetalk.stages import END, ThreadGroup


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
