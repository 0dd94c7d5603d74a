"""Whisper audio features and the per-frame audio windows MuseTalk 1.5 conditions on.

The maths follows upstream (DESIGN.md, "Audio"): 16 kHz mono audio is cut into 30 s segments
from t=0, each segment is encoded on its own (batch 1) and gives 1500 steps at 50 Hz of
``num_layers + 1`` stacked hidden states; the steps are concatenated, trimmed to
``floor(seconds * 50)``, zero-padded by ``2p`` steps before and ``6p`` after (``p = ceil(50 / fps)``),
and output frame ``f`` reads the 10 padded steps from ``floor(f * 50 / fps)``.

Here fps is an exact :class:`~fractions.Fraction` and all index maths is integer maths. Because
segments are aligned to absolute multiples of 30 s and never see each other, a shard encodes only
the segments its windows touch (:func:`audio_span`) and gets bit-identical windows; a job's encoded
segments are held in :class:`AudioFeatures`, which cuts each shard's windows out of them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from musetalk.layout import ModelLayout
from shards.plan import output_frame_count as _output_frame_count

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
STEPS_PER_SECOND = 50
SEGMENT_SECONDS = 30
SEGMENT_SAMPLES = SAMPLE_RATE * SEGMENT_SECONDS  # 480000
STEPS_PER_SEGMENT = STEPS_PER_SECOND * SEGMENT_SECONDS  # 1500
SAMPLES_PER_STEP = SAMPLE_RATE // STEPS_PER_SECOND  # 320

WINDOW_STEPS = 10  # 2 * (left padding 2 + right padding 2 + 1)
PAD_LEFT = 2  # upstream audio_padding_length_left
PAD_RIGHT = 2  # upstream audio_padding_length_right
PE_MAX_LEN = 5000


@dataclass(frozen=True)
class AudioSpan:
    """The part of the audio a shard needs: whole 30 s segments ``[first_segment, end_segment)``.

    ``sample_start``/``sample_end`` bound those segments' samples in the whole audio;
    ``first_step`` is the absolute (unpadded) 50 Hz step of the encoded features' row 0 and
    ``total_steps`` the trimmed step count of the whole audio.
    """

    first_segment: int
    end_segment: int
    sample_start: int
    sample_end: int
    first_step: int
    total_steps: int

    @property
    def num_segments(self) -> int:
        return self.end_segment - self.first_segment


def _check_fps(fps: Fraction) -> Fraction:
    fps = Fraction(fps)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return fps


def total_steps_for(total_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """``floor(total_samples / sample_rate * 50)``: the trimmed number of 50 Hz feature steps."""
    return total_samples * STEPS_PER_SECOND // sample_rate


def output_frame_count(total_samples: int, fps: Fraction, sample_rate: int = SAMPLE_RATE) -> int:
    """:func:`shards.plan.output_frame_count` with the sample rate last, defaulting to 16 kHz."""
    return _output_frame_count(total_samples, sample_rate, fps)


def padding_steps(fps: Fraction) -> int:
    """``p = ceil(50 / fps)``; the padded sequence has ``2p`` zero steps before and ``6p`` after."""
    fps = _check_fps(fps)
    return -(-STEPS_PER_SECOND * fps.denominator // fps.numerator)


def window_start(frame: int, fps: Fraction) -> int:
    """``floor(frame * 50 / fps)``: the first padded step of ``frame``'s window."""
    fps = _check_fps(fps)
    return frame * STEPS_PER_SECOND * fps.denominator // fps.numerator


def _needed_steps(frames_start: int, frames_end: int, fps: Fraction, total_steps: int) -> tuple[int, int]:
    """Absolute real steps ``[lo, hi)`` read by frames ``[frames_start, frames_end)`` (windows are monotonic)."""
    if frames_end <= frames_start:
        return 0, 0
    left = PAD_LEFT * padding_steps(fps)
    lo = max(0, window_start(frames_start, fps) - left)
    hi = min(total_steps, window_start(frames_end - 1, fps) - left + WINDOW_STEPS)
    return (lo, hi) if lo < hi else (0, 0)


