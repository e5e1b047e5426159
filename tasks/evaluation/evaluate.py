"""Stage `evaluate` and the re-evaluation flow: ground truth, teacher and student on a fixed held-out set.

The evaluation set is the first ``evaluate.windows_per_clip`` windows of up to ``evaluate.max_clips``
validation clips of data/latents (clips the student never trained on), listed with a digest in
``<out_dir>/eval_set.json``. For each window every system makes the same 4C x window_chunks frames that follow
the window's first frame (the reference):

* ground_truth: the curated clip's own frames;
* teacher: the bidirectional teacher sampled with teacher_sampler.* (steps, shift, audio CFG, eta: the
  stochastic sampler by default), the reference as clean frame 0, decoded by the VAE;
* student: the streaming student through StreamingGenerator, chunk by chunk, talking on the avatar's own
  voice (the window's audio where its mask says speaking) and listening to the rest.

Every metric (tasks/evaluation/metrics.py, lipsync.py, fidelity.py; definitions in DEFINITIONS and
docs/evaluation.md) is computed per window and averaged per system; FID and FVD compare each system's frames with the
ground truth's. A metric that cannot be computed says why ("skipped: no weights at PATH", "no face
detected"), never a made-up number.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from tasks.common.media import MediaError, read_frames
from tasks.common.stage import StageResult, write_json_atomic
from tasks.config import Config, ConfigError, resolve_path
from tasks.evaluation import fidelity, lipsync, metrics

log = logging.getLogger(__name__)

SYSTEMS = ("ground_truth", "teacher", "student")
# the ground truth's latents decoded by the autoencoder: what any system that generates latents can reach at best
AUTOENCODER = "autoencoder"
# evaluate.chain: the student after each training step, streamed exactly like `student` (the table's chain
# untrained student -> ODE init -> SiD -> GAN); each from its checkpoint under train.checkpoint_dir
CHAIN = {
    "student_untrained": ("teacher/final.pt", "the teacher's weights streamed as the causal 3-step student, "
                                              "before any distillation (the student's starting point)"),
    "student_ode_init": ("distill/ode_init.pt", "the student after ODE initialisation"),
    "student_sid": ("distill/final.pt", "the student after ODE init and SiD (before the GAN)"),
}
DEFINITIONS = {
    "hkv": "hand keypoint variance over the whole clip: per hand (mediapipe Hands, 21 points, left/right by "
           "handedness), per keypoint and coordinate, the variance over the frames where it is detected, in px^2 "
           "of the frame scaled to evaluate.keypoint_norm_height; averaged over keypoints, then over hands",
    "lbkv": "body keypoint variance (mediapipe Pose, 33 points, visibility >= 0.5) over listening frames only "
            "(the avatar's speaking mask is 0), as keypoint variance above (paper Table 2)",
    "lhkv": "hand keypoint variance over listening frames only",
    "lfkv": "face keypoint variance (mediapipe FaceMesh, 468 points) over listening frames only",
    "lip_corr": "Pearson correlation between the avatar voice's RMS envelope per video frame and the mouth "
                "opening (inner-lip gap / face height) at the best lag in +-evaluate.max_lag_frames; per window, "
                "and for a system over all its windows pooled (each standardised, one lag for all): the per-window "
                "mean is lip_corr_window_mean",
    "lip_lag": "that best lag in frames; positive = the mouth moves after the audio",
    "lip_corr_null": "lip_corr's chance level: the same search with the voice envelope reversed in time (same "
                     "values and smoothness, no alignment); lip sync is lip_corr minus this",
    "sync_c": "SyncNet confidence (median minus minimum of the mean embedding distance over offsets "
              "+-evaluate.sync_vshift); needs evaluate.syncnet_path",
    "sync_d": "SyncNet distance: the minimum over offsets of the mean embedding distance",
    "identity_dist": "1 - normalised cross-correlation of the grey face region with the reference frame's, "
                     "per frame, averaged per evaluate.identity_window_s window, then over windows",
    "identity_last_over_first": "identity distance in the last window / in the first (> 1: drifting away)",
    "flicker": "mean |I_t - (I_{t-1} + I_{t+1}) / 2| over pixels and frames, 0-255 scale: 0 for still or "
               "linearly changing pixels, large for frame-to-frame alternation",
    "mean_abs_diff": "mean |I_t - I_{t-1}| over pixels and frames, 0-255 scale (all motion, not only flicker)",
    "face_rate": "fraction of frames with a face detected (FaceMesh)",
    "fid": "Frechet distance between Inception-v3 pool features of the system's frames and the ground truth's "
           "(needs evaluate.inception_path)",
    "fvd": "Frechet distance between I3D features of evaluate.fvd_clip_frames-frame clips of the system and "
           "the ground truth (needs evaluate.i3d_path)",
}
# the face-only figures evaluate.seeds measures on every noise seed (face_metrics); the rest on the first seed
SEEDED = ("face_rate", "lip_corr", "lip_lag", "lip_corr_null", "identity_dist", "identity_last_over_first")
SCALARS = ("hkv", "lbkv", "lhkv", "lfkv", "lip_corr", "lip_lag", "lip_corr_null", "sync_c", "sync_d", "identity_dist",
           "identity_last_over_first", "flicker", "mean_abs_diff", "face_rate", "body_rate", "hand_rate")  # fmt: skip


# ------------------------------------------------------------------------------------------------ the set
@dataclass
class EvalItem:
    clip_id: str
    window: int
    frames: np.ndarray  # [T, H, W, 3] uint8 ground-truth frames after the reference
    reference: np.ndarray  # [H, W, 3] uint8, the window's first frame
    latents: torch.Tensor  # [1, z, 1 + F, h, w] the window's latents (the teacher's frame 0)
    talk: torch.Tensor
    listen: torch.Tensor
    wave: torch.Tensor  # [samples] the window's audio from frame 0
    mask: np.ndarray  # [1 + T] 1 speaking, 0 listening
    split: str = "val"  # val: held-out conversations; unseen: people never trained on

    @property
    def name(self) -> str:
        return f"{self.clip_id}_w{self.window}"


def evaluation_set(cfg: Config, root: Path) -> tuple[list[EvalItem], dict[str, Any]]:
    """The fixed held-out evaluation set and its description (clips, windows, digest)."""
    from tasks.training.data import load_windows

    sets = {"val": load_windows(cfg, root, "val")}  # a clear error when there are no windows at all
    try:
        sets["unseen"] = load_windows(cfg, root, "unseen")
    except ConfigError:
        pass  # no unseen people in this manifest
    manifest_path = root / cfg.curate.manifest
    if not manifest_path.is_file():
        raise ConfigError(f"{cfg.curate.manifest}: no curated manifest; run `streamavatar curate` first")
    manifest = pd.read_parquet(manifest_path).set_index("clip_id")
    items: list[EvalItem] = []
    for split, windows in sets.items():
        items += _items(cfg, root, windows, manifest, split)
    listing = [{"clip_id": it.clip_id, "window": it.window, "frames": len(it.frames), "split": it.split}
               for it in items]  # fmt: skip
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    return items, {"items": listing, "digest": digest, "source": f"val and unseen windows of {cfg.train.latents_dir}"}


def _items(cfg: Config, root: Path, windows, manifest: pd.DataFrame, split: str) -> list[EvalItem]:
    """The first evaluate.windows_per_clip windows of up to evaluate.max_clips clips of ``windows``."""
    e = cfg.evaluate
    idx = windows.index
    chosen: list[int] = []
    for clip in sorted(idx.clip_id.unique())[: e.max_clips]:
        rows = idx.index[idx.clip_id == clip].tolist()
        rows.sort(key=lambda i: int(idx.window[i]))
        chosen += rows[: e.windows_per_clip]
    items: list[EvalItem] = []
    v = cfg.video
    for i in chosen:
        clip, start = idx.clip_id[i], int(idx.start_frame[i])
        length = int(windows.mask[i].numel())
        video = root / manifest.loc[clip, "video_path"]
        frames = read_frames(video, v.width, v.height, v.fps)[start : start + length]
        if len(frames) < length:
            raise MediaError(f"{video}: {len(frames) + start} frames, the window needs {start + length}")
        items.append(EvalItem(
            clip_id=clip, window=int(idx.window[i]), frames=frames[1:], reference=frames[0],
            latents=windows.latents[i : i + 1], talk=windows.talk[i : i + 1], listen=windows.listen[i : i + 1],
            wave=windows.wave[i], mask=windows.mask[i].numpy(), split=split,
        ))  # fmt: skip
    return items


# ------------------------------------------------------------------------------------------------ systems
def _to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()


def _voices(cfg: Config, item: EvalItem) -> tuple[torch.Tensor, torch.Tensor]:
    """(avatar's own voice, the other voice) for the frames after the reference."""
    spf = cfg.audio.sample_rate // cfg.video.fps
    mask = torch.from_numpy(item.mask[1:]).float().repeat_interleave(spf)
    wave = item.wave[spf : spf + mask.numel()]
    mask = mask[: wave.numel()]
    return wave * mask, wave * (1 - mask)


@torch.no_grad()
def student_frames(cfg: Config, gen, item: EvalItem, seed: int | None = None) -> np.ndarray:
    """The window streamed by ``gen`` from its reference frame; ``seed``: the stream's noise seed (default the
    generator's own, project.seed)."""
    return student_frames_batch(cfg, gen, item, gen.settings.seed if seed is None else seed, 1)[0]


@torch.no_grad()
def student_frames_batch(cfg: Config, gen, item: EvalItem, seed: int, n: int) -> list[np.ndarray]:
    """``n`` streams of the window in one batch, the noise of all drawn from ``seed`` (each row its own draw;
    row 0 is :func:`student_frames` with that seed only when n is 1)."""
    avatar, other = _voices(cfg, item)
    kept = gen.settings.seed
    gen.settings.seed = seed
    try:
        ref = torch.from_numpy(item.reference).permute(2, 0, 1).float() / 127.5 - 1.0
        gen.start(ref[None].expand(n, -1, -1, -1))
    finally:
        gen.settings.seed = kept  # start() has drawn its generator from it
    step = gen.samples_per_chunk
    chunks = math.ceil(len(item.frames) / gen.chunk_video_frames)
    pad = chunks * step - avatar.numel()
    avatar, other = torch.nn.functional.pad(avatar, (0, pad)), torch.nn.functional.pad(other, (0, pad))
    out = [gen.step(avatar[k * step : (k + 1) * step], other[k * step : (k + 1) * step]) for k in range(chunks)]
    video = torch.cat(out, dim=2)  # [n, 3, T, H, W]
    return [_to_uint8(v)[: len(item.frames)] for v in video]


@torch.no_grad()
def teacher_frames(cfg: Config, teacher, vae, text: torch.Tensor, item: EvalItem, seed: int | None = None) -> np.ndarray:
    return teacher_frames_batch(cfg, teacher, vae, text, item, cfg.project.seed if seed is None else seed, 1)[0]


@torch.no_grad()
def teacher_frames_batch(cfg: Config, teacher, vae, text: torch.Tensor, item: EvalItem, seed: int,
                         n: int) -> list[np.ndarray]:  # fmt: skip
    """``n`` samples of the window from the teacher in one batch, initial and re-noising draws from ``seed``."""
    from tasks.training.common import sample_teacher

    device = next(teacher.parameters()).device
    lat = item.latents.to(device).expand(n, -1, -1, -1, -1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(lat.shape, generator=g).to(device)
    x[:, :, :1] = lat[:, :, :1]
    context = teacher.prepare_text(text.to(device, teacher.dtype).expand(n, -1, -1))
    talk, listen = (a.to(device).expand(n, *a.shape[1:]) for a in (item.talk, item.listen))
    x0 = sample_teacher(cfg, teacher, context, x, talk, listen, seed=seed)
    video = vae.decode(x0)  # [n, 3, 1 + T, H, W], frame 0 the reference
    return [_to_uint8(v[:, 1:])[: len(item.frames)] for v in video]


@torch.no_grad()
def autoencoder_frames(vae, item: EvalItem) -> np.ndarray:
    """The window's own latents (the ground truth encoded) decoded: the autoencoder's round trip."""
    video = vae.decode(item.latents.to(vae.mean.device))[0]  # [3, 1 + T, H, W], frame 0 the reference
    return _to_uint8(video[:, 1:])[: len(item.frames)]


# ------------------------------------------------------------------------------------------------ metrics
def item_metrics(cfg: Config, frames: np.ndarray, item: EvalItem,
                 parts: tuple[str, ...] = metrics.KEYPOINT_PARTS) -> dict[str, Any]:  # fmt: skip
    """Every per-window metric of one system's frames (None where it cannot be computed, with a note).
    ``parts``: the keypoint detectors run; the figures of the others (body and hand rates and motion) are None."""
    e = cfg.evaluate
    listening = item.mask[1 : 1 + len(frames)] == 0
    kp = metrics.extract_keypoints(frames, norm_height=e.keypoint_norm_height, min_side=e.keypoint_min_side,
                                   parts=parts)  # fmt: skip
    rates = {k: v for k, v in kp.detection_rates().items() if k in parts}
    out: dict[str, Any] = {"hkv": metrics.hkv(kp), **metrics.listening_kv(kp, listening),
                           "face_rate": rates.get("face"), "body_rate": rates.get("body"),
                           "hand_rate": rates.get("hands")}  # fmt: skip
    out.update(_face_part(cfg, frames, item, kp))
    avatar, _ = _voices(cfg, item)
    sync = _sync(cfg, frames, kp, avatar.numpy())
    out["sync_status"] = sync["status"]
    out["sync_c"], out["sync_d"] = sync.get("sync_c"), sync.get("sync_d")
    out.update(metrics.flicker(frames))
    notes = []
    if not rates.get("face"):
        notes.append("no face detected: face keypoints, mouth and lip correlation undefined")
    if "hands" in parts and not rates.get("hands"):
        notes.append("no hands detected")
    if set(parts) != set(metrics.KEYPOINT_PARTS):
        notes.append(f"keypoints measured: {', '.join(parts)} (evaluate.chain_body false)")
    out["notes"] = notes
    return out


def face_metrics(cfg: Config, frames: np.ndarray, item: EvalItem, seed: int) -> dict[str, Any]:
    """The face-only metrics of one window (face_rate, lip sync, identity), FaceMesh alone (a tenth of
    item_metrics' cost): what evaluate.seeds measures on each further noise seed."""
    e = cfg.evaluate
    kp = metrics.extract_keypoints(frames, norm_height=e.keypoint_norm_height, min_side=e.keypoint_min_side,
                                   parts=("face",))  # fmt: skip
    out: dict[str, Any] = {"seed": seed, "face_rate": kp.detection_rates()["face"]}
    out.update(_face_part(cfg, frames, item, kp))
    return out


def _face_part(cfg: Config, frames: np.ndarray, item: EvalItem, kp: metrics.Keypoints) -> dict[str, Any]:
    """Lip sync (voice envelope vs mouth opening; the series kept for the pooled r) and identity over time."""
    e = cfg.evaluate
    fps, sr = cfg.video.fps, cfg.audio.sample_rate
    avatar, _ = _voices(cfg, item)
    env = metrics.audio_envelope(avatar.numpy(), sr, fps, len(frames))
    mouth = metrics.mouth_series(kp.face)
    lag = metrics.lagged_correlation(env, mouth, e.max_lag_frames)
    out: dict[str, Any] = {"lip_corr": lag["best_corr"], "lip_lag": lag["best_lag"],
                           "lip_corr_null": metrics.lagged_correlation_null(env, mouth, e.max_lag_frames)}  # fmt: skip
    out["mouth"] = [None if not math.isfinite(v) else round(float(v), 5) for v in mouth]  # for the pooled r
    out["voice_envelope"] = [round(float(v), 6) for v in env]
    ident = metrics.identity_over_time(frames, item.reference, fps, e.identity_window_s, face_landmarks=kp.face,
                                       norm_height=e.keypoint_norm_height)
    out["identity_dist"], out["identity_last_over_first"] = ident["mean"], ident["last_over_first"]
    out["identity_by_window"] = ident["distance"]
    return out


def face_boxes(face: np.ndarray, height: int, norm_height: int) -> np.ndarray:
    """[T, 4] x1, y1, x2, y2 in the frame's pixels from FaceMesh keypoints (normalised frame), NaN without face."""
    pts = face * (height / norm_height)
    boxes = np.full((len(face), 4), np.nan)
    seen = np.isfinite(pts).all(axis=2).any(axis=1)
    if seen.any():
        p = pts[seen]
        boxes[seen] = np.stack([np.nanmin(p[..., 0], 1), np.nanmin(p[..., 1], 1), np.nanmax(p[..., 0], 1),
                                np.nanmax(p[..., 1], 1)], axis=1)  # fmt: skip
    return boxes


def _sync(cfg: Config, frames: np.ndarray, kp: metrics.Keypoints, voice: np.ndarray) -> dict[str, Any]:
    """SyncNet on face-centred crops (as syncnet_python cuts them, boxes from FaceMesh), when it can run."""
    e = cfg.evaluate
    if not e.syncnet_path or not Path(e.syncnet_path).expanduser().is_file():
        return lipsync.sync_metrics(e.syncnet_path, frames, voice, cfg.audio.sample_rate)  # the "skipped: ..."
    if cfg.video.fps != 25:
        return {"status": f"skipped: SyncNet needs 25 fps video (video.fps is {cfg.video.fps})"}
    boxes = face_boxes(kp.face, frames.shape[1], e.keypoint_norm_height)
    if not np.isfinite(boxes).any():
        return {"status": "skipped: no face detected for the SyncNet crops"}
    crops = lipsync.face_crops(frames, boxes)
    return lipsync.sync_metrics(e.syncnet_path, crops, voice, cfg.audio.sample_rate, vshift=e.sync_vshift)


def _mean(values: list) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.fmean(vals) if vals else None


def _lip_series(items: list[dict[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.asarray(it["voice_envelope"], dtype=np.float64),
             np.asarray([np.nan if v is None else v for v in it["mouth"]], dtype=np.float64))
            for it in items if it.get("mouth") is not None]  # fmt: skip


def aggregate(items: list[dict[str, Any]], max_lag: int, seed_items: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The mean of each scalar over the windows; lip_corr / lip_lag / lip_corr_null pooled over the windows
    (metrics.pooled_lagged_correlation: one lag for all, each window standardised) -- the mean of per-window
    best-lag correlations sits near its chance level on short windows; it is kept as lip_corr_window_mean.

    ``seed_items``: face_metrics rows of the same windows generated from further noise seeds (evaluate.seeds).
    The face figures (SEEDED: face rate, identity, lip sync) then count every seed's windows, the others (body
    motion, flicker, SyncNet) the first seed's; ``lip_corr_seed_min`` / ``_max`` give the pooled r of each seed
    alone, the spread one seed's figure would have."""
    seed_items = seed_items or []
    every = items + seed_items
    out = {k: _mean([it.get(k) for it in (every if k in SEEDED else items)]) for k in SCALARS}
    out["lip_corr_window_mean"], out["lip_corr_null_window_mean"] = out["lip_corr"], out["lip_corr_null"]
    series = _lip_series(every)
    pooled = metrics.pooled_lagged_correlation(series, max_lag)
    out["lip_corr"], out["lip_lag"] = pooled["best_corr"], pooled["best_lag"]
    out["lip_corr_null"] = metrics.pooled_lagged_correlation(series, max_lag, reverse_audio=True)["best_corr"]
    if seed_items:
        per_seed = [items] + [[it for it in seed_items if it["seed"] == s]
                              for s in sorted({it["seed"] for it in seed_items})]  # fmt: skip
        rs = [metrics.pooled_lagged_correlation(_lip_series(group), max_lag)["best_corr"] for group in per_seed]
        rs = [r for r in rs if r is not None]
        out["seeds"] = len(per_seed)
        out["lip_corr_seed_min"], out["lip_corr_seed_max"] = (min(rs), max(rs)) if rs else (None, None)
    return out


# ------------------------------------------------------------------------------------------------ the run
def _load_teacher(cfg: Config, root: Path, audio, device):
    from tasks.training.common import dit_from_state

    path = root / cfg.train.checkpoint_dir / "teacher" / "final.pt"
    if not path.is_file():
        return None, f"skipped: no teacher checkpoint at {path.relative_to(root)}"
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return dit_from_state(cfg, audio, blob["model"], device).eval(), str(path.relative_to(root))


def evaluate_systems(cfg: Config, root: Path, systems: tuple[str, ...] = SYSTEMS, checkpoint: str | None = None,
                     progress: bool = True, video_dir: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the chosen systems on the evaluation set and measure everything; returns the report."""
    from tasks.evaluation.benchmark import build_stream, resolve_student

    t0 = time.perf_counter()
    items, eval_set = evaluation_set(cfg, root)
    gen, student = build_stream(cfg, root, resolve_student(cfg, root, checkpoint or cfg.evaluate.checkpoint))
    chain: dict = {}
    for name in (s for s in systems if s in CHAIN):
        path = root / cfg.train.checkpoint_dir / CHAIN[name][0]
        chain[name] = build_stream(cfg, root, path)[0] if path.is_file() else f"skipped: no checkpoint at {path}"
    teacher, teacher_label = (None, "not requested")
    if "teacher" in systems:
        teacher, teacher_label = _load_teacher(cfg, root, gen.audio, gen.device)
    frames: dict[str, list[np.ndarray]] = {s: [] for s in systems}
    per_item: dict[str, list[dict]] = {s: [] for s in systems}
    status = {s: "ok" for s in systems}
    if teacher is None and "teacher" in systems:
        status["teacher"] = teacher_label
    status.update({name: g for name, g in chain.items() if isinstance(g, str)})
    seed_items: dict[str, list[dict]] = {s: [] for s in systems}
    base = cfg.project.seed
    pending: list[tuple[str, bool, dict[str, Any], Any]] = []  # (system, extra seed?, labels, measurement)
    with _measure_pool(cfg.evaluate.workers) as pool:
        for item in tqdm(items, desc="evaluate", unit="window", disable=not progress):
            made = {"ground_truth": item.frames}
            if AUTOENCODER in systems:
                made[AUTOENCODER] = autoencoder_frames(gen.vae, item)
            # the generated systems, each a function of the noise seed (None: project.seed)
            # the generated systems: (one stream at project.seed, a batch of the further seeds' streams)
            makers: dict[str, tuple[Any, Any]] = {}
            if "student" in systems:
                makers["student"] = (functools.partial(student_frames, cfg, gen, item),
                                     functools.partial(student_frames_batch, cfg, gen, item))  # fmt: skip
            if teacher is not None:
                makers["teacher"] = (functools.partial(teacher_frames, cfg, teacher, gen.vae, gen._text, item),
                                     functools.partial(teacher_frames_batch, cfg, teacher, gen.vae, gen._text, item))  # fmt: skip
            for name, g in chain.items():
                if not isinstance(g, str):
                    makers[name] = (functools.partial(student_frames, cfg, g, item),
                                    functools.partial(student_frames_batch, cfg, g, item))  # fmt: skip
            made.update({name: make() for name, (make, _) in makers.items()})
            labels = {"clip_id": item.clip_id, "window": item.window, "split": item.split}
            for name, video in made.items():
                if name in systems:
                    frames[name].append(video)
                    parts = ("face",) if name in chain and not cfg.evaluate.chain_body else metrics.KEYPOINT_PARTS
                    pending.append((name, False, labels, _submit(pool, item_metrics, cfg, video, item, parts)))
            if cfg.evaluate.seeds > 1:  # the face figures again from further noise draws, one batch per system
                for name, (_, make_batch) in makers.items():
                    for k, video in enumerate(make_batch(base + 1, cfg.evaluate.seeds - 1), start=1):
                        pending.append((name, True, labels, _submit(pool, face_metrics, cfg, video, item, base + k)))
            if video_dir is not None:
                _write_comparison(cfg, video_dir / f"{item.name}.mp4", item, made)
        for name, extra, labels, job in tqdm(pending, desc="measure", unit="video", disable=not progress):
            row = job.result()
            row.update(labels)
            (seed_items if extra else per_item)[name].append(row)
    report: dict[str, Any] = {
        "eval_set": eval_set, "student": student["label"], "teacher": teacher_label,
        "chain": {name: f"{CHAIN[name][1]} ({cfg.train.checkpoint_dir}/{CHAIN[name][0]})" for name in chain},
        "definitions": DEFINITIONS, "systems": {},
    }  # fmt: skip
    if AUTOENCODER in systems:
        report["autoencoder"] = ("the ground truth's own latents decoded by the autoencoder (vae.*): the best any "
                                 "system that generates latents can score")  # fmt: skip
    e = cfg.evaluate
    for name in systems:
        if status[name] != "ok":
            report["systems"][name] = {"status": status[name]}
            continue
        more = seed_items[name]
        entry: dict[str, Any] = {"status": "ok", "aggregate": aggregate(per_item[name], e.max_lag_frames, more),
                                 "items": per_item[name], "seed_items": more}  # fmt: skip
        entry["by_split"] = {sp: aggregate([r for r in per_item[name] if r["split"] == sp], e.max_lag_frames,
                                           [r for r in more if r["split"] == sp])
                             for sp in sorted({r["split"] for r in per_item[name]})}  # fmt: skip
        if name == "ground_truth":
            entry["fid"] = {"status": "reference set"}
            entry["fvd"] = {"status": "reference set"}
        else:
            real = [it.frames for it in items]  # the reference set, whichever systems were asked for
            entry["fid"] = fidelity.fid(np.concatenate(real), np.concatenate(frames[name]), e.inception_path)
            entry["fvd"] = fidelity.fvd(real, frames[name], e.i3d_path, clip_len=e.fvd_clip_frames)
        report["systems"][name] = entry
    report["table"] = table(report)
    report["seconds"] = time.perf_counter() - t0
    return report


class _Now:
    """A measurement made in this process, with a future's ``result()``."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


@contextlib.contextmanager
def _measure_pool(workers: int):
    """evaluate.workers processes that measure (mediapipe, one thread each) while this one generates (torch);
    None for 0. Spawned, not forked: this process holds torch's threads."""
    if workers > 0 and multiprocessing.current_process().daemon:
        log.info("evaluate: measuring in this process (a daemonic process cannot start evaluate.workers)")
        workers = 0
    if workers <= 0:
        yield None
        return
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_measure_worker) as pool:
        yield pool


def _measure_worker() -> None:
    torch.set_num_threads(1)  # the measurements are mediapipe's; torch only slices the audio here


def _submit(pool, fn, *args) -> Any:
    return pool.submit(fn, *args) if pool is not None else _Now(fn(*args))


def _write_comparison(cfg: Config, path: Path, item: EvalItem, made: dict[str, np.ndarray]) -> None:
    """ground truth | teacher | student side by side, with the window's audio."""
    from tasks.training.common import write_sample

    order = [made[s] for s in SYSTEMS if s in made]
    n = min(len(v) for v in order)
    video = np.concatenate([v[:n] for v in order], axis=2)  # [T, H, W * k, 3]
    spf = cfg.audio.sample_rate // cfg.video.fps
    tensor = torch.from_numpy(video).permute(3, 0, 1, 2).float() / 127.5 - 1.0
    write_sample(path, tensor, item.wave[spf : spf + n * spf], cfg)


def _value(x: Any) -> Any:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def table(report: dict) -> list[dict]:
    """One row per system: every aggregate metric, FID and FVD (value or why not)."""
    rows = []
    for name, entry in report["systems"].items():
        row: dict[str, Any] = {"system": name}
        if entry.get("status") != "ok":
            row["status"] = entry.get("status")
            rows.append(row)
            continue
        row.update({k: _value(v) for k, v in entry["aggregate"].items()})
        for k in ("fid", "fvd"):
            r = entry[k]
            row[k] = r.get("value") if r.get("status") == "ok" else r.get("status")
        row["status"] = "ok"
        rows.append(row)
        if len(entry.get("by_split", {})) > 1:  # the same system on each split alone (e.g. unseen people)
            for split, agg in entry["by_split"].items():
                rows.append({"system": f"{name}/{split}", **{k: _value(v) for k, v in agg.items()}, "status": "ok"})
    return rows


def format_table(rows: list[dict]) -> str:
    cols = ["system", "hkv", "lbkv", "lhkv", "lfkv", "lip_corr", "lip_lag", "lip_corr_null", "sync_c", "sync_d", "identity_dist",
            "flicker", "face_rate", "fid", "fvd"]  # fmt: skip

    def cell(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.4g}"
        text = str(v)
        return "skipped" if text.startswith("skipped") else text

    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(cell(r.get(c)) for c in cols) for r in rows]
    return "\n".join(lines)


def run_evaluate(cfg: Config, root: Path, progress: bool = True) -> StageResult:
    e = cfg.evaluate
    out_dir = resolve_path(e.out_dir, root)
    out_dir.mkdir(parents=True, exist_ok=True)
    systems = SYSTEMS[:1] + (AUTOENCODER,) + SYSTEMS[1:2] + (tuple(CHAIN) if e.chain else ()) + SYSTEMS[2:]
    systems = systems if e.teacher else tuple(s for s in systems if s != "teacher")
    report = evaluate_systems(cfg, root, systems=systems, progress=progress, video_dir=out_dir / "videos")
    (out_dir / "eval_set.json").write_text(json.dumps(report["eval_set"], indent=2))
    pd.DataFrame(report["table"]).to_csv(out_dir / "table.csv", index=False)
    text = format_table(report["table"])
    (out_dir / "table.md").write_text(text + "\n")
    out = resolve_path(e.report, root)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    tmp.write_text(json.dumps(report, indent=2, default=_json_default))
    tmp.replace(out)
    log.info("evaluation (%d windows)\n%s", len(report["eval_set"]["items"]), text)
    flat = {f"{row['system']}_{k}": float(v) for row in report["table"] for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and math.isfinite(v)}  # fmt: skip
    metrics = write_json_atomic(resolve_path(e.metrics, root), flat)
    videos = sorted((out_dir / "videos").glob("*.mp4"))
    skipped = sorted({str(row.get(k)) for row in report["table"] for k in ("fid", "fvd")
                      if str(row.get(k)).startswith("skipped")})  # fmt: skip
    summary = (f"evaluate: {len(report['eval_set']['items'])} held-out windows, systems "
               f"{', '.join(report['systems'])}; " + ("; ".join(skipped) if skipped else "FID/FVD computed"))
    return StageResult("evaluate", metrics=flat, artifacts=[out, metrics, out_dir / "table.csv", out_dir / "table.md",
                       *videos[:2]], outputs=[out, metrics, out_dir], summary=summary,
                       tables={"metrics_table.json": report["table"]})  # fmt: skip


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
