"""The memory test's measurement (issue [10]): is the corpus's coloured mark (``corpus.mark_prob``: a saturated
disc on one cheek that appears after the reference and stays) in a frame?

The mark's colours are chosen so that nothing in a face is near them (tasks/corpus/animate.py MARK_COLORS), so
the test is a colour count: pixels whose every channel lies within ``tol`` of the mark's colour; a frame shows
the mark when at least 1/400 of its pixels do (10 at 64x64). Measured on marked corpus clips curated to the
demo's 64x64 and passed through the demo VAE (tests/test_corpus.py): no frame before the mark appears shows
it; 96-100 % of the frontal frames after it do (``corpus.mark_radius_rel`` 0.12; at 0.07 the VAE erases it).

The count says yes or no. ``mark_contrast`` grades it: at the mark's place (``mark_region``: the pixels that
show the mark in most of the real clip's first frames after it appears), how far each frame's colour has moved
from the unmarked reference frame's towards the mark's colour (1: the mark, 0: the reference; a faded mark that
no longer passes the count reads, say, 0.2), less how far the rest of the frame moved the same way (a drift
of the whole frame is not a mark).
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


def mark_region(frames: np.ndarray, color, tol: int = 70) -> np.ndarray:
    """[H, W] bool: the pixels within ``tol`` of ``color`` in at least half of ``frames`` [T, H, W, 3] (the real
    clip's first frames with the mark: where it sits)."""
    x = np.asarray(frames)
    near = np.abs(x.astype(np.int16) - np.asarray(color, dtype=np.int16)).max(axis=-1) < tol
    return near.mean(axis=0) >= 0.5


def mark_contrast(frames: np.ndarray, reference: np.ndarray, region: np.ndarray, color) -> np.ndarray:
    """Per frame of ``frames`` [T, H, W, 3] uint8: how far the pixels of ``region`` [H, W] moved from
    ``reference`` [H, W, 3] (the unmarked frame) towards ``color`` (projected on that direction: 1 the mark's
    colour, 0 the reference's), less the same for the pixels outside it: a frame whose colours all drift
    (a stream without its sink turning pale) moves both alike and reads about 0; only a mark at its place
    reads high."""
    if not region.any():
        raise ValueError("mark_contrast: the mark's region is empty (the frames given never show the mark)")
    if region.all():
        raise ValueError("mark_contrast: the mark's region is the whole frame (nothing to compare it with)")
    x = np.asarray(frames, dtype=np.float32)
    ref = np.asarray(reference, dtype=np.float32)
    towards = np.asarray(color, dtype=np.float32) - ref  # [H, W, 3]
    moved = ((x - ref) * towards).sum(-1) / np.maximum((towards**2).sum(-1), 1.0)  # [T, H, W]
    return moved[:, region].mean(-1) - moved[:, ~region].mean(-1)


def mark_shown(frames: np.ndarray, color, tol: int = 70, min_pixels: int | None = None) -> np.ndarray:
    """Per frame [T] bool: the mark is in the frame (``min_pixels`` default: 1/400 of the frame's pixels)."""
    x = np.asarray(frames)
    need = min_pixels if min_pixels is not None else max(1, round(x.shape[-3] * x.shape[-2] / 400))
    return mark_pixels(x, color, tol) >= need
