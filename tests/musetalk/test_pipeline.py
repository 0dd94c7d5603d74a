"""Tiny-model end-to-end renders of the demo clip through the single-process API."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from musetalk.blending import blend_square
from musetalk.boxes import crop_box, smooth_boxes
from musetalk.config import EnhanceConfig, FaceConfig, PipelineConfig
from musetalk.local import render_local
from musetalk.pipeline import FramePipeline
from shards.plan import output_frame_count, source_index
from shards.probe import load_audio, probe_video
from shards.segment import EncodeSettings
from tests.helpers import decode_all, trimmed_audio

LOSSLESS = EncodeSettings(lossless=True)


def _cfg(models, **face) -> PipelineConfig:
    return PipelineConfig(
        models_dir=str(models), tiny=True, batch_size=4, face=FaceConfig(detector="haar", crop="box", **face)
    )


@pytest.fixture(scope="module")
def box_pipeline(tiny_models):
    return FramePipeline(_cfg(tiny_models))


def test_demo_render_passthrough_and_blend_region(box_pipeline, demo_media, tmp_path):
    out = tmp_path / "out.mp4"
    result = render_local(
        demo_media.video, demo_media.audio, out, box_pipeline.cfg, encode=LOSSLESS, pipeline=box_pipeline
    )
    info = probe_video(demo_media.video)
    samples = load_audio(demo_media.audio)
    expected = output_frame_count(len(samples), 16000, info.fps)
    rendered = decode_all(out)
    assert len(rendered) == expected == result.plan.output_frames
    source = decode_all(demo_media.video)

    # The Haar backend finds the face in every face frame and none in the cut-away.
    cfg = box_pipeline.cfg
    dets = box_pipeline.models.analyzer.detect(source)
    raw = [crop_box(d, source[0].shape[:2], cfg.face) for d in dets]
    boxes = smooth_boxes(raw, cfg.face.smooth_radius)
    face_frames = {i for i, b in enumerate(boxes) if b is not None}
    assert set(demo_media.no_face_frames).isdisjoint(face_frames)
    assert face_frames >= set(demo_media.face_frames)
    assert sum(s.face_frames for s in result.stats) == sum(
        1 for t in range(expected) if source_index(t, len(source)) in face_frames
    )

    h, w = source[0].shape[:2]
    changed = 0
    for t, frame in enumerate(rendered):
        src = source_index(t, len(source))
        if boxes[src] is None:
            assert np.array_equal(frame, source[src]), f"no-face frame {t} must pass through bit-identical"
            continue
        (x1, y1, x2, y2), _ = blend_square(boxes[src], cfg.blend.expand)
        outside = np.ones((h, w), bool)
        outside[max(0, y1) : max(0, y2), max(0, x1) : max(0, x2)] = False
        assert np.array_equal(frame[outside], source[src][outside]), (
            f"frame {t} changed outside its blend square"
        )
        changed += not np.array_equal(frame, source[src])
    assert changed > len(face_frames) // 2, "the face frames must actually be regenerated"


def test_landmark_crop_and_gfpgan(tiny_models, demo_media, tmp_path):
    cfg = _cfg(tiny_models)
    cfg = replace(
        cfg, face=replace(cfg.face, crop="landmarks"), enhance=EnhanceConfig(enabled=True, upscale=2)
    )
    audio = trimmed_audio(demo_media.audio, tmp_path / "short.wav", 0.6)
    out = tmp_path / "landmarks.mp4"
    result = render_local(demo_media.video, audio, out, cfg, encode=LOSSLESS)
    assert len(decode_all(out)) == result.plan.output_frames == 15
    assert sum(s.face_frames for s in result.stats) == 15
    assert all(s.seconds.get("enhance", 0) > 0 for s in result.stats)


def test_sharded_local_render_is_identical(box_pipeline, demo_media, tmp_path):
    audio = trimmed_audio(demo_media.audio, tmp_path / "short.wav", 2.0)
    one = render_local(
        demo_media.video,
        audio,
        tmp_path / "one.mp4",
        box_pipeline.cfg,
        encode=LOSSLESS,
        pipeline=box_pipeline,
    )
    many = render_local(
        demo_media.video,
        audio,
        tmp_path / "many.mp4",
        box_pipeline.cfg,
        encode=LOSSLESS,
        pipeline=box_pipeline,
        shard_frames=13,
    )
    assert len(one.plan.shards) == 1 and len(many.plan.shards) == 4
    a, b = decode_all(one.output), decode_all(many.output)
    assert len(a) == len(b) == 50
    for t, (x, y) in enumerate(zip(a, b, strict=True)):
        assert np.array_equal(x, y), f"frame {t} differs between 1 and 4 shards"


@pytest.mark.parametrize("error", ["oom", "generic"])
def test_parsing_errors_fail_the_unit_only_when_the_device_fails(
    box_pipeline, demo_media, error, monkeypatch
):
    """A device failure (out of memory, a CUDA error) fails the prepare unit, so the pool retries it and
    the job fails with one line; any other parser error falls back to the ellipse per frame."""
    import torch

    info = probe_video(demo_media.video)
    boxes = {src: (60, 50, 180, 200) for src in range(2)}

    def fail(_inputs):
        if error == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        raise RuntimeError("expected input to have 3 channels")

    monkeypatch.setattr(box_pipeline.models.blender.parser, "labels", fail)
    if error == "oom":
        with pytest.raises(torch.OutOfMemoryError):
            box_pipeline.prepare_range(info, 0, 2, boxes)
    else:
        entries, _ = box_pipeline.prepare_range(info, 0, 2, boxes)
        assert [e.parsed for e in entries] == [False, False]


@pytest.mark.parametrize("error", ["oom", "generic"])
def test_enhancement_errors_fail_the_shard_only_when_the_device_fails(
    box_pipeline, tiny_models, demo_media, tmp_path, error, monkeypatch
):
    """A device failure in GFPGAN fails the generation unit (nothing is left at the output path; the pool
    retries the unit, then the job fails with one line); any other GFPGAN error falls back per face."""
    import torch

    from musetalk.enhance import load_gfpgan
    from musetalk.layout import ModelLayout
    from musetalk.stats import ENHANCE_FALLBACK

    enhancer = load_gfpgan(ModelLayout.at(tiny_models, tiny=True), box_pipeline.models.device, upscale=1)
    cfg = replace(box_pipeline.cfg, enhance=EnhanceConfig(enabled=True, upscale=1))
    pipeline = FramePipeline(cfg, models=replace(box_pipeline.models, enhancer=enhancer))

    def fail(_faces):
        if error == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        raise RuntimeError("expected input to have 3 channels")

    monkeypatch.setattr(enhancer, "_run_batch", fail)
    audio = trimmed_audio(demo_media.audio, tmp_path / "short.wav", 0.6)
    out = tmp_path / "enhanced.mp4"
    if error == "oom":
        with pytest.raises(torch.OutOfMemoryError):
            render_local(demo_media.video, audio, out, cfg, encode=LOSSLESS, pipeline=pipeline)
        assert not out.exists()
    else:
        result = render_local(demo_media.video, audio, out, cfg, encode=LOSSLESS, pipeline=pipeline)
        kinds = "".join(s.frame_kinds for s in result.stats)
        assert sum(s.face_frames for s in result.stats) > 0
        assert kinds.count(ENHANCE_FALLBACK) == sum(s.face_frames for s in result.stats)
