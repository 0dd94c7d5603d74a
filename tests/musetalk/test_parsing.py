"""BiSeNet face parsing: official checkpoint format, strict loading, batching."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from musetalk.layout import ModelLayout
from musetalk.parsing import N_CLASSES, BiSeNet, FaceParser, load_face_parser, parse_input
from musetalk.testing.tiny_blend import write_tiny_face_parser
from shards.errors import WeightsError

CPU = torch.device("cpu")

# Written from upstream's face_parsing/model.py + resnet.py (the names in 79999_iter.pth), with shapes.
OFFICIAL_KEYS = {
    "cp.resnet.conv1.weight": (64, 3, 7, 7),
    "cp.resnet.bn1.running_mean": (64,),
    "cp.resnet.layer1.0.conv1.weight": (64, 64, 3, 3),
    "cp.resnet.layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "cp.resnet.layer2.0.downsample.1.running_var": (128,),
    "cp.resnet.layer3.1.conv2.weight": (256, 256, 3, 3),
    "cp.resnet.layer4.1.bn2.running_var": (512,),
    "cp.arm16.conv.conv.weight": (128, 256, 3, 3),
    "cp.arm16.conv.bn.weight": (128,),
    "cp.arm32.conv.conv.weight": (128, 512, 3, 3),
    "cp.arm32.conv_atten.weight": (128, 128, 1, 1),
    "cp.arm32.bn_atten.bias": (128,),
    "cp.conv_head32.conv.weight": (128, 128, 3, 3),
    "cp.conv_head16.bn.running_mean": (128,),
    "cp.conv_avg.conv.weight": (128, 512, 1, 1),
    "ffm.convblk.conv.weight": (256, 256, 1, 1),
    "ffm.convblk.bn.running_var": (256,),
    "ffm.conv1.weight": (64, 256, 1, 1),
    "ffm.conv2.weight": (256, 64, 1, 1),
    "conv_out.conv.conv.weight": (256, 256, 3, 3),
    "conv_out.conv.bn.bias": (256,),
    "conv_out.conv_out.weight": (19, 256, 1, 1),
    "conv_out16.conv.conv.weight": (64, 128, 3, 3),
    "conv_out16.conv_out.weight": (19, 64, 1, 1),
    "conv_out32.conv.bn.weight": (64,),
    "conv_out32.conv_out.weight": (19, 64, 1, 1),
}
TOP_LEVEL = ("cp.resnet.", "cp.arm16.", "cp.arm32.", "cp.conv_head32.", "cp.conv_head16.", "cp.conv_avg.",
             "ffm.", "conv_out.", "conv_out16.", "conv_out32.")  # fmt: skip


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> ModelLayout:
    layout = ModelLayout.at(tmp_path_factory.mktemp("parse") / "tiny", tiny=True)
    write_tiny_face_parser(layout, seed=0)
    return layout


@pytest.fixture(scope="module")
def parser(layout) -> FaceParser:
    return load_face_parser(layout, CPU, batch_size=2)


def _layout_with(root, layout: ModelLayout, parse_state=None, resnet_state=None) -> ModelLayout:
    """A layout under ``root`` holding the given state dicts (else links to ``layout``'s files)."""
    new = ModelLayout.at(root, tiny=True)
    new.face_parse.parent.mkdir(parents=True)
    for path, src, state in (
        (new.face_parse, layout.face_parse, parse_state),
        (new.resnet18, layout.resnet18, resnet_state),
    ):
        if state is None:
            path.symlink_to(src)
        else:
            torch.save(state, path)
    return new


def test_module_tree_matches_the_official_key_names():
    state = BiSeNet(N_CLASSES).state_dict()
    for key, shape in OFFICIAL_KEYS.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    assert all(k.startswith(TOP_LEVEL) for k in state), [k for k in state if not k.startswith(TOP_LEVEL)]
    assert not any(k.startswith("sp.") for k in state)  # upstream deleted the spatial path


def test_tiny_backbone_file_uses_torchvision_resnet18_names(layout):
    state = torch.load(layout.resnet18, weights_only=True)
    assert tuple(state["fc.weight"].shape) == (1000, 512) and tuple(state["fc.bias"].shape) == (1000,)
    assert tuple(state["layer2.0.downsample.1.running_mean"].shape) == (128,)
    assert tuple(state["conv1.weight"].shape) == (64, 3, 7, 7)
    expected = {k.removeprefix("cp.resnet.") for k in BiSeNet().state_dict() if k.startswith("cp.resnet.")}
    expected = {k for k in expected if not k.endswith("num_batches_tracked")} | {"fc.weight", "fc.bias"}
    assert set(state) == expected


def test_official_format_round_trip_loads_strictly(layout, parser):
    saved = torch.load(layout.face_parse, weights_only=True)
    loaded = parser.net.state_dict()
    assert set(saved) == set(loaded)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key


def test_checkpoint_without_num_batches_tracked_loads(layout, tmp_path):
    state = torch.load(layout.face_parse, weights_only=True)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    new = _layout_with(tmp_path / "m", layout, parse_state=state)
    net = load_face_parser(new, CPU).net
    assert torch.equal(net.state_dict()["ffm.conv1.weight"], state["ffm.conv1.weight"])


def test_renamed_key_is_a_weights_error_naming_it(layout, tmp_path):
    state = torch.load(layout.face_parse, weights_only=True)
    state["cp.arm32.conv_attn.weight"] = state.pop("cp.arm32.conv_atten.weight")
    new = _layout_with(tmp_path / "m", layout, parse_state=state)
    with pytest.raises(WeightsError) as err:
        load_face_parser(new, CPU)
    message = str(err.value)
    assert "cp.arm32.conv_atten.weight" in message and "cp.arm32.conv_attn.weight" in message
    assert str(new.face_parse) in message and "make_tiny_models" in message


def test_bad_backbone_file_is_a_weights_error(layout, tmp_path):
    state = torch.load(layout.resnet18, weights_only=True)
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    new = _layout_with(tmp_path / "m", layout, resnet_state=state)
    with pytest.raises(WeightsError, match=r"layer1\.0\.conv1\.weight"):
        load_face_parser(new, CPU)


def test_not_a_state_dict_is_a_weights_error(layout, tmp_path):
    new = _layout_with(tmp_path / "m", layout, parse_state={"model": {"a": torch.zeros(1)}})
    with pytest.raises(WeightsError, match="malformed"):
        load_face_parser(new, CPU)


@pytest.mark.parametrize("tiny", [True, False])
def test_missing_files_name_path_and_fetch_command(tmp_path, tiny):
    empty = ModelLayout.at(tmp_path / "models", tiny=tiny)
    with pytest.raises(WeightsError) as err:
        load_face_parser(empty, CPU)
    message = str(err.value)
    assert "resnet18-5c106cde.pth" in message
    assert ("make_tiny_models" if tiny else "download_models") in message
    empty.resnet18.parent.mkdir(parents=True)
    empty.resnet18.write_bytes(b"")
    with pytest.raises(WeightsError, match="79999_iter.pth"):
        load_face_parser(empty, CPU)


def test_output_shape_and_dtype_for_any_input_size(parser):
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((90, 70, 3), (600, 530, 3), (512, 512, 3))
    ]
    labels = parser(images)
    assert labels.shape == (3, 512, 512) and labels.dtype == np.uint8
    assert labels.max() < N_CLASSES
    assert parser([]).shape == (0, 512, 512)


