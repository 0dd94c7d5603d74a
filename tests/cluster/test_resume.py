"""Zero data loss through the CLI: Ctrl-C keeps finished shards and a re-run resumes to the same output;
two renders of one output never mix. Workers block at a known point (MUSETALK_HOLD_DIR) so every step
waits on a real event, never on a sleep."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from cluster.faults import HOLD_ENV
from tests.helpers import (
    assert_same_frames,
    cli,
    cli_tmp,
    error_lines,
    held,
    processes_under,
    scratch_under,
    wait_for,
)


def _args(tiny_models, demo_media, audio, out: Path) -> list[str]:
    """The CLI twin of tests.helpers.job_for (the reference render's settings), 5 shards of 10 frames."""
    return [
        "+task=test",
        "models=tiny",
        f"models.dir={tiny_models}",
        f"task.video={demo_media.video}",
        f"task.audio={audio}",
        f"task.output={out}",
        f"hydra.run.dir={out.parent}/hydra",
        "task.make_demo=false",
        "output.lossless=true",
        "render.batch_size=4",
        "render.threads=1",
        "face.crop=box",
        "shards.length=10",
        "cluster.num_cpus=2",
        "cluster.workers=1",
    ]


def _manifest_shards(out: Path) -> list[str]:
    """The shards whose segments the output's kept segments list (named by content, each with its stats)."""
    try:
        manifest = json.loads((out.parent / f".{out.name}.run" / "manifest.json").read_text())
    except (OSError, ValueError):
        return []
    return sorted(f"shard_{e['stats']['shard']:05d}" for e in manifest["segments"].values())


def _gone(tmp: Path) -> bool:
    return not processes_under(tmp)


def test_sigint_keeps_finished_shards_and_rerun_resumes_identically(
    tiny_models, demo_media, short_audio, reference_frames, tmp_path
):
    out = tmp_path / "resumed.mp4"
    hold = tmp_path / "hold"
    hold.mkdir()
    tmp = cli_tmp()
    proc, stderr = _interrupt_at_third_shard(_args(tiny_models, demo_media, short_audio, out), out, hold, tmp)

    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    (line,) = error_lines(stderr)
    assert "interrupted; 2 of 5 shards are kept in" in line and "run the same command again to resume" in line
    assert not out.exists()
    assert len(list((tmp_path / ".resumed.mp4.run" / "segments").glob("*.mkv"))) == 2
    wait_for(lambda: _gone(tmp))  # no orphan Ray or worker processes
    assert scratch_under(tmp) == []

    again = cli(*_args(tiny_models, demo_media, short_audio, out), tmp=cli_tmp())
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["reused_shards"] == 2 and summary["rendered_shards"] == 3 and summary["frames"] == 50
    # the lock is gone; the segments stay for a later render (a revision renders only what changed)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".resumed.mp4.run"]
    assert_same_frames(reference_frames, out)
    same = cli(*_args(tiny_models, demo_media, short_audio, out), tmp=cli_tmp())  # nothing changed
    assert same.returncode == 0, same.stderr[-3000:]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["reused_shards"] == 5 and summary["rendered_shards"] == 0
    assert_same_frames(reference_frames, out)


def test_two_renders_of_one_output_never_mix(
    tiny_models, demo_media, short_audio, reference_frames, tmp_path
):
    out = tmp_path / "shared.mp4"
    hold = tmp_path / "hold"
    hold.mkdir()
    first_tmp = cli_tmp()
    first = cli(
        *_args(tiny_models, demo_media, short_audio, out),
        tmp=first_tmp,
        env={HOLD_ENV: str(hold)},
        wait=False,
    )
    wait_for(lambda: held(hold))  # the first render is mid-job, holding the output's lock

    second_tmp = cli_tmp()
    second = cli(*_args(tiny_models, demo_media, short_audio, out), tmp=second_tmp)
    assert second.returncode == 2, second.stderr[-3000:]
    (line,) = error_lines(second.stderr)
    assert f"another render is writing {out} (process {first.pid})" in line
    assert scratch_under(second_tmp) == [] and _gone(second_tmp)

    (hold / "release-all").touch()
    _, stderr = first.communicate(timeout=1800)
    assert first.returncode == 0, stderr[-3000:]
    assert_same_frames(reference_frames, out)
    wait_for(lambda: _gone(first_tmp))
    assert scratch_under(first_tmp) == []


def _interrupt_at_third_shard(args: list[str], out: Path, hold: Path, tmp: Path, kept: int = 0):
    """Run until shards 0 and 1 are listed (besides the ``kept`` segments of shards 0 and 1 an earlier
    render left) and the worker blocks inside the third (and the fourth beside it, with
    cluster.max_in_flight=2): a known point mid-job; then Ctrl-C. Returns (process, stderr)."""
    for name in ("shard_00000", "shard_00001"):
        (hold / f"release-{name}").touch()
    proc = cli(*args, tmp=tmp, env={HOLD_ENV: str(hold)}, wait=False)
    wait_for(
        lambda: (
            _manifest_shards(out) == sorted(["shard_00000", "shard_00001"] * (1 + kept // 2))
            and "shard_00002" in {name for name, _ in held(hold)}
        )
    )
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=600)
    return proc, stderr


def _interrupted_manifest(args: list[str], out: Path, hold: Path, kept: int = 0) -> dict:
    """The run directory's manifest after an interrupt at the third shard (processes gone, hold reset)."""
    tmp = cli_tmp()
    proc, stderr = _interrupt_at_third_shard(args, out, hold, tmp, kept)
    assert proc.returncode == 130, stderr[-3000:]
    wait_for(lambda: _gone(tmp))
    for f in hold.iterdir():
        f.unlink()
    return json.loads((out.parent / f".{out.name}.run" / "manifest.json").read_text())


def test_resume_reuses_segments_only_of_the_same_compute_identity(
    tiny_models, demo_media, short_audio, tmp_path
):
    """``render.threads=null`` pins each worker's threads to ``cluster.cpus_per_worker``: a render resumed
    with another value computes with another thread count (other rounding), so it starts over; resumed
    with the same identity, it reuses the segments."""
    out = tmp_path / "identity.mp4"
    hold = tmp_path / "hold"
    hold.mkdir()
    base = [
        a for a in _args(tiny_models, demo_media, short_audio, out) if not a.startswith("render.threads=")
    ]

    one = _interrupted_manifest([*base, "render.threads=null", "cluster.cpus_per_worker=1"], out, hold)
    assert one["compute"].split("|")[3] == "1"

    two = _interrupted_manifest(
        [*base, "render.threads=null", "cluster.cpus_per_worker=2"], out, hold, kept=2
    )
    assert two["compute"].split("|")[3] == "2"
    # shards 0 and 1 rendered again, not reused: each is kept twice now, once per identity
    assert len(one["segments"]) == 2 and len(two["segments"]) == 4
    assert sorted(f"shard_{e['stats']['shard']:05d}" for e in two["segments"].values()) == [
        "shard_00000",
        "shard_00000",
        "shard_00001",
        "shard_00001",
    ]

    again = cli(*base, "render.threads=null", "cluster.cpus_per_worker=2", tmp=cli_tmp())
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["reused_shards"] == 2 and summary["frames"] == 50
