"""The benchmark script on tiny models, and the full-size stand-ins' architectures (built on the meta device)."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import soundfile as sf
import torch
import torch.nn as nn
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import WhisperModel

import musetalk.testing.tiny_models as make_tiny
from musetalk.audio import output_frame_count
from musetalk.config import FaceConfig, PipelineConfig
from musetalk.enhance import GFPGAN_V14_ARCH
from musetalk.layout import ModelLayout
from musetalk.stats import STAGES
from musetalk.testing import tiny_blend
from musetalk.testing.tiny_audio import whisper_config
from musetalk.testing.tiny_faces import tiny_fan
from musetalk.testing.tiny_generation import unet_config, vae_config
from scripts.benchmark import main, prepare_models, write_speech


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_benchmark_on_tiny_models_writes_sane_json(tiny_models, demo_media, tmp_path):
    out = tmp_path / "bench.json"
    res = main(
        ["--tiny", "--clip", "demo", "--models", str(tiny_models), "--media", str(demo_media.video.parent)]
        + ["--frames", "6", "--warmup-frames", "1", "--batch-size", "4", "--crop", "box", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == res
    assert (res["frames"], res["face_frames"], res["batch_size"], res["dtype"]) == (6, 6, 4, "float32")
    assert res["weights"] == "random tiny" and res["device"].startswith("CPU")
    assert res["peak_cuda_memory_mib"] is None and res["torch"] == torch.__version__
    assert res["wall_seconds"] > 0 and res["fps"] == pytest.approx(6 / res["wall_seconds"], rel=1e-2)
    assert set(res["stage_seconds"]) == set(res["stage_fps"]) == set(STAGES)
    # Stages overlap in the pipelined worker: their sum is compared with the workers' wall time, not bounded.
    assert res["stage_sum_seconds"] == pytest.approx(sum(res["stage_seconds"].values()), abs=1e-3)
    assert 0 < res["worker_wall_seconds"] <= res["wall_seconds"]
    for stage in ("decode", "detect", "vae_encode", "audio", "generate", "blend", "encode"):
        assert res["stage_seconds"][stage] > 0
        # stage_seconds are rounded to 1 ms: allow for that rounding on top of 1%
        seconds = res["stage_seconds"][stage]
        assert res["stage_fps"][stage] == pytest.approx(6 / seconds, rel=1e-2 + 0.0005 / seconds)
    assert res["stage_seconds"]["enhance"] == 0 and res["stage_fps"]["enhance"] is None


@pytest.mark.parametrize("fps", [Fraction(25), Fraction(30000, 1001)])
@pytest.mark.parametrize("frames", [1, 7, 200])
def test_speech_lasts_exactly_the_requested_frames(tmp_path, fps, frames):
    samples, rate = sf.read(write_speech(tmp_path / "a.wav", frames, fps))
    assert rate == 16000 and output_frame_count(len(samples), fps) == frames
    assert output_frame_count(len(samples) - 1, fps) == frames - 1  # no spare samples


def test_full_size_configs_are_the_real_ones():
    unet = unet_config(full_size=True)
    assert unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert (unet["layers_per_block"], unet["in_channels"], unet["out_channels"]) == (2, 8, 4)
    assert (unet["cross_attention_dim"], unet["attention_head_dim"], unet["sample_size"]) == (384, 8, 64)
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert (unet["norm_num_groups"], unet["norm_eps"], unet["flip_sin_to_cos"], unet["freq_shift"]) == (
        32, 1e-5, True, 0,
    )  # fmt: skip
    vae = vae_config(full_size=True)
    assert vae["block_out_channels"] == (128, 256, 512, 512)
    assert (vae["layers_per_block"], vae["latent_channels"], vae["norm_num_groups"], vae["sample_size"]) == (
        2, 4, 32, 256,
    )  # fmt: skip
    whisper = whisper_config(full_size=True)
    assert (whisper.d_model, whisper.encoder_layers, whisper.decoder_layers) == (384, 4, 4)
    assert (whisper.encoder_attention_heads, whisper.encoder_ffn_dim, whisper.decoder_ffn_dim) == (
        6,
        1536,
        1536,
    )
    assert (whisper.vocab_size, whisper.num_mel_bins) == (51865, 80)
    assert (whisper.max_source_positions, whisper.max_target_positions) == (1500, 448)
    # Parameter counts of the published checkpoints (unet.pth, sd-vae-ft-mse, whisper-tiny).
    with torch.device("meta"):
        assert _params(UNet2DConditionModel.from_config({k: v for k, v in unet.items() if k[0] != "_"})) == (
            849_947_844
        )
        assert _params(AutoencoderKL(**vae)) == 83_653_863
        assert _params(WhisperModel(whisper)) == 37_760_640
    assert tiny_fan(0, full_size=True).num_modules == 4
    assert unet_config() != unet and vae_config() != vae and whisper_config().encoder_ffn_dim == 64


def test_full_size_gfpgan_is_v14_without_override(tmp_path, monkeypatch):
    built = []

    def fake_arch(**kwargs):  # records the architecture instead of building 86M parameters
        built.append(kwargs)
        return nn.Linear(1, 1)

    monkeypatch.setattr(tiny_blend, "gfpgan_arch_class", lambda: fake_arch)
    layout = ModelLayout.at(tmp_path, tiny=True)
    tiny_blend.write_tiny_gfpgan(layout, 0)
    assert layout.gfpgan.with_suffix(".json").exists()
    tiny_blend.write_tiny_gfpgan(layout, 0, full_size=True)
    assert built[1] == GFPGAN_V14_ARCH and built[0]["narrow"] < 1
    assert not layout.gfpgan.with_suffix(".json").exists()


def test_marker_keeps_tiny_and_full_size_apart(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(make_tiny, "make_tiny_models", lambda root, seed, full_size: made.append(full_size))
    root = tmp_path / "m"
    root.mkdir()
    (root / make_tiny.MARKER).write_text(make_tiny.marker_text(0, False) + "\n")
    make_tiny.ensure_tiny_models(root)
    assert made == []
    make_tiny.ensure_tiny_models(root, full_size=True)
    assert made == [True]
    with pytest.raises(SystemExit, match="tiny stand-ins"):
        prepare_models(root, full_size=True)
    real = tmp_path / "real"
    (real / "musetalkV15").mkdir(parents=True)
    assert prepare_models(real, full_size=True) == "as found" and made == [True]


def test_pool_run_renders_through_the_driver_and_reports_the_workers(tiny_models, demo_media, tmp_path):
    """``run_pool`` (the 1080p path) on the demo clip: a real Ray pool, one worker, two shards."""
    import ray

    from cluster.pool import warm_pools
    from scripts.benchmark import run_pool
    from tests.helpers import trimmed_audio

    cfg = PipelineConfig(
        models_dir=str(tiny_models),
        tiny=True,
        batch_size=4,
        threads=1,
        face=FaceConfig(detector="haar", crop="box"),
    )
    audio = trimmed_audio(demo_media.audio, tmp_path / "a.wav", 0.8)  # 20 output frames
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        res = run_pool(cfg, demo_media.video, audio, workers=1, shards=2, prep_length=8)
    finally:
        warm_pools().discard(graceful=True)
        ray.shutdown()
    assert (res["workers"], res["shards"], res["frames"]) == (1, 2, 20)
    assert res["face_frames"] == 20  # source frames 0..19, each with a face
    assert res["detections"] == 22  # and 2 (face.smooth_radius) more that box smoothing reads
    assert res["prep_units"] == 3 + 3 + 1  # detect and prepare units of 8 source frames, one audio unit
    (worker,) = res["per_worker"]
    assert worker["units"] == 2 and worker["prep_units"] == res["prep_units"]
    assert worker["cpu_seconds"] > 0 and res["worker_cpu_seconds"] == pytest.approx(
        worker["cpu_seconds"], abs=1e-3
    )
    assert worker["peak_rss_mib"] > 0
    cpu = res["host_cpu"]  # CPU ms per output frame outside model calls, by stage, the encoder apart
    assert cpu["stages"].keys() == set(STAGES) and cpu["outside_models_and_encoder"] > 0
    assert cpu["outside_models_and_encoder"] == pytest.approx(
        sum(v for k, v in cpu["stages"].items() if k != "encode"), abs=0.01
    )
    assert cpu["encoder"] >= cpu["encoder_children"] > 0 and cpu["model"] > 0
    assert cpu["model_stages"].keys() >= {"detect", "vae_encode", "blend_prepare", "generate"}
    memory = worker["memory_mib"]  # Linux: resident memory now, by kind, and its peak
    assert memory["anon"] > 0 and memory["hwm"] >= memory["rss"] >= memory["anon"]
    assert res["worker_peak_rss_mib"] == pytest.approx(worker["peak_rss_mib"], abs=0.1)
    assert 0 < res["worker_wall_seconds"] <= res["wall_seconds"]
    assert res["stage_sum_seconds"] == pytest.approx(sum(res["stage_seconds"].values()), abs=1e-2)
    assert res["overlap_ratio"] == pytest.approx(
        res["stage_sum_seconds"] / res["worker_wall_seconds"], rel=1e-2
    )
    assert (
        res["fps"] == pytest.approx(20 / res["wall_seconds"], rel=1e-2)
        and res["peak_cuda_memory_mib"] is None
    )
