"""The reference portrait: any image (or a video's first frame) -> the [3, H, W] reference the student streams
from, cropped as curation crops the training clips. Shared by `streamavatar generate` and the live server."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch

from tasks.common.media import MediaError, iter_frames, probe

log = logging.getLogger(__name__)

FACE_HEADROOM = 0.4  # with a face: its centre sits this far down a crop taller than... (fraction of the crop)


def _landmarks(image: np.ndarray) -> np.ndarray | None:
    from tasks.common.facemesh import FaceMesh

    mesh = FaceMesh(static_image_mode=True)
    try:
        return mesh(image)
    finally:
        mesh.close()


def face_centre(image: np.ndarray) -> tuple[float, float] | None:
    """(x, y) pixel centre of the face FaceMesh finds in an RGB uint8 image, or None."""
    lm = _landmarks(image)
    if lm is None:
        return None
    return float(lm[:, 0].mean()), float(lm[:, 1].mean())


def head_crop(image: np.ndarray, width: int, height: int, scale: float) -> np.ndarray | None:
    """The crop curation makes of a clip (tasks/curation/clip.py head_box: a box ``scale`` times the face's
    larger side, a little above its centre), at the target aspect, shifted inside the image; None without a face."""
    from tasks.curation.clip import head_box

    lm = _landmarks(image)
    if lm is None:
        return None
    h, w = image.shape[:2]
    box = np.array([[lm[:, 0].min(), lm[:, 1].min(), lm[:, 0].max(), lm[:, 1].max()]])
    x1, y1, x2, y2 = head_box(box, np.array([True]), w, h, scale)
    cw = (x2 - x1) * w
    cw = min(cw, w, h * width / height)  # never larger than the image
    ch = cw * height / width
    cx, cy = (x1 + x2) / 2 * w, (y1 + y2) / 2 * h
    x0 = int(np.clip(round(cx - cw / 2), 0, w - round(cw)))
    y0 = int(np.clip(round(cy - ch / 2), 0, h - round(ch)))
    return image[y0 : y0 + round(ch), x0 : x0 + round(cw)]


def fit_reference(image: np.ndarray, width: int, height: int, centre: tuple[float, float] | None = None
                  ) -> torch.Tensor:  # fmt: skip
    """RGB uint8 [h, w, 3] of any size -> [3, height, width] float in [-1, 1]: cropped to the target aspect
    ratio (nothing is stretched), then resized with area interpolation. The crop is centred on the image, or,
    given ``centre`` (the face), placed so the face is centred across and FACE_HEADROOM of the way down,
    clamped to the image."""
    h, w = image.shape[:2]
    if w * height > h * width:  # wider than the target: crop the sides
        keep = max(1, min(w, round(h * width / height)))
        x0 = (w - keep) // 2 if centre is None else int(np.clip(round(centre[0] - keep / 2), 0, w - keep))
        image = image[:, x0 : x0 + keep]
    else:  # taller (or the same aspect): crop top and bottom
        keep = max(1, min(h, round(w * height / width)))
        y0 = (h - keep) // 2 if centre is None else int(np.clip(round(centre[1] - FACE_HEADROOM * keep), 0, h - keep))
        image = image[y0 : y0 + keep]
    resized = cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(resized).permute(2, 0, 1).float() / 127.5 - 1.0


def read_reference(path: str | Path, width: int, height: int, crop: str = "head", head_scale: float = 1.7
                   ) -> torch.Tensor:  # fmt: skip
    """Any image file ffmpeg reads (jpg, png, webp, ...; a video's first frame too) as the reference
    [3, height, width] in [-1, 1]. ``crop`` "head": the head crop curation gives the training clips
    (``head_scale`` x the face; the demo trains on such crops); "face": the largest crop of the target aspect
    placed around the face; both fall back to the centre when FaceMesh finds no face; "centre": always the
    centre. Raises MediaError naming the file when it cannot be read."""
    if crop not in ("head", "face", "centre"):
        raise ValueError(f"crop must be 'head', 'face' or 'centre', got {crop!r}")
    path = Path(path)
    info = probe(path)  # MediaError for a missing or unreadable file
    if info.video_codec is None or info.width < 1 or info.height < 1:
        raise MediaError(f"{path}: not an image (no picture ffmpeg can decode)")
    frames = iter_frames(path)
    try:
        first = next(frames, None)
    finally:
        frames.close()
    if first is None:
        raise MediaError(f"{path}: no picture could be decoded")
    h, w = first.shape[:2]
    if crop == "head":
        head = head_crop(first, width, height, head_scale)
        if head is not None:
            return fit_reference(head, width, height)
        log.warning("%s: no face found; the reference is the centre crop", path)
    if crop == "centre" or w * height == h * width:
        return fit_reference(first, width, height)
    return fit_reference(first, width, height, face_centre(first))


class NoFaceError(MediaError):
    """The reference image holds no face FaceMesh can find."""


def reference_from_bytes(data: bytes, width: int, height: int, head_scale: float = 1.7,
                         max_pixels: int = 40_000_000) -> torch.Tensor:  # fmt: skip
    """An encoded image (JPEG, PNG, WebP, BMP) received over the network -> the head-crop reference
    [3, height, width] in [-1, 1]. Unlike :func:`read_reference` it never falls back to the centre: a live
    session needs a face. MediaError when the bytes are not an image or the picture is larger than
    ``max_pixels`` (checked from the header before decoding the whole picture), NoFaceError without a face."""
    if not data:
        raise MediaError("the reference image is empty (0 bytes)")
    buf = np.frombuffer(data, np.uint8)
    header = cv2.imdecode(buf, cv2.IMREAD_REDUCED_GRAYSCALE_8)  # cheap: 1/8 size, proves it decodes
    if header is None:
        raise MediaError(f"the reference is not an image OpenCV can decode ({len(data)} bytes)")
    if header.shape[0] * header.shape[1] * 64 > max_pixels:
        raise MediaError(f"the reference image is too large (about {header.shape[1] * 8}x{header.shape[0] * 8} "
                         f"pixels; at most {max_pixels} pixels)")  # fmt: skip
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if bgr is None:
        raise MediaError(f"the reference image could not be decoded ({len(data)} bytes)")
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    head = head_crop(rgb, width, height, head_scale)
    if head is None:
        raise NoFaceError("no face found in the reference image (FaceMesh); send a portrait with a visible face")
    return fit_reference(head, width, height)
