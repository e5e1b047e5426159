"""Head pose per frame from mediapipe FaceMesh 3D landmarks, per-clip statistics, and the pose filter
(paper 4.1: discard videos in which the head deviates excessively from a forward-facing direction)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.common.facemesh import FaceMesh
from tasks.common.pose import head_pose


def clip_pose(frames: np.ndarray, stride: int = 1) -> np.ndarray:
    """[T, 3] (yaw, pitch, roll) in degrees for every ``stride``-th frame, NaN where no face was found;
    frames in between take the nearest measured value."""
    t = len(frames)
    pose = np.full((t, 3), np.nan)
    mesh = FaceMesh()
    try:
        for i in range(0, t, stride):
            landmarks = mesh(frames[i])
            if landmarks is not None:
                pose[i] = head_pose(landmarks)
    finally:
        mesh.close()
    if stride > 1:
        measured = np.arange(0, t, stride)
        nearest = measured[np.clip(np.round(np.arange(t) / stride).astype(int), 0, len(measured) - 1)]
        pose = pose[nearest]
    return pose


@dataclass
class PoseStats:
    frames: int
    face_frames: int
    mean_abs_yaw: float
    mean_abs_pitch: float
    mean_abs_roll: float
    max_abs_yaw: float
    max_abs_pitch: float
    max_abs_roll: float
    beyond_fraction: float  # share of face frames beyond any threshold

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def pose_stats(pose: np.ndarray, max_yaw: float, max_pitch: float, max_roll: float) -> PoseStats:
    found = ~np.isnan(pose[:, 0])
    p = np.abs(pose[found])
    if not len(p):
        nan = float("nan")
        return PoseStats(len(pose), 0, nan, nan, nan, nan, nan, nan, nan)
    beyond = (p[:, 0] > max_yaw) | (p[:, 1] > max_pitch) | (p[:, 2] > max_roll)
    mean, peak = p.mean(axis=0), p.max(axis=0)
    return PoseStats(len(pose), int(found.sum()), *map(float, mean), *map(float, peak), float(beyond.mean()))


def pose_verdict(stats: PoseStats, max_fraction: float, min_face_fraction: float) -> str:
    """'' when the clip passes, else the reason it is rejected."""
    if stats.frames == 0 or stats.face_frames / stats.frames < min_face_fraction:
        return f"face found in {stats.face_frames}/{stats.frames} frames (< {min_face_fraction:.0%})"
    if stats.beyond_fraction > max_fraction:
        return f"head beyond the pose limits in {stats.beyond_fraction:.0%} of face frames (> {max_fraction:.0%})"
    return ""
