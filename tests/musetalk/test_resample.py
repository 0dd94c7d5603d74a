"""musetalk/resample.py against the installed Pillow: every square side, both filters, windows."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from musetalk.resample import BICUBIC, BILINEAR, coefficients, resize_lanczos4, resize_square

PIL_FILTER = {BILINEAR: Image.Resampling.BILINEAR, BICUBIC: Image.Resampling.BICUBIC}


def pillow(image: np.ndarray, side: int, kind: str) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((side, side), PIL_FILTER[kind]))


def test_every_side_to_and_from_512_matches_pillow():
    """The two resizes of the blend: a square of any side to BiSeNet's 512 (RGB, bilinear) and the 512
    parsing mask back to the square (grey, bicubic), for every side up to 700 and some beyond."""
    rng = np.random.default_rng(0)
    mask = np.where(rng.random((512, 512)) > 0.5, 255, 0).astype(np.uint8)
    noise = rng.integers(0, 256, (512, 512), dtype=np.uint8)
    for side in [*range(1, 701), 899, 900, 1024, 1500]:
        image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        assert np.array_equal(resize_square(image, 512, BILINEAR), pillow(image, 512, BILINEAR)), side
        source = mask if side % 2 else noise
        assert np.array_equal(resize_square(source, side, BICUBIC), pillow(source, side, BICUBIC)), side


@pytest.mark.parametrize("kind", [BILINEAR, BICUBIC])
def test_windows_are_the_same_pixels_as_the_whole_output(kind):
    rng = np.random.default_rng(1)
    for _ in range(200):
        n, side = (int(v) for v in rng.integers(1, 400, 2))
        channels = () if rng.random() < 0.5 else (3,)
        image = rng.integers(0, 256, (n, n, *channels), dtype=np.uint8)
        whole = pillow(image, side, kind)
        x1, x2 = sorted(int(v) for v in rng.choice(side + 1, 2, replace=False))
        y1, y2 = sorted(int(v) for v in rng.choice(side + 1, 2, replace=False))
        got = resize_square(image, side, kind, (x1, y1, x2, y2))
        assert np.array_equal(got, whole[y1:y2, x1:x2]), (n, side, (x1, y1, x2, y2))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="square uint8"):
        resize_square(np.zeros((4, 5), np.uint8), 3, BILINEAR)
    with pytest.raises(ValueError, match="outside"):
        resize_square(np.zeros((4, 4), np.uint8), 3, BILINEAR, (0, 0, 4, 3))
    with pytest.raises(ValueError, match="unknown filter"):
        coefficients(4, 3, "lanczos")


def test_lanczos4_is_opencvs_resize_for_any_shape():
    """The face crop: any box to 256x256 (shrinking and growing), and random shapes both ways, views of
    a frame included."""
    rng = np.random.default_rng(2)
    frame = rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    for i in range(150):
        h, w = (int(v) for v in rng.integers(1, 900, 2))
        size = (256, 256) if i % 3 else tuple(int(v) for v in rng.integers(1, 600, 2))
        y, x = int(rng.integers(0, 1080 - h + 1)), int(rng.integers(0, 1920 - w + 1))
        image = frame[y : y + h, x : x + w] if i % 2 else cv2.GaussianBlur(frame[:h, :w], (7, 7), 0)
        expected = cv2.resize(image, size, interpolation=cv2.INTER_LANCZOS4)
        assert np.array_equal(resize_lanczos4(image, size), expected), (h, w, size)
    grey = rng.integers(0, 256, (37, 53, 1), dtype=np.uint8)
    expected = cv2.resize(grey, (20, 90), interpolation=cv2.INTER_LANCZOS4)
    assert np.array_equal(resize_lanczos4(grey, (20, 90))[..., 0], expected)
