"""GFPGAN v1.4 adapter: import without the gfpgan package root, strict loading, enhancement and fallbacks."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

import musetalk.enhance as enhance
from musetalk.enhance import GFPGAN_V14_ARCH, FaceEnhancer, gfpgan_arch_class, load_gfpgan
from musetalk.layout import ModelLayout
from musetalk.testing.tiny_blend import TINY_GFPGAN_ARCH, write_tiny_gfpgan
from shards.errors import ConfigError, WeightsError

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> ModelLayout:
    layout = ModelLayout.at(tmp_path_factory.mktemp("gfpgan") / "tiny", tiny=True)
    write_tiny_gfpgan(layout, seed=0)
    return layout


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    rng = np.random.default_rng(0)
    base = cv2.resize(
        rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), (256, 256), interpolation=cv2.INTER_CUBIC
    )
    return np.stack([base, base[::-1].copy()])


def test_adapter_skips_the_package_root_and_leaves_no_fake_basicsr(tmp_path):
    code = textwrap.dedent(
        """
        import sys
        from musetalk.enhance import gfpgan_arch_class
        cls = gfpgan_arch_class()
        assert cls.__name__ == "GFPGANv1Clean", cls
        net = cls(out_size=512, num_style_feat=16, channel_multiplier=2, narrow=0.0625, sft_half=True,
                  different_w=True, input_is_latent=True, fix_decoder=False)
        leaked = [m for m in sys.modules if m == "gfpgan" or m.startswith(("gfpgan.", "basicsr"))]
        assert not leaked, leaked
        assert "torchvision" not in sys.modules
        print("ok", sum(p.numel() for p in net.parameters()) > 0)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok True"


def test_stand_in_init_is_basicsr_default_init_weights():
    conv, lin = nn.Conv2d(8, 16, 3), nn.Linear(32, 64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        enhance._default_init_weights([conv, lin], scale=0.5, bias_fill=1, a=0.2, mode="fan_in")
        torch.manual_seed(3)
        w_conv, w_lin = torch.empty_like(conv.weight), torch.empty_like(lin.weight)
        nn.init.kaiming_normal_(w_conv, a=0.2, mode="fan_in")
        nn.init.kaiming_normal_(w_lin, a=0.2, mode="fan_in")
    assert torch.equal(conv.weight, w_conv * 0.5) and torch.equal(lin.weight, w_lin * 0.5)
    assert torch.all(conv.bias == 1) and torch.all(lin.bias == 1)
    assert enhance._PassThroughRegistry().register()(nn.Linear) is nn.Linear


def test_stand_ins_are_removed_and_restore_prior_entries(monkeypatch):
    sentinel = object()
    monkeypatch.setitem(sys.modules, "basicsr", sentinel)
    with enhance._basicsr_stand_ins():
        from basicsr.utils.registry import ARCH_REGISTRY  # noqa: F401  (the stand-in is importable inside)
    assert sys.modules["basicsr"] is sentinel
    assert not any(m.startswith("basicsr.") for m in sys.modules)


def test_v14_arch_matches_gfpganer_clean_arguments():
    assert GFPGAN_V14_ARCH == dict(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None,
                                   fix_decoder=False, num_mlp=8, input_is_latent=True, different_w=True, narrow=1,
                                   sft_half=True)  # fmt: skip


def test_missing_gfpgan_package_is_a_clear_error(monkeypatch):
    real = enhance.importlib.util.find_spec
    monkeypatch.setattr(
        enhance.importlib.util, "find_spec", lambda name, *a: None if name == "gfpgan" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install --no-deps gfpgan==1\.3\.8"):
        enhance._gfpgan_archs_dir()


def test_tiny_weights_load_strictly(layout):
    enhancer = load_gfpgan(layout, CPU)
    saved = torch.load(layout.gfpgan, weights_only=True)["params_ema"]
    loaded = enhancer.net.state_dict()
    assert set(saved) == set(loaded)
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    assert isinstance(enhancer.net, gfpgan_arch_class())
    assert enhancer.net.num_style_feat == TINY_GFPGAN_ARCH["num_style_feat"]
    assert json.loads(layout.gfpgan.with_suffix(".json").read_text()) == TINY_GFPGAN_ARCH


def _copy_layout(layout: ModelLayout, root, checkpoint, arch=None) -> ModelLayout:
    new = ModelLayout.at(root, tiny=True)
    new.gfpgan.parent.mkdir(parents=True)
    torch.save(checkpoint, new.gfpgan)
    new.gfpgan.with_suffix(".json").write_text(json.dumps(TINY_GFPGAN_ARCH if arch is None else arch))
    return new


def test_params_key_is_the_fallback(layout, tmp_path):
    state = torch.load(layout.gfpgan, weights_only=True)["params_ema"]
    new = _copy_layout(layout, tmp_path / "m", {"params": state})
    assert torch.equal(
        load_gfpgan(new, CPU).net.state_dict()["final_conv.weight"], state["final_conv.weight"]
    )


def test_renamed_key_is_a_weights_error(layout, tmp_path):
    state = torch.load(layout.gfpgan, weights_only=True)["params_ema"]
    state["final_convolution.weight"] = state.pop("final_conv.weight")
    new = _copy_layout(layout, tmp_path / "m", {"params_ema": state})
    with pytest.raises(WeightsError, match=r"final_conv\.weight.*final_convolution\.weight"):
        load_gfpgan(new, CPU)


def test_wrong_architecture_json_is_a_weights_error(layout, tmp_path):
    state = torch.load(layout.gfpgan, weights_only=True)["params_ema"]
    new = _copy_layout(
        layout, tmp_path / "a", {"params_ema": state}, arch={"narrow": 0.125, "num_style_feat": 32}
    )
    with pytest.raises(WeightsError, match="wrong shapes"):
        load_gfpgan(new, CPU)
    new = _copy_layout(layout, tmp_path / "b", {"params_ema": state}, arch={"width": 3})
    with pytest.raises(WeightsError, match="width"):
        load_gfpgan(new, CPU)
    new = _copy_layout(layout, tmp_path / "c", {"weights": state})
    with pytest.raises(WeightsError, match="params_ema"):
        load_gfpgan(new, CPU)


@pytest.mark.parametrize("tiny", [True, False])
def test_missing_weights(tmp_path, tiny):
    with pytest.raises(WeightsError, match="GFPGANv1.4.pth") as err:
        load_gfpgan(ModelLayout.at(tmp_path, tiny=tiny), CPU)
    assert ("make_tiny_models" if tiny else "download_models") in str(err.value)


def test_wrong_upscale_is_a_config_error(layout):
    with pytest.raises(ConfigError, match="upscale"):
        load_gfpgan(layout, CPU, upscale=3)
    with pytest.raises(ConfigError, match="upscale"):
        FaceEnhancer(nn.Identity(), CPU, 8)


def test_enhance_two_faces_deterministic(layout, faces):
    enhancer = load_gfpgan(layout, CPU, upscale=1)
    batch = np.stack([faces[0], faces[0]])
    out, failed = enhancer.enhance(batch)
    assert out.shape == (2, 256, 256, 3) and out.dtype == np.uint8 and failed == 0
    np.testing.assert_array_equal(out[0], out[1])  # stored noise, no randomness
    assert not np.array_equal(out[0], faces[0])


@pytest.mark.parametrize("upscale", [2, 4])
def test_enhance_upscales(layout, faces, upscale):
    out, failed = load_gfpgan(layout, CPU, upscale=upscale).enhance(faces[1:])
    assert out.shape == (1, 256 * upscale, 256 * upscale, 3) and out.dtype == np.uint8 and failed == 0


def test_non_finite_output_falls_back_to_lanczos(layout, faces, caplog):
    enhancer = load_gfpgan(layout, CPU, upscale=2)
    with torch.no_grad():
        enhancer.net.final_conv.weight.fill_(float("nan"))
    with caplog.at_level(logging.WARNING, logger="musetalk.enhance"):
        out, failed = enhancer.enhance(faces[:1])
    assert failed == 1 and "non-finite" in caplog.text
    np.testing.assert_array_equal(out[0], cv2.resize(faces[0], (512, 512), interpolation=cv2.INTER_LANCZOS4))


def test_raising_net_falls_back_per_face(faces, caplog):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # a real GFPGANv1Clean built for 256x256 inputs cannot take GFPGAN's 512x512 input: RuntimeError
        net = gfpgan_arch_class()(**{**GFPGAN_V14_ARCH, **TINY_GFPGAN_ARCH, "out_size": 256})
    with caplog.at_level(logging.WARNING, logger="musetalk.enhance"):
        out, failed = FaceEnhancer(net, CPU, 1).enhance(faces)
    assert failed == 2 and caplog.text.count("GFPGAN failed") == 2
    np.testing.assert_array_equal(out, faces)


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("CUDA error: device-side assert triggered")],
    ids=["oom", "cuda-error"],
)
def test_a_device_failure_in_gfpgan_is_raised_not_hidden(layout, faces, error, monkeypatch):
    enhancer = load_gfpgan(layout, CPU, upscale=1)

    def fail(_faces):
        raise error

    monkeypatch.setattr(enhancer, "_run_batch", fail)
    with pytest.raises(type(error)):
        enhancer.enhance(faces[:1])


