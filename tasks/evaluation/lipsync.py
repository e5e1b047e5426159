"""Lip-sync metrics Sync-C (confidence) and Sync-D (distance) with SyncNet, as syncnet_python computes them.

The protocol is that of joonson/syncnet_python (``SyncNetInstance.evaluate`` and ``calc_pdist``), which the
talking-head literature reports as Sync-C / Sync-D (a.k.a. LSE-C / LSE-D):

* video at 25 fps, audio at 16 kHz; ``min_length = min(frames, floor(samples / 640))`` (640 samples are one
  frame);
* one visual embedding per 5-frame window starting at frame ``i`` and one audio embedding per 20-step MFCC
  window starting at MFCC step ``4 i`` (MFCCs run at 100 Hz, 4 steps per frame), for
  ``i = 0 .. min_length - 6`` -- syncnet_python iterates ``range(0, min_length - 5)``, so the last full window
  is left out; we keep that for comparability;
* for every offset ``j = 0 .. 2 vshift``, the Euclidean distance between visual window ``i`` and audio window
  ``i + j - vshift`` (audio embeddings zero-padded with ``vshift`` rows at both ends, so windows whose partner
  falls outside the clip are compared with the zero vector, as ``calc_pdist`` does), averaged over ``i``;
* Sync-D = the smallest mean distance, Sync-C = median of the mean distances - Sync-D, and the AV offset
  ``vshift - argmin``. Sign: a positive offset means the audio is AHEAD of the video (visual window ``i``
  matches audio window ``i - offset``); audio delayed by ``k`` frames gives ``offset = -k``.

Preprocessing, from syncnet_python (``run_pipeline.crop_video`` and ``SyncNetInstance.evaluate``): face
crops (:func:`face_crops` cuts them from full frames and per-frame face boxes) are resized to 224 x 224
with ``cv2.resize`` (bilinear), read in OpenCV's BGR channel order and fed as raw 0..255 floats (no
mean/std normalisation); audio is 16 kHz 16-bit PCM fed to
``python_speech_features.mfcc(audio, 16000)`` with its defaults (13 cepstra, 25 ms windows, 10 ms hop,
c0 = log frame energy) on the INTEGER sample values, laid out as [13, steps]. We convert float audio in
[-1, 1] to int16 the way ffmpeg's ``pcm_s16le`` encoder does (x 32768, rounded, clipped); the scale matters
because c0 is a log energy. The original re-encodes crops as XVID and JPEG before reading them back; we do
not, so scores on identical clips can differ slightly from syncnet_python's.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import python_speech_features
import torch
import torch.nn.functional as F
from scipy.signal import medfilt, resample_poly

from model.syncnet import SyncNet, load_syncnet

SYNC_RATE = 16000  # Hz, the audio rate SyncNet was trained on
FPS = 25  # video frame rate SyncNet was trained on
SAMPLES_PER_FRAME = SYNC_RATE // FPS  # 640
MFCC_PER_FRAME = 4  # 100 Hz MFCCs / 25 fps
WINDOW = 5  # frames per visual window (= 20 MFCC steps)
SIZE = 224  # face-crop side fed to the visual stream
NOT_SET = "skipped: evaluate.syncnet_path is not set"


class ClipTooShortError(ValueError):
    """The clip has too few frames (or too little audio) for one SyncNet window."""


class SyncEmbedder(Protocol):
    """What :func:`sync_scores` needs of a network: :class:`SyncNet`'s two embedding functions."""

    def forward_lip(self, video: torch.Tensor) -> torch.Tensor: ...

    def forward_aud(self, mfcc: torch.Tensor) -> torch.Tensor: ...


