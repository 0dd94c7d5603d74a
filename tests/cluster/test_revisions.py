"""Re-rendering only what changed (kept segments named by content): a dub of a clip longer than a minute,
revised as a studio revises one, each render through the real driver on a local Ray cluster; tiny models,
Haar, lossless output, PCM audio."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
import soundfile as sf

from cluster.driver import run_job
from musetalk.audio import audio_span
from musetalk.testing.demo_media import make_demo_media
from shards.probe import load_audio
from tests.helpers import decode_all, job_for

FPS, SECONDS, RATE = Fraction(1), 65, 16000
# 14 shards of 5 s (the split at a range's end included): each spans what it did at 2 fps in 10 frames.
SHARD_FRAMES = 5
RANGES = [(5, 20), (40, 62)]  # seconds: two lines of dialogue
CHANGED = (45, 50)  # seconds of audio re-recorded, inside the second range and the second 30 s segment


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("revisions")
    media = make_demo_media(tmp / "media", fps=FPS, seconds=SECONDS)
    speech = load_audio(media.audio, RATE)[: SECONDS * RATE]
    takes = {"first": tmp / "first.wav", "revised": tmp / "revised.wav"}
    sf.write(takes["first"], speech, RATE, subtype="PCM_16")
    revised = speech.copy()
    a, b = (s * RATE for s in CHANGED)
    revised[a:b] = revised[a:b][::-1]  # the line said again, differently
    sf.write(takes["revised"], revised, RATE, subtype="PCM_16")
    return tmp, media, takes


def _segments(path, faces=("largest", "largest")):
    path.write_text(
        json.dumps([{"start": s, "end": e, "face": f} for (s, e), f in zip(RANGES, faces, strict=True)])
    )
    return path


def _job(tiny_models, media, audio, out, segments, *overrides):
    return job_for(
        tiny_models,
        media.video,
        audio,
        out,
        "task.mode=dub",
        f"task.segments={segments}",
        "face.detector=haar",
        f"shards.length={SHARD_FRAMES}",
        "cluster.workers=1",
        *overrides,
    )


def _render(tiny_models, media, audio, out, segments, *overrides):
    run_job(_job(tiny_models, media, audio, out, segments, *overrides))
    return json.loads(out.with_suffix(".summary.json").read_text())


def _reading_segment(summary_shards, k: int) -> int:
    """Shards with a lip-synced frame whose audio window reads 30 s segment ``k``: per frame inside a
    range, the Whisper steps its window reads (musetalk.audio.audio_span of that one frame)."""
    total = SECONDS * RATE
    inside = {t for s, e in RANGES for t in range(int(s * FPS), int(e * FPS))}
    count = 0
    for start, end in summary_shards:
        reads = set()
        for t in range(start, end):
            if t in inside:
                span = audio_span(total, FPS, t, t + 1)
                reads.update(range(span.first_segment, span.end_segment))
        count += k in reads
    return count


def test_a_revision_renders_only_the_shards_that_read_what_changed(local_ray, tiny_models, clip):
    tmp, media, takes = clip
    segments = _segments(tmp / "segments.json")
    out = tmp / "out" / "dub.mp4"
    first = _render(tiny_models, media, takes["first"], out, segments)
    shards = first["rendered_shards"]
    assert first["reused_shards"] == 0 and shards >= 14 and first["frames"] == SECONDS * FPS

    same = _render(tiny_models, media, takes["first"], out, segments)  # nothing changed
    assert (same["rendered_shards"], same["reused_shards"]) == (0, shards)

    # One re-recorded line: exactly the shards whose lip-synced frames read the changed 30 s segment.
    with_plan = _plan_shards(tiny_models, media, takes["revised"], tmp / "plan.mp4", segments)
    expected = _reading_segment(with_plan, CHANGED[0] // 30)
    assert 0 < expected < shards
    revised = _render(tiny_models, media, takes["revised"], out, segments)
    assert revised["rendered_shards"] == expected and revised["rendered_because"] == {"audio": expected}
    assert revised["reused_shards"] == shards - expected
    fresh = tmp / "fresh" / "dub.mp4"
    assert _render(tiny_models, media, takes["revised"], fresh, segments)["reused_shards"] == 0
    for t, (a, b) in enumerate(zip(decode_all(fresh), decode_all(out), strict=True)):
        assert np.array_equal(a, b), f"frame {t}: the revision differs from a fresh render of its inputs"

    # A corrected face choice for the first line: only that range's shards.
    moved = _segments(tmp / "faces.json", faces=("left", "largest"))
    in_first = sum(1 for s, e in with_plan if s < RANGES[0][1] * FPS and e > RANGES[0][0] * FPS)
    faces = _render(tiny_models, media, takes["revised"], out, moved)
    assert faces["rendered_shards"] == in_first and faces["rendered_because"] == {"frames": in_first}

    # An encode setting or the compute identity: nothing is reused.
    gop = _render(tiny_models, media, takes["revised"], out, moved, "+output.gop=7")
    assert (gop["rendered_shards"], gop["reused_shards"]) == (shards, 0)
    assert gop["rendered_because"] == {"encode": shards}
    threads = _render(tiny_models, media, takes["revised"], out, moved, "+output.gop=7", "render.threads=2")
    assert (threads["rendered_shards"], threads["reused_shards"]) == (shards, 0)
    assert threads["rendered_because"] == {"compute": shards}


def _plan_shards(tiny_models, media, audio, out, segments) -> list[tuple[int, int]]:
    """The job's shard grid, as the driver plans it (no render)."""
    from musetalk.local import plan_job

    job = _job(tiny_models, media, audio, out, segments)
    out.parent.mkdir(parents=True, exist_ok=True)
    _, _, plan = plan_job(
        job.video, job.audio, shard_frames=SHARD_FRAMES, dub=job.dub, track=out.with_suffix(".wav")
    )
    return [(s.start, s.end) for s in plan.shards]
