"""Blend masks (upstream parsing rules + our feathered ellipse) and the paste."""

from __future__ import annotations

import logging
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from torch import nn

from musetalk.blending import (
    Blender,
    BlendMaterial,
    _place,
    blend_square,
    blur_kernel_size,
    composite,
    ellipse_mask,
    fit_face,
    make_material,
    parsing_mask,
    upstream_mask,
)
from musetalk.config import BlendConfig
from musetalk.layout import ModelLayout
from musetalk.parsing import BiSeNet, FaceParser, load_face_parser
from musetalk.testing.tiny_blend import write_tiny_face_parser
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


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("CUDA error: an illegal memory access")],
    ids=["oom", "cuda-error"],
)
def test_a_device_failure_in_parsing_is_raised_not_hidden(frame, error, monkeypatch):
    parser = constant_parser(1)

    def fail(_inputs):
        raise error

    monkeypatch.setattr(parser, "labels", fail)
    with pytest.raises(type(error)):
        Blender(parser, BlendConfig()).prepare([frame], [BOX])


def test_a_generic_runtime_error_in_parsing_still_falls_back(frame, monkeypatch):
    parser = constant_parser(1)

    def fail(_inputs):
        raise RuntimeError("expected input to have 3 channels")

    monkeypatch.setattr(parser, "labels", fail)
    assert [m.parsed for m in Blender(parser, BlendConfig()).prepare([frame], [BOX])] == [False]


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


# --- upstream conformance: the v1.5 rules written out here, from upstream's code, as the oracle ---------


def upstream_jaw(labels: np.ndarray, cheek_width: int = 90) -> np.ndarray:
    """Upstream FaceParsing's ``jaw`` mode on (512, 512) class ids -> (512, 512) uint8 {0, 255}."""
    cone = np.zeros((33, 33), dtype=np.uint8)  # cone_height 21 + tail_height 12, centre column 16
    for row in range(10, 21):  # rows 10..20 are 1, 3, ..., 21 pixels wide
        cone[row, 16 - (row - 10) : 16 + (row - 10) + 1] = 1
    cone[21:, 16 - 10 : 16 + 10 + 1] = 1  # the tail is as wide as the cone's last row (21)
    cheek_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))
    cheeks = np.zeros((512, 512), dtype=np.uint8)
    cv2.rectangle(cheeks, (0, 0), (256 - cheek_width, 512), 255, -1)
    cv2.rectangle(cheeks, (256 + cheek_width, 0), (512, 512), 255, -1)
    skin = (labels == 1).astype(np.uint8) * 255
    dilated = cv2.dilate(skin, cone, iterations=1)
    eroded = cv2.erode(dilated, cheek_kernel, iterations=2)
    face = cv2.bitwise_or(cv2.bitwise_and(eroded, cheeks), cv2.bitwise_and(dilated, cv2.bitwise_not(cheeks)))
    out = labels.astype(np.int64)
    out[(face == 255) & (labels != 10)] = 255
    out[np.isin(labels, [11, 12, 13])] = 255
    out[out != 255] = 0
    return out.astype(np.uint8)