def audio_span(total_samples: int, fps: Fraction, start: int, end: int) -> AudioSpan:
    """The 30 s segments whose steps the windows of output frames ``[start, end)`` read."""
    frames = output_frame_count(total_samples, fps)
    if not 0 <= start <= end <= frames:
        raise ValueError(
            f"output frames [{start}, {end}) are outside [0, {frames}) for {total_samples} samples at {fps} fps"
        )
    total_steps = total_steps_for(total_samples)
    lo, hi = _needed_steps(start, end, fps, total_steps)
    if lo == hi:
        first = last = 0
    else:
        first = lo // STEPS_PER_SEGMENT
        last = -(-hi // STEPS_PER_SEGMENT)
    return AudioSpan(
        first_segment=first,
        end_segment=last,
        sample_start=first * SEGMENT_SAMPLES,
        sample_end=min(last * SEGMENT_SAMPLES, total_samples),
        first_step=first * STEPS_PER_SEGMENT,
        total_steps=total_steps,
    )


class WhisperAudioEncoder:
    """A loaded Whisper encoder plus its feature extractor; encodes 30 s segments one at a time."""

    def __init__(self, encoder: torch.nn.Module, feature_extractor, device: torch.device, dtype: torch.dtype):
        self.encoder = encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.feature_extractor = feature_extractor
        self.device = torch.device(device)
        self.dtype = dtype
        self.num_states = int(encoder.config.encoder_layers) + 1
        self.width = int(encoder.config.d_model)

    @torch.inference_mode()
    def encode_segment(self, segment: np.ndarray) -> torch.Tensor:
        """(n <= 480000,) float32 16 kHz samples -> (1500, L, D) float32 CPU stacked hidden states."""
        mel = self.feature_extractor(
            segment, sampling_rate=SAMPLE_RATE, return_tensors="pt"
        ).input_features  # (1, 80, 3000), zero-padded to 30 s
        mel = mel.to(device=self.device, dtype=self.dtype)
        states = self.encoder(mel, output_hidden_states=True).hidden_states  # L x (1, 1500, D)
        return torch.stack(states, dim=2)[0].float().cpu()

    def encode(self, samples: np.ndarray, first_segment: int = 0) -> torch.Tensor:
        """(N,) float32 mono 16 kHz samples starting at ``first_segment * 30`` s -> (S, L, D) float32 CPU.

        ``S = 1500 * ceil(N / 480000)``, untrimmed: each 30 s segment is encoded alone at batch 1, so
        segment k gives the same rows whether or not its neighbours are encoded too.
        """
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"expected mono samples of shape (N,), got {samples.shape}")
        count = -(-samples.shape[0] // SEGMENT_SAMPLES)
        if count == 0:
            return torch.zeros(0, self.num_states, self.width)
        log.debug("encoding audio segments [%d, %d)", first_segment, first_segment + count)
        segments = [
            self.encode_segment(samples[i * SEGMENT_SAMPLES : (i + 1) * SEGMENT_SAMPLES])
            for i in range(count)
        ]
        return torch.cat(segments, dim=0)


def load_whisper(layout: ModelLayout, device: torch.device | str, dtype: torch.dtype) -> WhisperAudioEncoder:
    """Load the Whisper encoder and feature extractor from ``layout.whisper_dir`` (local files only)."""
    from safetensors import SafetensorError
    from transformers import WhisperFeatureExtractor, WhisperModel

    what = "Whisper (openai/whisper-tiny)"
    root = layout.require(layout.whisper_dir, f"{what} directory")
    config_path = layout.require(root / "config.json", f"{what} config")
    preprocessor = layout.require(root / "preprocessor_config.json", f"{what} preprocessor config")
    weights = [root / name for name in ("model.safetensors", "pytorch_model.bin")]
    if not any(p.exists() for p in weights):
        layout.require(weights[0], f"{what} weights")

    try:
        model, info = WhisperModel.from_pretrained(
            root, local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
        raise layout.malformed(config_path, what, f"{type(err).__name__}: {err}".splitlines()[0]) from err
    except SafetensorError as err:  # a corrupt or truncated model.safetensors
        raise layout.malformed(root / "model.safetensors", what, str(err).splitlines()[0]) from err
    missing = sorted(k for k in info.get("missing_keys", ()) if k.startswith("encoder."))
    if missing:
        raise layout.malformed(root, what, f"{len(missing)} encoder weights missing (e.g. {missing[0]})")

    try:
        extractor = WhisperFeatureExtractor.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise layout.malformed(preprocessor, f"{what} preprocessor config", str(err).splitlines()[0]) from err
    problems = []
    if extractor.feature_size != model.config.num_mel_bins:
        problems.append(f"feature_size {extractor.feature_size} != num_mel_bins {model.config.num_mel_bins}")
    if extractor.sampling_rate != SAMPLE_RATE:
        problems.append(f"sampling_rate {extractor.sampling_rate} != {SAMPLE_RATE}")
    if extractor.n_samples != SEGMENT_SAMPLES:
        problems.append(f"chunk of {extractor.n_samples} samples != {SEGMENT_SAMPLES}")
    if getattr(extractor, "dither", 0.0) != 0.0:
        problems.append(f"dither {extractor.dither} != 0 (features would be random)")
    if model.config.max_source_positions != STEPS_PER_SEGMENT:
        problems.append(f"max_source_positions {model.config.max_source_positions} != {STEPS_PER_SEGMENT}")
    if problems:
        raise layout.malformed(preprocessor, what, "; ".join(problems))

    encoder = model.get_encoder()
    del model
    return WhisperAudioEncoder(encoder, extractor, torch.device(device), dtype)


def frame_windows(
    features: torch.Tensor, first_step: int, total_steps: int, fps: Fraction, frames: Sequence[int]
) -> torch.Tensor:
    """Per-frame audio windows: (len(frames), 10 * L, D), token = step * L + layer, features' dtype.

    ``features`` is (S, L, D) whose rows are absolute steps ``[first_step, first_step + S)``; steps
    outside ``[0, total_steps)`` (padding, trimmed tail, past the padded end) read zeros. A real step
    that ``features`` does not cover raises ValueError.
    """
    fps = _check_fps(fps)
    if features.ndim != 3:
        raise ValueError(f"features must be (S, L, D), got {tuple(features.shape)}")
    rows, layers, width = features.shape
    frames = [int(f) for f in frames]
    out = features.new_zeros(len(frames), WINDOW_STEPS, layers, width)
    if not frames:
        return out.reshape(0, WINDOW_STEPS * layers, width)
    if min(frames) < 0:
        raise ValueError(f"frame indices must be >= 0, got {min(frames)}")
    left = PAD_LEFT * padding_steps(fps)
    starts = torch.tensor([window_start(f, fps) - left for f in frames], dtype=torch.long)
    steps = starts[:, None] + torch.arange(WINDOW_STEPS)[None, :]  # (T, 10) absolute steps
    real = (steps >= 0) & (steps < total_steps)
    local = steps - first_step
    covered = (local >= 0) & (local < rows)
    uncovered = real & ~covered
    if bool(uncovered.any()):
        bad = steps[uncovered]
        raise ValueError(
            f"audio steps [{int(bad.min())}, {int(bad.max()) + 1}] are needed but the features cover only "
            f"[{first_step}, {first_step + rows}); the audio span does not match the frames"
        )
    out[real] = features[local[real]]
    return out.reshape(len(frames), WINDOW_STEPS * layers, width)


def sinusoidal_table(length: int, width: int) -> torch.Tensor:
    """(length, width) float32 sinusoidal positional encoding: sin on even dims, cos on odd dims."""
    if width % 2:
        raise ValueError(f"positional encoding needs an even width, got {width}")
    if length > PE_MAX_LEN:
        raise ValueError(f"positional encoding covers at most {PE_MAX_LEN} positions, got {length}")
    position = torch.arange(0, length, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, width, 2).float() * (-math.log(10000.0) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)
    return table


def positional_encoding(x: torch.Tensor) -> torch.Tensor:
    """(B, T, D) audio tokens -> x + pe[:T] in x's dtype and device (MuseTalk's PositionalEncoding)."""
    if x.ndim != 3:
        raise ValueError(f"expected (B, T, D) tokens, got {tuple(x.shape)}")
    table = sinusoidal_table(x.shape[1], x.shape[2])
    return x + table.to(device=x.device, dtype=x.dtype)


class AudioFeatures:
    """Whisper features of the 30 s segments of a job's audio that some shards need, each encoded once.

    ``segments``: segment k -> (1500, L, D) float32 CPU rows
    (:meth:`musetalk.pipeline.FramePipeline.encode_audio`).
    """

    def __init__(self, segments: dict[int, torch.Tensor], total_samples: int, fps) -> None:
        self.segments = segments
        self.total_samples = total_samples
        self.fps = fps

    def for_shard(self, start: int, end: int) -> Callable[[list[int]], torch.Tensor]:
        """A function from output frames in ``[start, end)`` to (n, 50, 384) UNet prompts."""
        span = audio_span(self.total_samples, self.fps, start, end)
        parts = [self.segments[k] for k in range(span.first_segment, span.end_segment)]
        features = torch.cat(parts) if parts else torch.zeros(0, 1, 1)

        def windows(ts: list[int]) -> torch.Tensor:
            return positional_encoding(
                frame_windows(features, span.first_step, span.total_steps, self.fps, ts)
            )

        return windows
