"""FID and FVD from local TorchScript feature networks: the standard files, never downloaded here.

Fréchet distance between two Gaussians fitted to feature sets X1, X2 (means mu, covariances S):

    d^2 = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))

* FID: features of NVlabs' ``inception-2015-12-05.pt`` (a TorchScript translation of the TF Inception-v3
  graph used by the original TTUR FID; StyleGAN2-ADA/StyleGAN3 ``metrics/frechet_inception_distance.py``
  and clean-fid's ``inception_torchscript.py`` use it). Calling convention found in StyleGAN3
  ``metrics/metric_utils.py``: ``net(images, return_features=True)`` with ``images`` a uint8 tensor
  [N, 3, H, W], RGB, values 0..255 (generated images are cast with ``(x * 127.5 + 128).clamp(0, 255)
  .to(uint8)``), any H, W, returning the 2048-d pool features [N, 2048]. Inside, the network casts to
  float, resizes to 299 x 299 (bilinear, ``affine_grid``/``grid_sample``; seen in a decompiled copy of its
  ``forward``) and normalises with (x - 128) / 128 (clean-fid's wrapper applies exactly that before calling
  the inner ``layers`` on pre-resized input). We feed every image at its own resolution, as StyleGAN3 does;
  clean-fid instead resizes outside with PIL bicubic, so its numbers are not interchangeable with ours.
* FVD: features of StyleGAN-V's ``i3d_torchscript.pt`` (the Kinetics-400 I3D of the TF-Hub FVD
  reference). Calling convention found in StyleGAN-V ``src/metrics/frechet_video_distance.py`` and
  ``metric_utils.py``: ``net(videos, rescale=True, resize=True, return_features=True)`` with ``videos`` a
  uint8 tensor [N, 3, T, H, W] (frames permuted from [N, T, C, H, W]), RGB, values 0..255, any H, W,
  returning the 400-d features before the softmax [N, 400]. ``rescale=True`` / ``resize=True`` make the
  network map 0..255 to [-1, 1] and resize to 224 x 224 itself -- inferred, not read: code bases that pass
  ``rescale=False, resize=False`` (e.g. common_metrics_on_video_quality) first resize to 224 x 224 and
  scale to [-1, 1] themselves. StyleGAN-V's ``fvd2048_16f`` uses 2048 clips of 16 consecutive frames
  (``num_frames=16``; real clips start at a random frame); we take the FIRST ``clip_len`` frames of every clip, so the metric
  is deterministic.

Statistics: mean and the unbiased sample covariance (``np.cov``, 1 / (N - 1), as TTUR, pytorch-fid and
clean-fid; StyleGAN3/StyleGAN-V divide by N, a difference that vanishes at the usual N >= 2048). Both
estimates are biased upwards for small N; values are comparable only at equal N. Every entry point returns
a ``status``; a number is returned only with ``status == "ok"``, never when weights or samples are missing.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch

FID_BIAS_N = 2048  # the conventional sample count (and the Inception feature dimension)
FVD_BIAS_N = 2048  # StyleGAN-V's default number of clips per set
KNOWN_KEYS = {"inception": "evaluate.inception_path", "i3d": "evaluate.i3d_path"}


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features ``feats`` [N, D], N >= 2."""
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"feature_stats needs features [N >= 2, D], got shape {list(x.shape)}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """``scipy.linalg.sqrtm`` with its singular-matrix warning silenced (the caller checks the result)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(scipy.linalg.sqrtm(a))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6,
) -> float:
    """Squared Fréchet distance ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))`` of two Gaussians.

    As in TTUR / pytorch-fid: when ``sqrtm(S1 S2)`` is not finite (a singular product), it is recomputed as
    ``sqrtm((S1 + eps I)(S2 + eps I))``; an imaginary part left by round-off is dropped when it is small
    (max |imag| of the diagonal <= 1e-3, after the same eps retry if needed), otherwise ``ValueError``.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(s1 @ s2)
    bad_imag = np.iscomplexobj(covmean) and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
    if not np.isfinite(covmean).all() or bad_imag:
        offset = np.eye(d) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset))
    if not np.isfinite(covmean).all():
        raise ValueError("frechet_distance: sqrtm(S1 S2) is not finite even with the eps offset")
    if np.iscomplexobj(covmean):
        max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if max_imag > 1e-3:
            raise ValueError(f"frechet_distance: sqrtm(S1 S2) has an imaginary component {max_imag:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def load_feature_net(
    path: str | Path, what: str, device: str | torch.device = "cpu",
) -> torch.jit.ScriptModule:
    """The TorchScript network at ``path`` (``torch.jit.load`` onto ``device``), in eval mode.

    ``what`` names it in errors (e.g. ``"inception"``, ``"i3d"``). Raises ``FileNotFoundError`` when there is
    no file at ``path`` and ``RuntimeError`` naming ``path`` when it is not a loadable TorchScript archive.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} feature network not found at {path}")
    try:
        with warnings.catch_warnings():  # the standard files are TorchScript; its deprecation notice is noise
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(path), map_location=torch.device(device))
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        raise RuntimeError(f"cannot load the {what} TorchScript network at {path}: {exc}") from exc
    return net.eval()