def upstream_mask_from_region(region: np.ndarray, box: tuple, ratio: float = 0.5) -> np.ndarray:
    """Upstream ``face_seg`` + ``get_image``'s mask steps, with Pillow, from a (512, 512) uint8 mask."""
    x, y, x1, y1 = box
    crop, s = blend_square(box, 1.5)  # upstream get_crop_box (tested above against hand values)
    xs, ys = crop[0], crop[1]
    size = (2 * s, 2 * s)
    resized = Image.fromarray(region).resize(size)  # Pillow's default filter
    small = resized.crop((x - xs, y - ys, x1 - xs, y1 - ys))
    in_box = Image.new("L", size, 0)
    in_box.paste(small, (x - xs, y - ys, x1 - xs, y1 - ys))
    top = int(size[1] * ratio)
    cut = Image.new("L", size, 0)
    cut.paste(in_box.crop((0, top, size[0], size[1])), (0, top))
    k = int(0.05 * size[0] // 2 * 2) + 1
    return cv2.GaussianBlur(np.array(cut), (k, k), 0)


def upstream_paste(frame: np.ndarray, face: np.ndarray, box: tuple, mask: np.ndarray) -> np.ndarray:
    """Upstream inference.py + ``get_image``'s paste: cv2 resize to the box, PIL crop/paste with the mask."""
    x, y, x1, y1 = box
    face = cv2.resize(face, (x1 - x, y1 - y))
    body = Image.fromarray(frame[:, :, ::-1].copy())
    crop, _ = blend_square(box, 1.5)
    face_large = body.crop(tuple(crop))
    face_large.paste(
        Image.fromarray(face[:, :, ::-1].copy()), (x - crop[0], y - crop[1], x1 - crop[0], y1 - crop[1])
    )
    body.paste(face_large, tuple(crop[:2]), Image.fromarray(mask))
    return np.array(body)[:, :, ::-1]


def test_blur_kernel_size_hand_values():
    assert [blur_kernel_size(side) for side in (20, 100, 150, 300, 420)] == [1, 5, 7, 15, 21]


def test_jaw_mode_equals_the_upstream_rule():
    labels = face_labels()
    np.testing.assert_array_equal(parsing_mask(labels, "jaw"), upstream_jaw(labels))
    rng = np.random.default_rng(4)
    noisy = rng.choice([0, 1, 1, 1, 10, 12, 17], size=(512, 512)).astype(np.uint8)
    np.testing.assert_array_equal(parsing_mask(noisy, "jaw"), upstream_jaw(noisy))


@pytest.mark.parametrize("box", [BOX, (60, 50, 141, 133), (-30, 90, 50, 190)])
def test_ellipse_off_is_upstreams_mask_from_a_label_map(box):
    labels = face_labels()
    square = blend_square(box, 1.5)[0]
    material = make_material(parsing_mask(labels, "jaw"), box, square, BlendConfig(ellipse=False))
    expected = upstream_mask_from_region(upstream_jaw(labels), box)
    assert material.parsed and material.mask.dtype == np.uint8
    np.testing.assert_array_equal(material.mask, expected)
    assert 0 < np.count_nonzero(expected) and np.any((expected > 0) & (expected < 255))


def test_ellipse_on_is_the_upstream_mask_times_the_feathered_ellipse():
    labels = face_labels()
    square = blend_square(BOX, 1.5)[0]
    cfg = BlendConfig()
    material = make_material(parsing_mask(labels, "jaw"), BOX, square, cfg)
    upstream = upstream_mask_from_region(upstream_jaw(labels), BOX)
    ellipse = np.zeros(upstream.shape, dtype=np.float32)
    x1, y1, x2, y2 = BOX[0] - square[0], BOX[1] - square[1], BOX[2] - square[0], BOX[3] - square[1]
    ellipse[y1:y2, x1:x2] = ellipse_mask(y2 - y1, x2 - x1, cfg.ellipse_feather)
    np.testing.assert_array_equal(material.mask, np.rint(upstream * ellipse).astype(np.uint8))
    assert np.any(material.mask < upstream)


@pytest.fixture(scope="module")
def tiny_parser(tmp_path_factory) -> FaceParser:
    layout = ModelLayout.at(tmp_path_factory.mktemp("blend-parse") / "tiny", tiny=True)
    write_tiny_face_parser(layout, seed=0)
    return load_face_parser(layout, CPU, batch_size=1)


def upstream_parse(net: nn.Module, crop_rgb: Image.Image) -> np.ndarray:
    """Upstream FaceParsing.__call__ up to the argmax: Pillow bilinear to 512, ToTensor, Normalize."""
    x = torch.from_numpy(np.array(crop_rgb.resize((512, 512), Image.BILINEAR))).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        3, 1, 1
    )
    with torch.no_grad():
        return net(x[None])[0].numpy().argmax(0)


def test_ellipse_off_matches_upstream_end_to_end_with_the_tiny_bisenet(tiny_parser):
    frame = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)  # (512, 512, 3) uint8 BGR
    box = (170, 60, 290, 230)  # the face; its blend square is (103, 18, 357, 272)
    blender = Blender(tiny_parser, BlendConfig(ellipse=False))
    material = blender.prepare([frame], [box])[0]

    crop, _ = blend_square(box, 1.5)
    labels = upstream_parse(tiny_parser.net, Image.fromarray(frame[:, :, ::-1].copy()).crop(tuple(crop)))
    expected = upstream_mask_from_region(upstream_jaw(labels), box)
    assert material.parsed
    np.testing.assert_array_equal(material.mask, expected)
    assert np.count_nonzero(expected) > 100

    face = np.random.default_rng(5).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    out = blender.paste(frame, face, box, material)
    np.testing.assert_array_equal(out, upstream_paste(frame, face, box, expected))


