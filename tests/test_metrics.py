"""Evaluation metrics on constructed inputs with known answers, and mediapipe landmarks on the real fixtures."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from tasks.common.facemesh import FaceMesh
from tasks.common.media import read_frames
from tasks.evaluation.metrics import (
    Keypoints,
    assign_hands,
    audio_envelope,
    extract_keypoints,
    face_box,
    flicker,
    hkv,
    identity_over_time,
    keypoint_variance,
    lagged_correlation,
    lagged_correlation_null,
    listening_kv,
    mouth_series,
    pooled_lagged_correlation,
)
from tests.conftest import shared_path


def still(t: int, k: int, seed: int = 0) -> np.ndarray:
    """[t, k, 2] the same (non-round) points in every frame."""
    return np.repeat(np.random.default_rng(seed).uniform(0, 512, (1, k, 2)), t, axis=0)


def alternating(t: int, k: int, amplitude: float) -> np.ndarray:
    """[t, k, 2] every coordinate 0, amplitude, 0, ... : population variance (amplitude / 2)^2."""
    return np.broadcast_to((np.arange(t) % 2 * amplitude)[:, None, None], (t, k, 2)).copy()


def clip(t: int, body=None, left=None, right=None, face=None) -> Keypoints:
    nan = lambda k: np.full((t, k, 2), np.nan)  # noqa: E731
    return Keypoints(body=nan(33) if body is None else body, left_hand=nan(21) if left is None else left,
                     right_hand=nan(21) if right is None else right, face=nan(468) if face is None else face)


# ---------------------------------------------------------------------------------------------- keypoint variance


def test_keypoint_variance_known_values():
    assert keypoint_variance(still(10, 33)) == 0.0  # exactly, despite non-round coordinates
    assert keypoint_variance(alternating(10, 5, 2.0)) == 1.0
    pts = alternating(10, 5, 2.0)
    pts[..., 1] = 7.0  # y still: mean over (k, coord) of {1, 0}
    assert keypoint_variance(pts) == 0.5
    pts = alternating(10, 5, 2.0)
    pts[[2, 5]] = np.nan  # one even and one odd frame lost: the rest still alternates 0/2
    pts[[7, 8], 0] = np.nan  # keypoint 0 alone loses another pair
    assert keypoint_variance(pts) == 1.0


def test_keypoint_variance_min_frames_and_selection():
    pts = alternating(6, 2, 2.0)
    pts[1:, 1] = np.nan  # keypoint 1 seen once: cannot qualify, keypoint 0 alone decides
    assert keypoint_variance(pts) == 1.0
    assert keypoint_variance(pts, min_frames=7) is None
    assert keypoint_variance(np.full((4, 3, 2), np.nan)) is None
    even = np.arange(6) % 2 == 0  # only the 0-valued frames
    assert keypoint_variance(pts, frames=even) == 0.0
    assert keypoint_variance(pts, frames=np.zeros(6, bool)) is None
    with pytest.raises(ValueError, match="bool"):
        keypoint_variance(pts, frames=np.ones(5, bool))


def test_listening_kv_counts_listening_frames_only():
    t = 20
    speaking = np.arange(t) < 10
    moving = np.where(speaking[:, None, None], alternating(t, 1, 4.0), 3.0)  # moves only while speaking
    kp = clip(t, body=np.broadcast_to(moving, (t, 33, 2)).copy(), left=np.broadcast_to(moving, (t, 21, 2)).copy(),
              face=np.broadcast_to(moving, (t, 468, 2)).copy())
    assert listening_kv(kp, ~speaking) == {"lbkv": 0.0, "lhkv": 0.0, "lfkv": 0.0}
    talking = listening_kv(kp, speaking)
    assert talking == {"lbkv": 4.0, "lhkv": 4.0, "lfkv": 4.0}
    assert keypoint_variance(kp.body) > 0
    with pytest.raises(ValueError, match="listening"):
        listening_kv(kp, np.ones(t + 1, bool))


def test_hkv_averages_the_hands_that_give_a_value():
    assert hkv(clip(8, left=alternating(8, 21, 2.0), right=alternating(8, 21, 4.0))) == pytest.approx(2.5)
    assert hkv(clip(8, left=alternating(8, 21, 2.0))) == 1.0
    assert hkv(clip(8, right=alternating(8, 21, 4.0))) == 4.0
    assert hkv(clip(8)) is None


def test_detection_rates():
    body = still(4, 33)
    body[0] = np.nan
    face = still(4, 468)
    face[:3] = np.nan
    left = still(4, 21)
    left[:2] = np.nan
    right = still(4, 21)
    right[1:] = np.nan
    assert clip(4, body=body, left=left, right=right, face=face).detection_rates() == {
        "body": 0.75, "hands": 0.75, "face": 0.25}  # fmt: skip


def test_assign_hands():
    pose = np.array([[100.0, 0.0], [0.0, 0.0]])  # subject's left wrist at x=100, right wrist at x=0
    # one hand near the right wrist, mislabelled: Pose decides
    assert assign_hands([np.array([5.0, 0.0])], [("Right", 0.55)], pose) == ["right"]
    assert assign_hands([np.array([90.0, 0.0])], [("Left", 0.9)], pose) == ["left"]
    two = [np.array([95.0, 3.0]), np.array([4.0, 1.0])]
    assert assign_hands(two, [("Left", 0.9), ("Left", 0.8)], pose) == ["left", "right"]
    assert assign_hands(two[::-1], [("Left", 0.9), ("Left", 0.8)], pose) == ["right", "left"]
    # no Pose: mediapipe's label is mirrored; a duplicated label keeps the higher score
    assert assign_hands(two, [("Left", 0.9), ("Right", 0.8)], None) == ["right", "left"]
    assert assign_hands(two, [("Left", 0.6), ("Left", 0.8)], None) == [None, "right"]
    assert assign_hands([], [], pose) == []


# ------------------------------------------------------------------------------------------------------ lip sync


def test_lagged_correlation_finds_the_delay():
    env = np.random.default_rng(1).random(200)
    for delay in (3, -2, 0):
        mouth = np.full(200, np.nan)  # mouth[t] = env[t - delay]; frames without a source stay NaN
        src = np.arange(200) - delay
        ok = (src >= 0) & (src < 200)
        mouth[ok] = 0.1 * env[src[ok]] + 0.02
        r = lagged_correlation(env, mouth, max_lag=10)
        assert r["best_lag"] == delay
        assert r["best_corr"] > 0.99
        assert r["frames"] == 200 - abs(delay)
        assert set(r["corr_by_lag"]) == set(range(-10, 11))
        assert all(abs(c) < 0.5 for lag, c in r["corr_by_lag"].items() if lag != delay)


def test_lip_sync_chance_level_is_low_for_a_synced_mouth_and_high_for_short_windows():
    rng = np.random.default_rng(3)
    # a smooth envelope (speech syllables ~ 4 Hz at 25 fps) and a mouth that follows it 2 frames late
    env = np.convolve(rng.random(400), np.ones(5) / 5, mode="same")
    mouth = np.roll(env, 2) + 0.01 * rng.standard_normal(400)
    assert lagged_correlation(env, mouth)["best_corr"] > 0.95
    assert lagged_correlation_null(env, mouth) < 0.3  # reversed, the envelope no longer explains the mouth
    # on 24-frame windows the lag search alone finds sizeable correlations between unrelated smooth series
    nulls = []
    for _ in range(40):
        a = np.convolve(rng.random(40), np.ones(5) / 5, mode="valid")[:24]
        b = np.convolve(rng.random(40), np.ones(5) / 5, mode="valid")[:24]
        nulls.append(lagged_correlation_null(a, b))
    assert 0.3 < float(np.mean(nulls)) < 0.9
    assert lagged_correlation_null(env[:2], mouth[:2]) is None  # too short for any lag


def test_pooled_lip_correlation_shares_one_lag_and_sits_near_zero_by_chance():
    rng = np.random.default_rng(4)

    def smooth(n):
        return np.convolve(rng.random(n + 4), np.ones(5) / 5, mode="valid")

    synced, unrelated = [], []
    for i in range(14):
        env = smooth(24)
        mouth = np.full(24, np.nan)
        mouth[2:] = env[:-2]  # the mouth follows 2 frames late
        scale = 10.0 ** (i % 3)  # faces and voices of other sizes: each window is standardised on its own
        synced.append((env * scale, (mouth + 0.03 * rng.standard_normal(24)) / scale + i))
        unrelated.append((smooth(24), smooth(24)))
    r = pooled_lagged_correlation(synced, max_lag=10)
    assert r["best_lag"] == 2 and r["best_corr"] > 0.8
    assert r["frames"] == 14 * 22
    assert pooled_lagged_correlation(synced, max_lag=10, reverse_audio=True)["best_corr"] < 0.35
    # per window the lag search finds ~0.5 in unrelated series; pooled, chance stays low
    per_window = np.mean([lagged_correlation(a, m)["best_corr"] for a, m in unrelated])
    pooled = pooled_lagged_correlation(unrelated, max_lag=10)["best_corr"]
    assert per_window > 0.4 and pooled < 0.3
    assert pooled_lagged_correlation([], max_lag=3)["best_corr"] is None


def test_lagged_correlation_undefined_cases():
    env = np.random.default_rng(2).random(50)
    r = lagged_correlation(env, np.full(50, 0.05))  # constant mouth: no lag is defined
    assert r["best_lag"] is None and r["best_corr"] is None and r["frames"] == 0
    assert all(math.isnan(c) for c in r["corr_by_lag"].values())
    r = lagged_correlation(env[:4], env[:4], max_lag=2)  # lag +-2 leave 2 pairs: NaN, lag 0 wins
    assert math.isnan(r["corr_by_lag"][2]) and math.isnan(r["corr_by_lag"][-2])
    assert r["best_lag"] == 0 and r["best_corr"] == pytest.approx(1.0)


def test_audio_envelope_of_a_gated_tone():
    sr, fps, t = 16000, 25, 40
    per = sr // fps  # 640 samples per frame: the 400 Hz tone fits 16 whole periods
    n = np.arange(per * t)
    wave = np.where((n >= 10 * per) & (n < 20 * per), 0.5 * np.sin(2 * np.pi * 400 * n / sr), 0.0)
    env = audio_envelope(wave, sr, fps, t)
    assert env.shape == (t,)
    assert np.all(env[:10] == 0) and np.all(env[20:] == 0)
    np.testing.assert_allclose(env[10:20], 0.5 / math.sqrt(2), rtol=1e-9)
    short = audio_envelope(wave[: 15 * per + per // 2], sr, fps, t)  # audio ends half way into frame 15
    np.testing.assert_allclose(short[10:15], env[10:15])
    assert 0 < short[15] < env[15] and np.all(short[16:] == 0)
    assert audio_envelope(np.ones(1000), 1000, 3, 3).tolist() == [1.0, 1.0, 1.0]  # 334 / 333 / 333 samples


def test_mouth_series_is_gap_over_face_height():
    face = np.zeros((3, 468, 2))
    face[:, 10] = (50, 100)
    face[:, 152] = (50, 200)  # face height 100
    face[:, 13] = (50, 150)
    face[:, 14] = [(50, 155), (50, 150), (50, 160)]
    face[2, 10] = np.nan
    m = mouth_series(face)
    assert m[0] == pytest.approx(0.05) and m[1] == 0 and math.isnan(m[2])


# ------------------------------------------------------------------------------------------------------- flicker


def test_flicker_known_values():
    zeros = np.zeros((5, 8, 8, 3), np.uint8)
    assert flicker(zeros + 77) == {"mean_abs_diff": 0.0, "flicker": 0.0}
    ramp = zeros + (10 * np.arange(5, dtype=np.uint8))[:, None, None, None]
    assert flicker(ramp) == {"mean_abs_diff": 10.0, "flicker": 0.0}
    alt = zeros + (100 * (np.arange(5) % 2)).astype(np.uint8)[:, None, None, None]
    assert flicker(alt) == {"mean_abs_diff": 100.0, "flicker": 100.0}
    with pytest.raises(ValueError, match="3 frames"):
        flicker(zeros[:2])


# ------------------------------------------------------------------------------------------------------ identity


def test_identity_windows_and_distances():
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    t, fps = 25, 10
    frames = np.repeat(ref[None], t, axis=0)
    frames[10:20] = 255 - ref  # the whole second window inverted
    r = identity_over_time(frames, ref, fps=fps, window_s=1.0)
    assert len(r["windows_s"]) == math.ceil(t / fps / 1.0) == 3
    assert r["windows_s"] == [[0.0, 1.0], [1.0, 2.0], [2.0, 2.5]]
    np.testing.assert_allclose(r["distance"], [0.0, 2.0, 0.0], atol=1e-9)
    assert r["mean"] == pytest.approx(20 / 25)
    assert r["last_over_first"] is None  # first window is 0
    assert r["face_box_frames"] == 0
    # a reference at another size is resized first (2x2 blocks: INTER_AREA gives ref back exactly)
    big = cv2.resize(ref, (40, 32), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_allclose(identity_over_time(frames[:10], big, fps=fps)["distance"], [0.0], atol=1e-9)
    r = identity_over_time(frames, ref, fps=fps, window_s=0.5)
    assert len(r["windows_s"]) == 5 and r["last_over_first"] is None


def test_identity_face_box():
    h = w = 64
    lm = np.full((468, 2), np.nan)  # normalised-512 frame: x8 the 64 px frame
    lm[0], lm[1] = (80, 80), (240, 240)  # original px 10..30, grown 20% -> 8..32
    assert face_box(lm, h / 512, w, h) == (8, 8, 32, 32)
    assert face_box(np.full((468, 2), np.nan), 1 / 8, w, h) is None
    rng = np.random.default_rng(4)
    ref = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    frames = np.repeat(rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8), 4, axis=0)
    frames[:, 8:32, 8:32] = ref[8:32, 8:32]  # equal to the reference inside the face box only
    face = np.repeat(lm[None], 4, axis=0)
    face[3] = np.nan  # no face in the last frame: the whole frame is compared
    r = identity_over_time(frames, ref, fps=2, window_s=1.0, face_landmarks=face)
    assert r["face_box_frames"] == 3
    assert r["distance"][0] == pytest.approx(0.0, abs=1e-9)
    assert r["distance"][1] > 0.4  # frame 3 alone is mostly noise: d near 1


# -------------------------------------------------------------------------------------------- real landmarks


def photo(name: str) -> np.ndarray:
    """A fixture photo as RGB."""
    return cv2.cvtColor(cv2.imread(str(shared_path("fixtures", "avatars", f"{name}.jpg"))), cv2.COLOR_BGR2RGB)


def top_square(image: np.ndarray) -> np.ndarray:
    """The image cut to its top centre square (the head stays in)."""
    h, w = image.shape[:2]
    s = min(h, w)
    return np.ascontiguousarray(image[:s, (w - s) // 2:(w - s) // 2 + s])


@pytest.fixture(scope="module")
def boy() -> tuple[np.ndarray, Keypoints]:
    image = photo("boy")  # 720 x 400, both hands raised
    return image, extract_keypoints(np.repeat(image[None], 5, axis=0))


def test_still_photo_gives_zero_variance(boy):
    image, kp = boy
    assert kp.face.shape == (5, 468, 2) and kp.body.shape == (5, 33, 2)
    assert kp.detection_rates() == {"body": 1.0, "hands": 1.0, "face": 1.0}
    assert keypoint_variance(kp.face) < 1e-6
    assert keypoint_variance(kp.body) < 1e-6
    assert hkv(kp) < 1e-6
    # both hands found and on the subject's side: each wrist next to Pose's wrist of that side
    assert np.isfinite(kp.left_hand).all() and np.isfinite(kp.right_hand).all()
    dist = lambda a, b: float(np.linalg.norm(a - b))  # noqa: E731
    lw, rw = kp.body[0, 15], kp.body[0, 16]  # Pose's wrists, ~450 px apart here
    assert dist(kp.left_hand[0, 0], lw) < 60 < dist(kp.left_hand[0, 0], rw)
    assert dist(kp.right_hand[0, 0], rw) < 60 < dist(kp.right_hand[0, 0], lw)
    # coordinates: FaceMesh's pixels on the 400 px high photo, times 512 / 400
    mesh = FaceMesh()
    try:
        direct = mesh(image)[:, :2]
    finally:
        mesh.close()
    np.testing.assert_allclose(kp.face[0], direct * 512 / 400, atol=1e-3)


def test_face_only_keypoints_equal_the_full_run(boy):
    """parts=("face",) runs FaceMesh alone: the same face landmarks as with every detector, body and hands
    left undetected; an unknown part is refused."""
    image, kp = boy
    face = extract_keypoints(np.repeat(image[None], 2, axis=0), parts=("face",))
    np.testing.assert_allclose(face.face, kp.face[:2])
    assert face.detection_rates() == {"body": 0.0, "hands": 0.0, "face": 1.0}
    assert np.isnan(face.body).all() and np.isnan(face.left_hand).all() and np.isnan(face.right_hand).all()
    with pytest.raises(ValueError, match="parts must be"):
        extract_keypoints(image[None], parts=("face", "feet"))


def test_upscaled_64px_frames_keep_the_face(boy):
    """At 64 x 64 the boy's face is ~22 px high; the upscale to 256 px keeps it detected, and its landmarks
    land within a few px (normalised frame) of the full-resolution ones."""
    square = top_square(boy[0])
    full = extract_keypoints(square[None])
    small = cv2.resize(square, (64, 64), interpolation=cv2.INTER_AREA)
    kp = extract_keypoints(np.repeat(small[None], 2, axis=0))
    assert kp.detection_rates()["face"] == 1.0
    assert np.median(np.linalg.norm(kp.face[0] - full.face[0], axis=-1)) < 8


def test_speakervid_clip_is_tracked():
    frames = read_frames(shared_path("fixtures", "speakervid", "half_body_1.mp4"), duration=2.0, width=512)
    kp = extract_keypoints(frames)
    rates = kp.detection_rates()
    assert rates["face"] > 0.5 and rates["body"] > 0.5
    mouth = mouth_series(kp.face)
    assert np.isfinite(mouth).mean() > 0.5 and 0 <= np.nanmin(mouth) and np.nanmax(mouth) < 0.2
    assert 0 < keypoint_variance(kp.face) < 1000  # a speaking head moves, by a few px
