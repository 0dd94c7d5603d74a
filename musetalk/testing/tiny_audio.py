"""Random-weight Whisper in the hub's openai/whisper-tiny directory format.

The tiny encoder keeps the real interface (80 mel bins, 1500 positions, width 384 = the UNet's
cross_attention_dim, 4 layers -> 5 hidden states) with a small feed-forward and a one-layer
decoder, so it loads through :func:`musetalk.audio.load_whisper` and runs a 30 s segment fast.
With ``full_size=True`` it is openai/whisper-tiny's exact architecture (FFN 1536, 4 decoder layers,
the 51865-token vocabulary).
"""

from __future__ import annotations

import logging

import torch
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

from musetalk.audio import SAMPLE_RATE, SEGMENT_SECONDS, STEPS_PER_SEGMENT
from musetalk.layout import ModelLayout

log = logging.getLogger(__name__)


def tiny_whisper_config() -> WhisperConfig:
    """whisper-tiny's encoder shape (d_model 384, 6 heads, 4 layers) with a 64-wide FFN and a toy decoder."""
    return WhisperConfig(
        vocab_size=64,
        num_mel_bins=80,
        d_model=384,
        encoder_layers=4,
        encoder_attention_heads=6,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=6,
        decoder_ffn_dim=64,
        max_source_positions=STEPS_PER_SEGMENT,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
        suppress_tokens=[],
        begin_suppress_tokens=[],
        architectures=["WhisperModel"],
    )


def full_whisper_config() -> WhisperConfig:
    """openai/whisper-tiny's config.json (the fields that shape the model, and its special tokens)."""
    return WhisperConfig(
        vocab_size=51865,
        num_mel_bins=80,
        d_model=384,
        encoder_layers=4,
        encoder_attention_heads=6,
        encoder_ffn_dim=1536,
        decoder_layers=4,
        decoder_attention_heads=6,
        decoder_ffn_dim=1536,
        max_source_positions=STEPS_PER_SEGMENT,
        max_target_positions=448,
        activation_function="gelu",
        scale_embedding=False,
        pad_token_id=50257,
        bos_token_id=50257,
        eos_token_id=50257,
        decoder_start_token_id=50258,
        suppress_tokens=[],
        begin_suppress_tokens=[220, 50257],
        architectures=["WhisperModel"],
    )


def whisper_config(full_size: bool = False) -> WhisperConfig:
    return full_whisper_config() if full_size else tiny_whisper_config()


def write_tiny_whisper(layout: ModelLayout, seed: int, *, full_size: bool = False) -> None:
    """Write config.json, model.safetensors and preprocessor_config.json to ``layout.whisper_dir``.

    Deterministic from ``seed``; the global torch RNG is left as it was.
    """
    out = layout.whisper_dir
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WhisperModel(whisper_config(full_size)).eval()
    model.save_pretrained(out, safe_serialization=True)
    extractor = WhisperFeatureExtractor(
        feature_size=80,
        sampling_rate=SAMPLE_RATE,
        hop_length=160,
        chunk_length=SEGMENT_SECONDS,
        n_fft=400,
        padding_value=0.0,
        return_attention_mask=False,
    )
    extractor.save_pretrained(out)
    log.info("wrote %s Whisper to %s", "full-size" if full_size else "tiny", out)
