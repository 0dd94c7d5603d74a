"""The pipelined worker writes exactly what the serial renderer wrote, cleans up after any failure,
and reports per-frame kinds."""

from __future__ import annotations

import json
import threading
import traceback
import weakref
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf

import shards.decode as decode_module
from musetalk.config import FaceConfig, PipelineConfig
from musetalk.local import plan_job
from musetalk.pipeline import FramePipeline
from musetalk.stats import PrepStats, ShardStats, busy_seconds
from musetalk.testing.demo_media import speech_like
from scripts.make_bench_media import SHORT_SECONDS, ensure_bench_media
from shards.segment import EncodeSettings, SegmentWriter
from tests.helpers import decode_all
from tests.musetalk.serial_reference import render_shard_serial

LOSSLESS = EncodeSettings(lossless=True)


@pytest.fixture(scope="module")
def pipe(tiny_models):
    cfg = PipelineConfig(
        models_dir=str(tiny_models), tiny=True, batch_size=4, face=FaceConfig(detector="haar", crop="box")
    )
    return FramePipeline(cfg)


@pytest.fixture(scope="module")
def short_1080p(tmp_path_factory):
    return ensure_bench_media(tmp_path_factory.mktemp("bench"), SHORT_SECONDS)


def _audio(path: Path, seconds: float) -> Path:
    sf.write(path, speech_like(seconds), 16000, subtype="PCM_16")
    return path


def _both(pipe, video, audio, tmp_path, shard_frames):
    """Render every shard with the pipelined and the serial renderer; return their frames and stats."""
    info, samples, plan = plan_job(video, audio, shard_frames=shard_frames)
    entries, features, _ = pipe.prepare_job(info, samples, plan, chunk=16)
    stats = []
    for shard in plan.shards:
        kw = dict(video=info, plan=plan, shard=shard, encode=LOSSLESS)
        stats.append(
            pipe.render_shard(
                out_path=tmp_path / f"new{shard.index}.mkv", entries=entries.__getitem__, audio=features, **kw
            )
        )
        render_shard_serial(pipe, out_path=tmp_path / f"old{shard.index}.mkv", samples=samples, **kw)
        new, old = (
            decode_all(tmp_path / f"new{shard.index}.mkv"),
            decode_all(tmp_path / f"old{shard.index}.mkv"),
        )
        assert len(new) == len(old) == shard.frames
        for t, (a, b) in enumerate(zip(new, old, strict=True)):
            assert np.array_equal(a, b), f"{shard.name} frame {t} differs from the serial renderer"
    return plan, stats


@pytest.mark.slow
def test_demo_with_ping_pong_matches_serial(pipe, demo_media, tmp_path):
    # 4.6 s of audio over the 4 s clip: the output bounces at source frame 99; 3 shards, one across it.
    plan, stats = _both(pipe, demo_media.video, _audio(tmp_path / "a.wav", 4.6), tmp_path, 40)
    assert len(plan.shards) == 3 and plan.output_frames == 115
    kinds = "".join(s.frame_kinds for s in stats)
    assert len(kinds) == 115 and set(kinds) <= {"F", "P", "p"}
    no_face = set(demo_media.no_face_frames)
    for t, kind in enumerate(kinds):
        assert (kind == "P") == (plan.source_index(t) in no_face), f"frame {t} is {kind}"
    assert sum(s.face_frames for s in stats) == 115 - kinds.count("P")
    assert sum(s.parsing_fallbacks for s in stats) == kinds.count("p")
    for s in stats:  # plain data: JSON round-trips (the resume manifest stores it)
        assert ShardStats(**json.loads(json.dumps(asdict(s)))) == s


@pytest.mark.slow
def test_short_1080p_matches_serial(pipe, short_1080p, tmp_path):
    plan, stats = _both(pipe, short_1080p.video, short_1080p.audio, tmp_path, 30)
    kinds = stats[0].frame_kinds
    assert len(kinds) == 30
    assert [t for t, k in enumerate(kinds) if k == "P"] == list(short_1080p.no_face_frames)


def _ffmpeg_children() -> list:
    return [p for p in psutil.Process().children(recursive=True) if "ffmpeg" in p.name()]


def _fail_in(where: str, monkeypatch, pipe):
    def boom(*_args, **_kwargs):
        raise ValueError(f"boom in {where}")

    if where == "decode":
        real = decode_module.read_pictures  # every decoder of the pipeline reads through it

        def frames(*args):
            it = real(*args)
            yield next(it)
            yield next(it)
            boom()

        monkeypatch.setattr(decode_module, "read_pictures", frames)
    elif where == "detect":
        monkeypatch.setattr(pipe.models.analyzer, "detect_all", boom)  # what detect_range calls
    elif where == "generate":
        monkeypatch.setattr(pipe.models.generator, "launch", boom)
    elif where == "mask":
        monkeypatch.setattr(pipe.models.blender, "material", boom)
    elif where == "encode":
        calls = []
        real_write = SegmentWriter.write

        def write(self, frame):
            calls.append(1)
            if len(calls) == 3:
                boom()
            real_write(self, frame)

        monkeypatch.setattr(SegmentWriter, "write", write)


