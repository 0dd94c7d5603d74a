"""A sweep's footing, without Ray: which footing a run's metrics show, and what each setting does to a job."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cluster.sweep import footing, on_footing, stage_columns
from shards.errors import ConfigError
from tests.helpers import job_for


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({"detections": 0, "vae_encodes": 0, "parsings": 0, "cache_hits": 40}, "cache"),
        ({"detections": 40, "vae_encodes": 40, "parsings": 40, "cache_hits": 0}, "paid"),
        ({"detections": 0, "vae_encodes": 8, "parsings": 8, "cache_hits": 32}, "mixed"),
    ],
)
def test_footing_is_read_from_what_a_run_did(metrics, expected):
    assert footing(metrics) == expected


def _job(tmp_path):
    return job_for(tmp_path / "models", tmp_path / "v.mp4", tmp_path / "a.wav", tmp_path / "o.mp4")


def test_paid_runs_without_the_avatar_cache(tmp_path):
    job = _job(tmp_path)
    paid, warmup = on_footing(replace(job, sweep=replace(job.sweep, prep="paid")))
    assert not paid.cache.enabled and warmup == {}
    assert replace(paid, cache=job.cache) == replace(job, sweep=paid.sweep)


def test_cache_footing_needs_the_cache(tmp_path):
    job = _job(tmp_path)
    with pytest.raises(ConfigError, match="sweep.prep=paid"):
        on_footing(replace(job, cache=replace(job.cache, enabled=False)))


def test_only_pipeline_stages_are_stacked():
    rows = [{"prep_s": 1.0, "gen_s": 2.0, "warmup_s": 3.0, "load_s": 4.0, "detect_s": 0.5, "generate_s": 1.5}]
    assert stage_columns(rows) == ["detect_s", "generate_s"]
