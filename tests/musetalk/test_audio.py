"""Audio windows (hand-computed indices, shard invariance), Whisper loading and encoding."""

from __future__ import annotations

import math
import shutil
from fractions import Fraction
from itertools import pairwise

import numpy as np
import pytest
import torch

from musetalk.audio import (
    STEPS_PER_SEGMENT,
    AudioSpan,
    audio_span,
    frame_windows,
    load_whisper,
    output_frame_count,
    padding_steps,
    positional_encoding,
)
from musetalk.layout import ModelLayout
from musetalk.testing.tiny_audio import write_tiny_whisper
from shards.errors import WeightsError

NTSC = Fraction(30000, 1001)
LAYERS, WIDTH = 5, 384
SECONDS_35 = 35 * 16000  # 560000 samples: segment 0 is full, segment 1 holds 5 s


def coded_features(segments: int, width: int = WIDTH) -> torch.Tensor:
    """(1500 * segments, 5, width) untrimmed features whose value is (step + 1) * 8 + layer."""
    steps = torch.arange(segments * STEPS_PER_SEGMENT, dtype=torch.float32)
    code = (steps[:, None] + 1) * 8 + torch.arange(LAYERS, dtype=torch.float32)[None, :]
    return code[:, :, None].expand(-1, -1, width).clone()


def read_steps(window: torch.Tensor) -> list[int | None]:
    """Decode a (50, D) window of coded features into the absolute step of each of its 10 rows."""
    rows = window.reshape(10, LAYERS, -1)
    out: list[int | None] = []
    for row in rows:
        if not row.any():
            out.append(None)
            continue
        assert torch.all(row == row[:, :1]), "every channel of a token carries the same code"
        code = row[:, 0].long()
        step = int(code[0]) // 8 - 1
        assert code.tolist() == [(step + 1) * 8 + layer for layer in range(LAYERS)], (
            "token = step * 5 + layer"
        )
        out.append(step)
    return out


def reference_windows(features: torch.Tensor, total_steps: int, fps: Fraction, frames: int) -> torch.Tensor:
    """Upstream's recipe (trim, zero-pad 2p / 6p, slice 10 steps) with exact fps; short slices zero-filled."""
    p = math.ceil(50 / fps)
    trimmed = features[:total_steps]
    padded = torch.cat(
        [torch.zeros(2 * p, *features.shape[1:]), trimmed, torch.zeros(6 * p, *features.shape[1:])]
    )
    out = torch.zeros(frames, 10, *features.shape[1:])
    for f in range(frames):
        idx = math.floor(f * 50 / fps)
        clip = padded[idx : idx + 10]
        out[f, : clip.shape[0]] = clip
    return out.reshape(frames, 10 * features.shape[1], features.shape[2])


# --- window indices, computed by hand -------------------------------------------------------------


def test_windows_at_25_fps_hand_computed():
    # 35 s at 25 fps: T = 875 frames, 1750 real steps, p = ceil(50 / 25) = 2 -> 4 zero steps before, 12 after.
    # Padded step j is absolute step j - 4; frame f reads padded [2f, 2f + 10) = absolute [2f - 4, 2f + 6).
    feats = coded_features(2)  # 3000 rows: rows 1750.. exist but are trimmed audio
    frames = [0, 1, 749, 752, 760, 874]
    win = frame_windows(feats, 0, 1750, Fraction(25), frames)
    assert win.shape == (6, 50, WIDTH) and win.dtype == torch.float32
    none4 = [None] * 4
    # frame 0: padded idx 0 -> 4 left-padding zeros, then steps 0..5
    assert read_steps(win[0]) == none4 + [0, 1, 2, 3, 4, 5]
    # frame 1: padded idx 2 -> 2 zeros, then steps 0..7
    assert read_steps(win[1]) == [None, None] + list(range(0, 8))
    # frame 749: padded idx 1498 -> steps 1494..1503, across the 30 s boundary (step 1500 = segment 1's row 0)
    assert read_steps(win[2]) == list(range(1494, 1504))
    # frame 752: padded idx 1504 -> steps 1500..1509, segment 1 only
    assert read_steps(win[3]) == list(range(1500, 1510))
    # frame 760: padded idx 1520 -> steps 1516..1525
    assert read_steps(win[4]) == list(range(1516, 1526))
    # frame 874 (last): padded idx 1748 -> steps 1744..1749, then 4 zeros: steps >= 1750 are trimmed
    assert read_steps(win[5]) == list(range(1744, 1750)) + none4


