"""One job's lip-sync scores and its quality gate (the driver's side of :mod:`musetalk.syncscore`).

Scores are computed on the rendered frames before H.264 encoding, where the frames are: each worker
crops its shard's frames at 25 fps instants as it composites them and embeds the lip windows that lie
inside the shard; windows across a shard edge are embedded here from the edge crops the shards return,
the audio windows from the job's samples. So the job's scores do not depend on how it was sharded (on one
device type, dtype and thread count, as the pixels). Each shard's sync data is kept beside its segment in
the run directory (:meth:`cluster.rundir.RunDir.put_side`): a resumed render scores every frame.

The crops read the raw detector boxes of the samples' source frames and 6 samples either side (the
reference's 13-frame median filter): the preparation plan detects those frames too (``also_detect``),
and releases a shard only once they are in.

With random weights (the tiny test models) the scores are meaningless: only their plumbing is tested.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from cluster.config import QaConfig
from cluster.rundir import RunDir
from musetalk.config import PipelineConfig
from musetalk.faces import FrameFaces, as_faces
from musetalk.syncscore import FPS, ShardSync, ShardSyncPlan, SyncPlan, audio_windows, job_scores
from musetalk.tracks import Tracks, chosen
from shards.plan import Plan, Shard

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncResult:
    """What a job's summary reports of its lip sync and its gate (None: not scored)."""

    sync_confidence: float | None = None
    sync_distance: float | None = None
    sync_offset: int | None = None
    sync_windows: int = 0
    sync_confidence_per_second: list[float | None] = field(default_factory=list)
    sync_distance_per_second: list[float | None] = field(default_factory=list)
    sync_offset_per_second: list[int | None] = field(default_factory=list)
    face_share: float = 0.0
    flagged: bool = False
    flags: list[str] = field(default_factory=list)


def gate(result: SyncResult, qa: QaConfig) -> SyncResult:
    """``result`` with its flags: every threshold of ``qa`` it misses, as a reason. A job that could not
    be scored (no 5 consecutive face frames) is judged on its face share only."""
    reasons = []
    if result.sync_confidence is not None and result.sync_confidence < qa.min_sync_confidence:
        reasons.append(f"sync confidence {result.sync_confidence:.2f} < {qa.min_sync_confidence}")
    if result.sync_offset is not None and abs(result.sync_offset) > qa.max_offset_frames:
        reasons.append(f"audio-video offset {result.sync_offset} frames, |offset| > {qa.max_offset_frames}")
    if result.face_share < qa.min_face_share:
        reasons.append(f"face share {result.face_share:.2f} < {qa.min_face_share}")
    return SyncResult(**{**result.__dict__, "flagged": bool(reasons), "flags": reasons})


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


class JobSync:
    """A job's lip-sync scoring: the 25 fps sampling, which shards wait for detections, their crops'
    plans, and the scores at the end."""

    def __init__(self, plan: Plan, pipeline: PipelineConfig, samples) -> None:
        self.plan = plan
        self.pipeline = pipeline
        self.samples = samples
        self.sync = SyncPlan(plan.output_frames, plan.fps, len(samples))

    def source_frames(self, shard: Shard) -> list[int]:
        """Source frames whose raw detections the crops of ``shard`` read (the preparation plan detects
        them and releases the shard once they are in: ``PrepPlan(also_detect=...)``)."""
        return sorted(
            {self.plan.source_index(self.sync.frames[k]) for k in self.sync.context(shard.start, shard.end)}
        )

    def shard_plan(
        self, shard: Shard, detections: dict[int, FrameFaces], width: int, tracks: Tracks | None = None
    ) -> ShardSyncPlan:
        """What the shard's worker crops (its detections are all in: see :meth:`source_frames`): the raw
        box of the face the frame's choice picks (``Plan.face_choice``; ``tracks``: the video's, when it
        names a track). A frame that passes through (a dub outside its ranges) is not scored: its lips
        were never meant to follow the new audio."""
        boxes = {}
        for k in self.sync.context(shard.start, shard.end):
            src = self.plan.source_index(self.sync.frames[k])
            face = self.plan.face_choice(src)
            if face is None:
                boxes[k] = None
                continue
            faces = as_faces(detections[src]).faces
            i = chosen(face, src, [d.box for d in faces], width, tracks)
            boxes[k] = None if i is None else tuple(float(v) for v in faces[i].box)
        return self.sync.shard(shard.start, shard.end, boxes)

    def result(self, run: RunDir, face_frames: int) -> SyncResult:
        """The job's scores from every shard's sync data in ``run`` and the driver's own embeddings (edge
        windows, audio), with the scorer loaded here on the CPU."""
        from cluster.weights import local_models
        from musetalk.layout import ModelLayout
        from musetalk.syncnet import load_syncnet

        cfg = local_models(self.pipeline)
        scorer = load_syncnet(ModelLayout.at(cfg.models_dir, cfg.tiny), "cpu")
        shards = [ShardSync.from_bytes(run.side(s.name).read_bytes()) for s in self.plan.shards]
        audio = scorer.audio(audio_windows(self.samples, self.sync.n_windows))
        scores = job_scores(self.sync, shards, scorer.lips, audio)
        share = face_frames / max(1, self.plan.chosen_frames)
        job = scores.job
        logger.info(
            "lip sync: %s over %d windows (%d s at %d fps)",
            "not scored"
            if job is None
            else f"confidence {job.confidence:.2f}, distance {job.distance:.2f}, offset {job.offset}",
            0 if job is None else job.windows,
            math.ceil(len(self.sync.frames) / FPS),
            FPS,
        )
        sec = scores.seconds
        return SyncResult(
            sync_confidence=None if job is None else _r(job.confidence),
            sync_distance=None if job is None else _r(job.distance),
            sync_offset=None if job is None else job.offset,
            sync_windows=0 if job is None else job.windows,
            sync_confidence_per_second=[None if s is None else _r(s.confidence) for s in sec],
            sync_distance_per_second=[None if s is None else _r(s.distance) for s in sec],
            sync_offset_per_second=[None if s is None else s.offset for s in sec],
            face_share=round(share, 4),
        )