def _to_int16_scale(wave: np.ndarray) -> np.ndarray:
    """Mono audio as float64 holding 16-bit PCM values: int16 input as is, float input (range [-1, 1]) scaled
    by 32768, rounded and clipped to [-32768, 32767] like ffmpeg's float -> s16 conversion."""
    if wave.dtype == np.int16:
        return wave.astype(np.float64)
    if not np.issubdtype(wave.dtype, np.floating):
        raise ValueError(f"wave must be float (range [-1, 1]) or int16 samples, got dtype {wave.dtype}")
    return np.clip(np.rint(wave.astype(np.float64) * 32768.0), -32768, 32767)


def syncnet_inputs(
    frames: np.ndarray, wave: np.ndarray, sample_rate: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SyncNet's inputs for a whole clip, prepared as syncnet_python prepares them (see the module docstring).

    ``frames``: [T, H, W, 3] uint8 RGB face-centred crops at 25 fps (:func:`face_crops`; whole half-body
    frames put the mouth where SyncNet does not look and give meaningless scores). ``wave``: mono samples at
    ``sample_rate`` Hz, float in [-1, 1] (or int16); resampled to 16 kHz with ``scipy.signal.resample_poly``
    when ``sample_rate`` differs.

    Returns ``(video, mfcc)``: ``video`` a uint8 tensor [3, T, 224, 224] in BGR order (kept as uint8 to save
    memory; :func:`sync_scores` converts each window to 0..255 floats), ``mfcc`` a float32 tensor [13, M]
    with M ~= 100 x duration MFCC steps (python_speech_features' count: ``1 + ceil((n - 400) / 160)`` for n
    samples at 16 kHz).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise ValueError(f"wave must be mono [samples], got shape {list(wave.shape)}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    pcm = _to_int16_scale(wave)
    if sample_rate != SYNC_RATE:
        g = math.gcd(SYNC_RATE, int(sample_rate))
        pcm = np.clip(resample_poly(pcm, SYNC_RATE // g, int(sample_rate) // g), -32768, 32767)
    crops = np.stack([cv2.resize(f[..., ::-1], (SIZE, SIZE), interpolation=cv2.INTER_LINEAR) for f in frames])
    video = torch.from_numpy(np.ascontiguousarray(crops.transpose(3, 0, 1, 2)))  # [3, T, 224, 224] BGR
    if len(pcm) == 0:
        mfcc = np.zeros((13, 0), dtype=np.float32)
    else:
        mfcc = python_speech_features.mfcc(pcm, SYNC_RATE).T.astype(np.float32)  # [13, M]
    return video, torch.from_numpy(np.ascontiguousarray(mfcc))


def face_crops(
    frames: np.ndarray, boxes: np.ndarray, crop_scale: float = 0.4, smooth: int = 13,
) -> np.ndarray:
    """Face-centred 224 x 224 crops cut the way syncnet_python's ``run_pipeline.crop_video`` cuts them.

    ``frames``: [T, H, W, 3] uint8 (any channel order, kept). ``boxes``: [T, 4] face boxes (x1, y1, x2, y2) in
    pixels, NaN rows where no face was found (filled by linear interpolation over time, as the pipeline
    interpolates between detections; ``ValueError`` if no row is finite). Per frame: half-size
    ``s = max(w, h) / 2`` and centre (cx, cy), each median-filtered over ``smooth`` frames with
    ``scipy.signal.medfilt`` (zero-padded ends, as the original; the kernel is shortened to the largest odd
    number <= T for clips shorter than ``smooth``, which the original, with its 100-frame minimum track, never
    sees); the frame is padded by ``int(s (1 + 2 crop_scale))`` pixels of value 110 on every side and the
    crop spans rows ``cy - s .. cy + s (1 + 2 crop_scale)`` and columns ``cx -+ s (1 + crop_scale)`` -- a
    square reaching further below the box (mouth, chin) than above -- resized to 224 x 224 (``cv2.resize``,
    bilinear).
    The boxes of the original come from the S3FD face detector; boxes from other detectors or landmarks
    frame the face somewhat differently. Returns [T, 224, 224, 3] uint8.
    """
    frames = np.asarray(frames)
    boxes = np.asarray(boxes, dtype=np.float64)
    if frames.ndim != 4 or frames.dtype != np.uint8 or boxes.shape != (len(frames), 4):
        raise ValueError(f"need uint8 frames [T, H, W, 3] and boxes [T, 4], got {frames.dtype} "
                         f"{list(frames.shape)} and {list(boxes.shape)}")
    ok = np.isfinite(boxes).all(axis=1)
    if not ok.any():
        raise ValueError("face_crops: no frame has a face box")
    t = np.arange(len(boxes))
    boxes = np.stack([np.interp(t, t[ok], boxes[ok, k]) for k in range(4)], axis=1)
    kernel = max(1, min(smooth, len(boxes)))  # odd and <= T: medfilt zero-pads a longer kernel's overhang
    kernel -= 1 - kernel % 2
    size = medfilt(np.maximum(boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]) / 2, kernel)
    cy = medfilt((boxes[:, 1] + boxes[:, 3]) / 2, kernel)
    cx = medfilt((boxes[:, 0] + boxes[:, 2]) / 2, kernel)
    out = np.empty((len(frames), SIZE, SIZE, 3), np.uint8)
    for i, frame in enumerate(frames):
        bs = float(size[i])
        pad = int(bs * (1 + 2 * crop_scale))
        padded = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), mode="constant", constant_values=110)
        my, mx = cy[i] + pad, cx[i] + pad
        face = padded[max(int(my - bs), 0):int(my + bs * (1 + 2 * crop_scale)),
                      max(int(mx - bs * (1 + crop_scale)), 0):int(mx + bs * (1 + crop_scale))]
        if face.size == 0:
            raise ValueError(f"face_crops: empty crop at frame {i} (box {boxes[i].tolist()})")
        out[i] = cv2.resize(face, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    return out


def _windows(video: torch.Tensor, mfcc: torch.Tensor, starts: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Visual windows [B, 3, 5, 224, 224] (float 0..255) and MFCC windows [B, 1, 13, 20] starting at the
    frames ``starts``."""
    vid = torch.stack([video[:, i:i + WINDOW] for i in starts]).float()
    n_mfcc = WINDOW * MFCC_PER_FRAME
    aud = torch.stack([mfcc[:, MFCC_PER_FRAME * i:MFCC_PER_FRAME * i + n_mfcc] for i in starts]).unsqueeze(1)
    return vid, aud


@torch.no_grad()
def sync_scores(
    net: SyncNet | SyncEmbedder, frames: np.ndarray, wave: np.ndarray, sample_rate: int, vshift: int = 15,
    batch: int = 20,
) -> dict[str, Any]:
    """Sync-C, Sync-D and the AV offset of one clip (syncnet_python's ``evaluate``; see the module docstring).

    ``net`` is used as is (call ``.eval()`` first; :func:`load_syncnet` does); windows go to the device of its
    first parameter, if it has any. ``vshift``: the largest offset searched, in frames, both ways.

    Returns ``{"sync_c": float, "sync_d": float, "offset": int, "dists_by_offset": list[float],
    "n_windows": int}``: ``dists_by_offset`` holds the mean distances for offsets ``j = 0 .. 2 vshift``,
    entry ``j`` comparing visual window ``i`` with audio window ``i + j - vshift`` (so
    ``offset = vshift - argmin``), each averaged over the ``n_windows = min_length - 5`` visual windows.
    Raises :class:`ClipTooShortError` (a ``ValueError``) when the video or the audio is shorter than 6 frames
    (``n_windows < 1``).
    """
    if vshift < 0 or batch < 1:
        raise ValueError(f"need vshift >= 0 and batch >= 1, got vshift={vshift}, batch={batch}")
    video, mfcc = syncnet_inputs(frames, wave, sample_rate)
    n_16k = len(wave) if sample_rate == SYNC_RATE else math.ceil(len(wave) * SYNC_RATE / sample_rate)
    n_audio_frames = n_16k // SAMPLES_PER_FRAME  # resample_poly returns ceil(n * 16000 / rate) samples
    min_length = min(video.shape[1], n_audio_frames)
    n_windows = min_length - WINDOW
    if n_windows < 1:
        raise ClipTooShortError(
            f"SyncNet needs at least {WINDOW + 1} frames of video and audio (0.24 s at 25 fps); got "
            f"{video.shape[1]} frames and {len(wave) / sample_rate:.3f} s of audio ({n_audio_frames} frames)")
    param = next(iter(net.parameters()), None) if isinstance(net, torch.nn.Module) else None
    device = param.device if param is not None else torch.device("cpu")
    lip, aud = [], []
    for start in range(0, n_windows, batch):
        vid_b, aud_b = _windows(video, mfcc, range(start, min(n_windows, start + batch)))
        lip.append(net.forward_lip(vid_b.to(device)).float().cpu())
        aud.append(net.forward_aud(aud_b.to(device)).float().cpu())
    lip_feat, aud_feat = torch.cat(lip), torch.cat(aud)  # [n, D] each
    span = 2 * vshift + 1
    padded = F.pad(aud_feat, (0, 0, vshift, vshift))  # [n + 2 vshift, D], zero rows at both ends
    candidates = padded.unfold(0, span, 1).transpose(1, 2)  # [n, span, D]: audio i - vshift .. i + vshift
    lip_rep = lip_feat.unsqueeze(1).expand_as(candidates)
    dim = lip_feat.shape[1]
    dists = F.pairwise_distance(lip_rep.reshape(-1, dim), candidates.reshape(-1, dim)).view(-1, span)
    mean_dist = dists.mean(dim=0)  # [span]
    min_val, min_idx = torch.min(mean_dist, dim=0)
    return {
        "sync_c": float(torch.median(mean_dist) - min_val),
        "sync_d": float(min_val),
        "offset": int(vshift - int(min_idx)),
        "dists_by_offset": [float(d) for d in mean_dist],
        "n_windows": n_windows,
    }


@lru_cache(maxsize=4)
def _load_once(path: str, device: str, stamp: tuple[int, int]) -> SyncNet:
    return load_syncnet(path).to(device)


def _cached_syncnet(path: Path, device: str) -> SyncNet:
    """:func:`load_syncnet`, cached per (resolved path, device, file mtime and size): a file replaced in place
    is loaded again."""
    resolved = path.resolve()
    info = resolved.stat()
    return _load_once(str(resolved), device, (info.st_mtime_ns, info.st_size))


def sync_metrics(
    path_or_empty: str, frames: np.ndarray, wave: np.ndarray, sample_rate: int, *, device: str | None = None,
    vshift: int = 15, batch: int = 20,
) -> dict[str, Any]:
    """Sync-C / Sync-D of one clip with the SyncNet weights at ``path_or_empty`` -- or why there are none.

    Returns ``{"status": "skipped: evaluate.syncnet_path is not set"}`` when the path is empty,
    ``{"status": "skipped: no weights at PATH"}`` when no file is there, ``{"status": "skipped: <reason>"}``
    when the clip is too short for one window, and otherwise ``{"status": "ok", **sync_scores(...)}``. The
    network is loaded once per path and device (default: CUDA when available, else CPU) and cached.
    """
    if not path_or_empty:
        return {"status": NOT_SET}
    path = Path(path_or_empty).expanduser()
    if not path.is_file():
        return {"status": f"skipped: no weights at {path}"}
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = _cached_syncnet(path, dev)
    try:
        scores = sync_scores(net, frames, wave, sample_rate, vshift=vshift, batch=batch)
    except ClipTooShortError as exc:
        return {"status": f"skipped: {exc}"}
    return {"status": "ok", **scores}
