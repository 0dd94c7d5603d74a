"""The ``scripts.make_demo_media`` command line builds the demo into ``--out``."""

from __future__ import annotations

from scripts.make_demo_media import main
from shards.probe import probe_video


def test_cli_builds_into_out(tmp_path):
    main(["--out", str(tmp_path / "media")])
    assert probe_video(tmp_path / "media" / "demo.mp4").frame_count == 100