@pytest.mark.parametrize("where", ["decode", "detect", "mask", "generate", "encode"])
def test_an_error_in_any_thread_reaches_the_caller_and_cleans_up(
    pipe, demo_media, tmp_path, monkeypatch, where
):
    info, samples, plan = plan_job(demo_media.video, _audio(tmp_path / "a.wav", 1.0), shard_frames=25)
    _fail_in(where, monkeypatch, pipe)
    out = tmp_path / "out.mkv"
    with pytest.raises(ValueError, match=f"boom in {where}") as caught:
        entries, features, _ = pipe.prepare_job(info, samples, plan, chunk=16)
        pipe.render_shard(
            video=info,
            plan=plan,
            shard=plan.shards[0],
            out_path=out,
            encode=LOSSLESS,
            entries=entries.__getitem__,
            audio=features,
        )
    frames = traceback.extract_tb(caught.value.__traceback__)
    assert frames[-1].name == "boom", "the original traceback is kept"
    prefixes = (plan.shards[0].name, "detect-", "prepare-")
    assert not [t for t in threading.enumerate() if t.name.startswith(prefixes)]
    assert not _ffmpeg_children() and not out.exists()


def _frames_alive_at(monkeypatch, model, method: str) -> tuple[list, list[int]]:
    """Track every decoded frame (weak references) and count those still alive at each call of
    ``model.method``: (the references, the counts)."""
    decoded, alive = [], []
    real_bgr, real_call = decode_module.Picture.bgr, getattr(model, method)

    def bgr(picture):  # every decoded frame the pipeline converts
        frame = real_bgr(picture)
        decoded.append(weakref.ref(frame))
        return frame

    def call(*args):
        alive.append(sum(ref() is not None for ref in decoded))
        return real_call(*args)

    monkeypatch.setattr(decode_module.Picture, "bgr", bgr)
    monkeypatch.setattr(model, method, call)
    return decoded, alive


def test_preparation_lets_each_frame_go_once_it_is_cropped(pipe, demo_media, monkeypatch):
    """A prepare unit keeps only the small crops of the frames waiting for their batch: the decoded frames
    alive while a batch is encoded are the decode queue's, however large the batch."""
    from musetalk.boxes import boxes_from_detections
    from musetalk.stages import PipelineTuning

    info, _, plan = plan_job(demo_media.video, demo_media.audio, shard_frames=25)
    found, _ = pipe.detect_range(info, 0, 24)
    boxes = boxes_from_detections(
        found, range(0, 20), (info.height, info.width), pipe.cfg.face, plan.source_frames
    )
    assert sum(b is not None for b in boxes.values()) >= 2 * pipe.cfg.batch_size  # full batches
    shallow = FramePipeline(pipe.cfg, models=pipe.models, tuning=PipelineTuning(decode_depth=1))
    decoded, alive_at_encode = _frames_alive_at(monkeypatch, pipe.models.generator, "encode")
    entries, _ = shallow.prepare_range(info, 0, 20, boxes)
    assert [e.src for e in entries] == list(range(20)) and len(decoded) == 20
    # one frame in the depth-1 queue and one the decode thread holds: never a batch of 4
    assert alive_at_encode and max(alive_at_encode) <= 2, alive_at_encode


def test_generation_holds_no_frame_while_its_batch_fills(pipe, demo_media, tmp_path, monkeypatch):
    """Generation reads entries, not frames: while the UNet runs a batch of 8, the decoded frames alive are
    the few in the shallow queues and the one being composited, not the 8 the batch shows."""
    from musetalk.stages import PipelineTuning

    info, samples, plan = plan_job(demo_media.video, _audio(tmp_path / "a.wav", 1.6), shard_frames=40)
    entries, features, _ = pipe.prepare_job(info, samples, plan, chunk=16)
    shallow = FramePipeline(
        replace(pipe.cfg, batch_size=8),
        models=pipe.models,
        tuning=PipelineTuning(decode_depth=1, encode_depth=1),
    )
    _, alive_at_generate = _frames_alive_at(monkeypatch, pipe.models.generator, "launch")
    stats = shallow.render_shard(
        video=info,
        plan=plan,
        shard=plan.shards[0],
        out_path=tmp_path / "out.mkv",
        encode=LOSSLESS,
        entries=entries.__getitem__,
        audio=features,
    )
    assert stats.frames == 40 and stats.face_frames >= 16  # at least two full batches
    # decode queue + decode thread + the frame being composited + finished queue + encoder
    assert len(alive_at_generate) >= 2 and max(alive_at_generate) <= 5, alive_at_generate


def test_tuning_rejects_bad_values():
    from musetalk.stages import PipelineTuning

    with pytest.raises(ValueError, match="composite"):
        PipelineTuning(composite="gpu")
    with pytest.raises(ValueError, match="decode_depth"):
        replace(PipelineTuning(), decode_depth=0)


def test_busy_seconds_count_side_by_side_units_of_a_worker_once():
    def unit(worker, start, wall):
        return PrepStats(unit="u", worker=worker, started=start, wall_seconds=wall)

    a = [unit("a", 100.0, 10.0), unit("a", 105.0, 10.0), unit("a", 130.0, 5.0)]  # 15 s + 5 s
    b = [
        ShardStats(
            shard=0, frames=1, face_frames=1, decoded_frames=1, worker="b", started=100.0, wall_seconds=4.0
        )
    ]
    assert busy_seconds(a) == pytest.approx(20.0)
    assert busy_seconds([*a, *b]) == pytest.approx(24.0)  # workers add up
    assert busy_seconds([unit("a", 0.0, 10.0), unit("a", 2.0, 3.0)]) == pytest.approx(10.0)  # nested
    assert busy_seconds([]) == 0.0
