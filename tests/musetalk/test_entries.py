"""Avatar entries and detections as bytes: pure rules with hand-computed expectations."""

from __future__ import annotations

import numpy as np
import pytest

from musetalk.entries import (
    ChunkReader,
    Entry,
    EntrySource,
    detections_from_json,
    detections_to_json,
    pack_chunk,
)
from musetalk.faces import Detection, FrameFaces


def _entry(src: int, face: bool) -> Entry:
    if not face:
        return Entry(src)
    rng = np.random.default_rng(src)
    return Entry(
        src=src,
        box=(10, 20, 110, 140),
        latents=rng.standard_normal((8, 32, 32)).astype(np.float32),
        square=(0, 5, 120, 125),
        mask=rng.integers(0, 256, (120, 120), dtype=np.uint8),
        parsed=src % 2 == 0,
        rect=(12, 30, 100, 140),
    )


def test_chunk_round_trips_bit_exact_and_reads_single_frames():
    entries = [_entry(s, s != 7) for s in range(5, 9)]
    reader = ChunkReader(pack_chunk(entries))
    assert reader.frames == [5, 6, 7, 8] and 9 not in reader
    for e in entries:
        got = reader.get(e.src)
        assert (got.src, got.box, got.square, got.parsed, got.rect) == (
            e.src,
            e.box,
            e.square,
            e.parsed,
            e.rect,
        )
        if e.box is not None:
            assert np.array_equal(got.latents, e.latents) and got.latents.dtype == np.float32
            assert np.array_equal(got.mask, e.mask) and not got.mask.flags.writeable


def test_detections_round_trip_exactly():
    marks = (np.random.default_rng(0).random((68, 2)) * 500).astype(np.float32)
    sig = np.arange(256, dtype=np.uint8).reshape(16, 16)
    big = Detection((1.5, 2.25, 300.125, 410.0), 0.987654321, marks)
    found = {3: FrameFaces((), sig), 4: FrameFaces((big, Detection((0, 0, 9, 9), 3.0)), None)}
    back = detections_from_json(detections_to_json(found))
    assert back[3].faces == () and np.array_equal(back[3].signature, sig) and back[4].signature is None
    (b4, b5) = back[4].faces
    assert b5.landmarks is None and b5.box == (0, 0, 9, 9)
    assert b4.box == big.box and b4.score == big.score
    assert np.array_equal(b4.landmarks, marks) and b4.landmarks.dtype == np.float32


def test_entry_source_fetches_only_chunks_it_reads_and_holds_few():
    blobs = {k: pack_chunk([_entry(s, True) for s in range(k * 4, k * 4 + 4)]) for k in range(5)}
    fetched = []

    def fetch(k):
        fetched.append(k)
        return blobs[k]

    source = EntrySource([(k * 4, k * 4 + 4, k) for k in range(5)], fetch, keep=2)
    for src in [*range(4, 12), *reversed(range(4, 12))]:  # a ping-pong bounce over chunks 1 and 2
        assert source(src).src == src
    assert fetched == [1, 2]  # chunks 0, 3 and 4 never fetched; 1 and 2 once each
    source(0), source(16), source(4)
    assert fetched == [1, 2, 0, 4, 1]  # at most 2 held: chunk 1 was dropped and is fetched again
    with pytest.raises(KeyError, match="source frame 99"):
        source(99)