def test_rejects_wrong_input_shape(layout):
    with pytest.raises(ValueError, match="256"):
        FaceEnhancer(nn.Identity(), CPU, 1).enhance(np.zeros((1, 128, 128, 3), np.uint8))


def test_a_batch_that_raises_is_rerun_face_by_face(layout, faces, caplog):
    """GPU-sized batches are padded, so a face gets the same result whatever its batch mates; a batch that
    raises (not a device failure) is rerun face by face, and only the face that still fails falls back."""
    single = load_gfpgan(layout, CPU, upscale=1)
    black = np.zeros_like(faces[0])

    class FailsOnBlack(nn.Module):
        """The real net, raising as a shape error would on the one bad (all-black) face."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, **kwargs):
            if bool((x.flatten(1) == -1.0).all(dim=1).any()):
                raise RuntimeError("a face this net cannot take")
            return self.net(x, **kwargs)

    clean = FaceEnhancer(single.net, CPU, 1, batch_size=2)
    expected, fell = clean.restore(np.stack([faces[0], faces[0], faces[1]]))  # [0 0] [1 + padding]
    assert fell == [False] * 3
    batched = FaceEnhancer(FailsOnBlack(single.net), CPU, 1, batch_size=2)
    with caplog.at_level(logging.WARNING, logger="musetalk.enhance"):
        out, fell = batched.restore(np.stack([faces[0], black, faces[1]]))  # [0 black] [1 + padding]
    assert fell == [False, True, False] and caplog.text.count("GFPGAN failed") == 1
    np.testing.assert_array_equal(out[0], expected[0])  # rerun alone (padded with itself)
    np.testing.assert_array_equal(out[2], expected[2])
    np.testing.assert_array_equal(out[1], black)  # the Lanczos fallback at upscale 1: the face itself
