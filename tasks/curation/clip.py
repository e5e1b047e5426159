"""Curation of one clip: probe, length check, head pose, quality, active-speaker mask, crop, normalisation.

The filters run before the active speaker detector (the costly part): a clip they reject is not scored. The crop
(``crop="head"``) is a fixed square around the clip's median mediapipe face box, ``head_scale`` times its size,
so the face fills most of the profile's small frame whatever the source's framing; ``crop="person"`` keeps the
source's person box (merged_anno) or the centred frame.

``curate_clip`` takes plain, picklable arguments (a :class:`SourceClip` and a :class:`ClipSettings`) so that
the same function runs in a local process pool, on a Dask or Ray worker, or in a test. It never raises for a
bad clip: it returns a row with ``status`` ``rejected`` (a filter said no) or ``failed`` (the clip could not
be read) and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from tasks.common.media import MediaError, probe, read_audio, read_frames
from tasks.curation.asd import (
    ASD_MIN_CROP,
    UNKNOWN,
    FaceTrack,
    crop_side,
    detect_faces,
    face_crops,
    load_detector,
    speaking_mask,
)
from tasks.curation.normalize import normalize_clip
from tasks.curation.pose import clip_pose, pose_stats, pose_verdict
from tasks.curation.quality import luminance, sharpness
from tasks.curation.sources import SourceClip


@dataclass(frozen=True)
class ClipSettings:
    out_dir: str  # absolute
    fps: int
    sample_rate: int
    width: int
    height: int
    analysis_width: int
    min_duration_s: float
    asd: str
    asd_weights: str  # absolute
    asd_durations: tuple[float, ...]
    asd_calibration: str
    asd_threshold: float
    asd_min_gap: float
    asd_min_share: float
    max_yaw_deg: float
    max_pitch_deg: float
    max_roll_deg: float
    max_pose_fraction: float
    min_face_fraction: float
    pose_stride: int
    luminance_range: tuple[float, float]
    min_face_sharpness: float
    torch_threads: int = 1  # per worker process: cores / workers, so parallel clips do not oversubscribe
    max_duration_s: float | None = None  # longer sources: their first max_duration_s seconds
    crop: str = "person"  # head | person
    head_scale: float = 1.7
    face_stride: int = 5  # face detection every n-th frame, linked into one track
    asd_device: str = "cpu"


def analysis_frames(src: Path, info, width: int, fps: int, duration: float | None) -> np.ndarray:
    """The frames curation analyses: at most ``width`` px wide (area averaging: the right filter for a large
    downscale, and ~2x cheaper than bicubic), ``fps``, the first ``duration`` s, in the worker's reused
    buffer (valid until its next clip)."""
    return read_frames(src, width=min(width, info.width), fps=fps, duration=duration, reuse=True, scale_flags="area")


def calibration_for(setting: str, source: str) -> str:
    """``curate.asd_calibration`` for a clip of ``source``: ``auto`` is per_clip on the synthetic corpus (renders
    shift the detector's zero point) and the detector's own threshold on real video."""
    if setting != "auto":
        return setting
    return "per_clip" if source == "synthetic" else "fixed"


def detector_scale(src: Path, info, frames: np.ndarray, track: FaceTrack, fps: int, duration: float | None
                   ) -> tuple[np.ndarray, FaceTrack]:  # fmt: skip
    """The frames and track for the active speaker detector: as they are when the face crop is at least
    ``ASD_MIN_CROP`` (112 px; the detectors resize it to 224, so it is never upsampled more than 2x), else the
    clip read again at the width that makes it so (at most the source's), the track scaled to it: a small face
    in a wide shot is not blown up from the analysis frames. (Measured on the shared clips analysed at 480 px:
    scores from crops of the native frames correlate 0.93-1.0 with those and decide every frame the same;
    full_body_3's 94 px crop is the one below 112.)"""
    side = crop_side(track)
    h, w = frames.shape[1:3]
    if not side or side >= ASD_MIN_CROP or w >= info.width:
        return frames, track
    width = min(info.width, int(np.ceil(w * ASD_MIN_CROP / side / 2)) * 2)
    sharper = analysis_frames(src, info, width, fps, duration)[: len(frames)]
    kx, ky = sharper.shape[2] / w, sharper.shape[1] / h
    return sharper, FaceTrack(boxes=track.boxes * np.array([kx, ky, kx, ky]), found=track.found)


def head_box(boxes: np.ndarray, found: np.ndarray, width: int, height: int, scale: float
             ) -> tuple[float, float, float, float] | None:  # fmt: skip
    """A square around the median face box of a track (pixels of width x height frames), ``scale`` times its
    larger side, centred a little above the box centre (forehead and hair rather than neck); normalised
    x1 y1 x2 y2 (it may reach past the frame: the crop is fitted inside later). None without a face."""
    b = boxes[found]
    if not len(b):
        return None
    size = float(np.median(np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])))
    cx = float(np.median((b[:, 0] + b[:, 2]) / 2))
    cy = float(np.median((b[:, 1] + b[:, 3]) / 2)) - 0.1 * size
    half = scale * size / 2
    return (cx - half) / width, (cy - half) / height, (cx + half) / width, (cy + half) / height


@lru_cache(maxsize=2)
def _detector(kind: str, weights: str, device: str = "cpu"):
    return load_detector(kind, weights, device)


def _row(clip: SourceClip, status: str, reason: str = "", **values) -> dict:
    return {"clip_id": clip.clip_id, "group": clip.group, "source_path": clip.video_path, "status": status,
            "reason": reason, **values}  # fmt: skip


def curate_clip(clip: SourceClip, s: ClipSettings, root: str) -> dict:
    if clip.error:
        return _row(clip, "failed", clip.error)
    if clip.rejected:
        return _row(clip, "rejected", clip.rejected)
    import torch

    torch.set_num_threads(max(1, s.torch_threads))
    src = Path(clip.video_path)
    src = src if src.is_absolute() else Path(root) / src
    try:
        info = probe(src)
    except (MediaError, FileNotFoundError) as exc:
        return _row(clip, "failed", str(exc))
    missing = [kind for kind, codec in (("video", info.video_codec), ("audio", info.audio_codec)) if codec is None]
    if missing:
        return _row(clip, "failed", f"{src}: no {' and no '.join(missing)} stream (curation needs both)")
    if info.duration_s < s.min_duration_s:
        return _row(clip, "rejected", f"too short: {info.duration_s:.2f} s < {s.min_duration_s} s",
                    duration_s=info.duration_s)  # fmt: skip
    limit = s.max_duration_s if s.max_duration_s and info.duration_s > s.max_duration_s else None
    try:
        frames = analysis_frames(src, info, s.analysis_width, s.fps, limit)
        audio = read_audio(src, s.sample_rate, duration=limit)
    except MediaError as exc:
        return _row(clip, "failed", str(exc))
    n = min(len(frames), len(audio) * s.fps // s.sample_rate)
    frames, audio = frames[:n], audio[: n * s.sample_rate // s.fps]
    values: dict = {"duration_s": n / s.fps, "num_frames": n, "fps": s.fps, "source_fps": info.fps,
                    "source_width": info.width, "source_height": info.height}  # fmt: skip

    # 1. head pose
    stats = pose_stats(clip_pose(frames, s.pose_stride), s.max_yaw_deg, s.max_pitch_deg, s.max_roll_deg)
    values.update({f"pose_{k}": v for k, v in stats.as_dict().items()})
    reasons = [r for r in [pose_verdict(stats, s.max_pose_fraction, s.min_face_fraction)] if r]

    # 2. quality: luminance (every 5th frame is plenty for a median) and face sharpness
    lum = float(np.median(luminance(frames[::5])))
    values["luminance"] = lum
    if not s.luminance_range[0] <= lum <= s.luminance_range[1]:
        reasons.append(f"luminance {lum:.0f} outside {list(s.luminance_range)}")
    track = detect_faces(frames, stride=s.face_stride)  # the clip's face track, also ASD's below
    if track.found.any():
        every = np.arange(0, len(frames), max(1, s.fps // 5))  # 5 frames per second are plenty for a median
        few = FaceTrack(boxes=track.boxes[every], found=track.found[every])
        sharp = float(np.median(sharpness(face_crops(frames[every], few)[few.found])))
        values["face_sharpness"] = sharp
        if sharp < s.min_face_sharpness:
            reasons.append(f"face blurred: sharpness {sharp:.1f} < {s.min_face_sharpness}")
    if reasons:  # a filter said no: the detector is not run
        return _row(clip, "rejected", "; ".join(reasons), **values)

    # 3. active speaker mask (1 speaking, 0 listening, -1 unknown), on a face crop at the detector's own scale
    frames, track = detector_scale(src, info, frames, track, s.fps, limit)
    detector = _detector(s.asd, s.asd_weights, s.asd_device)
    result = speaking_mask(detector, frames, audio, list(s.asd_durations), s.sample_rate,
                           calibration_for(s.asd_calibration, clip.source), s.asd_threshold, s.asd_min_gap,
                           s.asd_min_share, track=track)  # fmt: skip
    known = result.mask != UNKNOWN
    values.update(
        asd_threshold=result.threshold,
        unknown_ratio=float(1 - known.mean()),
        speaking_ratio=float((result.mask[known] == 1).mean()) if known.any() else float("nan"),
        listen_ratio=float((result.mask[known] == 0).mean()) if known.any() else float("nan"),
    )
    out = Path(s.out_dir)
    mask_path = out / "masks" / f"{clip.clip_id}.npy"
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    np.save(mask_path, result.mask)
    values["mask_path"] = _rel(mask_path, root)

    # 4. the crop: around the head, or the source's person box
    box, margin = clip.bbox, 1.3
    if s.crop == "head" and result.boxes is not None:
        head = head_box(result.boxes, result.face_found, frames.shape[2], frames.shape[1], s.head_scale)
        if head is not None:
            box, margin = head, 1.0
    values["crop_box"] = ",".join(f"{v:.4f}" for v in box) if box is not None else ""

    # 5. normalised clip at the profile's size
    dst = out / "clips" / f"{clip.clip_id}.mp4"
    try:
        normalize_clip(src, dst, info, s.fps, s.sample_rate, s.width, s.height, box, margin=margin,
                       duration=limit)  # fmt: skip
    except MediaError as exc:
        return _row(clip, "failed", str(exc), **values)
    values["video_path"] = _rel(dst, root)
    return _row(clip, "ok", **values)


def _rel(path: Path, root: str) -> str:
    try:
        return str(path.resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)
