"""Identity-drift benchmark: the paper's Table 1 ablation in miniature, on the students the project trained.

The paper adds the Reference Sink and then RAPR to a Self-Forcing-style rolling KV cache, then the GAN
refinement, and reports that identity holds over long streams. This bench streams ONE seed, ONE reference
image and audio track, for ``frames`` frames, under five settings that differ only where the paper's differ:

* ``baseline rolling cache``: the distilled student (distill/final.pt), no sink, absolute RoPE. The reference
  frame is an ordinary cached frame and is evicted once the rolling window has moved past it (Self-Forcing);
* ``+ reference sink``: the same student; the reference and the first chunk are never evicted, still absolute
  RoPE, so the distance between a new chunk and the reference (and every RoPE index) grows without bound;
* ``+ sink + RAPR``: the same student, the sink plus Reference-Anchored Positional Re-encoding, which caps
  every index at D;
* ``+ sink + RAPR (legacy)``: the same with the old RAPR rule (model/attention.py, ``rapr_rule``), where
  a sink of 1 + C frames kept its absolute indices and collided with window frames; the two rules coincide
  with a sink of the reference alone, and then this setting is skipped (said so);
* ``+ GAN``: the refined student (refine/final.pt) in the ``+ sink + RAPR`` layout.

A setting whose student checkpoint is missing is reported as skipped, with the reason.

Per time window (10 s by default), against the reference: the evaluate stage's identity distance (1 - NCC of
the grey face region, ``metrics.identity_over_time`` on FaceMesh boxes) and face rate (FaceMesh finds a
face, ``Keypoints.detection_rates``), both at the evaluate stage's ``keypoint_min_side`` /
``keypoint_norm_height``; and distances in a FIXED feature space (the frozen VAE encoder, each frame encoded
alone as a reference frame is) and in pixels. A student that holds its identity keeps them flat; a drifting
one shows them growing (identity) or falling (face rate). A plot draws identity distance and face rate over
time, one line per setting.
"""

from __future__ import annotations

import logging
import math
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.attention import CausalLayout
from model.streaming import StreamingGenerator
from model.vae import VideoVAE
from tasks.common.media import MediaError, read_audio, read_frames
from tasks.common.models import (
    build_layout,
)
from tasks.common.student import RANDOM, build_stream, default_checkpoint, load_student  # noqa: F401  (re-exported)
from tasks.config import Config, ConfigError, resolve_path
from tasks.evaluation import metrics
from tasks.evaluation.model_bench import hardware

log = logging.getLogger(__name__)

BASELINE, SINK, SINK_RAPR, GAN = "baseline rolling cache", "+ reference sink", "+ sink + RAPR", "+ GAN"
LEGACY = "+ sink + RAPR (legacy)"
SETTINGS = (BASELINE, SINK, SINK_RAPR, LEGACY, GAN)
DISTILL, REFINE = "distill", "refine"
STUDENT_OF = {BASELINE: DISTILL, SINK: DISTILL, SINK_RAPR: DISTILL, LEGACY: DISTILL, GAN: REFINE}  # whose final.pt streams
LATENT_METRICS = ("latent_cosine", "latent_rel_l2", "pixel_mad")
FACE_METRICS = ("identity_dist", "face_rate")
METRICS = (*FACE_METRICS, *LATENT_METRICS)
FIXTURES = "../shared/fixtures/avatars"
ENCODE_BATCH = 64  # frames per VAE-encoder call for the features: bounded memory, few calls


# ------------------------------------------------------------------------------------------------ layouts
def drift_layouts(cfg: Config) -> dict[str, CausalLayout]:
    """The five settings' layouts, all derived from the profile's so that chunk size and window agree
    (``+ GAN`` streams the refined student in the ``+ sink + RAPR`` layout)."""
    s = cfg.student
    if s.sink_frames < 1:
        raise ConfigError("student.sink_frames is 0: the '+ reference sink' settings would equal the "
                          "baseline; set it to 1 or 1 + k * chunk_frames")  # fmt: skip
    base = build_layout(cfg)
    full = replace(base, sink_frames=s.sink_frames, rapr=True, max_distance=s.rapr_max_distance, rapr_rule="ordered")
    return {
        BASELINE: replace(base, sink_frames=0, rapr=False),
        SINK: replace(base, sink_frames=s.sink_frames, rapr=False),
        SINK_RAPR: full,
        LEGACY: replace(full, rapr_rule="legacy"),
        GAN: full,
    }


def same_indices(a: CausalLayout, b: CausalLayout, chunks: int) -> bool:
    """Whether two layouts give every chunk of a ``chunks``-chunk stream the same keys at the same indices."""
    c = a.chunk_frames
    for k in range(chunks):
        start, end = 1 + k * c, 1 + (k + 1) * c
        keys = a.visible(start, end)
        if keys != b.visible(start, end) or a.time_index(keys, end) != b.time_index(keys, end):
            return False
    return True


