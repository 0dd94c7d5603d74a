"""The fast paste is the upstream-exact paste; the device paste stays within one level of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from musetalk.blending import blend_square, fit_face, make_material, paste_face
from musetalk.boxes import crop_face
from musetalk.composite import DeviceCompositor, active_rect, paste_numpy
from musetalk.config import BlendConfig


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


@pytest.mark.parametrize("box", BOXES)
def test_host_paste_sends_only_the_rectangle_and_matches_the_device_paste(box):
    """``paste_host`` (the frame stays on the host, only ``rect`` goes through the device) writes exactly
    what the whole-frame device paste writes, in place, and nothing outside ``rect``."""
    rng = np.random.default_rng(11 + sum(box))
    frame, face, square, material = _case(rng, 360, 400, box)
    rect = active_rect(box, square, material.mask, frame.shape[:2])
    compositor = DeviceCompositor(torch.device("cpu"))
    whole = compositor.paste(
        torch.from_numpy(frame.copy()), torch.from_numpy(face), box, square,
        torch.from_numpy(material.mask.copy()), rect,
    ).numpy()  # fmt: skip
    host = frame.copy()
    assert compositor.paste_host(host, face, box, square, material.mask, rect, stream=None) is host
    assert np.array_equal(host, whole)
    outside = np.ones(frame.shape[:2], dtype=bool)
    if rect is not None:
        outside[rect[1] : rect[3], rect[0] : rect[2]] = False
    assert np.array_equal(host[outside], frame[outside])


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_paste_on_a_side_stream_matches_the_cpu_while_the_unit_stream_is_busy():
    """On CUDA the rectangle is blended on a side stream: the result is the CPU's (the same maths), and it
    comes back while the unit's own stream still runs a long queue of kernels."""
    from musetalk.stages import side_stream

    cuda = torch.device("cuda")
    rng = np.random.default_rng(5)
    frame, face, square, material = _case(rng, 1080, 1920, (800, 300, 1100, 650))
    rect = active_rect((800, 300, 1100, 650), square, material.mask, frame.shape[:2])
    expected = DeviceCompositor(torch.device("cpu")).paste_host(
        frame.copy(), face, (800, 300, 1100, 650), square, material.mask, rect
    )
    compositor, stream = DeviceCompositor(cuda), side_stream(cuda)
    compositor.paste_host(
        frame.copy(), face, (800, 300, 1100, 650), square, material.mask, rect, stream
    )  # warm
    busy = torch.randn(4096, 4096, device=cuda)
    for _ in range(50):  # the unit's stream: a long queue
        busy = busy @ busy / 4096
    done = torch.cuda.Event()
    done.record()
    got = compositor.paste_host(
        frame.copy(), face, (800, 300, 1100, 650), square, material.mask, rect, stream
    )
    overlapped = not done.query()
    assert np.abs(got.astype(int) - expected).max() <= 1
    assert overlapped, "the paste waited for the unit's stream"
