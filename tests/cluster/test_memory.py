"""A worker's memory housekeeping (cluster.memory): real glibc, in a fresh interpreter."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from cluster.memory import can_trim, cpu_seconds, memory_mib

# Frees 200 MiB of heap blocks below a live block: glibc keeps those pages (free() only shrinks the heap's
# top), so the process stays 200 MiB larger until malloc_trim hands the holes back.
_FRAGMENTED_HEAP = textwrap.dedent(
    """
    import json
    import numpy as np
    from cluster.memory import memory_mib, trim_heap
    big = np.ones(8 << 20, np.uint8)
    del big  # a freed mmapped block raises glibc's mmap threshold: the 1 MiB blocks below go on the heap
    blocks = [np.ones(1 << 20, np.uint8) for _ in range(200)]
    pin = np.ones(1 << 20, np.uint8)  # above them: the heap's top cannot shrink past it
    del blocks
    before = memory_mib()["anon"]
    trimmed = trim_heap()
    print(json.dumps({"before": before, "after": memory_mib()["anon"], "trimmed": trimmed}))
    """
)


@pytest.mark.skipif(not can_trim(), reason="needs glibc's malloc_trim")
def test_trim_heap_gives_freed_heap_pages_back():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's defaults
    out = subprocess.run(
        [sys.executable, "-c", _FRAGMENTED_HEAP], env=env, capture_output=True, text=True, check=True
    )
    got = json.loads(out.stdout)
    assert got["trimmed"] is True
    assert got["before"] - got["after"] > 150, got  # MiB: nearly all of the 200 freed


def test_memory_split_and_cpu_seconds_of_this_process():
    mem = memory_mib()
    assert set(mem) == {"hwm", "rss", "anon", "file", "shmem"}
    assert mem["hwm"] >= mem["rss"] > 0
    assert mem["rss"] == pytest.approx(mem["anon"] + mem["file"] + mem["shmem"], abs=1)
    assert cpu_seconds() > 0