def test_windows_at_ntsc_fps_hand_computed():
    # 35 s at 30000/1001 fps: T = floor(35 * 30000 / 1001) = floor(1048.95) = 1048; p = ceil(1.668) = 2.
    # idx = floor(f * 50 * 1001 / 30000) = floor(f * 1.668333...). (Upstream's int(29.97) = 29 would give
    # floor(900 * 50 / 29) = 1551 for frame 900 instead of 1501: 30 steps = 0.6 s of drift after 30 s.)
    assert output_frame_count(SECONDS_35, NTSC) == 1048
    feats = coded_features(2)
    frames = [0, 3, 899, 900, 1047]
    win = frame_windows(feats, 0, 1750, NTSC, frames)
    assert win.shape == (5, 50, WIDTH)
    # frame 0: idx 0 -> 4 zeros, steps 0..5
    assert read_steps(win[0]) == [None] * 4 + list(range(0, 6))
    # frame 3: idx floor(5.005) = 5 -> steps 1..10
    assert read_steps(win[1]) == list(range(1, 11))
    # frame 899: idx floor(1499.83) = 1499 -> steps 1495..1504 (crosses the 30 s boundary)
    assert read_steps(win[2]) == list(range(1495, 1505))
    # frame 900: idx floor(1501.5) = 1501 -> steps 1497..1506
    assert read_steps(win[3]) == list(range(1497, 1507))
    # frame 1047 (last): idx floor(1746.75) = 1746 -> steps 1742..1749, then 2 trimmed zeros
    assert read_steps(win[4]) == list(range(1742, 1750)) + [None, None]


def test_window_past_the_padded_end_reads_zeros():
    # 1 s at 60 fps: 50 steps, p = ceil(50 / 60) = 1, padded length 2 + 50 + 6 = 58. Frame 59 (last):
    # idx floor(59 * 50 / 60) = 49 -> padded [49, 59): one past the padded end; absolute steps 47..56.
    assert padding_steps(Fraction(60)) == 1 and output_frame_count(16000, Fraction(60)) == 60
    win = frame_windows(coded_features(1), 0, 50, Fraction(60), [59])
    assert read_steps(win[0]) == [47, 48, 49] + [None] * 7


def test_windows_match_upstream_recipe_on_random_features():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(3 * STEPS_PER_SEGMENT, LAYERS, 16, generator=gen)
    for fps in (
        Fraction(25),
        NTSC,
        Fraction(24000, 1001),
        Fraction(24),
        Fraction(50),
        Fraction(60),
        Fraction(12),
    ):
        for samples in (SECONDS_35, 75 * 16000 + 123, 16000 * 2 + 7):
            total_steps = samples * 50 // 16000
            frames = output_frame_count(samples, fps)
            got = frame_windows(feats, 0, total_steps, fps, range(frames))
            assert torch.equal(got, reference_windows(feats, total_steps, fps, frames)), (fps, samples)


def test_frame_windows_refuses_uncovered_steps():
    seg0, seg1 = coded_features(2)[:STEPS_PER_SEGMENT], coded_features(2)[STEPS_PER_SEGMENT:]
    with pytest.raises(ValueError, match="needed"):
        frame_windows(seg1, STEPS_PER_SEGMENT, 1750, Fraction(25), [749])  # needs steps 1494..1499
    with pytest.raises(ValueError, match="needed"):
        frame_windows(seg0, 0, 1750, Fraction(25), [760])  # needs steps 1516..1525
    # padding-only windows need no features at all
    empty = torch.zeros(0, LAYERS, WIDTH)
    assert not frame_windows(empty, 0, 0, Fraction(25), [0, 1]).any()
    assert frame_windows(seg0, 0, 1750, Fraction(25), []).shape == (0, 50, WIDTH)


# --- exact frame counts and spans -------------------------------------------------------------------


def test_output_frame_count_is_exact():
    assert output_frame_count(10 * 16000, NTSC) == 299  # floor(299.7)
    assert output_frame_count(10 * 44100, NTSC, sample_rate=44100) == 299
    assert output_frame_count(16000 * 1001, NTSC) == 30000
    # floor(166670504 / 16000 * 30000 / 1001) = 312195 exactly; float maths gives 312194.99999999994
    assert output_frame_count(166670504, NTSC) == 312195
    assert output_frame_count(0, Fraction(25)) == 0
    assert audio_span(160001, Fraction(25), 0, 0).total_steps == 500  # floor(500.003)
    assert audio_span(319, Fraction(50), 0, 0).total_steps == 0