@pytest.mark.parametrize("box", [BOX, (-30, 90, 50, 190), (150, -40, 230, 60), (0, 0, 200, 160)])
def test_paste_is_upstreams_pil_paste(frame, box):
    blender = Blender(None, BlendConfig())
    material = blender.prepare([frame], [box])[0]
    face = np.random.default_rng(6).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    out = blender.paste(frame, face, box, material)
    np.testing.assert_array_equal(out, upstream_paste(frame, face, box, np.asarray(material.mask)))


def test_face_shrinks_to_the_box_with_opencv_bilinear():
    face = np.random.default_rng(7).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    box = (40, 30, 120, 130)  # 80 wide, 100 tall: smaller than the face both ways
    fitted = fit_face(face, box)
    np.testing.assert_array_equal(fitted, cv2.resize(face, (80, 100), interpolation=cv2.INTER_LINEAR))
    assert np.any(fitted != cv2.resize(face, (80, 100), interpolation=cv2.INTER_AREA))
    grown = fit_face(face, (0, 0, 300, 280))
    np.testing.assert_array_equal(grown, cv2.resize(face, (300, 280), interpolation=cv2.INTER_LINEAR))


def test_gfpgan_upscaled_face_shrinks_with_the_area_filter():
    face = np.random.default_rng(8).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        fit_face(face, (0, 0, 80, 100)), cv2.resize(face, (80, 100), interpolation=cv2.INTER_AREA)
    )


def test_composite_is_pil_paste_with_a_mask():
    rng = np.random.default_rng(9)
    base, layer = (rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(2))
    mask = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    mask[0, :3] = (0, 255, 128)
    image = Image.fromarray(base)
    image.paste(Image.fromarray(layer), (0, 0), Image.fromarray(mask))
    out = composite(base, layer, mask)
    np.testing.assert_array_equal(out, np.asarray(image))
    assert tuple(out[0, 0]) == tuple(base[0, 0]) and tuple(out[0, 1]) == tuple(layer[0, 1])
    # the documented formula, in floats: round((base * (255 - m) + layer * m) / 255)
    m = mask.astype(np.float64)[..., None]
    np.testing.assert_array_equal(out, np.floor((base * (255 - m) + layer * m) / 255 + 0.5).astype(np.uint8))


def test_ellipse_off_without_parsing_is_a_config_error():
    with pytest.raises(ConfigError, match="blend.ellipse=false needs blend.parsing=true"):
        Blender(None, BlendConfig(ellipse=False, parsing=False))


def whole_square_material(region, box, square, cfg: BlendConfig) -> tuple[np.ndarray, bool]:
    """The ellipse-on mask and its ``parsed`` flag computed over the whole blend square (the maths before
    the window speed-ups): Pillow's bicubic resize of the whole mask, upstream's mask steps on the square,
    times the ellipse placed in a square of zeros."""
    side = square[2] - square[0]
    in_square = np.asarray(Image.fromarray(region).resize((side, side), Image.Resampling.BICUBIC))
    area = np.zeros((side, side), dtype=bool)  # the box inside the square, below the top cut
    bx1, by1, bx2, by2 = box[0] - square[0], box[1] - square[1], box[2] - square[0], box[3] - square[1]
    area[max(by1, 0) : max(by2, 0), max(bx1, 0) : max(bx2, 0)] = True
    area[: int(side * cfg.upper_boundary_ratio)] = False
    total = int(area.sum())
    parsed = total > 0 and int((in_square[area] >= 128).sum()) >= 0.02 * total
    if not parsed:
        in_square = np.full((side, side), 255, dtype=np.uint8)
    blurred = upstream_mask(in_square, box, square, cfg.upper_boundary_ratio)
    ellipse = np.zeros((side, side), dtype=np.float32)
    x1, y1, x2, y2 = box
    _place(ellipse, ellipse_mask(y2 - y1, x2 - x1, cfg.ellipse_feather), x1 - square[0], y1 - square[1])
    return np.rint(blurred.astype(np.float32) * ellipse).astype(np.uint8), parsed