@lru_cache(maxsize=4)
def _load_once(path: str, what: str, device: str, stamp: tuple[int, int]) -> torch.jit.ScriptModule:
    return load_feature_net(path, what, device)


def _cached_net(path: str | Path, what: str, device: str) -> torch.jit.ScriptModule:
    """:func:`load_feature_net`, cached per (resolved path, role, device, file mtime and size): a file
    replaced in place is loaded again."""
    resolved = Path(path).expanduser().resolve()
    info = resolved.stat()
    return _load_once(str(resolved), what, device, (info.st_mtime_ns, info.st_size))


def _default_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _weights_status(path: str | Path | None, what: str) -> str | None:
    """``None`` when a weights file is at ``path``, else the ``skipped: ...`` status."""
    if not path:
        return f"skipped: {KNOWN_KEYS.get(what, what + ' path')} is not set"
    if not Path(path).expanduser().is_file():
        return f"skipped: no weights at {Path(path).expanduser()}"
    return None


def _check_frames(frames: np.ndarray, name: str) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 [N, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    return frames


@torch.no_grad()
def image_features(
    net: Any, frames: np.ndarray, batch: int = 32, device: str | torch.device = "cpu",
) -> np.ndarray:
    """Inception features [N, D] (float64) of uint8 RGB ``frames`` [N, H, W, 3]:
    ``net(x, return_features=True)`` on uint8 [B, 3, H, W] batches, as StyleGAN3 calls
    ``inception-2015-12-05.pt``."""
    frames = _check_frames(frames, "frames")
    out = []
    for start in range(0, len(frames), batch):
        x = torch.from_numpy(np.ascontiguousarray(frames[start:start + batch].transpose(0, 3, 1, 2)))
        feats = net(x.to(device), return_features=True)
        out.append(feats.reshape(x.shape[0], -1).double().cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def video_features(
    net: Any, clips: np.ndarray, batch: int = 4, device: str | torch.device = "cpu",
) -> np.ndarray:
    """I3D features [N, D] (float64) of uint8 RGB ``clips`` [N, T, H, W, 3]:
    ``net(x, rescale=True, resize=True, return_features=True)`` on uint8 [B, 3, T, H, W] batches, as
    StyleGAN-V calls ``i3d_torchscript.pt``."""
    clips = np.asarray(clips)
    if clips.ndim != 5 or clips.shape[-1] != 3 or clips.dtype != np.uint8:
        raise ValueError(f"clips must be uint8 [N, T, H, W, 3], got {clips.dtype} {list(clips.shape)}")
    out = []
    for start in range(0, len(clips), batch):
        x = torch.from_numpy(np.ascontiguousarray(clips[start:start + batch].transpose(0, 4, 1, 2, 3)))
        feats = net(x.to(device), rescale=True, resize=True, return_features=True)
        out.append(feats.reshape(x.shape[0], -1).double().cpu().numpy())
    return np.concatenate(out)


def _distance(real: np.ndarray, fake: np.ndarray) -> float:
    mu_r, s_r = feature_stats(real)
    mu_f, s_f = feature_stats(fake)
    return frechet_distance(mu_r, s_r, mu_f, s_f)


def fid(
    real_frames: np.ndarray | None, fake_frames: np.ndarray | None, inception_path: str, batch: int = 32,
    device: str | None = None,
) -> dict[str, Any]:
    """FID between two sets of uint8 RGB images [N, H, W, 3], Inception TorchScript at ``inception_path``.

    Returns ``{"status": "ok", "value", "n_real", "n_fake"}`` (plus ``"note"`` when either set has fewer than
    2048 images: FID is then biased upwards and only comparable at equal N), or ``{"status": "skipped: ..."}``
    when the path is empty or has no file, when a set is ``None`` or has fewer than 2 images (no covariance).
    """
    skipped = _weights_status(inception_path, "inception")
    if skipped:
        return {"status": skipped}
    if real_frames is None or fake_frames is None:
        return {"status": f"skipped: no {'real' if real_frames is None else 'fake'} images"}
    real_frames = _check_frames(real_frames, "real_frames")
    fake_frames = _check_frames(fake_frames, "fake_frames")
    n_real, n_fake = len(real_frames), len(fake_frames)
    if min(n_real, n_fake) < 2:
        return {"status": f"skipped: FID needs at least 2 real and 2 fake images, got {n_real} and {n_fake}",
                "n_real": n_real, "n_fake": n_fake}
    dev = _default_device(device)
    net = _cached_net(inception_path, "inception", dev)
    real, fake = (image_features(net, frames, batch, dev) for frames in (real_frames, fake_frames))
    value = _distance(real, fake)
    result: dict[str, Any] = {"status": "ok", "value": value, "n_real": n_real, "n_fake": n_fake}
    if min(n_real, n_fake) < FID_BIAS_N:
        result["note"] = (f"FID from {n_real} real / {n_fake} fake images: below ~{FID_BIAS_N} images per "
                          "set the estimate is biased upwards; compare only values computed with the same N")
    return result


def fvd(
    real_clips: list[np.ndarray] | None, fake_clips: list[np.ndarray] | None, i3d_path: str,
    clip_len: int = 16, batch: int = 4, device: str | None = None,
) -> dict[str, Any]:
    """FVD between two sets of uint8 RGB videos [T, H, W, 3] with the I3D TorchScript at ``i3d_path``.

    Each clip contributes its first ``clip_len`` consecutive frames; clips shorter than that are left out
    (counted in ``"note"``). Returns ``{"status": "ok", "value", "n_real", "n_fake"}`` (``n_*``: clips
    used; ``"note"`` on dropped clips and when fewer than 2048 clips per set were used, which biases FVD
    upwards), or ``{"status": "skipped: ..."}`` when the path is empty or has no file, when a set is
    ``None``, or when fewer than 2 usable clips remain in either set. All clips of one set must share H and W.
    """
    if clip_len < 1:
        raise ValueError(f"clip_len must be >= 1, got {clip_len}")
    skipped = _weights_status(i3d_path, "i3d")
    if skipped:
        return {"status": skipped}
    if real_clips is None or fake_clips is None:
        return {"status": f"skipped: no {'real' if real_clips is None else 'fake'} clips"}
    sets, notes = {}, []
    for name, clips in (("real", real_clips), ("fake", fake_clips)):
        kept = []
        for i, clip in enumerate(clips):
            clip = np.asarray(clip)
            if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8:
                raise ValueError(
                    f"{name} clip {i} must be uint8 [T, H, W, 3], got {clip.dtype} {list(clip.shape)}")
            if len(clip) >= clip_len:
                kept.append(clip[:clip_len])
        if len(kept) < len(clips):
            notes.append(f"{len(clips) - len(kept)} of {len(clips)} {name} clips are shorter than {clip_len} "
                         "frames and were left out")
        sets[name] = kept
    n_real, n_fake = len(sets["real"]), len(sets["fake"])
    if min(n_real, n_fake) < 2:
        status = (f"skipped: FVD needs at least 2 real and 2 fake clips of >= {clip_len} frames, "
                  f"got {n_real} and {n_fake}")
        out: dict[str, Any] = {"status": status, "n_real": n_real, "n_fake": n_fake}
        if notes:
            out["note"] = "; ".join(notes)
        return out
    dev = _default_device(device)
    net = _cached_net(i3d_path, "i3d", dev)
    feats = {name: video_features(net, np.stack(kept), batch, dev) for name, kept in sets.items()}
    value = _distance(feats["real"], feats["fake"])
    notes.append(f"first {clip_len} consecutive frames of each clip")
    if min(n_real, n_fake) < FVD_BIAS_N:
        notes.append(f"FVD from {n_real} real / {n_fake} fake clips: below ~{FVD_BIAS_N} clips per set the "
                     "estimate is biased upwards; compare only values computed with the same N")
    return {"status": "ok", "value": value, "n_real": n_real, "n_fake": n_fake, "note": "; ".join(notes)}