def test_audio_span_hand_computed():
    fps = Fraction(25)
    assert audio_span(SECONDS_35, fps, 0, 700) == AudioSpan(0, 1, 0, 480000, 0, 1750)
    # frame 749 reads steps 1494..1503: both segments
    assert audio_span(SECONDS_35, fps, 700, 760) == AudioSpan(0, 2, 0, 560000, 0, 1750)
    # frame 752 is the first whose window (1500..1509) lies in segment 1 only
    assert audio_span(SECONDS_35, fps, 748, 752).first_segment == 0
    assert audio_span(SECONDS_35, fps, 752, 875) == AudioSpan(1, 2, 480000, 560000, 1500, 1750)
    assert audio_span(SECONDS_35, fps, 10, 10).num_segments == 0
    for start, end in ((-1, 5), (5, 4), (0, 876)):
        with pytest.raises(ValueError, match="outside"):
            audio_span(SECONDS_35, fps, start, end)


def test_shard_windows_equal_whole_windows_on_synthetic_features():
    gen = torch.Generator().manual_seed(1)
    samples = 75 * 16000 + 4321  # 3 segments, the last one short
    feats = torch.randn(3 * STEPS_PER_SEGMENT, LAYERS, 8, generator=gen)
    for fps in (Fraction(25), NTSC, Fraction(24000, 1001), Fraction(60), Fraction(15)):
        total = output_frame_count(samples, fps)
        whole_span = audio_span(samples, fps, 0, total)
        whole = frame_windows(feats, 0, whole_span.total_steps, fps, range(total))
        boundaries = {int(fps * 30), int(fps * 30) + 1, int(fps * 60) - 1}  # around the 30 s / 60 s cuts
        cuts = sorted({0, total, *(int(total * k / 7) for k in range(1, 7)), *boundaries})
        for a, b in [*pairwise(cuts), (int(fps * 29), int(fps * 31)), (int(fps * 60) - 2, total)]:
            span = audio_span(samples, fps, a, b)
            rows = feats[span.first_step : span.end_segment * STEPS_PER_SEGMENT]
            part = frame_windows(rows, span.first_step, span.total_steps, fps, range(a, b))
            assert torch.equal(part, whole[a:b]), (fps, a, b)
            assert span.sample_start == span.first_segment * 480000
            assert span.sample_end == min(span.end_segment * 480000, samples)
            # minimal: dropping the first or last segment must make the windows unreachable
            if span.num_segments:
                with pytest.raises(ValueError):
                    frame_windows(
                        rows[STEPS_PER_SEGMENT:], span.first_step + 1500, span.total_steps, fps, range(a, b)
                    )
                with pytest.raises(ValueError):
                    frame_windows(
                        rows[:-STEPS_PER_SEGMENT], span.first_step, span.total_steps, fps, range(a, b)
                    )


# --- positional encoding ----------------------------------------------------------------------------


def test_positional_encoding_values():
    x = torch.zeros(2, 50, WIDTH)
    pe = positional_encoding(x)
    assert pe.shape == (2, 50, WIDTH) and torch.equal(pe[0], pe[1])
    assert torch.all(pe[0, 0, 0::2] == 0) and torch.all(pe[0, 0, 1::2] == 1)  # sin 0, cos 0
    freq = lambda i: 10000 ** (-i / WIDTH)  # noqa: E731  (div for dims i and i + 1, i even)
    assert pe[0, 1, 0].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    assert pe[0, 1, 1].item() == pytest.approx(math.cos(1.0), abs=1e-6)
    assert pe[0, 7, 2].item() == pytest.approx(math.sin(7 * freq(2)), abs=1e-6)
    assert pe[0, 49, 383].item() == pytest.approx(math.cos(49 * freq(382)), abs=1e-6)
    ones = positional_encoding(torch.ones(1, 3, 4, dtype=torch.float64))
    assert ones.dtype == torch.float64 and ones[0, 0].tolist() == [1.0, 2.0, 1.0, 2.0]
    with pytest.raises(ValueError):
        positional_encoding(torch.zeros(1, 3, 5))


# --- tiny Whisper: format, encoding, shard-wise encoding --------------------------------------------


