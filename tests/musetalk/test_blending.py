"""Blend masks (upstream parsing rules + our feathered ellipse) and the paste."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from musetalk.blending import Blender, BlendMaterial, blend_square, ellipse_mask, parsing_mask
from musetalk.config import BlendConfig
from musetalk.parsing import BiSeNet, FaceParser
from shards.errors import ConfigError

CPU = torch.device("cpu")
H, W = 160, 200
BOX = (50, 40, 130, 140)  # w 80, h 100 -> s = 75, square (15, 15, 165, 165): leaves the frame at the bottom


def constant_parser(label: int) -> FaceParser:
    """A real BiSeNet whose main head predicts ``label`` everywhere (features forced to 1, one-hot classifier)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = BiSeNet()
    head = net.conv_out
    with torch.no_grad():
        head.conv.conv.weight.zero_()
        head.conv.bn.bias.fill_(1.0)
        head.conv.bn.weight.fill_(1.0)
        head.conv_out.weight.zero_()
        head.conv_out.weight[label] = 1.0
    return FaceParser(net, CPU, batch_size=1)


@pytest.fixture(scope="module")
def skin_parser() -> FaceParser:
    return constant_parser(1)


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


def face_labels() -> np.ndarray:
    """A hand-made 512x512 label map: hair, skin with nose, lips and mouth, a neck below."""
    labels = np.zeros((512, 512), dtype=np.uint8)
    labels[50:100, 120:392] = 17  # hair
    labels[100:400, 120:392] = 1  # skin
    labels[200:260, 236:276] = 10  # nose
    labels[300:320, 220:292] = 12  # upper lip
    labels[320:330, 220:292] = 11  # mouth
    labels[330:345, 220:292] = 13  # lower lip
    labels[420:500, 200:312] = 14  # neck
    return labels


def test_blend_square_is_upstream_get_crop_box():
    assert blend_square((10, 20, 110, 140), 1.5) == ((-30, -10, 150, 170), 90)
    assert blend_square(BOX, 1.5) == ((15, 15, 165, 165), 75)


def test_raw_and_neck_modes():
    labels = face_labels()
    raw, neck = parsing_mask(labels, "raw"), parsing_mask(labels, "neck")
    for mask in (raw, neck):
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
        assert (
            mask[150, 256] == 255
            and mask[310, 256] == 255
            and mask[325, 256] == 255
            and mask[340, 256] == 255
        )
        assert mask[230, 256] == 0  # nose
        assert mask[70, 256] == 0 and mask[10, 10] == 0  # hair, background
    assert raw[450, 256] == 0 and neck[450, 256] == 255


def test_jaw_mode_rules():
    labels = face_labels()
    jaw, raw = parsing_mask(labels, "jaw"), parsing_mask(labels, "raw")
    assert jaw[230, 256] == 0  # nose excluded even though the dilated skin covers it
    assert jaw[310, 256] == jaw[325, 256] == jaw[340, 256] == 255  # lips and mouth included
    assert raw[403, 256] == 0 and jaw[403, 256] == 255  # the skin grows below the chin in the middle ...
    assert jaw[405, 256] == 255 and jaw[405, 156] == 0  # cheek bands: the growth is eroded back
    assert raw[250, 125] == 255 and jaw[250, 125] == 0  # ... and is eroded back in the outer cheek bands
    assert raw[250, 386] == 255 and jaw[250, 386] == 0
    assert jaw[450, 256] == 0  # no neck


def test_jaw_cheek_width_moves_the_erosion_bands():
    labels = np.zeros((512, 512), dtype=np.uint8)
    labels[100:400, 200:312] = 1
    narrow = parsing_mask(labels, "jaw", cheek_width=20)  # columns <= 236 and >= 276 are cheek bands
    wide = parsing_mask(labels, "jaw")  # the whole skin block lies between 166 and 346
    assert narrow[250, 205] == 0 and wide[250, 205] == 255


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="lips"):
        parsing_mask(face_labels(), "lips")
    with pytest.raises(ConfigError, match="mode"):
        Blender(None, BlendConfig(mode="lips"))


def test_ellipse_mask_is_feathered_and_inscribed():
    m = ellipse_mask(40, 60, 0.25)
    assert m.shape == (40, 60) and m.dtype == np.float32
    assert m[20, 30] == 1.0 and m[0, 0] == 0.0 and m[39, 59] == 0.0
    edge = m[20, :15]  # from the left edge inwards
    assert edge[0] < 0.05 and np.all(np.diff(edge) >= 0) and np.any((edge > 0.05) & (edge < 0.95))
    np.testing.assert_allclose(m, m[::-1, ::-1], atol=1e-6)
    assert set(np.unique(ellipse_mask(40, 60, 0.0))) == {0.0, 1.0}