def layout_facts(layout: CausalLayout, chunks: int, chunk_s: float) -> dict[str, Any]:
    """When the mechanisms act in a stream of ``chunks`` chunks, so a reader can tell whether the stream was
    long enough for the layouts to differ at all (times are the chunk's start in the generated video)."""
    c = layout.chunk_frames
    evicted = rapr_from = None
    last_index = 0
    for k in range(chunks):
        start = 1 + k * c
        end = start + c
        visible = layout.visible(start, end)
        if evicted is None and 0 not in visible:
            evicted = k * chunk_s
        if rapr_from is None and layout.shift(end) > 0:
            rapr_from = k * chunk_s
        last_index = max(layout.time_index(visible, end))
    return {
        "chunk_frames": c, "sink_frames": layout.sink_frames, "window_frames": layout.window_frames,
        "rapr": layout.rapr, "max_distance": layout.max_distance if layout.rapr else None,
        "reference_evicted_from_s": evicted, "rapr_reencoding_from_s": rapr_from,
        "last_chunk_max_rope_time_index": last_index,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class DriftInputs:
    reference: torch.Tensor  # [3, H, W] in [-1, 1]
    avatar: torch.Tensor  # [samples] the avatar's own voice
    other: torch.Tensor  # [samples] the interlocutor's voice
    reference_source: str
    audio_source: str


def _tile(wave: torch.Tensor, samples: int) -> torch.Tensor:
    reps = math.ceil(samples / max(1, wave.numel()))
    return wave.repeat(reps)[:samples]


def _turns(voice: torch.Tensor, period: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One voice looped; the avatar speaks on even loops and listens to it on odd ones, so both the talking
    and the listening audio paths run, as in a conversation."""
    looped = _tile(voice, samples)
    talking = ((torch.arange(samples) // period) % 2 == 0).float()
    return looped * talking, looped * (1 - talking)


def _synthetic_reference(cfg: Config) -> torch.Tensor:
    """A seeded smooth image (low-frequency noise, bilinearly upsampled): image-like, same every run."""
    g = torch.Generator().manual_seed(cfg.project.seed)
    coarse = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    size = (cfg.video.height, cfg.video.width)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0]


def _synthetic_voice(cfg: Config, seconds: float = 2.0) -> torch.Tensor:
    """A 2 s 'syllabic' tone: 180 Hz with harmonics, amplitude-modulated at 4 Hz."""
    sr = cfg.audio.sample_rate
    t = torch.arange(int(seconds * sr)) / sr
    tone = sum(torch.sin(2 * math.pi * 180 * k * t) / k for k in (1, 2, 3))
    return 0.2 * tone * (0.5 + 0.5 * torch.sin(2 * math.pi * 4 * t)).clamp(min=0)


def drift_inputs(cfg: Config, root: Path, samples: int) -> DriftInputs:
    """Reference image and ``samples`` of both voices: the first validation window of data/latents, else a
    ../shared avatar fixture (+ its wav), else seeded synthetic ones. Every source is said in the report."""
    from tasks.training.data import load_windows

    spf = cfg.audio.sample_rate // cfg.video.fps
    if (root / cfg.train.latents_dir / "index.parquet").is_file():
        try:
            w = load_windows(cfg, root, "val", limit=1)
        except ConfigError as exc:
            log.warning("drift bench: %s; falling back to a fixture reference", exc)
        else:
            ref = w.reference[0].float() / 127.5 - 1.0
            # frame 0 is the reference itself; the audio of generated frames starts one frame later
            mask = w.mask[0, 1:].repeat_interleave(spf)
            wave = w.wave[0, spf : spf + mask.numel()]
            mask = mask[: wave.numel()]
            clip = w.index.clip_id[0]
            src = f"first val window of {cfg.train.latents_dir} ({clip}, window {int(w.index.window[0])})"
            return DriftInputs(ref, _tile(wave * mask, samples), _tile(wave * (1 - mask), samples), src,
                               f"{src}: its audio split by its speaking mask, looped "
                               f"({wave.numel() / cfg.audio.sample_rate:.2f} s)")  # fmt: skip
    folder = resolve_path(FIXTURES, root)
    images = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    images.sort(key=lambda p: not p.with_suffix(".wav").is_file())  # prefer an avatar with its own voice
    period = 2 * cfg.video.fps * spf  # 2 s turns
    for image in images:
        try:
            frame = read_frames(image, cfg.video.width, cfg.video.height)[0]
        except MediaError as exc:
            log.warning("drift bench: %s", exc)
            continue
        ref = torch.from_numpy(frame).permute(2, 0, 1).float() / 127.5 - 1.0
        wav = image.with_suffix(".wav")
        voice, audio_src = None, "a seeded synthetic tone"
        if wav.is_file():
            try:
                voice = torch.from_numpy(read_audio(wav, cfg.audio.sample_rate))
                audio_src = f"fixture {FIXTURES}/{wav.name}"
            except MediaError as exc:
                log.warning("drift bench: %s", exc)
        if voice is None or voice.numel() == 0:
            voice = _synthetic_voice(cfg)
        avatar, other = _turns(voice, period, samples)
        size = f"{cfg.video.width}x{cfg.video.height}"
        return DriftInputs(ref, avatar, other, f"fixture {FIXTURES}/{image.name} (resized to {size})",
                           f"{audio_src}, looped; the avatar speaks on even 2 s turns and listens to the "
                           "same voice on odd ones")  # fmt: skip
    avatar, other = _turns(_synthetic_voice(cfg), period, samples)
    return DriftInputs(_synthetic_reference(cfg), avatar, other,
                       f"synthetic (seeded smooth noise image, project.seed={cfg.project.seed}; no "
                       f"{cfg.train.latents_dir} and no {FIXTURES})",
                       "a seeded synthetic tone, looped; the avatar speaks on even 2 s turns and listens on "
                       "odd ones")  # fmt: skip


# ------------------------------------------------------------------------------------------------ streaming
@torch.no_grad()
def stream(gen: StreamingGenerator, inputs: DriftInputs, frames: int, progress: bool = False,
           desc: str = "stream") -> torch.Tensor:  # fmt: skip
    """``frames`` generated frames [T, 3, H, W] in [-1, 1] (CPU float32): start(reference), then one step
    (DiT denoise + streaming VAE decode) per chunk, exactly as the product runs."""
    chunks = math.ceil(frames / gen.chunk_video_frames)
    step = gen.samples_per_chunk
    gen.start(inputs.reference)
    h, w = inputs.reference.shape[-2:]
    out = torch.empty(chunks * gen.chunk_video_frames, 3, h, w)
    for i in tqdm(range(chunks), desc=desc, unit="chunk", disable=not progress, leave=False):
        piece = slice(i * step, (i + 1) * step)
        video = gen.step(inputs.avatar[piece], inputs.other[piece])[0]  # [3, 4C, H, W]
        n = video.shape[1]
        out[i * n : (i + 1) * n] = video.permute(1, 0, 2, 3).float().cpu()
    return out[:frames]


@torch.no_grad()
def frame_distances(vae: VideoVAE, frames: torch.Tensor, reference: torch.Tensor,
                    batch: int = ENCODE_BATCH) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per frame: 1 - cos and ||f - f_ref|| / ||f_ref|| of the flattened frozen-VAE latents, and the mean
    absolute pixel difference in [0, 1]. Each frame is encoded alone (as the reference is), in batches."""
    device = vae.mean.device
    ref_f = vae.encode_reference(reference[None].to(device)).flatten(1).float().cpu()[0]
    cos, rel = [], []
    for i in range(0, len(frames), batch):
        f = vae.encode_reference(frames[i : i + batch].to(device)).flatten(1).float().cpu()
        cos.append(1 - torch.nn.functional.cosine_similarity(f, ref_f[None], dim=1))
        rel.append((f - ref_f).norm(dim=1) / ref_f.norm())
    pixel = ((frames.clamp(-1, 1) - reference[None].clamp(-1, 1)).abs() / 2).flatten(1).mean(1)
    return {"latent_cosine": torch.cat(cos), "latent_rel_l2": torch.cat(rel), "pixel_mad": pixel}


def window_edges(frames: int, fps: int, window_s: float) -> list[tuple[float, float]]:
    """[start, end) seconds of every window; the last one is cut at the stream's end."""
    per = window_s * fps
    n = math.ceil(frames / per - 1e-9)
    return [(k * window_s, min((k + 1) * window_s, frames / fps)) for k in range(n)]


def windowed(values: torch.Tensor, fps: int, window_s: float) -> list[float]:
    """Mean of ``values`` (one per frame, frame i at i / fps seconds) over each window."""
    per = window_s * fps
    idx = torch.floor(torch.arange(len(values)) / per + 1e-9).long()
    n = len(window_edges(len(values), fps, window_s))
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, values.double())
    ones = torch.ones(len(values), dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, ones)
    return (sums / counts).tolist()


def summarise(series: list[float], centres_s: list[float]) -> dict[str, Any]:
    """first/last window, least-squares slope per minute over the window centres, and last/first."""
    first, last = series[0], series[-1]
    slope = float(np.polyfit(centres_s, series, 1)[0] * 60) if len(series) > 1 else None
    return {"series": series, "first": first, "last": last, "slope_per_min": slope,
            "last_over_first": last / first if first > 0 else None}  # fmt: skip


def _first_difference(a: torch.Tensor, b: torch.Tensor, chunk: int) -> tuple[int | None, float]:
    """(1-based chunk where two streams first differ, max |a - b|), None when identical."""
    diff = (a - b).abs().flatten(1).amax(1)
    differing = torch.nonzero(diff > 0)
    first = int(differing[0]) // chunk + 1 if len(differing) else None
    return first, float(diff.max()) if len(diff) else 0.0


# ------------------------------------------------------------------------------------------------ face metrics
def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[T, 3, H, W] in [-1, 1] -> [T, H, W, 3] uint8, quantised as the evaluate stage quantises its videos."""
    return ((frames.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def face_landmarks(frames: np.ndarray, norm_height: int, min_side: int, progress: bool = False,
                   desc: str = "faces") -> np.ndarray:  # fmt: skip
    """FaceMesh landmarks [T, 468, 2] of uint8 frames [T, H, W, 3], NaN where no face: the ``face`` of
    ``metrics.extract_keypoints(frames, norm_height, min_side)`` (same FaceMesh settings, same enlargement,
    same normalised-frame pixels; tested equal), without its Pose and Hands passes, which the drift bench
    does not use and which cost 15x the FaceMesh time per frame here (55 ms against 3.6 ms at 64x64)."""
    from tasks.common.facemesh import FaceMesh

    t, h, w = frames.shape[:3]
    sx, sy = w * norm_height / h, float(norm_height)
    face = np.full((t, metrics.FACE_POINTS, 2), np.nan)
    mesh = FaceMesh(static_image_mode=True)
    try:
        for i in tqdm(range(t), desc=desc, unit="frame", disable=not progress, leave=False):
            image = np.ascontiguousarray(metrics.upscale_for_landmarks(frames[i], min_side))
            lm = mesh(image)
            if lm is not None:
                ih, iw = image.shape[:2]
                face[i, :, 0] = lm[:, 0] / iw * sx
                face[i, :, 1] = lm[:, 1] / ih * sy
    finally:
        mesh.close()
    return face


def face_rate_by_window(face: np.ndarray, fps: int, window_s: float) -> list[float]:
    """Per window (frames assigned as ``windowed`` assigns them), ``Keypoints.detection_rates()['face']``
    (the evaluate stage's face_rate) of its frames."""
    idx = np.floor(np.arange(len(face)) / (window_s * fps) + 1e-9).astype(np.int64)
    none = np.full((len(face), 1, 2), np.nan)
    rates = []
    for k in range(len(window_edges(len(face), fps, window_s))):
        part = idx == k
        kp = metrics.Keypoints(body=none[part], left_hand=none[part], right_hand=none[part], face=face[part])
        rates.append(kp.detection_rates()["face"])
    return rates


def face_measures(cfg: Config, frames: np.ndarray, reference: np.ndarray, window_s: float, progress: bool = False,
                  desc: str = "faces") -> dict[str, Any]:  # fmt: skip
    """Identity distance to ``reference`` (``metrics.identity_over_time`` on the FaceMesh face boxes, as the
    evaluate stage computes identity_dist) and face rate, per ``window_s`` window of uint8 ``frames``."""
    e, fps = cfg.evaluate, cfg.video.fps
    face = face_landmarks(frames, e.keypoint_norm_height, e.keypoint_min_side, progress, desc)
    ident = metrics.identity_over_time(frames, reference, fps, window_s, face_landmarks=face,
                                       norm_height=e.keypoint_norm_height)  # fmt: skip
    return {"identity_dist": ident["distance"], "face_rate": face_rate_by_window(face, fps, window_s),
            "identity_mean": ident["mean"], "face_rate_all": float(np.isfinite(face).all(-1).any(-1).mean()),
            "face_box_frames": ident["face_box_frames"]}  # fmt: skip


# ------------------------------------------------------------------------------------------------ the bench
def resolve_students(cfg: Config, root: Path, checkpoint: str | Path | None,
                     gan_checkpoint: str | Path | None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """{"distill": {"checkpoint": path or "random"} or {"skipped": why}, "refine": likewise}. A checkpoint
    left at None is the stage's final.pt, skipped when missing; one given that does not exist is an error."""
    ckpt = cfg.train.checkpoint_dir
    out: dict[str, dict[str, Any]] = {}
    for stage, given, flag in (
        (DISTILL, checkpoint, "--checkpoint"),
        (REFINE, gan_checkpoint, "--gan-checkpoint"),
    ):
        if given == RANDOM:
            out[stage] = {"checkpoint": RANDOM}
        elif given is None:
            path = root / ckpt / stage / "final.pt"
            out[stage] = (
                {"checkpoint": path}
                if path.is_file()
                else {"skipped": f"no {ckpt}/{stage}/final.pt (run `streamavatar {stage}`, or `make demo`)"}
            )
        else:
            path = resolve_path(given, root)
            if not path.is_file():
                raise ConfigError(f"{flag} {given}: no such file")
            out[stage] = {"checkpoint": path}
    if all("skipped" in s for s in out.values()):
        raise ConfigError(f"no trained student: neither {ckpt}/distill/final.pt nor {ckpt}/refine/final.pt "
                          "exists; run `make demo` first (or pass --checkpoint PATH, or --checkpoint random for "
                          "the untrained student)")  # fmt: skip
    return out


def run_drift_bench(
    cfg: Config, root: Path, frames: int = 1500, checkpoint: str | Path | None = None, window_s: float = 10.0,
    progress: bool = True, streams_out: dict[str, torch.Tensor] | None = None,
    gan_checkpoint: str | Path | None = None, plot_path: str | Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Stream ``frames`` frames under each of the four settings and measure drift per ``window_s`` window.

    ``checkpoint``: the student of the three cache settings (None: distill/final.pt), ``gan_checkpoint``:
    the ``+ GAN`` student (None: refine/final.pt); either may be a path or "random". ``streams_out``: when a
    dict is given, each setting's frames [T, 3, H, W] are stored in it. ``plot_path``: where to draw the
    identity distance and face rate over time (the report lists it).
    """
    if frames < 1:
        raise ConfigError(f"--frames must be at least 1, got {frames}")
    if not window_s > 0:
        raise ConfigError(f"--window-s must be positive, got {window_s}")
    if window_s * cfg.video.fps < 1:
        raise ConfigError(f"--window-s {window_s} holds less than one frame at {cfg.video.fps} fps")
    t_all = time.perf_counter()
    root = Path(root)
    students = resolve_students(cfg, root, checkpoint, gan_checkpoint)
    ran = [stage for stage in (DISTILL, REFINE) if "skipped" not in students[stage]]
    # the product's generator; every setting streams with the same VAE, audio encoder, prompt and seed
    probe, info = build_stream(cfg, root, students[ran[0]]["checkpoint"])
    dit, vae, audio, text, base_settings = probe.dit, probe.vae, probe.audio, probe._text, probe.settings
    dits = {ran[0]: dit}
    students[ran[0]].update(info)
    for stage in ran[1:]:
        if students[stage]["checkpoint"] == students[ran[0]]["checkpoint"]:
            dits[stage] = dit
            students[stage].update(info)
        else:
            dits[stage], more = load_student(cfg, root, students[stage]["checkpoint"], audio, probe.device)
            students[stage].update(more)
    for s in students.values():
        s.pop("checkpoint", None)  # a Path; "path" and "label" say it
    layouts = drift_layouts(cfg)
    fps = cfg.video.fps
    cvf, spc = probe.chunk_video_frames, probe.samples_per_chunk
    chunks = math.ceil(frames / cvf)
    inputs = drift_inputs(cfg, root, chunks * spc)
    edges = window_edges(frames, fps, window_s)
    centres = [(a + b) / 2 for a, b in edges]
    reference = to_uint8(inputs.reference[None])[0]
    e = cfg.evaluate
    reference_face = bool(np.isfinite(face_landmarks(reference[None], e.keypoint_norm_height,
                                                     e.keypoint_min_side)).any())  # fmt: skip
    # the scale of "far": a flat mid-grey frame knows nothing about the reference
    grey = torch.zeros_like(inputs.reference)[None]
    anchor = {m: float(v[0]) for m, v in frame_distances(vae, grey, inputs.reference).items()}
    grey_face = face_measures(cfg, to_uint8(grey), reference, window_s)
    anchor.update(identity_dist=grey_face["identity_dist"][0], face_rate=grey_face["face_rate"][0])

    results: dict[str, dict[str, Any]] = {}
    compared: dict[str, torch.Tensor] = {}  # the streams the next settings are compared with
    for name in SETTINGS:
        stage = STUDENT_OF[name]
        if "skipped" in students[stage]:
            results[name] = {"student": stage, "skipped": students[stage]["skipped"]}
            log.warning("drift bench: '%s' skipped: %s", name, students[stage]["skipped"])
            continue
        layout = layouts[name]
        if name == LEGACY and same_indices(layout, layouts[SINK_RAPR], chunks):
            results[name] = {"student": stage, "skipped": f"the legacy and ordered RAPR rules give the same indices "
                             f"with sink_frames={layout.sink_frames} (they differ only with a sink of 1 + k*C "
                             "frames, e.g. --set student.sink_frames=4)"}  # fmt: skip
            continue
        gen = StreamingGenerator(dits[stage], vae, audio, text, replace(base_settings, layout=layout))
        t0 = time.perf_counter()
        video = stream(gen, inputs, frames, progress, desc=name)
        stream_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        per_frame = frame_distances(vae, video, inputs.reference)
        faces = face_measures(cfg, to_uint8(video), reference, window_s, progress, desc=f"{name}: faces")
        features_s = time.perf_counter() - t0
        series = {**{m: windowed(per_frame[m], fps, window_s) for m in LATENT_METRICS},
                  **{m: faces[m] for m in FACE_METRICS}}  # fmt: skip
        row: dict[str, Any] = {
            "student": stage, "checkpoint": students[stage]["label"],
            "layout": layout_facts(layout, chunks, cvf / fps),
            "stream_s": stream_s, "features_s": features_s, "seconds": stream_s + features_s,
            "metrics": {m: summarise(series[m], centres) for m in METRICS},
            "identity_dist_all_frames": faces["identity_mean"], "face_rate_all_frames": faces["face_rate_all"],
            "face_box_frames": faces["face_box_frames"],
        }  # fmt: skip
        for other, key in ((BASELINE, "baseline"), (SINK, "sink"), (SINK_RAPR, "sink_rapr")):
            if other in compared and name != other:
                first, biggest = _first_difference(compared[other], video, cvf)
                row[f"first_chunk_differing_from_{key}"] = first
                row[f"max_abs_pixel_diff_vs_{key}"] = biggest
        if name in (BASELINE, SINK, SINK_RAPR):
            compared[name] = video
        if streams_out is not None:
            streams_out[name] = video
        results[name] = row
        del video

    report = {
        "benchmark": "drift",
        "frames": frames, "seconds_of_video": frames / fps, "fps": fps, "chunks": chunks,
        "chunk_video_frames": cvf, "window_s": window_s, "windows": len(edges), "window_edges_s": edges,
        "students": students,
        "trained_student": all(students[s]["trained"] for s in ran),
        "reference_source": inputs.reference_source, "audio_source": inputs.audio_source,
        "reference_face_found": reference_face,
        "feature_space": "frozen VAE encoder latent of each frame encoded alone (vae.encode_reference), "
                         "flattened; " + ("pretrained VAE" if cfg.vae.pretrained_path
                                          else "RANDOMLY INITIALISED demo VAE"),
        "metrics": {
            "identity_dist": "the evaluate stage's identity distance: 1 - normalised cross-correlation of the "
                             "grey face region (FaceMesh box + 20%, the whole frame without a face) with the "
                             "same pixels of the reference, mean over the window's frames (0 same, 1 unrelated)",
            "face_rate": "fraction of the window's frames in which FaceMesh finds a face (the evaluate stage's "
                         f"face_rate; frames enlarged to {e.keypoint_min_side} px first)",
            "latent_cosine": "1 - cos(latent(frame), latent(reference))",
            "latent_rel_l2": "||latent(frame) - latent(reference)|| / ||latent(reference)||",
            "pixel_mad": "mean |frame - reference| with pixels in [0, 1]",
        },
        "profile": {"video": f"{cfg.video.width}x{cfg.video.height}@{fps}", "backbone": cfg.model.backbone,
                    "dit_params_m": round(sum(p.numel() for p in dit.parameters()) / 1e6, 3),
                    "vae_params_m": round(sum(p.numel() for p in vae.parameters()) / 1e6, 3),
                    "vae_weights": "pretrained" if cfg.vae.pretrained_path else "random",
                    "dtype": cfg.project.dtype, "steps": base_settings.steps,
                    "context": base_settings.context, "seed": base_settings.seed},
        "flat_grey_frame": anchor,
        "hardware": hardware(probe.device),
        "settings": results,
    }  # fmt: skip
    report["interpretation"] = interpret(report, cfg)
    if plot_path is not None:
        plot = plot_drift(report, resolve_path(plot_path, root))
        report["plot"] = str(plot.relative_to(root) if plot.is_relative_to(root) else plot)
    report["wall_s"] = time.perf_counter() - t_all
    return report


def plot_drift(report: dict, out: Path) -> Path:
    """Identity distance and face rate per window over the stream, one line per setting that ran (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = [(a + b) / 2 for a, b in report["window_edges_s"]]
    style = {BASELINE: ("C3", "o", "-"), SINK: ("C1", "s", "-"), SINK_RAPR: ("C0", "^", "-"),
             LEGACY: ("C4", "v", ":"), GAN: ("C2", "D", "--")}  # fmt: skip
    fig, axes = plt.subplots(2, 1, figsize=(8, 6.2), sharex=True)
    panels = (("identity_dist", "identity distance to the reference\n(1 - NCC of the grey face region)"),
              ("face_rate", "face rate (FaceMesh)"))  # fmt: skip
    for ax, (metric, label) in zip(axes, panels, strict=True):
        for name in SETTINGS:
            row = report["settings"][name]
            colour, marker, line = style[name]
            if "skipped" in row:
                ax.plot([], [], color=colour, linestyle=":", label=f"{name}: skipped")
                continue
            ax.plot(centres, row["metrics"][metric]["series"], color=colour, marker=marker, linestyle=line,
                    label=f"{name} ({row['student']})")  # fmt: skip
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    grey = report["flat_grey_frame"].get("identity_dist")
    if grey is not None:
        axes[0].axhline(grey, color="grey", linestyle=":", linewidth=1, label="flat grey frame")
    axes[1].set_ylim(-0.05, 1.05)
    axes[0].legend(loc="best", fontsize=7)
    axes[-1].set_xlabel(f"time in the stream (s), centres of {report['window_s']:g} s windows")
    prof = report["profile"]
    fig.suptitle(f"identity drift over {report['frames']} frames ({report['seconds_of_video']:g} s), "
                 f"{prof['video']} {prof['backbone']}", fontsize=10)  # fmt: skip
    fig.text(0.01, 0.005, textwrap.shorten(f"reference: {report['reference_source']}", 150), fontsize=6)
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


SAME_PCT = 1.0  # settings whose last-window distances are within this many percent are called the same
SAME_RATE = 0.02  # face rates within this many (fraction of frames) are called the same
FEW_FACES = 0.1  # below this face rate in every setting, "which ends best" would read noise
FLAT_PCT = 5.0  # a last/first ratio within this many percent of 1 is called no drift


def _ran(report: dict) -> list[str]:
    return [n for n in SETTINGS if "skipped" not in report["settings"][n]]


def interpret(report: dict, cfg: Config) -> str:
    """A few sentences read off the numbers: who holds identity best at the end, whether anything drifts,
    what was skipped, and what to discount (an untrained or demo-sized model)."""
    s = report["settings"]
    ran = _ran(report)
    end = edges_label(report["window_edges_s"][-1])

    def stat(name: str, metric: str, key: str) -> float:
        return s[name]["metrics"][metric][key]

    parts = [f"'{n}' was skipped: {s[n]['skipped']}." for n in SETTINGS if n not in ran]
    for metric, what, best_of in (("identity_dist", "identity distance", min), ("face_rate", "face rate", max),
                                  ("latent_cosine", "latent cosine distance", min)):  # fmt: skip
        last = {n: stat(n, metric, "last") for n in ran}
        detail = ", ".join(f"'{n}' {v:.3g}" for n, v in last.items())
        if len(ran) < 2:
            parts.append(f"{what.capitalize()} in the last window ({end}): {detail}.")
            continue
        lo, hi = min(last.values()), max(last.values())
        same = (
            hi - lo <= SAME_RATE if metric == "face_rate" else hi - lo <= SAME_PCT / 100 * max(abs(lo), 1e-12)
        )
        if metric == "face_rate" and hi < FEW_FACES:
            verdict = f"FaceMesh finds a face in under {100 * FEW_FACES:g}% of every setting's frames"
        elif same:
            verdict = "the settings end the same (no measurable difference)"
        else:
            best = best_of(last, key=last.get)
            verdict = f"'{best}' ends best"
        parts.append(f"{what.capitalize()} in the last window ({end}): {verdict}; {detail}.")
    ident = {n: (stat(n, "identity_dist", "first"), stat(n, "identity_dist", "last"),
                 stat(n, "identity_dist", "slope_per_min")) for n in ran}  # fmt: skip
    faces = {n: (stat(n, "face_rate", "first"), stat(n, "face_rate", "last")) for n in ran}
    flat = all(abs(b - a) <= FLAT_PCT / 100 * max(a, 1e-12) for a, b, _ in ident.values()) and all(
        abs(b - a) <= SAME_RATE for a, b in faces.values()
    )
    if len(report["window_edges_s"]) < 2:
        parts.append("One window only: nothing can be said about drift over time.")
    elif flat:
        parts.append(f"No setting drifts over {report['seconds_of_video']:g} s: identity distance and face rate "
                     "stay within " + f"{FLAT_PCT:g}% and {SAME_RATE:g} of their first window.")  # fmt: skip
    else:
        parts.append("Identity distance first -> last window (trend per minute): "
                     + ", ".join(f"'{n}' {a:.3f} -> {b:.3f} ({_fmt(v, '+.3g')})" for n, (a, b, v) in ident.items())
                     + "; face rate first -> last: "
                     + ", ".join(f"'{n}' {a:.2f} -> {b:.2f}" for n, (a, b) in faces.items()) + ".")  # fmt: skip
    if SINK in ran and s[SINK].get("first_chunk_differing_from_baseline") is not None:
        parts.append(f"The layouts do change the frames (the sink stream parts from the baseline at chunk "
                     f"{s[SINK]['first_chunk_differing_from_baseline']}, max |pixel difference| "
                     f"{s[SINK]['max_abs_pixel_diff_vs_baseline']:.3g} in [-1, 1]).")  # fmt: skip
    if LEGACY in ran and SINK_RAPR in ran:
        part = s[LEGACY].get("first_chunk_differing_from_sink_rapr")
        parts.append(f"RAPR's sink order: the legacy rule's stream parts from the ordered rule's at chunk {part}; "
                     f"identity distance in the last window {stat(SINK_RAPR, 'identity_dist', 'last'):.3f} "
                     f"(ordered) vs {stat(LEGACY, 'identity_dist', 'last'):.3f} (legacy), face rate "
                     f"{stat(SINK_RAPR, 'face_rate', 'last'):.2f} vs {stat(LEGACY, 'face_rate', 'last'):.2f}.")  # fmt: skip
    facts = s[ran[0]]["layout"] if BASELINE not in ran else s[BASELINE]["layout"]
    if BASELINE in ran and facts["reference_evicted_from_s"] is None:
        parts.append("The stream is too short for the rolling window to evict the reference, so the baseline "
                     "and the sink settings cannot differ yet.")  # fmt: skip
    rapr = next((s[n]["layout"] for n in (SINK_RAPR, GAN) if n in ran), None)
    if rapr is not None and rapr["rapr_reencoding_from_s"] is None:
        parts.append("The stream is too short for RAPR to re-encode any position, so the two sink settings "
                     "cannot differ yet.")  # fmt: skip
    first = next((n for n in (SINK_RAPR, GAN) if n in ran), ran[0])  # the product's layout when it ran
    grey = report["flat_grey_frame"]
    boxed = s[first]["face_box_frames"] / report["frames"]
    scale = (f"In the first window '{first}' is at identity distance {stat(first, 'identity_dist', 'first'):.3f} "
             f"(a flat grey frame: {grey['identity_dist']:.3f}) with a face in "
             f"{100 * stat(first, 'face_rate', 'first'):.0f}% of frames")  # fmt: skip
    if not report["reference_face_found"]:
        parts.append(f"{scale}; FaceMesh finds no face in the reference itself, so identity is compared on the "
                     "whole frame and face rate means little.")  # fmt: skip
    elif stat(first, "identity_dist", "first") >= 0.8 * grey["identity_dist"]:
        parts.append(f"{scale}: the student does not reproduce the reference to begin with, so there is "
                     "little identity to lose and these figures cannot show the paper's effect.")  # fmt: skip
    elif stat(first, "face_rate", "first") < 0.5:
        parts.append(f"{scale}: the frames keep the reference's layout but FaceMesh rarely finds a face in them, "
                     f"so identity is mostly compared on the whole frame (face box in {100 * boxed:.0f}% of its "
                     "frames) and face rate cannot show drift.")  # fmt: skip
    else:
        parts.append(f"{scale}.")
    if not report["trained_student"]:
        parts.append(
            "A student is RANDOMLY INITIALISED (--checkpoint random): these numbers only show "
            "that the settings change the stream, nothing about a trained model's drift."
        )
    elif cfg.model.backbone.startswith("tiny"):
        steps = ", ".join(f"{k} step {v['step']}" for k, v in report["students"].items() if v.get("step"))
        parts.append(f"Caveat: the demo students ({steps or 'steps unknown'}) are tiny and trained for minutes "
                     "on a small corpus: this shows the mechanisms' effect on a tiny model, not the paper's "
                     "quality.")  # fmt: skip
    return " ".join(parts)


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else f"{x:{spec}}"


def edges_label(edge: tuple[float, float] | list[float]) -> str:
    return f"t={edge[0]:g}-{edge[1]:g}s"


def format_report(r: dict) -> str:
    s, hw, prof = r["settings"], r["hardware"], r["profile"]
    lines = [
        f"drift benchmark  {r['frames']} frames ({r['seconds_of_video']:.1f} s) per setting, "
        f"{r['window_s']:g} s windows, {prof['video']} {prof['backbone']} on {hw.get('gpu', hw['cpu'])} "
        f"({hw['cpu_threads']} threads)",
    ]
    for stage, info in r["students"].items():
        what = info.get("skipped") or info["label"] + (f" (step {info['step']})" if info.get("step") else "")
        lines.append(f"  {stage + ':':10s} {what}")
    face = "" if r["reference_face_found"] else "  (FaceMesh finds NO face in it)"
    lines += [
        f"  reference: {r['reference_source']}{face}",
        f"  audio:     {r['audio_source']}",
        f"  features:  {r['feature_space']}",
        "",
        f"  {'':24s} {'identity distance':^26s} {'face rate':^13s} {'latent 1-cos':^17s} "
        f"{'pixel |x-ref|':^17s}",
        f"  {'setting':24s} {'first':>7s} {'last':>7s} {'slope/min':>10s} {'first':>6s} {'last':>6s} "
        f"{'first':>8s} {'last':>8s} {'first':>8s} {'last':>8s} {'time s':>7s}",
    ]  # fmt: skip
    for name in SETTINGS:
        if "skipped" in s[name]:
            lines.append(f"  {name:24s} skipped: {s[name]['skipped']}")
            continue
        m = s[name]["metrics"]
        i, f, c, p = m["identity_dist"], m["face_rate"], m["latent_cosine"], m["pixel_mad"]
        lines.append(
            f"  {name:24s} {i['first']:7.3f} {i['last']:7.3f} {_num(i['slope_per_min'], '+10.4f', 10)} "
            f"{f['first']:6.2f} {f['last']:6.2f} {c['first']:8.4f} {c['last']:8.4f} {p['first']:8.4f} "
            f"{p['last']:8.4f} {s[name]['seconds']:7.1f}"
        )
    lines.append(f"  {'flat grey frame':24s} {r['flat_grey_frame']['identity_dist']:7.3f}")
    edges = r["window_edges_s"]
    picks = sorted({0, len(edges) // 4, len(edges) // 2, (3 * len(edges)) // 4, len(edges) - 1})
    if len(edges) <= 8:
        picks = list(range(len(edges)))
    labels = " ".join(f"{edges_label(edges[k]):>11s}" for k in picks)
    for metric, title, spec in (("identity_dist", "identity per window", "11.3f"),
                                ("face_rate", "face rate per window", "11.2f")):  # fmt: skip
        lines += ["", f"  {title:24s} {labels}"]
        for name in _ran(r):
            series = s[name]["metrics"][metric]["series"]
            lines.append(f"  {name:24s} " + " ".join(f"{series[k]:{spec}}" for k in picks))
    lines += ["", "  when the layouts act (times are chunk starts in the generated video):"]
    for name in _ran(r):
        f = s[name]["layout"]
        differs = []
        for key, other in (("baseline", "baseline"), ("sink_rapr", "+ sink + RAPR")):
            if f"first_chunk_differing_from_{key}" in s[name]:
                differs.append(
                    f"differs from {other} from chunk {s[name][f'first_chunk_differing_from_{key}'] or 'never'}"
                )
        lines.append(
            f"  {name:24s} sink {f['sink_frames']}, window {f['window_frames']}, rapr {f['rapr']}: reference "
            f"evicted {_seen(f['reference_evicted_from_s'])}, RAPR re-encoding "
            f"{_seen(f['rapr_reencoding_from_s'])}, max RoPE time index {f['last_chunk_max_rope_time_index']}"
            + "".join(f", {d}" for d in differs)
        )
    lines += ["", textwrap.fill(r["interpretation"], 108, initial_indent="  ", subsequent_indent="  ")]
    if r.get("plot"):
        lines.append(f"  plot: {r['plot']}")
    lines.append(f"  wall time {r['wall_s']:.1f} s")
    return "\n".join(lines)


def _num(x: float | None, spec: str, width: int) -> str:
    return f"{'n/a':>{width}s}" if x is None else f"{x:{spec}}"


def _seen(seconds: float | None) -> str:
    return "never" if seconds is None else f"from {seconds:g} s"
