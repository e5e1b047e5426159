"""SpeakerVid-style quality measures: luminance range, face sharpness (variance of the Laplacian)."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import laplace


def luminance(frames: np.ndarray) -> np.ndarray:
    """Mean Rec.601 luma (0-255) of each RGB frame."""
    f = frames.astype(np.float32)
    return (0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]).mean(axis=(1, 2))


def sharpness(grey_crops: np.ndarray) -> np.ndarray:
    """Variance of the Laplacian of each grey crop (blurred faces score low)."""
    return np.array([laplace(c.astype(np.float32)).var() for c in grey_crops])
