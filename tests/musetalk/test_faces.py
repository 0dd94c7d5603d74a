"""Face detection, landmarks, crop boxes and smoothing, on a real face (skimage's astronaut) and tiny weights."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from face_alignment.api import FaceAlignment, LandmarksType
from face_alignment.detection.sfd.net_s3fd import s3fd
from face_alignment.detection.sfd.sfd_detector import SFDDetector
from face_alignment.models import FAN
from skimage import data

from musetalk.boxes import CROP_SIZE, crop_box, crop_face, landmark_box, smooth_boxes
from musetalk.config import FaceConfig
from musetalk.faces import Detection, FaceAnalyzer, load_face_analyzer
from musetalk.layout import ModelLayout
from musetalk.testing.tiny_faces import write_tiny_face_models
from shards.errors import ConfigError, WeightsError

CPU = torch.device("cpu")
REAL_MODELS = ModelLayout.at(Path(__file__).resolve().parents[2] / "models")


@pytest.fixture(scope="session")
def face_layout(tmp_path_factory) -> ModelLayout:
    layout = ModelLayout.at(tmp_path_factory.mktemp("face-models") / "tiny", tiny=True)
    write_tiny_face_models(layout, seed=0)
    return layout


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """(512, 512, 3) uint8 BGR."""
    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


@pytest.fixture(scope="session")
def faces(astronaut) -> list[np.ndarray]:
    """Three (256, 256, 3) uint8 BGR frames with one face: plain, shifted, zoomed in."""
    plain = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
    shift = np.float32([[1, 0, 14], [0, 1, 9]])
    shifted = cv2.warpAffine(plain, shift, (256, 256), borderMode=cv2.BORDER_REPLICATE)
    zoomed = cv2.resize(astronaut[0:400, 80:480], (256, 256), interpolation=cv2.INTER_AREA)
    return [plain, shifted, zoomed]


@pytest.fixture(scope="session")
def coffee() -> np.ndarray:
    """(256, 384, 3) uint8 BGR, no face."""
    return cv2.resize(
        cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR), (384, 256), interpolation=cv2.INTER_AREA
    )


def config(**overrides) -> FaceConfig:
    base = {"detector": "haar", "crop": "box", "detect_max_side": 160, "batch_size": 2}
    return FaceConfig(**(base | overrides))


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def random_s3fd(seed: int) -> torch.nn.Module:
    """A random s3fd that reports many boxes (scores hover around 0.5) and whose boxes depend on the input.

    Default init shrinks activations layer by layer until the largest box barely depends on the image;
    He init at gain 0.7 keeps them alive without overflowing the box regression.
    """
    torch.manual_seed(seed)
    net = s3fd().eval()
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            module.weight.data.mul_(0.7)
            torch.nn.init.zeros_(module.bias)
    return net


# --- weight files -------------------------------------------------------------------------------


def test_tiny_files_have_the_official_formats(face_layout):
    # face-alignment's own loaders read them: SFDDetector(path_to_detector=...) and FAN + load_state_dict.
    detector = SFDDetector(device="cpu", path_to_detector=str(face_layout.s3fd))
    assert isinstance(detector.face_detector, s3fd)
    fan_state = torch.load(face_layout.fan, weights_only=True)
    FAN(1).load_state_dict(fan_state)  # strict
    assert set(fan_state) == set(FAN(1).state_dict())


def test_tiny_files_load_strictly_through_load_face_analyzer(face_layout):
    analyzer = load_face_analyzer(face_layout, config(detector="s3fd", crop="landmarks"), CPU)
    assert analyzer.fan.num_modules == 1
    assert analyzer.haar is None
    saved = torch.load(face_layout.s3fd, weights_only=True)
    loaded = analyzer.s3fd_net.state_dict()
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_tiny_models_are_deterministic(tmp_path):
    paths = []
    for name in ("a", "b"):
        layout = ModelLayout.at(tmp_path / name, tiny=True)
        write_tiny_face_models(layout, seed=3)
        paths.append(layout)
    for attr in ("s3fd", "fan"):
        first = torch.load(getattr(paths[0], attr), weights_only=True)
        second = torch.load(getattr(paths[1], attr), weights_only=True)
        assert all(torch.equal(first[k], second[k]) for k in first)


def _rewrite(src: ModelLayout, dst_root: Path, attr: str, edit) -> ModelLayout:
    dst = ModelLayout.at(dst_root, tiny=True)
    for name in ("s3fd", "fan"):
        getattr(dst, name).parent.mkdir(parents=True, exist_ok=True)
        state = torch.load(getattr(src, name), weights_only=True)
        if name == attr:
            state = edit(state)
        torch.save(state, getattr(dst, name))
    return dst


@pytest.mark.parametrize(
    ("attr", "cfg", "key"),
    [("s3fd", config(detector="s3fd"), "fc7.weight"), ("fan", config(crop="landmarks"), "conv1.weight")],
)
def test_renamed_key_is_a_weights_error_naming_it(face_layout, tmp_path, attr, cfg, key):
    def rename(state):
        return {(k + "_renamed" if k == key else k): v for k, v in state.items()}

    layout = _rewrite(face_layout, tmp_path / "models", attr, rename)
    with pytest.raises(WeightsError) as err:
        load_face_analyzer(layout, cfg, CPU)
    message = str(err.value)
    assert f"{key}_renamed" in message and key in message
    assert str(getattr(layout, attr)) in message and "make_tiny_models" in message
    assert "\n" not in message


def test_wrong_shape_and_garbage_are_weights_errors(face_layout, tmp_path):
    def reshape(state):
        return state | {"fc7.bias": torch.zeros(3)}

    layout = _rewrite(face_layout, tmp_path / "shape", "s3fd", reshape)
    with pytest.raises(WeightsError, match="fc7.bias"):
        load_face_analyzer(layout, config(detector="s3fd"), CPU)

    layout.fan.write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(WeightsError, match="not a readable torch checkpoint"):
        load_face_analyzer(layout, config(crop="landmarks"), CPU)

    torch.save({"m0.x": [1, 2]}, layout.fan)
    with pytest.raises(WeightsError, match="state dict of tensors"):
        load_face_analyzer(layout, config(crop="landmarks"), CPU)


def test_missing_files_name_the_path_and_the_fetch_command(tmp_path):
    layout = ModelLayout.at(tmp_path / "empty", tiny=True)
    with pytest.raises(WeightsError) as err:
        load_face_analyzer(layout, config(detector="s3fd"), CPU)
    assert str(layout.s3fd) in str(err.value)
    assert f"python -m scripts.make_tiny_models --dir {layout.root}" in str(err.value)
    with pytest.raises(WeightsError, match="FAN") as err:
        load_face_analyzer(layout, config(crop="landmarks"), CPU)
    assert str(layout.fan) in str(err.value)
    # Haar + box crop needs no weight file at all.
    assert load_face_analyzer(layout, config(), CPU).haar is not None


def test_unknown_names_are_config_errors(tmp_path):
    layout = ModelLayout.at(tmp_path, tiny=True)
    with pytest.raises(ConfigError, match="'retina'.*'mesh'"):
        load_face_analyzer(layout, config(detector="retina", crop="mesh"), CPU)
    with pytest.raises(ConfigError, match="batch_size"):
        load_face_analyzer(layout, config(batch_size=0), CPU)


# --- detection ----------------------------------------------------------------------------------


def test_tiny_s3fd_finds_no_face(face_layout, faces):
    analyzer = load_face_analyzer(face_layout, config(detector="s3fd"), CPU)
    assert analyzer.detect(faces) == [None, None, None]


def test_haar_finds_the_astronaut_and_nothing_in_coffee(faces, coffee, tmp_path):
    analyzer = load_face_analyzer(ModelLayout.at(tmp_path), config(), CPU)
    *found, nothing = analyzer.detect([*faces, coffee])
    assert nothing is None
    plain, shifted, zoomed = found
    for det in found:
        assert det is not None and det.landmarks is None and det.score > 0
    # The face sits at about x 0.35..0.53, y 0.13..0.31 of the full picture (Haar at 512 px).
    cx, cy = (plain.box[0] + plain.box[2]) / 2 / 256, (plain.box[1] + plain.box[3]) / 2 / 256
    assert 0.35 < cx < 0.53 and 0.13 < cy < 0.31
    # The shifted frame's box moved by the shift (14, 9); the zoomed face is larger.
    assert abs((shifted.box[0] - plain.box[0]) - 14) <= 6 and abs((shifted.box[1] - plain.box[1]) - 9) <= 6
    assert zoomed.box[2] - zoomed.box[0] > plain.box[2] - plain.box[0]


def test_detection_on_downscaled_frames_maps_boxes_to_full_size(astronaut, tmp_path):
    frame = cv2.resize(astronaut[:, 32:480], (448, 512), interpolation=cv2.INTER_AREA)  # not square
    layout = ModelLayout.at(tmp_path)
    small = load_face_analyzer(layout, config(detect_max_side=160), CPU).detect([frame])[0]
    full = load_face_analyzer(layout, config(detect_max_side=512), CPU).detect([frame])[0]
    assert iou(small.box, full.box) > 0.7


def test_s3fd_decoding_matches_face_alignment(tmp_path, faces):
    # The same random net through face-alignment's own SFDDetector (RGB in, flipped to BGR inside).
    net = random_s3fd(seed=1)
    path = tmp_path / "s3fd.pth"
    torch.save(net.state_dict(), path)
    reference = SFDDetector(device="cpu", path_to_detector=str(path))
    frame = cv2.resize(faces[0], (96, 96), interpolation=cv2.INTER_AREA)
    ours = FaceAnalyzer(config(detector="s3fd", detect_max_side=96, batch_size=1), CPU, s3fd_net=net)
    det = ours.detect([frame])[0]
    rgb = torch.from_numpy(frame[..., ::-1].copy()).permute(2, 0, 1)[None].float()
    boxes = np.array(reference.detect_from_batch(rgb)[0])
    assert len(boxes) > 1
    largest = boxes[np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))]
    np.testing.assert_allclose(det.box, largest[:4], rtol=1e-5)
    assert det.score == pytest.approx(float(largest[4]), rel=1e-5)
    # The comparison can tell channel orders apart: BGR read as RGB gives another box.
    swapped = ours.detect([frame[..., ::-1].copy()])[0]
    assert not np.allclose(swapped.box, det.box, rtol=1e-5)


def _groupings(analyzer: FaceAnalyzer, frames: list[np.ndarray], groups: list[list[int]]) -> list[Detection]:
    result: dict[int, Detection] = {}
    for group in groups:
        for i, det in zip(group, analyzer.detect([frames[i] for i in group]), strict=True):
            result[i] = det
    return [result[i] for i in range(len(frames))]


def _same(a: Detection | None, b: Detection | None) -> bool:
    if a is None or b is None:
        return a is b
    same_landmarks = (a.landmarks is None and b.landmarks is None) or np.array_equal(a.landmarks, b.landmarks)
    return a.box == b.box and a.score == b.score and same_landmarks


GROUPINGS = [[[0, 1, 2, 3]], [[3, 2], [1], [0]], [[1, 2, 3], [0]], [[2], [0, 3, 1]]]


def test_s3fd_results_do_not_depend_on_batch_mates(faces, coffee):
    frames = [cv2.resize(f, (128, 128), interpolation=cv2.INTER_AREA) for f in [*faces, coffee]]
    analyzer = FaceAnalyzer(
        config(detector="s3fd", detect_max_side=96, batch_size=3), CPU, s3fd_net=random_s3fd(2)
    )
    runs = [_groupings(analyzer, frames, groups) for groups in GROUPINGS]
    assert all(det is not None for det in runs[0])  # the random net reports boxes everywhere
    for run in runs[1:]:
        assert all(_same(a, b) for a, b in zip(runs[0], run, strict=True))


def test_haar_and_fan_results_do_not_depend_on_batch_mates(face_layout, faces, coffee):
    frames = [*faces, cv2.resize(coffee, (256, 256))]
    analyzer = load_face_analyzer(face_layout, config(crop="landmarks"), CPU)
    runs = [_groupings(analyzer, frames, groups) for groups in GROUPINGS[:3]]
    assert [det is None for det in runs[0]] == [False, False, False, True]
    for run in runs[1:]:
        assert all(_same(a, b) for a, b in zip(runs[0], run, strict=True))


# --- landmarks ----------------------------------------------------------------------------------


def test_landmarks_end_to_end_with_haar_and_tiny_fan(face_layout, faces):
    cfg = config(crop="landmarks")
    analyzer = load_face_analyzer(face_layout, cfg, CPU)
    for frame, det in zip(faces, analyzer.detect(faces), strict=True):
        assert det.landmarks.shape == (68, 2) and det.landmarks.dtype == np.float32
        # Random FAN heatmaps: the points are garbage, but they lie in face-alignment's crop of the face.
        x1, y1, x2, y2 = det.box
        half = (x2 - x1 + y2 - y1) / 195 * 100
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2 - (y2 - y1) * 0.12
        assert np.all(np.abs(det.landmarks - [cx, cy]) <= half + 2)
        box = crop_box(det, frame.shape[:2], cfg)
        bx1, by1, bx2, by2 = box
        assert 0 <= bx1 < bx2 <= 256 and 0 <= by1 < by2 <= 256
        assert bx2 - bx1 >= 8 and by2 - by1 >= 8
        assert crop_face(frame, box).shape == (CROP_SIZE, CROP_SIZE, 3)


def test_landmarks_match_face_alignment_get_landmarks(face_layout, faces):
    analyzer = load_face_analyzer(face_layout, config(crop="landmarks", batch_size=1), CPU)
    det = analyzer.detect(faces[:1])[0]
    # face-alignment's own landmark path, with our networks plugged in (no download, no compile).
    reference = object.__new__(FaceAlignment)
    reference.device, reference.dtype, reference.max_batch_size = "cpu", torch.float32, 1
    reference.flip_input, reference.landmarks_type = False, LandmarksType.TWO_D
    reference.face_detector = SFDDetector(device="cpu", path_to_detector=str(face_layout.s3fd))
    reference.face_alignment_net = analyzer.fan
    rgb = cv2.cvtColor(faces[0], cv2.COLOR_BGR2RGB)
    expected = reference.get_landmarks_from_image(rgb, detected_faces=[np.array([*det.box, det.score])])[0]
    np.testing.assert_array_equal(det.landmarks, expected)


@pytest.mark.slow
@pytest.mark.skipif(
    not (REAL_MODELS.s3fd.exists() and REAL_MODELS.fan.exists()),
    reason="real face-alignment weights not fetched",
)
def test_real_s3fd_and_fan_on_the_astronaut(faces, tmp_path):
    haar = load_face_analyzer(ModelLayout.at(tmp_path), config(), CPU).detect(faces[:1])[0]
    cfg = config(detector="s3fd", crop="landmarks", detect_max_side=256, batch_size=1)
    det = load_face_analyzer(REAL_MODELS, cfg, CPU).detect(faces[:1])[0]
    assert det is not None and det.score > 0.9
    assert iou(det.box, haar.box) > 0.3
    nose_x, nose_y = det.landmarks[29]
    assert haar.box[0] < nose_x < haar.box[2] and haar.box[1] < nose_y < haar.box[3]
    x1, y1, x2, y2 = crop_box(det, (256, 256), cfg)
    assert x1 < nose_x < x2 and y1 < nose_y < y2


# --- crop boxes ---------------------------------------------------------------------------------


def landmarks_with(x_min=80.7, x_max=160.2, y_max=200.9, nose_y=150.5) -> np.ndarray:
    points = np.tile(np.float32([120.0, 140.0]), (68, 1))
    points[0] = (x_min, 130.0)
    points[16] = (x_max, 130.0)
    points[8] = (120.0, y_max)
    points[29] = (120.0, nose_y)
    return points


DET_BOX = (50.6, 60.2, 150.9, 170.4)


def test_crop_box_landmarks_rule():
    det = Detection(box=DET_BOX, score=1.0, landmarks=landmarks_with())
    # x 80..160, bottom 200, nose 150 -> top 150 - (200 - 150) = 100; then 10 px below the chin.
    assert crop_box(det, (300, 300), config(crop="landmarks")) == (80, 100, 160, 210)
    assert crop_box(det, (300, 300), config(crop="landmarks", extra_margin=0)) == (80, 100, 160, 200)


@pytest.mark.parametrize(
    ("shift", "top"),
    [
        (7, 114),  # nose 150 + 7 = 157 -> top 157 - (200 - 157) = 114 = 100 + 2 * 7
        (-9, 82),  # nose 150 - 9 = 141 -> top 141 - (200 - 141) = 82 = 100 - 2 * 9
    ],
)
def test_bbox_shift_moves_the_landmark_top_by_twice_the_shift(shift, top):
    det = Detection(box=DET_BOX, score=1.0, landmarks=landmarks_with())
    assert crop_box(det, (300, 300), config(crop="landmarks", bbox_shift=shift)) == (80, top, 160, 210)
    assert landmark_box(det.landmarks, shift) == (80, top, 160, 200)


def test_bbox_shift_below_the_chin_counts_in_the_bottom():
    # Upstream moves landmark 29 in place: nose 150 + 60 = 210 is the new max y, so top = bottom = 210.
    det = Detection(box=DET_BOX, score=1.0, landmarks=landmarks_with())
    assert landmark_box(det.landmarks, 60) is None
    assert crop_box(det, (300, 300), config(crop="landmarks", bbox_shift=60)) == (50, 60, 150, 180)


def test_crop_box_landmarks_clipped_at_frame_borders():
    det = Detection(box=DET_BOX, score=1.0, landmarks=landmarks_with(x_min=2.0, x_max=320.0, nose_y=90.0))
    # top max(0, 90 - (200 - 90)) = 0; x 2..320 -> 300; bottom 200 + 10 -> 205 (frame height).
    assert crop_box(det, (205, 300), config(crop="landmarks")) == (2, 0, 300, 205)


UNSHIFTED_DET_BOX = (50, 60, 150, 180)  # int(DET_BOX), bottom + 10: upstream falls back without bbox_shift


def test_landmark_box_left_of_the_frame_falls_back_to_the_detector_box():
    cfg = config(crop="landmarks", bbox_shift=5)
    left = Detection(box=DET_BOX, score=1.0, landmarks=landmarks_with(x_min=-5.0))
    assert landmark_box(left.landmarks) is None
    assert crop_box(left, (300, 300), cfg) == UNSHIFTED_DET_BOX


def test_empty_landmark_box_falls_back_to_the_detector_box():
    cfg = config(crop="landmarks", bbox_shift=5)
    collapsed = Detection(box=DET_BOX, score=1.0, landmarks=np.full((68, 2), 120.0, np.float32))
    assert landmark_box(collapsed.landmarks) is None
    assert crop_box(collapsed, (300, 300), cfg) == UNSHIFTED_DET_BOX
    assert crop_box(Detection(box=DET_BOX, score=1.0), (300, 300), cfg) == UNSHIFTED_DET_BOX


def test_landmarks_are_truncated_toward_zero():
    # -0.6 truncates to 0 (a usable box at the left edge); flooring would give -1 and the detector box.
    near = Detection(box=DET_BOX, score=1.0, landmarks=landmarks_with(x_min=-0.6))
    assert landmark_box(near.landmarks) == (0, 100, 160, 200)
    assert crop_box(near, (300, 300), config(crop="landmarks")) == (0, 100, 160, 210)
    # -1.2 truncates to -1: x1 < 0, so upstream's fallback applies.
    far = Detection(box=DET_BOX, score=1.0, landmarks=landmarks_with(x_min=-1.2))
    assert landmark_box(far.landmarks) is None
    assert crop_box(far, (300, 300), config(crop="landmarks")) == UNSHIFTED_DET_BOX
    # 150.9 -> 150 and 200.99 -> 200 (not rounded): top 150 - 50 = 100.
    assert landmark_box(landmarks_with(nose_y=150.9, y_max=200.99)) == (80, 100, 160, 200)


def test_unusable_landmark_box_in_the_frame_falls_back_to_the_detector_box():
    # Our addition: upstream would paste a 4 px tall face, or crash on a box outside the frame.
    flat = Detection(box=DET_BOX, score=1.0, landmarks=landmarks_with(y_max=152.0, nose_y=150.0))
    assert landmark_box(flat.landmarks) == (80, 148, 160, 152)
    assert crop_box(flat, (300, 300), config(crop="landmarks")) == UNSHIFTED_DET_BOX
    outside = Detection(box=DET_BOX, score=1.0, landmarks=landmarks_with() + 400)
    assert crop_box(outside, (300, 300), config(crop="landmarks")) == UNSHIFTED_DET_BOX


def test_crop_box_box_mode():
    det = Detection(box=DET_BOX, score=1.0, landmarks=landmarks_with())
    assert crop_box(det, (300, 300), config()) == (50, 60, 150, 180)  # landmarks ignored
    assert crop_box(det, (300, 300), config(bbox_shift=-8)) == (50, 52, 150, 180)
    assert crop_box(det, (300, 300), config(bbox_shift=-100)) == (50, 0, 150, 180)
    assert crop_box(det, (175, 300), config(bbox_shift=12)) == (50, 72, 150, 175)
    edge = Detection(box=(-10.5, -3.2, 60.0, 70.9), score=1.0)
    assert crop_box(edge, (100, 50), config(extra_margin=40)) == (0, 0, 50, 100)
    assert crop_box(det, (300, 300), config(bbox_shift=105)) is None  # nothing left of the box
    assert crop_box(None, (300, 300), config()) is None


def test_crop_face_resizes_any_box_to_256():
    frame = np.zeros((120, 200, 3), np.uint8)
    frame[20:60, 30:130] = (10, 200, 30)
    face = crop_face(frame, (30, 20, 130, 60))  # 100 x 40, not square
    assert face.shape == (256, 256, 3) and face.dtype == np.uint8
    assert np.all(face == (10, 200, 30))
    for bad in [(30, 20, 30, 60), (30, 20, 230, 60), (-1, 0, 10, 10)]:
        with pytest.raises(ValueError):
            crop_face(frame, bad)


# --- smoothing ----------------------------------------------------------------------------------


def random_track(n: int, seed: int, none_every: int = 7) -> list:
    rng = random.Random(seed)
    track = []
    for i in range(n):
        if i % none_every == 3:
            track.append(None)
            continue
        x, y = 100 + rng.randint(-4, 4), 80 + rng.randint(-4, 4)
        track.append((x, y, x + 90 + rng.randint(-3, 3), y + 110 + rng.randint(-3, 3)))
    return track


def test_smooth_boxes_keeps_none_and_radius_zero_is_identity():
    track = random_track(20, seed=0)
    smoothed = smooth_boxes(track, 2)
    assert [b is None for b in smoothed] == [b is None for b in track]
    assert smooth_boxes(track, 0) == track
    assert smooth_boxes([], 3) == []
    assert smooth_boxes([None, None], 1) == [None, None]


def test_smooth_boxes_reads_only_its_window():
    track = random_track(30, seed=1)
    radius = 2
    full = smooth_boxes(track, radius)
    rng = random.Random(5)
    for i in range(len(track)):
        lo, hi = max(0, i - radius), min(len(track), i + radius + 1)
        start = lo if lo == 0 else rng.randint(0, lo)  # any sub-list holding the whole window
        end = rng.randint(hi, len(track))
        assert smooth_boxes(track[start:end], radius)[i - start] == full[i]


def test_smooth_boxes_constant_track_and_single_outlier():
    box = (40, 50, 140, 170)
    track = [box, None, box, box, box, None, box]
    assert smooth_boxes(track, 2) == [box, None, box, box, box, None, box]
    spiked = [box, box, (90, 95, 200, 230), box, box]
    assert smooth_boxes(spiked, 2) == [box, box, box, box, box]


def test_smooth_boxes_reduces_jitter():
    rng = np.random.default_rng(0)
    truth = np.array([100, 80, 190, 190])
    track = [tuple(int(v) for v in truth + rng.integers(-5, 6, size=4)) for _ in range(60)]
    smoothed = smooth_boxes(track, 2)
    raw_error = np.abs(np.array(track) - truth).mean()
    smooth_error = np.abs(np.array(smoothed) - truth).mean()
    assert smooth_error < 0.75 * raw_error
    assert all(x1 < x2 and y1 < y2 for x1, y1, x2, y2 in smoothed)


def test_detection_is_frozen():
    det = Detection(box=DET_BOX, score=0.9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        det.score = 1.0
