"""Per-frame speaking/listening mask of a single-person clip by active speaker detection.

Face track (mediapipe face detection on every k-th frame, detections linked across frames by overlap, the
clip's main track kept, gaps interpolated, median-smoothed), face crops and MFCCs prepared exactly as
Light-ASD / TalkNet were trained (anchors.md: 25 fps, 16 kHz mono, crop resized to 224x224 grey then the
centre 112x112; 13 MFCCs at 100 Hz), per-frame logits averaged over several window lengths and smoothed over
+-2 frames; speaking where the score is >= 0. Frames where no face was detected are UNKNOWN (-1): never
guessed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("GLOG_minloglevel", "2")

SPEAKING, LISTENING, UNKNOWN = 1, 0, -1
CROP_SCALE = 0.40  # margin around the detected box, as in the detectors' own demos
ASD_MIN_CROP = 112  # px: the face crop is resized to 224 (the detectors' input is its centre 112): at most 2x up
SMOOTH_KERNEL = 13  # median filter over box centre/size (frames)
ENCODE_CHUNK = 100  # frames per visual-encoder pass (bounded memory: ~0.4 GB at 112x112)


@dataclass
class FaceTrack:
    boxes: np.ndarray  # [T, 4] x1, y1, x2, y2 in pixels (interpolated where missing)
    found: np.ndarray  # [T] bool: a face was detected in this frame


def detect_faces(frames: np.ndarray, min_confidence: float = 0.5, stride: int = 1, iou: float = 0.3) -> FaceTrack:
    """The clip's main face track: mediapipe face detection on every ``stride``-th RGB frame [T, H, W, 3], the
    detections linked into tracks across frames (a detection joins the track whose last box overlaps it most,
    IoU >= ``iou``, however long ago it was last seen: a face lost in a turn is found again where it was), the
    main track the one with the most face area over the
    clip (the person on screen longest and largest -- not the largest face of each frame, which jumps to
    whoever is nearer the camera for a moment). Its boxes are interpolated over the frames between detections;
    a frame counts as found where the track was detected in it, or between two of its detections no more than
    ``stride`` frames apart (or within ``stride`` frames after the last)."""
    import mediapipe as mp

    from tasks.common.native_logs import filter_native_logs

    t, h, w, _ = frames.shape
    stride = max(1, int(stride))
    sampled = range(0, t, stride)
    per_frame: list[np.ndarray] = []
    filter_native_logs()  # MediaPipe's native start-up noise (before the graph's threads start)
    with mp.solutions.face_detection.FaceDetection(model_selection=1, min_detection_confidence=min_confidence) as det:
        for i in sampled:
            res = det.process(frames[i])
            found = []
            for d in res.detections or []:
                r = d.location_data.relative_bounding_box
                found.append([r.xmin * w, r.ymin * h, (r.xmin + r.width) * w, (r.ymin + r.height) * h])
            per_frame.append(np.asarray(found, dtype=np.float64).reshape(-1, 4))
    main = link_tracks(list(sampled), per_frame, iou)
    boxes = np.full((t, 4), np.nan, dtype=np.float64)
    found = np.zeros(t, dtype=bool)
    if main:
        frame_ids = np.array(sorted(main))
        pts = np.stack([main[i] for i in frame_ids])
        idx = np.arange(t)
        for c in range(4):
            boxes[:, c] = np.interp(idx, frame_ids, pts[:, c])
        found[frame_ids] = True
        for a, b in zip(frame_ids[:-1], frame_ids[1:], strict=True):
            if b - a <= stride:
                found[a:b] = True
        found[frame_ids[-1] : min(t, frame_ids[-1] + stride)] = True
    return FaceTrack(boxes=boxes, found=found)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [N, 4] against b [M, 4] (x1, y1, x2, y2) -> [N, M]."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def link_tracks(frame_ids: list[int], detections: list[np.ndarray], min_iou: float) -> dict[int, np.ndarray]:
    """Greedy IoU tracking: per frame, each detection joins the track whose last box overlaps it most
    (>= ``min_iou``; best pairs first; one detection per track and frame), or starts a new track. Returns
    the track with the most box area summed over its frames, as {frame: box}; {} when nothing was detected."""
    tracks: list[dict[int, np.ndarray]] = []
    last: list[int] = []
    for f, boxes in zip(frame_ids, detections, strict=True):
        live = list(range(len(tracks)))
        taken: set[int] = set()
        if live and len(boxes):
            ious = box_iou(boxes, np.stack([tracks[k][last[k]] for k in live]))
            for flat in np.argsort(-ious, axis=None):
                d, j = np.unravel_index(flat, ious.shape)
                if ious[d, j] < min_iou:
                    break
                k = live[j]
                if d in taken or last[k] == f:
                    continue
                tracks[k][f], last[k] = boxes[d], f
                taken.add(int(d))
        for d in range(len(boxes)):
            if d not in taken:
                tracks.append({f: boxes[d]})
                last.append(f)
    if not tracks:
        return {}
    area = [sum(float((b[2] - b[0]) * (b[3] - b[1])) for b in tr.values()) for tr in tracks]
    return tracks[int(np.argmax(area))]


def _half_size(boxes: np.ndarray) -> np.ndarray:
    """Half the longer side of each box [N, 4]: the scale the face crop is cut at."""
    return np.maximum(boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]) / 2


def crop_side(track: FaceTrack) -> float:
    """Median side (pixels) of the region :func:`face_crops` cuts around the track, before its resize to 224."""
    b = track.boxes[track.found] if track.found.any() else track.boxes
    return float(np.median(_half_size(b)) * (2 + 2 * CROP_SCALE)) if len(b) else 0.0


def face_crops(frames: np.ndarray, track: FaceTrack) -> np.ndarray:
    """[T, 112, 112] uint8 grey crops around the smoothed track (the detectors' preprocessing)."""
    import cv2
    from scipy.signal import medfilt

    b = track.boxes
    size = medfilt(_half_size(b), SMOOTH_KERNEL)
    cy = medfilt((b[:, 1] + b[:, 3]) / 2, SMOOTH_KERNEL)
    cx = medfilt((b[:, 0] + b[:, 2]) / 2, SMOOTH_KERNEL)
    out = np.zeros((len(frames), 112, 112), dtype=np.uint8)
    for i, frame in enumerate(frames):
        bs = max(float(size[i]), 1.0)
        pad = int(bs * (1 + 2 * CROP_SCALE))
        padded = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), constant_values=110)
        my, mx = cy[i] + pad, cx[i] + pad
        face = padded[int(my - bs) : int(my + bs * (1 + 2 * CROP_SCALE)),
                      int(mx - bs * (1 + CROP_SCALE)) : int(mx + bs * (1 + CROP_SCALE))]  # fmt: skip
        grey = cv2.cvtColor(cv2.resize(face, (224, 224)), cv2.COLOR_RGB2GRAY)
        out[i] = grey[56:168, 56:168]
    return out


