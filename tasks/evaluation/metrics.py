"""Evaluation metrics of generated avatar videos: numpy arrays in, numbers out, no learned weights except mediapipe's.

* keypoints: mediapipe Pose (33 body points), Hands (21 points per hand) and FaceMesh (468 points) per frame,
  reported in pixels of the frame scaled to a fixed height (``norm_height``, 512 by default) so that
  variances compare across resolutions;
* keypoint variance (paper: HKV over a clip, and LBKV / LHKV / LFKV over listening frames, Table 2): how much
  the landmarks move, in px^2 of that normalised frame;
* lip sync without a SyncNet: the correlation, over a range of frame lags, between the audio's RMS envelope
  and the mouth opening measured on the face landmarks;
* temporal flicker: the temporal second difference of the pixels (0 for smooth motion, large for frames that
  alternate);
* identity over time: 1 - normalised cross-correlation of each frame with the reference image, averaged per
  time window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from tasks.common.facemesh import FaceMesh, mouth_opening
from tasks.common.native_logs import filter_native_logs

POSE_POINTS, HAND_POINTS, FACE_POINTS = 33, 21, 468
KEYPOINT_PARTS = ("body", "hands", "face")  # the detectors extract_keypoints can run
MIN_POSE_VISIBILITY = 0.5
LEFT_WRIST, RIGHT_WRIST = 15, 16  # Pose indices, the subject's sides
FACE_BOX_MARGIN = 0.2  # the face box grows by this fraction of its width and of its height, about its centre


@dataclass
class Keypoints:
    """Landmarks of one clip in pixels of the normalised frame (the frame scaled to height ``norm_height``, x
    scaled by the same factor); NaN where a part was not detected in a frame.

    body: [T, 33, 2] mediapipe Pose points; a point whose visibility is below 0.5 is NaN as well.
    left_hand, right_hand: [T, 21, 2] mediapipe Hands points of the SUBJECT's left / right hand.
    face: [T, 468, 2] mediapipe FaceMesh points (no iris refinement).
    """

    body: np.ndarray
    left_hand: np.ndarray
    right_hand: np.ndarray
    face: np.ndarray

    def __len__(self) -> int:
        return len(self.body)

    def detection_rates(self) -> dict[str, float]:
        """Fraction of the T frames in which a part has at least one finite point: ``body``, ``hands`` (the
        left or the right hand or both) and ``face``; 0.0 for every part of an empty clip."""
        t = max(len(self), 1)
        seen = {
            "body": _detected(self.body),
            "hands": _detected(self.left_hand) | _detected(self.right_hand),
            "face": _detected(self.face),
        }
        return {name: float(mask.sum() / t) for name, mask in seen.items()}


def _detected(points: np.ndarray) -> np.ndarray:
    """[T] bool: the frame has at least one finite point."""
    return np.isfinite(points).all(axis=-1).any(axis=-1)


def _nan_points(t: int, k: int) -> np.ndarray:
    return np.full((t, k, 2), np.nan, dtype=np.float64)


def upscale_for_landmarks(frame: np.ndarray, min_side: int) -> np.ndarray:
    """The frame itself when its shorter side is at least ``min_side`` px, else the frame enlarged (bicubic,
    aspect kept) so that its shorter side is ``min_side``."""
    h, w = frame.shape[:2]
    if min(h, w) >= min_side:
        return frame
    f = min_side / min(h, w)
    return cv2.resize(frame, (round(w * f), round(h * f)), interpolation=cv2.INTER_CUBIC)


def assign_hands(wrists: list[np.ndarray], labels: list[tuple[str, float]],
                 pose_wrists: np.ndarray | None) -> list[str | None]:  # fmt: skip
    """The subject's side ("left", "right" or None = dropped) of each hand mediapipe Hands found in one frame.

    wrists: each hand's wrist (Hands point 0); labels: each hand's (handedness label, score); pose_wrists:
    [2, 2] Pose's left (15) and right (16) wrist in the same coordinates, whatever their visibility, or None
    when Pose found no body.

    * With Pose: one hand goes to the side of the nearer pose wrist; two hands take the pairing (as found or
      swapped) with the smaller summed wrist distance. On 2 s of the SpeakerVid fixture half_body_1 the
      handedness label put the same physical hand on the wrong side in 7 of 49 frames (low scores, e.g. 0.55),
      which would count as a jump of the hand across the body.
    * Without Pose: the label. mediapipe labels as if the image were mirrored (selfie camera), so on an
      ordinary image its "Left" is the subject's RIGHT hand (checked against Pose's wrists on the fixture
      photos). When both hands get the same label, the higher score keeps it and the other is dropped.
    """
    if not wrists:
        return []
    if len(wrists) > 2 or len(labels) != len(wrists):
        raise ValueError(f"one or two hands with one label each, got {len(wrists)} hands, {len(labels)} labels")
    if pose_wrists is not None and np.isfinite(pose_wrists).all():
        dist = np.array([[np.linalg.norm(w - pose_wrists[s]) for s in range(2)] for w in wrists])
        if len(wrists) == 1:
            return ["left" if dist[0, 0] <= dist[0, 1] else "right"]
        as_found = dist[0, 0] + dist[1, 1] <= dist[0, 1] + dist[1, 0]
        return ["left", "right"] if as_found else ["right", "left"]
    sides: list[str | None] = ["right" if label == "Left" else "left" for label, _ in labels]
    for side in ("left", "right"):
        mine = [j for j, s in enumerate(sides) if s == side]
        for j in sorted(mine, key=lambda j: labels[j][1], reverse=True)[1:]:
            sides[j] = None
    return sides


def extract_keypoints(frames: np.ndarray, norm_height: int = 512, min_side: int = 256, progress: bool = False,
                      tracking: bool = False, parts: tuple[str, ...] = KEYPOINT_PARTS) -> Keypoints:  # fmt: skip
    """Body, hand and face landmarks of every frame with mediapipe's legacy solutions (all run offline).

    frames: [T, H, W, 3] uint8 RGB. A frame whose shorter side is below ``min_side`` px is first enlarged
    (``upscale_for_landmarks``); coordinates are reported in pixels of the frame scaled to height
    ``norm_height`` (x by the same factor), so the enlargement does not change them. On the fixture photos cut
    to 64 x 64 px (faces ~13-22 px high) FaceMesh found all four faces with the enlargement to 256 px and one
    fewer without it; at 32 x 32 px (faces ~6-11 px high) it found one of the four.

    * body: ``Pose(model_complexity=1)``, 33 points; a point with visibility < 0.5 is NaN.
    * hands: ``Hands(model_complexity=1, max_num_hands=2)``; ``left_hand`` holds the subject's left hand, the
      side chosen by ``assign_hands`` (Pose's wrists when Pose found the body, else the handedness label).
    * face: ``FaceMesh(max_num_faces=1)``, 468 points.

    ``tracking=False`` (default) runs every frame independently (``static_image_mode=True``): the landmarks of
    a frame depend on that frame alone, so a still video gives exactly zero variance. With ``tracking=True``
    mediapipe's video mode crops each frame around the previous frame's landmarks (and Pose smooths them);
    on a still photo that moved the landmarks by up to 48 px (Pose) and 4 px (face) over the first frames and
    then kept jittering, which would count as motion, and it was not faster here.

    ``parts``: the detectors run (a subset of ``("body", "hands", "face")``); the others stay NaN. The face alone
    costs ~5 ms a frame here against ~50 ms for all three (Pose ~33, Hands ~16).
    """
    import mediapipe as mp

    unknown = sorted(set(parts) - set(KEYPOINT_PARTS))
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {KEYPOINT_PARTS}, got {tuple(parts)}")

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be [T, H, W, 3] uint8 RGB, got {frames.shape} {frames.dtype}")
    t, h, w = frames.shape[:3]
    sx, sy = w * norm_height / h, float(norm_height)  # normalised [0, 1] coordinates -> normalised frame px
    body, left, right, face = (_nan_points(t, POSE_POINTS), _nan_points(t, HAND_POINTS),
                               _nan_points(t, HAND_POINTS), _nan_points(t, FACE_POINTS))  # fmt: skip
    static = not tracking
    filter_native_logs()  # before the graphs start: their threads log as soon as they are built
    pose = mp.solutions.pose.Pose(static_image_mode=static, model_complexity=1) if "body" in parts else None
    hands = (mp.solutions.hands.Hands(static_image_mode=static, model_complexity=1, max_num_hands=2)
             if "hands" in parts else None)  # fmt: skip
    mesh = FaceMesh(static_image_mode=static) if "face" in parts else None
    try:
        for i in tqdm(range(t), desc="landmarks", unit="frame", disable=not progress):
            image = np.ascontiguousarray(upscale_for_landmarks(frames[i], min_side))
            ih, iw = image.shape[:2]
            # 1. body
            res = pose.process(image) if pose is not None else None
            body_raw = None
            if res is not None and res.pose_landmarks is not None:
                lms = res.pose_landmarks.landmark
                body_raw = np.array([(p.x * sx, p.y * sy) for p in lms])
                visible = np.array([p.visibility >= MIN_POSE_VISIBILITY for p in lms])
                body[i, visible] = body_raw[visible]
            # 2. hands, each put on the subject's side by assign_hands
            if hands is not None:
                _place_hands(hands.process(image), body_raw, sx, sy, left, right, i)
            # 3. face (FaceMesh answers in pixels of the image it saw)
            lm = mesh(image) if mesh is not None else None
            if lm is not None:
                face[i, :, 0] = lm[:, 0] / iw * sx
                face[i, :, 1] = lm[:, 1] / ih * sy
    finally:
        for detector in (pose, hands, mesh):
            if detector is not None:
                detector.close()
    return Keypoints(body=body, left_hand=left, right_hand=right, face=face)


def _place_hands(res, body_raw, sx: float, sy: float, left: np.ndarray, right: np.ndarray, i: int) -> None:
    """Hands' landmarks of frame ``i`` into ``left`` / ``right``, each on the subject's side (assign_hands)."""
    found = [np.array([(p.x * sx, p.y * sy) for p in lm.landmark]) for lm in res.multi_hand_landmarks or []]
    labels = [(h.classification[0].label, h.classification[0].score) for h in res.multi_handedness or []]
    pose_wrists = body_raw[[LEFT_WRIST, RIGHT_WRIST]] if body_raw is not None else None
    sides = assign_hands([pts[0] for pts in found], labels, pose_wrists)
    for pts, side in zip(found, sides, strict=True):
        if side is not None:
            (left if side == "left" else right)[i] = pts


# ---------------------------------------------------------------------------------------------- keypoint variance


def keypoint_variance(points: np.ndarray, frames: np.ndarray | None = None, min_frames: int = 2) -> float | None:
    """Mean per-coordinate variance of keypoints over time, in px^2 of the normalised frame.

    points: [T, K, 2], NaN = not detected. frames: optional bool [T] choosing the frames to use (default all).
    For each keypoint k and coordinate c in (x, y), the population variance (ddof=0) of points[t, k, c] over
    the chosen frames t in which that value is finite; the result is the mean of these variances over all
    (k, c) with at least ``min_frames`` finite values. None when no (k, c) qualifies.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 3 or points.shape[-1] != 2:
        raise ValueError(f"points must be [T, K, 2], got {points.shape}")
    if frames is not None:
        frames = np.asarray(frames)
        if frames.dtype != bool or frames.shape != points.shape[:1]:
            raise ValueError(f"frames must be a bool array of shape {points.shape[:1]}, got {frames.shape} "
                             f"{frames.dtype}")  # fmt: skip
        points = points[frames]
    if len(points) == 0:
        return None
    finite = np.isfinite(points)
    count = finite.sum(axis=0)
    # shift every series by its first finite value: exact zeros for a still keypoint, less cancellation
    first = np.take_along_axis(points, finite.argmax(axis=0)[None], axis=0)
    d = np.where(finite, points - first, 0.0)
    mean = d.sum(axis=0) / np.maximum(count, 1)
    var = (np.where(finite, d - mean, 0.0) ** 2).sum(axis=0) / np.maximum(count, 1)
    ok = count >= min_frames
    return float(var[ok].mean()) if ok.any() else None


def _mean_of_present(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def hkv(kp: Keypoints) -> float | None:
    """Hand keypoint variance of the whole clip: the mean of ``keypoint_variance(kp.left_hand)`` and
    ``keypoint_variance(kp.right_hand)`` over the hands that give a value (one hand: its value alone); None
    when neither does."""
    return _mean_of_present([keypoint_variance(kp.left_hand), keypoint_variance(kp.right_hand)])


def listening_kv(kp: Keypoints, listening: np.ndarray) -> dict[str, float | None]:
    """Keypoint variance over the listening frames only (paper Table 2), px^2 of the normalised frame.

    listening: bool [T], True where the avatar listens. ``lbkv`` = keypoint_variance(body), ``lhkv`` = the mean
    over the two hands as in ``hkv``, ``lfkv`` = keypoint_variance(face), each restricted to those frames; None
    where no keypoint has two detections among them.
    """
    listening = np.asarray(listening, dtype=bool)
    if listening.shape != (len(kp),):
        raise ValueError(f"listening must be [T={len(kp)}] bool, got shape {listening.shape}")
    return {
        "lbkv": keypoint_variance(kp.body, listening),
        "lhkv": _mean_of_present([keypoint_variance(kp.left_hand, listening),
                                  keypoint_variance(kp.right_hand, listening)]),  # fmt: skip
        "lfkv": keypoint_variance(kp.face, listening),
    }


# ------------------------------------------------------------------------------------------------------ lip sync


def audio_envelope(wave: np.ndarray, sample_rate: int, fps: float, frames: int) -> np.ndarray:
    """[frames] RMS amplitude (linear, in the wave's units) of the audio under each video frame.

    Frame i covers the samples n with n / sample_rate in [i / fps, (i + 1) / fps), i.e. n from
    ceil(i * sample_rate / fps) to ceil((i + 1) * sample_rate / fps) - 1. wave: 1-D mono; audio shorter than
    the video is padded with zeros (so a frame past its end has RMS 0), audio beyond the last frame is unused.
    """
    wave = np.asarray(wave, dtype=np.float64)
    if wave.ndim != 1:
        raise ValueError(f"wave must be 1-D mono, got shape {wave.shape}")
    edges = np.ceil(np.arange(frames + 1) * (sample_rate / fps) - 1e-9).astype(np.int64)
    if edges[-1] > len(wave):
        wave = np.concatenate([wave, np.zeros(edges[-1] - len(wave))])
    power = np.concatenate([[0.0], np.cumsum(wave**2)])
    sums = power[edges[1:]] - power[edges[:-1]]
    return np.sqrt(np.maximum(sums, 0.0) / np.maximum(np.diff(edges), 1))


def mouth_series(face: np.ndarray) -> np.ndarray:
    """[T] mouth opening per frame from ``Keypoints.face`` [T, 468, 2]: the distance between the inner-lip
    centres (13, 14) over the face height (forehead 10 to chin 152), as ``facemesh.mouth_opening`` but on the
    2-D normalised keypoints; NaN where the frame has no face (any of the four points not finite)."""
    face = np.asarray(face, dtype=np.float64)
    out = np.full(len(face), np.nan)
    for t, lm in enumerate(face):
        if np.isfinite(lm[[10, 13, 14, 152]]).all():
            out[t] = mouth_opening(lm)
    return out


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r over the pairs where both are finite; NaN with fewer than 3 pairs or a constant side."""
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / math.sqrt((a @ a) * (b @ b)))


def lagged_correlation(audio: np.ndarray, mouth: np.ndarray, max_lag: int = 10) -> dict[str, Any]:
    """Audio-mouth synchrony: Pearson correlation of audio[t] and mouth[t + lag] for lag in [-max_lag, max_lag].

    A POSITIVE lag means the mouth moves ``lag`` frames AFTER the audio. Both series are per video frame
    (e.g. ``audio_envelope`` and ``mouth_series``); pairs where either value is not finite are dropped, and
    only t with both t and t + lag inside both series count. A lag with fewer than 3 pairs or a constant
    series over its pairs gets NaN and cannot win. Returns ``best_lag`` (the lag of the highest correlation,
    the smallest |lag| on a tie, None when every lag is NaN), ``best_corr`` (None likewise),
    ``corr_by_lag`` {lag: r} and ``frames`` (the number of pairs used at best_lag, 0 when None).
    """
    # Pearson r ignores each series' offset and scale: one window pooled is this window's correlation
    return pooled_lagged_correlation([(audio, mouth)], max_lag)


def lagged_correlation_null(audio: np.ndarray, mouth: np.ndarray, max_lag: int = 10) -> float | None:
    """The chance level of :func:`lagged_correlation`: its best correlation with the audio envelope reversed in
    time (the same values and smoothness, no alignment with the mouth). The search over lags finds some
    correlation in any two smooth series, more so in short ones; lip sync is what ``best_corr`` adds to this."""
    audio = np.asarray(audio, dtype=np.float64)
    n = min(len(audio), len(mouth))
    return lagged_correlation(audio[:n][::-1].copy(), np.asarray(mouth)[:n], max_lag)["best_corr"]


def _standardise(x: np.ndarray) -> np.ndarray:
    """(x - mean) / std over the finite entries (NaN stays NaN); all NaN where fewer than 3 or constant."""
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    if ok.sum() < 3 or np.nanstd(x) == 0:
        return np.full(len(x), np.nan)
    return (x - np.nanmean(x)) / np.nanstd(x)


def pooled_lagged_correlation(windows: list[tuple[np.ndarray, np.ndarray]], max_lag: int = 10,
                              reverse_audio: bool = False) -> dict[str, Any]:  # fmt: skip
    """:func:`lagged_correlation` over many windows at once: each window's (audio, mouth) standardised on its
    own (faces and voices differ in scale from window to window), the pairs of every window at one lag pooled
    into one Pearson r, and the best lag shared by all windows. Short windows each pick their own best lag
    from chance alone (24 frames, 21 lags: r ~ 0.5 between unrelated smooth series); pooled, the chance level
    falls to ~0.1. ``reverse_audio`` reverses each window's audio: the chance level of this measure."""
    prepared = []
    for audio, mouth in windows:
        n = min(len(audio), len(mouth))
        a = np.asarray(audio, dtype=np.float64)[:n]
        prepared.append((_standardise(a[::-1] if reverse_audio else a), _standardise(np.asarray(mouth)[:n])))
    corr: dict[int, float] = {}
    pairs: dict[int, int] = {}
    for lag in range(-max_lag, max_lag + 1):
        a_all, m_all = [], []
        for a, m in prepared:
            n = len(a)
            lo, hi = max(0, -lag), min(n, n - lag)
            if hi > lo:
                a_all.append(a[lo:hi])
                m_all.append(m[lo + lag:hi + lag])
        a_cat = np.concatenate(a_all) if a_all else np.zeros(0)
        m_cat = np.concatenate(m_all) if m_all else np.zeros(0)
        corr[lag] = _pearson(a_cat, m_cat)
        pairs[lag] = int((np.isfinite(a_cat) & np.isfinite(m_cat)).sum())
    valid = [lag for lag in sorted(corr, key=abs) if not math.isnan(corr[lag])]
    if not valid:
        return {"best_lag": None, "best_corr": None, "corr_by_lag": corr, "frames": 0}
    best = max(valid, key=lambda lag: corr[lag])
    return {"best_lag": best, "best_corr": corr[best], "corr_by_lag": corr, "frames": pairs[best]}


# ------------------------------------------------------------------------------------------------------- flicker


def flicker(frames: np.ndarray) -> dict[str, float]:
    """Temporal smoothness of a video, on the 0..255 pixel scale, every channel of every pixel counted.

    ``mean_abs_diff``: mean over t >= 1 of mean |I_t - I_{t-1}| (how much changes per frame: motion included).
    ``flicker``: mean over 1 <= t <= T-2 of mean |I_t - (I_{t-1} + I_{t+1}) / 2|, the temporal second
    difference: 0 for a still video and for any pixel changing linearly in time, 100 for frames alternating
    between 0 and 100. frames: [T, ...] (e.g. [T, H, W, 3] uint8), T >= 3 else ValueError.
    """
    frames = np.asarray(frames)
    if len(frames) < 3:
        raise ValueError(f"flicker needs at least 3 frames, got {len(frames)}")
    diff, second = 0.0, 0.0
    prev = frames[0].astype(np.float64)
    cur = frames[1].astype(np.float64)
    diff += np.abs(cur - prev).mean()
    for t in range(1, len(frames) - 1):
        nxt = frames[t + 1].astype(np.float64)
        diff += np.abs(nxt - cur).mean()
        second += np.abs(cur - (prev + nxt) / 2).mean()
        prev, cur = cur, nxt
    return {"mean_abs_diff": float(diff / (len(frames) - 1)), "flicker": float(second / (len(frames) - 2))}


# ------------------------------------------------------------------------------------------------------ identity


def frames_to_gray_float(frames: np.ndarray) -> np.ndarray:
    """Luma Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601) as float64 on the 0..255 scale: [..., 3] -> [...]."""
    return np.asarray(frames, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Zero-mean normalised cross-correlation of two same-shape arrays, in [-1, 1]:
    sum(a' b') / sqrt(sum(a'^2) sum(b'^2)) with a' = a - mean(a). When either is constant it is 1.0 if the two
    are equal and 0.0 otherwise."""
    if np.array_equal(a, b):
        return 1.0
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def face_box(landmarks: np.ndarray, scale: float, width: int, height: int) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) pixel slice bounds of a face in the ORIGINAL frame: the bounding box of the finite
    landmarks (normalised-frame px, times ``scale`` = original height / norm_height), grown by 20% of its width
    and of its height about its centre, then clipped to the frame. None without finite landmarks or when the
    box is smaller than 2 x 2 px."""
    lm = np.asarray(landmarks, dtype=np.float64)
    lm = lm[np.isfinite(lm).all(axis=-1)] * scale
    if len(lm) == 0:
        return None
    (x0, y0), (x1, y1) = lm.min(axis=0), lm.max(axis=0)
    gx, gy = (x1 - x0) * FACE_BOX_MARGIN / 2, (y1 - y0) * FACE_BOX_MARGIN / 2
    bx0, by0 = max(0, math.floor(x0 - gx)), max(0, math.floor(y0 - gy))
    bx1, by1 = min(width, math.ceil(x1 + gx)), min(height, math.ceil(y1 + gy))
    return (bx0, by0, bx1, by1) if bx1 - bx0 >= 2 and by1 - by0 >= 2 else None


def identity_over_time(frames: np.ndarray, reference: np.ndarray, fps: float, window_s: float = 1.0,
                       face_landmarks: np.ndarray | None = None, norm_height: int = 512) -> dict[str, Any]:  # fmt: skip
    """Appearance distance of every frame to the reference image, averaged per time window.

    frames: [T, H, W, 3] uint8; reference: [h, w, 3] uint8, resized to W x H first when its size differs
    (cv2 INTER_AREA when shrinking, INTER_CUBIC otherwise). Per frame, d_t = 1 - ncc(gray(frame), gray(reference))
    (``frames_to_gray_float``, ``ncc``), so d is in [0, 2]: 0 identical up to brightness gain/offset,
    1 uncorrelated, 2 inverted. The region compared is the frame's face box (``face_box`` of
    face_landmarks[t], which are in the normalised frame of height ``norm_height``, e.g. ``Keypoints.face``),
    cut at the SAME pixels from the frame and from the reference, when face_landmarks is given and frame t has
    a face; otherwise the whole frame. Frame t lies at t / fps s and belongs to window floor(t / (fps *
    window_s)); there are ceil(T / (fps * window_s)) windows, the last cut at T / fps.

    Returns ``windows_s`` [[start, end], ...] seconds, ``distance`` (mean d_t per window), ``mean`` (mean d_t
    over all frames), ``last_over_first`` (last window / first window, None when the first is 0) and
    ``face_box_frames`` (how many frames were compared on the face box).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be [T>0, H, W, 3], got {frames.shape}")
    t, h, w = frames.shape[:3]
    reference = np.asarray(reference)
    if reference.shape[:2] != (h, w):
        shrink = reference.shape[0] * reference.shape[1] > h * w
        reference = cv2.resize(reference, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    ref = frames_to_gray_float(reference)
    if face_landmarks is not None and len(face_landmarks) != t:
        raise ValueError(f"face_landmarks has {len(face_landmarks)} frames, the video {t}")
    d = np.empty(t)
    boxed = 0
    for i in range(t):
        box = face_box(face_landmarks[i], h / norm_height, w, h) if face_landmarks is not None else None
        x0, y0, x1, y1 = box if box is not None else (0, 0, w, h)
        boxed += box is not None
        d[i] = 1.0 - ncc(frames_to_gray_float(frames[i, y0:y1, x0:x1]), ref[y0:y1, x0:x1])
    per = fps * window_s
    if per < 1:
        raise ValueError(f"a window of {window_s} s holds less than one frame at {fps} fps")
    n = math.ceil(t / per - 1e-9)
    index = np.minimum(np.floor(np.arange(t) / per + 1e-9).astype(np.int64), n - 1)
    distance = [float(d[index == k].mean()) for k in range(n)]
    windows = [[k * window_s, min((k + 1) * window_s, t / fps)] for k in range(n)]
    first, last = distance[0], distance[-1]
    return {"windows_s": windows, "distance": distance, "mean": float(d.mean()),
            "last_over_first": last / first if first > 0 else None, "face_box_frames": int(boxed)}  # fmt: skip
