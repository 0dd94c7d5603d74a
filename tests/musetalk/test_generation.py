"""UNet/VAE loading in the official formats, and LatentGenerator's maths and batch invariance."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from skimage import data

from musetalk.generation import UNET_SCALE, LatentGenerator, load_unet, load_vae
from musetalk.layout import ModelLayout
from musetalk.testing.tiny_generation import (
    FULL_UNET_CONFIG,
    tiny_unet_config,
    write_tiny_unet,
    write_tiny_vae,
)
from shards.errors import WeightsError

CPU = torch.device("cpu")


def _config_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def tiny_layout(tmp_path_factory: pytest.TempPathFactory) -> ModelLayout:
    layout = ModelLayout.at(tmp_path_factory.mktemp("tiny-models"), tiny=True)
    write_tiny_unet(layout, seed=0)
    write_tiny_vae(layout, seed=0)
    return layout


@pytest.fixture(scope="module")
def models(tiny_layout: ModelLayout) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    return load_unet(tiny_layout, CPU, torch.float32), load_vae(tiny_layout, CPU, torch.float32)


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    """(5, 256, 256, 3) uint8 BGR: the astronaut, shifted and flipped so every crop differs."""
    face = cv2.resize(data.astronaut()[:, :, ::-1], (256, 256), interpolation=cv2.INTER_AREA)
    items = [np.roll(face, 9 * i, axis=1) for i in range(4)] + [face[:, ::-1]]
    return np.ascontiguousarray(np.stack(items))


@pytest.fixture(scope="module")
def audio() -> torch.Tensor:
    return torch.randn(5, 50, 384, generator=torch.Generator().manual_seed(3))


def _generator(models, batch_size: int) -> LatentGenerator:
    unet, vae = models
    return LatentGenerator(unet, vae, CPU, torch.float32, batch_size)


def _copy_layout(src: ModelLayout, dst: Path) -> ModelLayout:
    shutil.copytree(src.root, dst)
    return ModelLayout.at(dst)


# ---------------------------------------------------------------- loading: UNet


def test_official_unet_state_dict_loads_strictly(tmp_path: Path) -> None:
    layout = ModelLayout.at(tmp_path)
    torch.manual_seed(7)
    reference = UNet2DConditionModel(**_config_kwargs(tiny_unet_config()))
    layout.unet_config.parent.mkdir(parents=True)
    layout.unet_config.write_text(json.dumps(tiny_unet_config()))
    state = reference.state_dict()
    assert "conv_in.weight" in state and any(k.startswith("down_blocks.0.attentions.0.") for k in state)
    torch.save(state, layout.unet_weights)

    unet = load_unet(layout, CPU, torch.float32)

    loaded = unet.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not unet.training
    assert not any(p.requires_grad for p in unet.parameters())
    assert not any(p.is_meta for p in unet.parameters()) and not any(b.is_meta for b in unet.buffers())


def test_unet_renamed_key_is_named(tiny_layout: ModelLayout, tmp_path: Path) -> None:
    layout = _copy_layout(tiny_layout, tmp_path / "m")
    state = torch.load(layout.unet_weights, weights_only=True)
    state["conv_in.weights_renamed"] = state.pop("conv_in.weight")
    torch.save(state, layout.unet_weights)
    with pytest.raises(WeightsError, match="malformed MuseTalk UNet weights") as err:
        load_unet(layout, CPU, torch.float32)
    assert "conv_in.weights_renamed" in str(err.value) and "missing keys: conv_in.weight" in str(err.value)
    assert "\n" not in str(err.value)


def test_unet_wrong_shape_is_named(tiny_layout: ModelLayout, tmp_path: Path) -> None:
    layout = _copy_layout(tiny_layout, tmp_path / "m")
    state = torch.load(layout.unet_weights, weights_only=True)
    state["conv_out.weight"] = torch.zeros(4, 32, 1, 1)
    torch.save(state, layout.unet_weights)
    with pytest.raises(WeightsError, match=r"conv_out.weight \(4, 32, 1, 1\) != \(4, 32, 3, 3\)"):
        load_unet(layout, CPU, torch.float32)


def test_unet_missing_files_give_the_fetch_command(tiny_layout: ModelLayout, tmp_path: Path) -> None:
    layout = _copy_layout(tiny_layout, tmp_path / "m")
    layout.unet_weights.unlink()
    with pytest.raises(WeightsError, match="missing MuseTalk UNet weights") as err:
        load_unet(layout, CPU, torch.float32)
    assert str(layout.unet_weights) in str(err.value)
    assert f"python -m scripts.download_models --dir {layout.root}" in str(err.value)
    layout.unet_config.unlink()
    with pytest.raises(WeightsError, match="missing MuseTalk UNet config"):
        load_unet(layout, CPU, torch.float32)


@pytest.mark.parametrize(
    ("target", "content", "problem"),
    [
        ("weights", b"not a checkpoint", "not a readable torch checkpoint"),
        ("weights", None, "expected a state dict, got list"),
        ("config", b"{broken", "not readable JSON"),
        ("config", b"[1, 2]", "expected a JSON object"),
        ("config", b'{"block_out_channels": [32, 64], "down_block_types": ["NoSuchBlock2D"]}', "config"),
    ],
)
def test_unet_malformed_files(tiny_layout: ModelLayout, tmp_path: Path, target, content, problem) -> None:
    layout = _copy_layout(tiny_layout, tmp_path / "m")
    path = layout.unet_weights if target == "weights" else layout.unet_config
    if content is None:
        torch.save([torch.zeros(1)], path)
    else:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match="malformed MuseTalk UNet") as err:
        load_unet(layout, CPU, torch.float32)
    assert problem in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- loading: VAE


def test_vae_loads_upstream_bin_with_legacy_attention_names(tiny_layout: ModelLayout, tmp_path: Path) -> None:
    """sd-vae-ft-mse's .bin predates diffusers' attention renames (query/key/value/proj_attn)."""
    layout = _copy_layout(tiny_layout, tmp_path / "m")
    weights = layout.vae_dir / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    legacy = {
        k.replace(".to_q.", ".query.")
        .replace(".to_k.", ".key.")
        .replace(".to_v.", ".value.")
        .replace(".to_out.0.", ".proj_attn."): v
        for k, v in state.items()
    }
    assert legacy.keys() != state.keys()
    weights.unlink()
    torch.save(legacy, layout.vae_dir / "diffusion_pytorch_model.bin")

    vae = load_vae(layout, CPU, torch.float32)

    assert all(torch.equal(vae.state_dict()[k], v) for k, v in state.items())


def test_vae_missing_files_give_the_fetch_command(tiny_layout: ModelLayout, tmp_path: Path) -> None:
    layout = _copy_layout(tiny_layout, tmp_path / "m")
    (layout.vae_dir / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(
        WeightsError, match="missing VAE weights: expected .*diffusion_pytorch_model.safetensors"
    ):
        load_vae(layout, CPU, torch.float32)
    shutil.rmtree(layout.vae_dir)
    with pytest.raises(WeightsError, match="missing VAE directory") as err:
        load_vae(layout, CPU, torch.float32)
    assert f"python -m scripts.download_models --dir {layout.root}" in str(err.value)


def test_vae_corrupt_or_incomplete_weights(tiny_layout: ModelLayout, tmp_path: Path) -> None:
    layout = _copy_layout(tiny_layout, tmp_path / "m")
    weights = layout.vae_dir / "diffusion_pytorch_model.safetensors"
    state = {k: v.clone() for k, v in load_file(weights).items()}  # not backed by the file we overwrite
    weights.write_bytes(b"garbage" * 100)
    with pytest.raises(WeightsError, match="malformed VAE") as err:
        load_vae(layout, CPU, torch.float32)
    assert "\n" not in str(err.value)

    state.pop("decoder.conv_out.weight")
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="malformed VAE weights.*missing keys: decoder.conv_out.weight"):
        load_vae(layout, CPU, torch.float32)


# ---------------------------------------------------------------- tiny writers


def test_tiny_writers_are_deterministic(tiny_layout: ModelLayout, tmp_path: Path) -> None:
    again = ModelLayout.at(tmp_path / "again", tiny=True)
    write_tiny_unet(again, seed=0)
    write_tiny_vae(again, seed=0)
    for name in ("unet_config", "unet_weights"):
        assert getattr(again, name).read_bytes() == getattr(tiny_layout, name).read_bytes()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert (again.vae_dir / name).read_bytes() == (tiny_layout.vae_dir / name).read_bytes()
    other = ModelLayout.at(tmp_path / "other", tiny=True)
    write_tiny_unet(other, seed=1)
    assert other.unet_weights.read_bytes() != tiny_layout.unet_weights.read_bytes()
    assert json.loads(tiny_layout.unet_config.read_text())["_class_name"] == "UNet2DConditionModel"


# ---------------------------------------------------------------- encode / generate


def test_encode_matches_upstream_maths(models, crops: np.ndarray) -> None:
    unet, vae = models
    latents = _generator(models, 2).encode(crops[:3])
    assert latents.shape == (3, 8, 32, 32) and latents.dtype == torch.float32 and latents.device == CPU
    assert torch.isfinite(latents).all()

    # Upstream preprocessing, written independently: BGR->RGB, /255, bottom half black, to [-1, 1].
    rgb = crops[0][:, :, ::-1].astype(np.float32) / 255.0
    masked = rgb.copy()
    masked[128:] = 0.0
    with torch.inference_mode():
        expected = [
            vae.encode(torch.from_numpy((im - 0.5) / 0.5).permute(2, 0, 1)[None]).latent_dist.mean
            * UNET_SCALE
            for im in (masked, rgb)
        ]
    torch.testing.assert_close(latents[0, :4], expected[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(latents[0, 4:], expected[1][0], rtol=1e-4, atol=1e-5)
    assert not torch.equal(latents[:, :4], latents[:, 4:])


def test_masked_latent_is_reference_latent_of_the_blacked_out_crop(models, crops: np.ndarray) -> None:
    blacked = crops.copy()
    blacked[:, 128:] = 0
    gen = _generator(models, 5)
    original, blank = gen.encode(crops), gen.encode(blacked)
    assert torch.equal(original[:, :4], blank[:, 4:])
    assert torch.equal(original[:, :4], blank[:, :4])


def test_encode_is_deterministic(models, crops: np.ndarray) -> None:
    gen = _generator(models, 2)
    assert torch.equal(gen.encode(crops), gen.encode(crops))


def test_generate_matches_upstream_maths(models, crops: np.ndarray, audio: torch.Tensor) -> None:
    unet, vae = models
    gen = _generator(models, 2)
    latents = gen.encode(crops[:3])
    faces = gen.generate(latents, audio[:3])
    assert faces.shape == (3, 256, 256, 3) and faces.dtype == np.uint8
    assert faces.std() > 5.0, "random tiny models should still produce varied pixels"

    with torch.inference_mode():
        pred = unet(latents[:1], torch.tensor([0]), encoder_hidden_states=audio[:1]).sample
        assert pred.shape == (1, 4, 32, 32) and torch.isfinite(pred).all()
        image = vae.decode(pred / UNET_SCALE).sample
    image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    expected_bgr = (image * 255).round().astype(np.uint8)[0, :, :, ::-1]
    assert np.abs(faces[0].astype(int) - expected_bgr.astype(int)).max() <= 1


def test_batch_composition_does_not_change_results(models, crops: np.ndarray, audio: torch.Tensor) -> None:
    """The same item gives bit-identical output whatever else shares its batch (shard invariance)."""
    gen = _generator(models, 3)
    all_latents = gen.encode(crops)  # batches [0 1 2] [3 4 4*]
    for start, stop in [(1, 4), (3, 5), (2, 3), (4, 5), (0, 2)]:
        assert torch.equal(gen.encode(crops[start:stop]), all_latents[start:stop]), (start, stop)
    all_faces = gen.generate(all_latents, audio)
    for start, stop in [(1, 4), (3, 5), (2, 3), (0, 1)]:
        np.testing.assert_array_equal(
            gen.generate(all_latents[start:stop], audio[start:stop]), all_faces[start:stop]
        )
    reordered = [4, 0, 2]
    np.testing.assert_array_equal(
        gen.generate(all_latents[reordered], audio[reordered]), all_faces[reordered]
    )


def test_every_model_call_sees_the_fixed_batch_size(models, crops: np.ndarray, audio: torch.Tensor) -> None:
    unet, vae = models
    seen: list[tuple[str, int]] = []
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, name=name: seen.append((name, args[0].shape[0])))
        for name, module in [("unet", unet), ("encoder", vae.encoder), ("decoder", vae.decoder)]
    ]
    try:
        gen = _generator(models, 4)
        gen.generate(gen.encode(crops), audio)  # 5 items -> batches of 4 and 1 (+3 padding)
    finally:
        for hook in hooks:
            hook.remove()
    assert [name for name, _ in seen].count("encoder") == 4  # 2 batches x (masked, reference)
    assert [name for name, _ in seen].count("decoder") == 2
    assert {size for _, size in seen} == {4}


def test_a_job_batch_size_on_loaded_models_is_a_fresh_load(
    models, crops: np.ndarray, audio: torch.Tensor
) -> None:
    """A job's own ``render.batch_size`` passed per call on models loaded with another (a warm pool in a
    sweep) computes exactly what models loaded with that batch size compute: the weights stay loaded."""
    fresh, loaded = _generator(models, 2), _generator(models, 4)
    latents = fresh.encode(crops)
    assert torch.equal(loaded.encode(crops, 2), latents)
    np.testing.assert_array_equal(loaded.generate(latents, audio, 2), fresh.generate(latents, audio))
    with pytest.raises(ValueError, match="batch_size"):
        loaded.encode(crops, -1)


def test_bad_inputs_are_rejected(models, crops: np.ndarray, audio: torch.Tensor) -> None:
    gen = _generator(models, 2)
    with pytest.raises(ValueError, match="crops must be"):
        gen.encode(crops[:, :128])
    with pytest.raises(ValueError, match="crops must be"):
        gen.encode(crops.astype(np.float32))
    with pytest.raises(ValueError, match="audio must be"):
        gen.generate(torch.zeros(2, 8, 32, 32), audio[:3])
    with pytest.raises(ValueError, match="dtype"):
        LatentGenerator(models[0], models[1], CPU, torch.float16, 2)
    assert gen.encode(crops[:0]).shape == (0, 8, 32, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generate_fp16_on_cuda(
    tiny_layout: ModelLayout, models, crops: np.ndarray, audio: torch.Tensor
) -> None:
    cuda = torch.device("cuda")
    gen = LatentGenerator(
        load_unet(tiny_layout, cuda, torch.float16),
        load_vae(tiny_layout, cuda, torch.float16),
        cuda,
        torch.float16,
        3,
    )
    latents = gen.encode(crops)
    faces = gen.generate(latents, audio)
    assert latents.dtype == torch.float32 and latents.device == CPU and torch.isfinite(latents).all()
    assert faces.shape == (5, 256, 256, 3) and faces.dtype == np.uint8
    for start, stop in [(1, 4), (3, 5)]:
        assert torch.equal(gen.encode(crops[start:stop]), latents[start:stop])
        np.testing.assert_array_equal(gen.generate(latents[start:stop], audio[start:stop]), faces[start:stop])
    reference = _generator(models, 3).generate(latents, audio)
    assert np.abs(faces.astype(float) - reference).mean() < 2.0


# ---------------------------------------------------------------- the real architecture


@pytest.mark.slow
def test_full_size_unet_from_the_real_config_runs_batch_invariant_on_cpu(models, audio: torch.Tensor) -> None:
    """The published musetalk.json builds with this diffusers, runs, and stays batch-invariant (random weights)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(_config_kwargs(FULL_UNET_CONFIG)).eval().requires_grad_(False)
    params = sum(p.numel() for p in unet.parameters())
    logging.getLogger(__name__).info("MuseTalk 1.5 UNet: %d parameters", params)
    assert params == 849_947_844  # x4 bytes ~= the 3,400,074,924-byte upstream unet.pth

    gen = LatentGenerator(unet, models[1], CPU, torch.float32, 2)
    latents = torch.randn(2, 8, 32, 32, generator=torch.Generator().manual_seed(5)) * 0.2
    faces = gen.generate(latents, audio[:2])
    assert faces.shape == (2, 256, 256, 3)
    np.testing.assert_array_equal(gen.generate(latents[[1, 0]], audio[[1, 0]]), faces[[1, 0]])


