"""mediapipe FaceMesh (legacy solution, model inside the 0.10.21 wheel: runs offline) as plain arrays."""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Landmark groups of the 468-point topology used by the corpus animator and the pose/mouth measurements.
FACE_OVAL = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152,
             148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109]
LIPS_OUTER_UPPER = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291]
LIPS_OUTER_LOWER = [146, 91, 181, 84, 17, 314, 405, 321, 375]
LIPS_INNER_UPPER = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308]
LIPS_INNER_LOWER = [95, 88, 178, 87, 14, 317, 402, 318, 324]
# upper-lid point -> the lower-lid point below it, both eyes
EYELID_PAIRS = [(246, 7), (161, 163), (160, 144), (159, 145), (158, 153), (157, 154), (173, 155),
                (466, 249), (388, 390), (387, 373), (386, 374), (385, 380), (384, 381), (398, 382)]
EYE_CORNERS = [33, 133, 263, 362]
BROWS = [70, 63, 105, 66, 107, 336, 296, 334, 293, 300]
NOSE = [1, 4, 5, 195, 197, 6, 98, 327, 168]
UPPER_LIP_CENTRE, LOWER_LIP_CENTRE = 13, 14


class FaceMesh:
    """One face's 468 landmarks in pixels: x, y and z (z on the x scale, larger = farther from the camera)."""

    def __init__(self, static_image_mode: bool = True, min_detection_confidence: float = 0.5) -> None:
        import mediapipe as mp

        from tasks.common.native_logs import filter_native_logs

        filter_native_logs()  # MediaPipe's native start-up noise (before the graph's threads start)
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=static_image_mode, max_num_faces=1, refine_landmarks=False,
            min_detection_confidence=min_detection_confidence,
        )

    def __call__(self, rgb: np.ndarray) -> np.ndarray | None:
        h, w = rgb.shape[:2]
        result = self._mesh.process(np.ascontiguousarray(rgb))
        if not result.multi_face_landmarks:
            return None
        lm = result.multi_face_landmarks[0].landmark
        return np.array([[p.x * w, p.y * h, p.z * w] for p in lm], dtype=np.float64)

    def close(self) -> None:
        self._mesh.close()


def mouth_opening(landmarks: np.ndarray) -> float:
    """Inner-lip gap over face height (forehead 10 to chin 152): ~0 closed, ~0.1 wide open."""
    gap = np.linalg.norm(landmarks[LOWER_LIP_CENTRE, :2] - landmarks[UPPER_LIP_CENTRE, :2])
    face = np.linalg.norm(landmarks[152, :2] - landmarks[10, :2])
    return float(gap / max(face, 1e-6))