def test_results_do_not_depend_on_batch_mates(parser):
    rng = np.random.default_rng(1)
    a, b, c = (rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3))
    seen: list[int] = []
    hook = parser.net.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    try:
        alone = parser([c])[0]
        together = parser([a, b, c])
        paired = parser([b, c])
    finally:
        hook.remove()
    assert seen == [2, 2, 2, 2]  # every batch padded to batch_size
    np.testing.assert_array_equal(together[2], alone)
    np.testing.assert_array_equal(paired[1], alone)
    np.testing.assert_array_equal(paired[0], together[1])


def test_rejects_non_bgr_images(parser):
    with pytest.raises(ValueError, match="uint8"):
        parser([np.zeros((32, 32), dtype=np.uint8)])


@pytest.mark.parametrize("shape", [(700, 700), (300, 220)])  # shrinking (antialiased) and growing
def test_parse_input_is_pillows_bilinear_resize(shape):
    bgr = np.random.default_rng(2).integers(0, 256, (*shape, 3), dtype=np.uint8)
    rgb = Image.fromarray(bgr[:, :, ::-1].copy())
    expected = np.asarray(rgb.resize((512, 512), Image.BILINEAR))  # upstream FaceParsing.__call__
    got = parse_input(bgr)
    assert got.shape == (512, 512, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    # OpenCV's filters are a different resize (the point of matching Pillow).
    opencv = cv2.resize(np.asarray(rgb), (512, 512), interpolation=cv2.INTER_AREA)
    assert np.abs(opencv.astype(int) - expected).max() > 2


def test_parser_feeds_the_net_pillow_resized_imagenet_normalised_rgb(parser):
    bgr = np.random.default_rng(3).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    seen: list[torch.Tensor] = []
    hook = parser.net.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0].clone()))
    try:
        parser([bgr])
    finally:
        hook.remove()
    rgb = np.asarray(Image.fromarray(bgr[:, :, ::-1].copy()).resize((512, 512), Image.BILINEAR))
    expected = (
        torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0
        - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    ) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=1e-6)