@pytest.mark.parametrize("seed", range(8))
def test_box_window_mask_is_bit_identical_to_the_whole_square_maths(seed):
    """Blur and ellipse over the face box alone equal the whole square's, for boxes at 1080p sizes too,
    narrow squares (expand 1: the box touches the square's edges), any top cut and the parsing fallback."""
    rng = np.random.default_rng(seed)
    labels = face_labels()
    for _ in range(6):
        w, h = int(rng.integers(9, 700)), int(rng.integers(9, 700))
        x1, y1 = int(rng.integers(-50, 1300)), int(rng.integers(-50, 500))
        box = (x1, y1, x1 + w, y1 + h)
        cfg = BlendConfig(
            expand=float(rng.choice([1.0, 1.2, 1.5])),
            upper_boundary_ratio=float(rng.choice([0.0, 0.3, 0.5, 0.8])),
            ellipse_feather=float(rng.choice([0.0, 0.15, 0.5])),
        )
        square = blend_square(box, cfg.expand)[0]
        region = parsing_mask(labels, "jaw") if rng.random() < 0.7 else np.zeros((512, 512), np.uint8)
        material = make_material(region, box, square, cfg)
        mask, parsed = whole_square_material(region, box, square, cfg)
        np.testing.assert_array_equal(material.mask, mask)
        assert material.parsed == parsed
        fallback = make_material(None, box, square, cfg)
        full = np.full((512, 512), 255, dtype=np.uint8)
        np.testing.assert_array_equal(fallback.mask, whole_square_material(full, box, square, cfg)[0])


def noisy_labels(rng: np.random.Generator) -> np.ndarray:
    """:func:`face_labels` with random blobs of skin, nose and lips, so the morphology has edges everywhere."""
    labels = face_labels()
    for _ in range(40):
        y, x = (int(v) for v in rng.integers(0, 500, 2))
        labels[y : y + int(rng.integers(2, 30)), x : x + int(rng.integers(2, 30))] = rng.choice(
            [0, 1, 10, 12, 14]
        )
    return labels


@pytest.mark.parametrize("mode", ["jaw", "raw", "neck"])
def test_parsing_mask_over_a_window_is_the_whole_maps_pixels(mode):
    rng = np.random.default_rng(3)
    for _ in range(30):
        labels, cheek = noisy_labels(rng), int(rng.choice([20, 90, 200]))
        whole = parsing_mask(labels, mode, cheek_width=cheek)
        x1, x2 = sorted(int(v) for v in rng.choice(513, 2, replace=False))
        y1, y2 = sorted(int(v) for v in rng.choice(513, 2, replace=False))
        part = parsing_mask(labels, mode, cheek_width=cheek, window=(x1, y1, x2, y2))
        np.testing.assert_array_equal(part[y1:y2, x1:x2], whole[y1:y2, x1:x2])
        assert not part[:y1].any() and not part[y2:].any()
        assert not part[:, :x1].any() and not part[:, x2:].any()


def test_blender_material_from_class_ids_is_the_whole_region_maths():
    """The blender computes the parsing region only where the mask can survive: the same material as from
    the whole region, for random boxes, cuts and modes (ellipse on and off)."""
    rng = np.random.default_rng(4)
    for _ in range(40):
        w, h = int(rng.integers(9, 700)), int(rng.integers(9, 700))
        x1, y1 = int(rng.integers(-50, 1300)), int(rng.integers(-50, 500))
        box = (x1, y1, x1 + w, y1 + h)
        cfg = BlendConfig(
            mode=str(rng.choice(["jaw", "raw", "neck"])),
            ellipse=bool(rng.random() < 0.8),
            expand=float(rng.choice([1.0, 1.2, 1.5])),
            upper_boundary_ratio=float(rng.choice([0.0, 0.3, 0.5, 0.8])),
        )
        labels = noisy_labels(rng)
        square = blend_square(box, cfg.expand)[0]
        got = Blender(None, replace(cfg, parsing=True)).material(labels, box)
        expected = make_material(parsing_mask(labels, cfg.mode), box, square, cfg)
        np.testing.assert_array_equal(got.mask, expected.mask)
        assert got.parsed == expected.parsed


def test_ellipse_is_the_numpy_formula_value_for_value():
    """The compiled ellipse against the formula in numpy, for every feather kind and many sizes."""
    rng = np.random.default_rng(5)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(1, 800, 2))
        feather = float(rng.choice([0.0, 0.1, 0.15, 0.5, 1.0, rng.random()]))
        ys = (np.arange(h, dtype=np.float64) + 0.5 - h / 2) / (h / 2)
        xs = (np.arange(w, dtype=np.float64) + 0.5 - w / 2) / (w / 2)
        r = np.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2)
        if feather == 0.0:
            expected = (r <= 1.0).astype(np.float32)
        else:
            t = np.clip((1.0 - r) / feather, 0.0, 1.0)
            expected = (t * t * (3.0 - 2.0 * t)).astype(np.float32)
        np.testing.assert_array_equal(ellipse_mask(h, w, feather), expected)