def check_material(material: BlendMaterial, cfg: BlendConfig) -> None:
    square, s = blend_square(BOX, cfg.expand)
    side = 2 * s
    mask = material.mask
    assert material.square == square
    assert mask.shape == (side, side) and mask.dtype == np.uint8 and not mask.flags.writeable
    # zero outside the face box
    bx1, by1, bx2, by2 = BOX[0] - square[0], BOX[1] - square[1], BOX[2] - square[0], BOX[3] - square[1]
    outside = np.ones_like(mask, dtype=bool)
    outside[by1:by2, bx1:bx2] = False
    assert not mask[outside].any()
    # zero above the upper boundary (less the blur's reach), opaque low in the middle of the box
    top = int(side * cfg.upper_boundary_ratio)
    ksize = int(0.05 * side // 2 * 2) + 1
    assert not mask[: top - ksize // 2].any() and mask[top - ksize // 2 :].any()
    assert mask[by1 + 3 * (by2 - by1) // 4, (bx1 + bx2) // 2] == 255
    # feathered: values strictly between 0 and 255 along the bottom and side edges of the kept region
    column = mask[:, (bx1 + bx2) // 2]
    assert np.any((column > 5) & (column < 250))
    row = mask[by1 + 3 * (by2 - by1) // 4]
    assert row[bx1] < 13 and np.any((row > 5) & (row < 250))


def test_parsed_material(skin_parser, frame):
    cfg = BlendConfig()
    material = Blender(skin_parser, cfg).prepare([frame], [BOX])[0]
    assert material.parsed
    check_material(material, cfg)


@pytest.mark.parametrize("label", [0, 10])  # background everywhere; nose everywhere (jaw mode removes it)
def test_empty_parsing_falls_back_to_the_pure_ellipse(frame, label):
    cfg = BlendConfig()
    parsed = Blender(constant_parser(label), cfg).prepare([frame], [BOX])[0]
    ellipse = Blender(None, cfg).prepare([frame], [BOX])[0]
    assert not parsed.parsed and not ellipse.parsed
    np.testing.assert_array_equal(parsed.mask, ellipse.mask)
    check_material(ellipse, cfg)


def test_parsing_disabled_ignores_the_parser(skin_parser, frame):
    cfg = BlendConfig(parsing=False)
    material = Blender(skin_parser, cfg).prepare([frame], [BOX])[0]
    assert not material.parsed
    check_material(material, cfg)


def test_parser_exception_falls_back(frame, caplog):
    broken = FaceParser(nn.Conv2d(4, 19, 1), CPU)  # a real net that cannot take RGB input
    with caplog.at_level(logging.WARNING, logger="musetalk.blending"):
        materials = Blender(broken, BlendConfig()).prepare([frame, frame], [BOX, BOX])
    assert [m.parsed for m in materials] == [False, False]
    assert "face parsing failed" in caplog.text
    check_material(materials[0], BlendConfig())


def test_paste_changes_only_masked_pixels(skin_parser, frame):
    blender = Blender(skin_parser, BlendConfig())
    material = blender.prepare([frame], [BOX])[0]
    face = np.full((256, 256, 3), (10, 200, 30), dtype=np.uint8)
    before = frame.copy()
    out = blender.paste(frame, face, BOX, material)
    assert out is not frame and out.shape == frame.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(frame, before)
    sx, sy, sx2, sy2 = material.square
    in_mask = np.zeros((H, W), dtype=bool)
    in_mask[sy:sy2, sx:sx2] = material.mask[: H - sy, : W - sx] > 0
    np.testing.assert_array_equal(
        out[~in_mask], frame[~in_mask]
    )  # outside the square or mask == 0: bit-identical
    opaque = np.zeros((H, W), dtype=bool)
    opaque[sy:sy2, sx:sx2] = material.mask[: H - sy, : W - sx] == 255
    assert opaque.sum() > 100
    assert np.abs(out[opaque].astype(int) - (10, 200, 30)).max() <= 1
    partial = in_mask & ~opaque
    assert np.any(out[partial] != frame[partial])


def test_boxes_partly_outside_the_frame(frame):
    blender = Blender(None, BlendConfig())
    face = np.full((512, 512, 3), 255, dtype=np.uint8)
    for box in ((-30, 90, 50, 190), (150, -40, 230, 60), (0, 0, 200, 160)):
        material = blender.prepare([frame], [box])[0]
        out = blender.paste(frame, face, box, material)
        assert out.shape == frame.shape
        x1, y1, x2, y2 = blend_square(box, 1.5)[0]
        outside = np.ones((H, W), dtype=bool)
        outside[max(y1, 0) : y2, max(x1, 0) : x2] = False
        np.testing.assert_array_equal(out[outside], frame[outside])
        assert np.any(out != frame)


def test_paste_rejects_material_of_another_box(frame):
    blender = Blender(None, BlendConfig())
    material = blender.prepare([frame], [BOX])[0]
    with pytest.raises(ValueError, match="prepared for"):
        blender.paste(frame, np.zeros((256, 256, 3), np.uint8), (52, 40, 134, 140), material)


def test_invalid_config_lists_every_problem():
    with pytest.raises(ConfigError) as err:
        Blender(None, BlendConfig(upper_boundary_ratio=1.5, expand=0.5, ellipse_feather=2.0))
    message = str(err.value)
    assert "upper_boundary_ratio" in message and "expand" in message and "ellipse_feather" in message


def test_one_pixel_box_leaves_the_frame_alone(skin_parser, frame):
    blender = Blender(skin_parser, BlendConfig())
    tiny, normal = blender.prepare([frame, frame], [(5, 5, 6, 6), BOX])
    assert tiny.mask.shape == (0, 0) and not tiny.parsed and normal.parsed
    np.testing.assert_array_equal(
        blender.paste(frame, np.zeros((256, 256, 3), np.uint8), (5, 5, 6, 6), tiny), frame
    )
