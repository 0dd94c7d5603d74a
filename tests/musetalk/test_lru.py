"""musetalk.lru.LRU: least recently used out, pinned entries kept."""

import pytest

from musetalk.lru import LRU


def test_the_least_recently_used_entry_goes_first_and_get_counts_as_use():
    lru = LRU(2)
    assert lru.put("a", 1) == [] and lru.put("b", 2) == []
    assert lru.get("a") == 1  # a is now the most recent
    assert lru.put("c", 3) == [("b", 2)]
    assert list(lru) == ["a", "c"] and len(lru) == 2
    assert lru.get("b") is None and lru.get("b", 0) == 0
    assert lru.put("a", 10) == [] and lru.get("a") == 10  # replacing evicts nothing


def test_pinned_entries_are_never_evicted_and_the_map_may_grow_past_its_size_for_them():
    running = {"a", "b"}
    lru = LRU(2, pinned=running.__contains__)
    lru.put("a", 1), lru.put("b", 2)
    assert lru.put("c", 3) == []  # a and b are pinned, c was just put
    assert list(lru) == ["a", "b", "c"]
    running.discard("a")
    assert lru.make_room() == [("a", 1), ("c", 3)]  # room for one more: only b (pinned) stays
    assert list(lru) == ["b"]


def test_make_room_leaves_space_for_one_insert_and_pop_forgets():
    lru = LRU(3)
    for k in "abc":
        lru.put(k, k)
    assert lru.make_room() == [("a", "a")] and len(lru) == 2
    assert lru.pop("b") == "b" and lru.pop("b") is None and "b" not in lru


def test_an_lru_holds_at_least_one_entry():
    with pytest.raises(ValueError, match="size=0"):
        LRU(0)
