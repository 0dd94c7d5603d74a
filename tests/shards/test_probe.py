"""shards.probe against real files: exact rates, audio, and one-line errors for bad inputs."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from shards.decode import count_frames, read_frames
from shards.errors import InputError
from shards.probe import audio_duration, load_audio, probe_audio, probe_video
from tests.shards.media_clips import same_frames


@pytest.mark.parametrize("name", ["ntsc", "ntsc_mkv"])
def test_2997_probes_to_an_exact_fraction(clips, name):
    info = probe_video(clips[name])
    assert info.fps == Fraction(30000, 1001) and isinstance(info.fps, Fraction)
    assert not info.vfr  # Matroska's 1 ms timestamps are rounded, not variable
    assert info.frame_count == count_frames(clips[name]) == 45
    assert info.duration == pytest.approx(45 * 1001 / 30000)
    full = list(read_frames(info, 0, info.frame_count))
    assert same_frames(list(read_frames(info, 17, 31)), full[17:31])


def test_audio_probe_and_load(clips):
    info = probe_audio(clips["tone"])
    assert (info.sample_rate, info.channels, info.codec) == (22050, 2, "pcm_s16le")
    assert info.duration == pytest.approx(1.3) == audio_duration(clips["tone"])
    samples = load_audio(clips["tone"], 16000)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - 1.3 * 16000) <= 2 and np.abs(samples).max() <= 1.0
    spectrum = np.abs(np.fft.rfft(samples))
    assert np.argmax(spectrum) * 16000 / len(samples) == pytest.approx(440, abs=2)


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("call", "name", "needle"),
    [
        (probe_video, "missing", "video input not found"),
        (probe_video, "text", "video input is not a media file"),
        (probe_video, "tone", "video input has no video stream"),
        (probe_audio, "missing", "audio input not found"),
        (probe_audio, "text", "audio input is not a media file"),
        (probe_audio, "cfr", "audio input has no audio stream"),
        (load_audio, "cfr", "audio input has no audio stream"),
        (count_frames, "tone", "has no video stream"),
    ],
)
def test_bad_inputs_raise_one_line_input_errors(clips, tmp_path, call, name, needle):
    path = tmp_path / "nowhere.mp4" if name == "missing" else clips[name]
    with pytest.raises(InputError) as err:
        call(path)
    message = str(err.value)
    assert needle in message and str(path) in message and "\n" not in message


def test_probe_is_cached_per_file_version(tmp_path, demo_media):
    """A second probe of an unchanged file is the same object (no second decode); a rewritten file is probed anew."""
    import shutil

    clip = tmp_path / "clip.mp4"
    shutil.copy(demo_media.video, clip)
    first = probe_video(clip)
    assert probe_video(clip) is first
    shutil.copy(demo_media.video, tmp_path / "other.mp4")
    (tmp_path / "other.mp4").replace(clip)  # same contents, a new file at the same path
    again = probe_video(clip)
    assert again is not first and again == first