@pytest.fixture(scope="module")
def tiny_layout(tmp_path_factory) -> ModelLayout:
    layout = ModelLayout.at(tmp_path_factory.mktemp("models"), tiny=True)
    write_tiny_whisper(layout, seed=0)
    return layout


@pytest.fixture(scope="module")
def tiny_encoder(tiny_layout):
    return load_whisper(tiny_layout, "cpu", torch.float32)


def speech_like(seconds: float) -> np.ndarray:
    """Deterministic 16 kHz float32 audio: a gliding tone with an amplitude envelope plus seeded noise."""
    t = np.arange(int(seconds * 16000)) / 16000
    tone = np.sin(2 * np.pi * (180 * t + 40 * np.sin(2 * np.pi * 0.3 * t))) * (
        0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    )
    noise = np.random.default_rng(7).standard_normal(t.shape[0])
    return (0.3 * tone + 0.02 * noise).astype(np.float32)


def test_tiny_whisper_layout_and_determinism(tiny_layout, tmp_path):
    names = sorted(p.name for p in tiny_layout.whisper_dir.iterdir())
    assert names == ["config.json", "model.safetensors", "preprocessor_config.json"]
    again = ModelLayout.at(tmp_path, tiny=True)
    write_tiny_whisper(again, seed=0)
    for name in names:
        assert (again.whisper_dir / name).read_bytes() == (tiny_layout.whisper_dir / name).read_bytes(), name


def test_encode_shapes(tiny_encoder):
    one = tiny_encoder.encode(speech_like(12.5))
    assert one.shape == (1500, 5, 384) and one.dtype == torch.float32 and one.device.type == "cpu"
    assert torch.isfinite(one).all() and one.std() > 0
    # layers differ from each other and the audio matters
    assert not torch.equal(one[:, 0], one[:, 4])
    assert not torch.equal(one, tiny_encoder.encode(speech_like(12.5) * 0.5))
    assert tiny_encoder.encode(np.zeros(0, np.float32)).shape == (0, 5, 384)


def test_shard_wise_encoding_is_bit_identical(tiny_encoder):
    audio = speech_like(35.0)  # 2 segments
    whole_feats = tiny_encoder.encode(audio)
    assert whole_feats.shape == (3000, 5, 384)
    for fps, cuts in ((Fraction(25), (0, 700, 760, 875)), (NTSC, (0, 900, 1048))):
        total = output_frame_count(audio.shape[0], fps)
        assert total == cuts[-1]
        whole = frame_windows(
            whole_feats, 0, audio_span(audio.shape[0], fps, 0, total).total_steps, fps, range(total)
        )
        for a, b in pairwise(cuts):
            span = audio_span(audio.shape[0], fps, a, b)
            feats = tiny_encoder.encode(audio[span.sample_start : span.sample_end], span.first_segment)
            assert feats.shape[0] == 1500 * span.num_segments
            part = frame_windows(feats, span.first_step, span.total_steps, fps, range(a, b))
            assert torch.equal(part, whole[a:b]), (fps, a, b)
    # the 25 fps shard [760, 875) encoded segment 1 alone
    assert audio_span(audio.shape[0], Fraction(25), 760, 875).first_segment == 1


def test_missing_whisper_names_path_and_fetch_command(tmp_path):
    layout = ModelLayout.at(tmp_path / "nowhere", tiny=True)
    with pytest.raises(WeightsError, match=r"missing .*whisper.*make_tiny_models --dir") as err:
        load_whisper(layout, "cpu", torch.float32)
    assert str(layout.whisper_dir) in str(err.value)


def test_incomplete_or_broken_whisper_dir(tiny_layout, tmp_path):
    layout = ModelLayout.at(tmp_path, tiny=True)
    shutil.copytree(tiny_layout.whisper_dir, layout.whisper_dir)
    (layout.whisper_dir / "preprocessor_config.json").unlink()
    with pytest.raises(WeightsError, match=r"missing .*preprocessor_config\.json"):
        load_whisper(layout, "cpu", torch.float32)
    shutil.copy(tiny_layout.whisper_dir / "preprocessor_config.json", layout.whisper_dir)
    (layout.whisper_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(
        WeightsError, match=r"malformed .*re-fetch it with `python -m scripts.make_tiny_models"
    ):
        load_whisper(layout, "cpu", torch.float32)
    (layout.whisper_dir / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"missing .*model\.safetensors"):
        load_whisper(layout, "cpu", torch.float32)
