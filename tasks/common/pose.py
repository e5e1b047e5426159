"""Head pose from 3D face landmarks (mediapipe FaceMesh topology, pixel units, z pointing away from the camera).

Head frame: x axis from landmark 33 (subject's right eye, outer corner) to 263 (left eye, outer corner), y axis
from 10 (top of forehead) to 152 (chin), z = x cross y (into the head). The rotation R = [x y z] is read as
R = Ry(-yaw) Rx(pitch) Rz(roll): yaw > 0 turns the nose toward image right, pitch > 0 looks down, roll > 0
tilts the head clockwise in the image. The corpus writes its ground truth with this same function.
"""

from __future__ import annotations

import numpy as np

RIGHT_EYE_OUTER, LEFT_EYE_OUTER, FOREHEAD, CHIN = 33, 263, 10, 152


def head_frame(landmarks: np.ndarray) -> np.ndarray:
    """3x3 rotation whose columns are the head's x, y, z axes in camera coordinates."""
    p = np.asarray(landmarks, dtype=np.float64)
    x = p[LEFT_EYE_OUTER] - p[RIGHT_EYE_OUTER]
    x /= np.linalg.norm(x)
    y = p[CHIN] - p[FOREHEAD]
    y -= x * (x @ y)  # orthogonalise against x
    y /= np.linalg.norm(y)
    z = np.cross(x, y)
    return np.stack([x, y, z], axis=1)


def angles_from_rotation(r: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees of R = Ry(-yaw) Rx(pitch) Rz(roll)."""
    pitch = np.arcsin(np.clip(-r[1, 2], -1.0, 1.0))
    yaw = -np.arctan2(r[0, 2], r[2, 2])
    roll = np.arctan2(r[1, 0], r[1, 1])
    return float(np.degrees(yaw)), float(np.degrees(pitch)), float(np.degrees(roll))


def rotation_from_angles(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Inverse of ``angles_from_rotation`` (degrees)."""
    a, b, c = np.radians([-yaw, pitch, roll])
    ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return ry @ rx @ rz


def head_pose(landmarks: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from 468 (or 478) 3D landmarks."""
    return angles_from_rotation(head_frame(landmarks))
