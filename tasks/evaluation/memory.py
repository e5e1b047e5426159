"""The memory test's measurement (issue [10]): is the corpus's coloured mark (``corpus.mark_prob``: a saturated
disc on one cheek that appears after the reference and stays) in a frame?

The mark's colours are chosen so that nothing in a face is near them (tasks/corpus/animate.py MARK_COLORS), so
the test is a colour count: pixels whose every channel lies within ``tol`` of the mark's colour; a frame shows
the mark when at least 1/400 of its pixels do (10 at 64x64). Measured on marked corpus clips curated to the
demo's 64x64 and passed through the demo VAE (tests/test_corpus.py): no frame before the mark appears shows
it; 96-100 % of the frontal frames after it do (``corpus.mark_radius_rel`` 0.12; at 0.07 the VAE erases it).
"""

from __future__ import annotations

import numpy as np


def mark_pixels(frames: np.ndarray, color, tol: int = 70) -> np.ndarray:
    """Per frame of ``frames`` [T, H, W, 3] (or one frame [H, W, 3]) uint8 RGB: how many pixels lie within
    ``tol`` of ``color`` in every channel."""
    x = np.asarray(frames)
    single = x.ndim == 3
    if single:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3] or [H, W, 3] RGB, got shape {x.shape}")
    near = np.abs(x.astype(np.int16) - np.asarray(color, dtype=np.int16)).max(axis=-1) < tol
    counts = near.reshape(len(x), -1).sum(axis=1)
    return counts[0] if single else counts


def mark_shown(frames: np.ndarray, color, tol: int = 70, min_pixels: int | None = None) -> np.ndarray:
    """Per frame [T] bool: the mark is in the frame (``min_pixels`` default: 1/400 of the frame's pixels)."""
    x = np.asarray(frames)
    need = min_pixels if min_pixels is not None else max(1, round(x.shape[-3] * x.shape[-2] / 400))
    return mark_pixels(x, color, tol) >= need
