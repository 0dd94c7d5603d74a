"""The fast paste is the upstream-exact paste; the device paste stays within one level of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from musetalk.blending import blend_square, fit_face, make_material, paste_face
from musetalk.composite import DeviceCompositor, active_rect, paste_numpy
from musetalk.config import BlendConfig
from musetalk.faces import crop_face


def _case(rng, h, w, box, face_side=256):
    frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    face = rng.integers(0, 256, (face_side, face_side, 3), dtype=np.uint8)
    square, _ = blend_square(box, 1.5)
    region = np.where(rng.random((512, 512)) < 0.7, 255, 0).astype(np.uint8)
    material = make_material(region, box, square, BlendConfig())
    return frame, face, square, material


BOXES = [
    (120, 80, 300, 290),  # inside
    (-20, 10, 150, 200),  # box and square leave the frame on the left
    (250, 300, 400, 359),  # square leaves the frame at the bottom and right
    (5, 5, 6, 7),  # tiny box
]


@pytest.mark.parametrize("box", BOXES)
@pytest.mark.parametrize("face_side", [256, 512])
def test_numpy_paste_is_bit_exact(box, face_side):
    rng = np.random.default_rng(sum(box) + face_side)
    frame, face, square, material = _case(rng, 360, 400, box, face_side)
    face_box = fit_face(face, box)
    expected = paste_face(frame, face_box, box, square, material.mask)
    rect = active_rect(box, square, material.mask, frame.shape[:2])
    got = paste_numpy(frame.copy(), face, box, square, material.mask, rect)
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("box", BOXES)
@pytest.mark.parametrize("face_side", [256, 512])
def test_device_paste_within_one_level(box, face_side):
    rng = np.random.default_rng(7 + face_side)
    frame, face, square, material = _case(rng, 360, 400, box, face_side)
    expected = paste_face(frame, fit_face(face, box), box, square, material.mask)
    rect = active_rect(box, square, material.mask, frame.shape[:2])
    compositor = DeviceCompositor(torch.device("cpu"))
    got = compositor.paste(
        torch.from_numpy(frame.copy()), torch.from_numpy(face), box, square,
        torch.from_numpy(material.mask.copy()), rect,
    ).numpy()  # fmt: skip
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_device_paste_on_a_real_crop():
    photo = np.ascontiguousarray(data.astronaut()[:, :, ::-1])
    frame = np.ascontiguousarray(np.repeat(np.repeat(photo, 2, axis=0), 2, axis=1))  # 1024x1024
    box = (360, 130, 560, 380)
    face = crop_face(frame, box)[:, ::-1].copy()  # a "generated" face: the crop, mirrored
    square, _ = blend_square(box, 1.5)
    material = make_material(None, box, square, BlendConfig())
    expected = paste_face(frame, fit_face(face, box), box, square, material.mask)
    rect = active_rect(box, square, material.mask, frame.shape[:2])
    assert np.array_equal(paste_numpy(frame.copy(), face, box, square, material.mask, rect), expected)
    got = DeviceCompositor(torch.device("cpu")).paste(
        torch.from_numpy(frame.copy()), torch.from_numpy(face), box, square,
        torch.from_numpy(material.mask.copy()), rect,
    ).numpy()  # fmt: skip
    assert np.abs(got.astype(int) - expected).max() <= 1
    assert not np.array_equal(got, frame)


def test_active_rect_covers_every_changed_pixel():
    rng = np.random.default_rng(3)
    frame, face, square, material = _case(rng, 360, 400, BOXES[0])
    box = BOXES[0]
    changed = np.argwhere(
        (paste_face(frame, fit_face(face, box), box, square, material.mask) != frame).any(-1)
    )
    x1, y1, x2, y2 = active_rect(box, square, material.mask, frame.shape[:2])
    assert changed.size and (changed[:, 0] >= y1).all() and (changed[:, 0] < y2).all()
    assert (changed[:, 1] >= x1).all() and (changed[:, 1] < x2).all()
    assert active_rect(box, square, np.zeros_like(material.mask), frame.shape[:2]) is None
