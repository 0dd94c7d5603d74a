"""The avatar cache: its store on a directory or a URI, and a cache that cannot be used turning itself off."""

from __future__ import annotations

import logging
from fractions import Fraction

import numpy as np
import pytest

from cluster import storage
from cluster.cache import AvatarCache, AvatarStore
from cluster.config import CacheConfig
from musetalk.config import PipelineConfig
from musetalk.device import ComputeIdentity
from musetalk.entries import Entry, EntrySource, pack_chunk
from shards.plan import PrepUnit, UnitKind

CPU = ComputeIdentity("cpu", "x86_64 AVX2", "float32", 1, "2.13.0")


def _entry(src: int, face: bool) -> Entry:
    if not face:
        return Entry(src)
    rng = np.random.default_rng(src)
    return Entry(src, (10, 20, 110, 140), rng.standard_normal((8, 32, 32)).astype(np.float32), (0, 5, 120, 125),
                 rng.integers(0, 256, (120, 120), dtype=np.uint8), True, (12, 30, 100, 140))  # fmt: skip


@pytest.mark.parametrize("root", ["local", "memory://avatars-test"])
def test_store_lists_reads_and_writes_whole_files(root, tmp_path):
    store = AvatarStore(str(tmp_path / "cache") if root == "local" else root)
    assert store.ranges("v", "p1") == []
    store.write("v", "p1", 64, 128, "npz", b"second")
    store.write("v", "p1", 0, 64, "npz", b"first")
    store.write("v", "d1", 0, 64, "json", b"{}")
    assert store.ranges("v", "p1") == [(0, 64), (64, 128)]
    assert store.read("v", "p1", 0, 64, "npz") == b"first"
    if root == "local":
        assert not list((tmp_path / "cache").rglob("*.partial")), "no temporary file is left"


def test_a_shared_store_serves_chunks_by_uri_to_any_process():
    store = AvatarStore("memory://avatars-uri-test")
    blob = pack_chunk([_entry(s, s % 3 != 0) for s in range(10, 14)])
    store.write("v", "p1", 10, 14, "npz", blob)
    uri = store.uri("v", "p1", 10, 14, "npz")
    assert uri.startswith("memory://") and storage.cat(uri) == blob
    source = EntrySource([(10, 14, uri)], storage.cat)
    assert source(11).box is not None and source(12).box is None


def test_a_failed_local_write_leaves_no_file_behind(tmp_path, monkeypatch):
    import cluster.cache as cache

    store = AvatarStore(str(tmp_path / "cache"))

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        store.write("v", "p1", 0, 64, "npz", b"entries")
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
    assert store.ranges("v", "p1") == []


@pytest.mark.parametrize("kind", ["a file", "below a file"])
def test_a_cache_dir_that_is_not_a_directory_turns_the_cache_off(
    kind, tiny_models, demo_media, tmp_path, caplog
):
    """``cache.dir`` naming an existing file (or a path below one): one warning, no cache, and the file
    untouched."""
    blocker = tmp_path / "notes.txt"
    blocker.write_bytes(b"keep me")
    root = blocker if kind == "a file" else blocker / "avatars"
    pipeline = PipelineConfig(models_dir=str(tiny_models), tiny=True)
    caplog.set_level(logging.WARNING, logger="cluster.cache")
    cache = AvatarCache.open(CacheConfig(dir=str(root)), demo_media.video, pipeline, CPU, "out.mp4")
    assert cache is None
    (line,) = [r.getMessage() for r in caplog.records]
    assert "cannot be used" in line and "rendering out.mp4 without it" in line and "\n" not in line
    assert blocker.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_usable_cache_is_keyed_by_the_compute_identity(tiny_models, demo_media, tmp_path):
    pipeline = PipelineConfig(models_dir=str(tiny_models), tiny=True)
    cfg = CacheConfig(dir=str(tmp_path / "avatars"))
    one = AvatarCache.open(cfg, demo_media.video, pipeline, CPU, "a.mp4")
    two = AvatarCache.open(
        cfg, demo_media.video, pipeline, CPU.__class__(**{**CPU.__dict__, "threads": 2}), "b.mp4"
    )
    assert one.video == two.video and one.detect != two.detect and one.prepare != two.prepare
    assert (
        AvatarCache.open(CacheConfig(enabled=False, dir=str(tmp_path)), demo_media.video, pipeline, CPU, "c")
        is None
    )


def test_entry_chunks_are_keyed_by_the_face_they_hold(tmp_path):
    """A chunk's key holds its frames' face choices: the largest face everywhere keeps the bare prepare
    key (entries made before face choices still hit), another choice reads only its own chunks, and the
    same choice hits again."""
    from musetalk.preparation import PrepPlan
    from shards.plan import plan_shards

    store = AvatarStore(str(tmp_path / "avatars"))

    def cache(choice):
        return AvatarCache(store, "v", "d1", "p1", "job", choice)

    largest, track2 = cache(None), cache(lambda s: "2")
    ranged = cache(lambda s: "2" if s < 4 else None)
    assert largest.chunk_key(0, 8) == "p1" == cache(lambda s: "largest").chunk_key(0, 8)
    keys = {c.chunk_key(0, 8) for c in (largest, track2, ranged, cache(lambda s: "left"))}
    assert len(keys) == 4 and track2.chunk_key(0, 8) == cache(lambda s: 2).chunk_key(0, 8)
    assert ranged.chunk_key(8, 16) != track2.chunk_key(8, 16) and ranged.chunk_key(0, 4) == track2.chunk_key(
        0, 4
    )

    plan = plan_shards(
        source_frames=16, total_samples=16 * 640, sample_rate=16000, fps=Fraction(25), shard_frames=16
    )
    blob = pack_chunk([_entry(s, True) for s in range(0, 8)])
    for c in (largest, track2):
        c.remember(PrepUnit(UnitKind.PREPARE, 0, 0, 8), blob)
    assert set(cache(lambda s: "2").chunks(PrepPlan(plan, plan.shards, chunk=8, smooth_radius=0))) == {(0, 8)}
    assert set(ranged.chunks(PrepPlan(plan, plan.shards, chunk=8, smooth_radius=0))) == set()
    assert sorted(store.keys("v")) == sorted({"p1", track2.chunk_key(0, 8)})