# ---------------------------------------------------------------- launch and the generate thread


def test_launch_queues_what_generate_returns(models, crops: np.ndarray, audio: torch.Tensor) -> None:
    gen = _generator(models, 2)
    latents = gen.encode(crops)
    pending = gen.launch(latents, audio)  # on the CPU the work is done here; on CUDA it is queued
    np.testing.assert_array_equal(pending.result(), gen.generate(latents, audio))


def test_generate_faces_launches_the_next_batch_before_it_waits(
    models, crops: np.ndarray, audio: torch.Tensor, monkeypatch
) -> None:
    """Batches close at 2 faces or 4 frames; batch N+1 is launched before batch N's faces are read, and
    every frame comes out once, in order, with the face a plain ``generate`` gives it."""
    from musetalk.entries import Entry
    from musetalk.generation import generate_faces
    from musetalk.stages import StageClock

    gen = _generator(models, 2)
    latents = gen.encode(crops)
    no_face = {3, 7}
    face_ts = [t for t in range(10) if t not in no_face]
    row = {t: i % len(crops) for i, t in enumerate(face_ts)}
    entries = [
        (t, Entry(t) if t in no_face else Entry(t, (0, 0, 8, 8), latents[row[t]].numpy())) for t in range(10)
    ]
    windows = {t: audio[row[t]] for t in face_ts}
    events: list[str] = []
    real_launch = gen.launch

    def launch(lat, aud, batch_size=None):
        pending = real_launch(lat, aud, batch_size)
        events.append(f"launch {len(lat)}")
        real_result = pending.result
        pending.result = lambda: (events.append("result"), real_result())[1]
        return pending

    monkeypatch.setattr(gen, "launch", launch)
    out = list(
        generate_faces(
            entries, gen, None, lambda ts: torch.stack([windows[t] for t in ts]), StageClock(CPU), 2
        )
    )
    # batches [0 1] [2 3 4] [5 6] [7 8 9]: each launched before the previous one is read
    assert events == ["launch 2", "launch 2", "result", "launch 2", "result", "launch 2", "result", "result"]
    assert [g.t for g in out] == list(range(10))
    expected = gen.generate(
        torch.from_numpy(np.stack([latents[row[t]].numpy() for t in face_ts])),
        torch.stack([windows[t] for t in face_ts]),
    )
    for g in out:
        if g.t in no_face:
            assert g.face is None
        else:
            np.testing.assert_array_equal(g.face, expected[face_ts.index(g.t)])