def mfcc_100hz(audio: np.ndarray, sample_rate: int = 16000) -> np.ndarray:
    """13 MFCCs at 100 Hz of float audio in [-1, 1], computed on int16 values like the detectors' training."""
    import python_speech_features

    pcm = np.clip(audio, -1.0, 1.0 - 1 / 32768) * 32768
    return python_speech_features.mfcc(pcm.astype(np.int16), sample_rate, numcep=13, winlen=0.025, winstep=0.010)


@torch.no_grad()
def asd_scores(model: torch.nn.Module, mfcc: np.ndarray, faces: np.ndarray, durations: list[float]) -> np.ndarray:
    """Per-frame speaking logits, averaged over windows of each length in ``durations`` (seconds).

    A detector with ``frame_embeddings`` / ``classify`` (Light-ASD) encodes the clip once -- its encoders are
    convolutions a few frames deep, so each frame's embedding needs only its neighbours, not the window -- and
    runs only its recurrent back end per window: one visual pass whatever the number of window lengths, and
    no window edge padded with zeros inside the clip. Others (TalkNet, whose encoders normalise over the
    window) run whole per window. The windows of one length are one batch; everything runs on the detector's
    device (``curate.asd_device``)."""
    n = min(len(faces), (len(mfcc) - len(mfcc) % 4) // 4)
    if n == 0:
        return np.zeros(0)
    device = next(model.parameters()).device
    mfcc, faces = mfcc[: 4 * n], faces[:n]
    a_all = torch.from_numpy(np.ascontiguousarray(mfcc)).float()[None].to(device)
    v_all = torch.from_numpy(np.ascontiguousarray(faces))[None].to(device)
    local = hasattr(model, "frame_embeddings") and hasattr(model, "classify")
    shared = model.frame_embeddings(a_all, v_all, chunk=ENCODE_CHUNK if device.type == "cpu" else 0) if local else None
    runs = []
    for dur in durations:
        step = max(1, int(round(dur * 25)))
        full = n // step * step  # whole windows: one batch [n // step, step, ...]; then the shorter last one
        parts = []
        if shared is not None:
            if full:
                parts.append(model.classify(shared[0, :full].reshape(n // step, step, -1)).reshape(-1))
            if full < n:
                parts.append(model.classify(shared[:, full:])[0])
        else:
            if full:
                a = a_all[0, : 4 * full].reshape(n // step, 4 * step, -1)
                parts.append(model(a, v_all[0, :full].reshape(n // step, step, *faces.shape[1:]).float()).reshape(-1))
            if full < n:
                parts.append(model(a_all[:, 4 * full :], v_all[:, full:].float())[0])
        runs.append(torch.cat(parts).float().cpu().numpy()[:n])
    return np.mean(runs, axis=0)


def smooth(scores: np.ndarray, radius: int = 2) -> np.ndarray:
    """Mean over +-radius frames (clipped at the ends)."""
    out = np.empty_like(scores, dtype=np.float64)
    for i in range(len(scores)):
        out[i] = scores[max(0, i - radius) : i + radius + 1].mean()
    return out


def two_class_split(scores: np.ndarray) -> tuple[float, float]:
    """Otsu's split of 1-D scores: (threshold, distance between the two class means)."""
    v = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(v)
    if n < 2 or v[0] == v[-1]:
        return float(v[0]) if n else 0.0, 0.0
    csum = np.cumsum(v)
    k = np.arange(1, n)  # class 0 = v[:k]
    m0 = csum[:-1] / k
    m1 = (csum[-1] - csum[:-1]) / (n - k)
    between = k * (n - k) * (m0 - m1) ** 2
    best = int(np.argmax(between))
    return float((v[best] + v[best + 1]) / 2), float(m1[best] - m0[best])


def clip_threshold(scores: np.ndarray, calibration: str, fixed: float, min_gap: float, min_share: float) -> float:
    """The decision threshold for one clip.

    ``fixed``: the detector's own (logit >= ``fixed``). ``per_clip``: when the clip's scores fall into two
    well separated groups (means at least ``min_gap`` logits apart, the smaller group at least ``min_share``
    of the frames), split between them -- the detector ranks frames well on renders unlike its training data
    but its zero point drifts; otherwise (one behaviour throughout) fall back to ``fixed``.
    """
    if calibration == "fixed" or len(scores) == 0:
        return fixed
    if calibration != "per_clip":
        raise ValueError(f"unknown ASD calibration {calibration!r}; use fixed or per_clip")
    threshold, gap = two_class_split(scores)
    share = min(np.mean(scores < threshold), np.mean(scores >= threshold))
    return threshold if gap >= min_gap and share >= min_share else fixed


@dataclass
class ClipMask:
    score: np.ndarray  # [T] smoothed logit (NaN where unknown)
    mask: np.ndarray  # [T] int8: 1 speaking, 0 listening, -1 unknown (no face)
    face_found: np.ndarray  # [T] bool
    threshold: float = 0.0
    boxes: np.ndarray | None = None  # [T, 4] the face track (x1, y1, x2, y2 pixels of the analysed frames)


def speaking_mask(
    model: torch.nn.Module,
    frames: np.ndarray,
    audio: np.ndarray,
    durations: list[float],
    sample_rate: int = 16000,
    calibration: str = "fixed",
    threshold: float = 0.0,
    min_gap: float = 2.0,
    min_share: float = 0.1,
    track: FaceTrack | None = None,
    detect_stride: int = 1,
) -> ClipMask:
    """frames [T, H, W, 3] RGB at 25 fps, audio float mono at ``sample_rate`` -> per-frame mask. ``track``:
    the clip's face track when already made (else :func:`detect_faces` every ``detect_stride``-th frame)."""
    t = len(frames)
    track = track if track is not None else detect_faces(frames, stride=detect_stride)
    mask = np.full(t, UNKNOWN, dtype=np.int8)
    score = np.full(t, np.nan)
    if not track.found.any():
        return ClipMask(score, mask, track.found, boxes=track.boxes)
    mfcc = mfcc_100hz(audio, sample_rate)
    short = 4 * t - len(mfcc)
    if 0 < short <= 4:  # the MFCC framing drops the last partial window: repeat it, do not drop a frame
        mfcc = np.pad(mfcc, ((0, short), (0, 0)), mode="edge")
    raw = asd_scores(model, mfcc, face_crops(frames, track), durations)
    s = smooth(raw)
    n = len(s)
    score[:n] = s
    known = track.found.copy()
    known[n:] = False
    th = clip_threshold(s[known[:n]], calibration, threshold, min_gap, min_share)
    mask[known] = (s[known[:n]] >= th).astype(np.int8)
    score[~known] = np.nan
    return ClipMask(score, mask, track.found, th, track.boxes)


def frame_f1(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Frame-level precision/recall/F1 of 'speaking' over frames the detector did not call unknown."""
    keep = pred >= 0
    p, g = pred[keep] == SPEAKING, np.asarray(truth)[keep] == 1
    tp, fp, fn = int((p & g).sum()), int((p & ~g).sum()), int((~p & g).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"precision": prec, "recall": rec, "f1": f1, "frames": int(keep.sum()), "unknown": int((~keep).sum())}


def asd_device(setting: str) -> torch.device:
    """``curate.asd_device``: cpu, cuda, cuda:N, or auto (the first GPU when there is one)."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"curate.asd_device is {setting!r} but torch sees no GPU (use cpu or auto)")
    return device


def load_detector(kind: str, weights: str | Path, device: str = "cpu") -> torch.nn.Module:
    """The active speaker detector ``kind`` with its ``weights``, in eval mode on ``device`` (see asd_device)."""
    where = asd_device(device)
    if kind == "light-asd":
        from model.asd.light_asd import load_light_asd

        return load_light_asd(weights, where)
    if kind == "talknet":
        from model.asd.talknet import load_talknet

        return load_talknet(weights, where)
    raise ValueError(f"unknown active speaker detector {kind!r}; available: light-asd, talknet")
