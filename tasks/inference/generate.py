"""`streamavatar generate`: a reference image and a conversation's audio in, a talking/listening mp4 out.

The avatar talks on its own voice (``audio``) and listens to the other person's (``listen_to``). Both tracks
are decoded by ffmpeg from any audio or video file (any rate, any channel count) to mono at
``audio.sample_rate``, padded with silence to the longer one and streamed chunk by chunk through
``StreamingGenerator``, exactly the product's path: ``start(reference)`` then one ``step`` (DiT denoising and
streaming VAE decode) per chunk of 4C video frames. Frames go to the encoder as they are produced, so memory
stays flat however long the audio is, and the mp4 (with the mix of both voices as its AAC track) only takes
its final name once it is complete.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.streaming import StreamingGenerator
from tasks.common.media import MediaError, read_audio, read_frames, writable_output, write_video, write_wav
from tasks.common.reference import (  # noqa: F401  (re-exported: generate's inputs)
    FACE_HEADROOM,
    _landmarks,
    face_centre,
    fit_reference,
    head_crop,
    read_reference,
)
from tasks.common.student import build_stream
from tasks.config import Config, ConfigError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ inputs
def read_voice(path: str | Path, sample_rate: int, seconds: float | None) -> np.ndarray:
    """One voice as float32 mono at ``sample_rate`` (the first ``seconds`` when given); MediaError when the
    file cannot be decoded or holds no audio."""
    wave = read_audio(path, sample_rate, duration=seconds)
    if wave.size == 0:
        raise MediaError(f"{path}: no audio in the file (0 samples decoded)")
    return wave


def conversation(avatar: np.ndarray, other: np.ndarray | None, samples: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(avatar, other) of equal length: the longer track's, the shorter padded with silence (``other`` is
    silence when None), then cut to ``samples`` when given."""
    other = np.zeros(0, np.float32) if other is None else other
    n = max(avatar.size, other.size) if samples is None else min(samples, max(avatar.size, other.size))
    return _fit(avatar, n), _fit(other, n)


def mix(avatar: np.ndarray, other: np.ndarray) -> np.ndarray:
    """What a viewer hears: both voices summed, scaled down only if the sum would clip."""
    both = avatar.astype(np.float32) + other.astype(np.float32)
    peak = float(np.abs(both).max()) if both.size else 0.0
    return both / peak if peak > 1.0 else both


def _fit(wave: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, np.float32)
    m = min(n, wave.size)
    out[:m] = wave[:m]
    return out


# ------------------------------------------------------------------------------------------------ streaming
def _to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] RGB uint8."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()


def stream_frames(gen: StreamingGenerator, avatar: torch.Tensor, other: torch.Tensor, frames: int,
                  bar: tqdm | None = None) -> Iterator[np.ndarray]:  # fmt: skip
    """RGB uint8 frames, one ``gen.step`` per chunk of ``gen.samples_per_chunk`` samples of both voices (each
    already padded to whole chunks), stopping after ``frames`` frames. ``gen`` must be started."""
    step = gen.samples_per_chunk
    chunks = math.ceil(avatar.numel() / step)
    left = frames
    for i in range(chunks):
        if left <= 0:
            break
        piece = slice(i * step, (i + 1) * step)
        video = _to_uint8(gen.step(avatar[piece], other[piece])[0])[:left]
        left -= len(video)
        if bar is not None:
            bar.update(1)
        yield from video


def parse_actions(spec: str | None) -> list[tuple[float, str]]:
    """``--actions "2.0:nod,5.5:smile"`` -> [(2.0, "nod"), (5.5, "smile")], sorted by time; a malformed entry,
    an unknown action or a negative time is a ConfigError naming the entry."""
    from model.interaction import ACTIONS

    out = []
    for raw in (spec or "").split(","):
        entry = raw.strip()
        if not entry:
            continue
        at, sep, name = entry.partition(":")
        try:
            t = float(at)
        except ValueError:
            t = float("nan")
        if not sep or not t >= 0:
            raise ConfigError(f"--actions: {entry!r} is not SECONDS:ACTION (e.g. 2.0:nod) with SECONDS >= 0")
        if name.strip() not in ACTIONS:
            raise ConfigError(f"--actions: {entry!r}: unknown action {name.strip()!r}; the vocabulary is "
                              f"{', '.join(ACTIONS)}")  # fmt: skip
        out.append((t, name.strip()))
    return sorted(out)


def action_plan(requests: list[tuple[float, str]], chunks: int, chunk_frames: int, fps: float
                ) -> list[tuple[int, str]]:  # fmt: skip
    """(chunk, action) requests: a request at ``t`` seconds is taken at the first chunk boundary at or after
    it (Cache-Switching swaps the prompt there); requests past the last chunk are dropped."""
    out = []
    for t, name in requests:
        chunk = math.ceil(round(t * fps / chunk_frames, 6))
        if chunk < chunks:
            out.append((chunk, name))
    return out


def stream_with_actions(gen: StreamingGenerator, avatar: torch.Tensor, other: torch.Tensor, frames: int,
                        plan: list[tuple[int, str]], action_chunks: int, log_rows: list[dict],
                        bar: tqdm | None = None) -> Iterator[np.ndarray]:  # fmt: skip
    """``stream_frames`` with State-Cycling (model/interaction.py ``StateCycler``): before each chunk the
    requests due are handed to the cycler, whose action for the chunk is switched in (``set_action``) when it
    changes; each chunk's state and action are appended to ``log_rows``."""
    from model.interaction import StateCycler

    cycler = StateCycler()
    due = {}
    for chunk, name in plan:
        due.setdefault(chunk, []).append(name)
    step = gen.samples_per_chunk
    left, i = frames, 0
    speaking = partner = False
    while left > 0 and i * step < avatar.numel():
        for name in due.get(i, []):
            cycler.request(name, action_chunks)
        state, action = cycler.step(speaking, partner)
        if action != gen.action:
            gen.set_action(action)
        piece = slice(i * step, (i + 1) * step)
        video = _to_uint8(gen.step(avatar[piece], other[piece])[0])[:left]
        speaking = bool(gen.last_mask.float().mean() > 0.5)
        partner = bool(gen.last_partner_mask.float().mean() > 0.5)
        log_rows.append({"chunk": i, "first_frame": 1 + i * gen.chunk_video_frames, "state": state, "action": action})
        left -= len(video)
        i += 1
        if bar is not None:
            bar.update(1)
        yield from video


def performed_requests(rows: list[dict], chunk_frames: int) -> list[tuple[str, int, int]]:
    """The actions the generator was conditioned on, as (name, first frame, end frame) runs of chunks: what
    the action detector scores the video against (frame 0 of the video is the first generated frame)."""
    out: list[tuple[str, int, int]] = []
    for r in rows:
        start = r["chunk"] * chunk_frames
        if r["action"] == "idle":
            continue
        if out and out[-1][0] == r["action"] and out[-1][2] == start:
            out[-1] = (r["action"], out[-1][1], start + chunk_frames)
        else:
            out.append((r["action"], start, start + chunk_frames))
    return out


def _partial(path: Path) -> Path:
    return path.with_name(path.stem + ".partial" + path.suffix)  # where write_video encodes to


# ------------------------------------------------------------------------------------------------ generate
def generate(
    cfg: Config, root: Path, reference: Path, audio: Path, out: Path, listen_to: Path | None = None,
    checkpoint: str | None = None, seconds: float | None = None, progress: bool = True, crop: str = "head",
    actions: str | None = None, action_s: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Write ``out`` (an mp4): the avatar of ``reference`` talking on ``audio`` and listening to
    ``listen_to``, at the profile's size and frame rate, with the mix of both voices as its sound.

    ``checkpoint``: a student checkpoint path, None for the last trained one (refine, else distill) or
    "random" (the seeded untrained student). ``seconds``: use only the first this many seconds of audio.
    ``actions``: requested actions "SECONDS:ACTION,..." (``parse_actions``), each run for ``action_s`` seconds
    (default: the middle of corpus.action_s) in whole chunks, switched in at chunk boundaries; the summary's
    ``action_log`` says each chunk's state and action and ``requests`` what was performed.
    Returns a summary: frames, seconds, chunks, the checkpoint, timings and the real-time factor (time spent
    generating and encoding / seconds of audio, model loading excluded; ``rtf_with_load`` includes it).
    Raises ConfigError (bad arguments, no checkpoint) or MediaError (an input that cannot be read).
    """
    t_all = time.perf_counter()
    root, reference, audio, out = Path(root), Path(reference), Path(audio), Path(out)
    if out.suffix.lower() != ".mp4":
        raise ConfigError(f"--out {out}: the output must be an .mp4 file")
    if seconds is not None and not seconds > 0:
        raise ConfigError(f"--seconds must be positive, got {seconds}")
    sr, fps = cfg.audio.sample_rate, cfg.video.fps
    width, height = cfg.video.width, cfg.video.height
    if sr % fps:
        raise ConfigError(f"audio.sample_rate {sr} is not a whole number of samples per frame at {fps} fps")
    spf = sr // fps

    # the inputs first: a bad file fails before any model is loaded
    if crop not in ("head", "face", "centre"):
        raise ConfigError(f"--crop must be 'head', 'face' or 'centre', got {crop!r}")
    ref = read_reference(reference, width, height, crop, cfg.curate.head_scale)
    voice = read_voice(audio, sr, seconds)
    heard = read_voice(listen_to, sr, seconds) if listen_to is not None else None
    requests = parse_actions(actions)
    if action_s is not None and not action_s > 0:
        raise ConfigError(f"--action-seconds must be positive, got {action_s}")
    avatar, other = conversation(voice, heard, None if seconds is None else round(seconds * sr))
    writable_output(out)  # before any model is loaded or any frame is made
    samples = avatar.size
    audio_s = samples / sr
    frames = math.ceil(samples / spf)

    gen, student = build_stream(cfg, root, checkpoint, actions=bool(requests))
    step = gen.samples_per_chunk
    chunks = math.ceil(samples / step)
    length_s = action_s if action_s is not None else sum(cfg.corpus.action_s) / 2
    action_chunks = max(1, round(length_s * fps / gen.chunk_video_frames))
    plan = action_plan(requests, chunks, gen.chunk_video_frames, fps)
    action_log: list[dict] = []
    padded = chunks * step  # the last chunk is completed with silence; its extra frames are dropped
    talk, listen = torch.from_numpy(_fit(avatar, padded)), torch.from_numpy(_fit(other, padded))
    load_s = time.perf_counter() - t_all
    log.info("generate: %s, %.2f s of audio -> %d frames in %d chunks of %d frames (%dx%d @ %d fps), student %s",
             out, audio_s, frames, chunks, gen.chunk_video_frames, width, height, fps, student["label"])  # fmt: skip

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=chunks, desc="generate", unit="chunk",
                                                    disable=not progress, leave=False) as bar:  # fmt: skip
        # the sound track: both voices, padded to whole frames so the two streams end together
        track = Path(tmp) / "mix.wav"
        write_wav(track, _fit(mix(avatar, other), frames * spf), sr)
        gen.start(ref)
        try:
            video = (stream_with_actions(gen, talk, listen, frames, plan, action_chunks, action_log, bar) if requests
                     else stream_frames(gen, talk, listen, frames, bar))  # fmt: skip
            write_video(out, video, fps, audio_path=track, audio_rate=sr)
        except BaseException:
            _partial(out).unlink(missing_ok=True)  # an interrupted run leaves nothing behind
            raise
    stream_s = time.perf_counter() - t0
    wall_s = time.perf_counter() - t_all
    return {
        "out": str(out), "frames": frames, "seconds": frames / fps, "audio_seconds": audio_s, "chunks": chunks,
        "chunk_video_frames": gen.chunk_video_frames, "fps": fps, "size": f"{width}x{height}",
        "checkpoint": student["label"], "checkpoint_path": student["path"], "trained_student": student["trained"],
        "checkpoint_step": student["step"], "reference": str(reference), "audio": str(audio),
        "listen_to": None if listen_to is None else str(listen_to), "device": str(gen.device),
        "torch_threads": torch.get_num_threads(), "load_s": load_s, "stream_s": stream_s, "wall_s": wall_s,
        "rtf": stream_s / audio_s, "rtf_with_load": wall_s / audio_s,
        "actions": [{"at_s": t, "action": a} for t, a in requests], "action_chunks": action_chunks,
        "action_log": action_log, "requests": performed_requests(action_log, gen.chunk_video_frames),
    }  # fmt: skip


def measure_actions(video: str | Path, requests: list[tuple[str, int, int]], fps: float) -> dict[str, Any]:
    """Action following of a generated video (tasks/evaluation/actions.py): the share of the performed
    requests the detector finds within 1 s, per action, the latency and false actions per idle minute."""
    from tasks.evaluation.actions import action_signals, detect_actions, score_following

    frames = read_frames(video)
    return score_following(detect_actions(action_signals(frames), fps), requests, len(frames), fps).as_dict()


def measure(cfg: Config, video: str | Path, voice: str | Path, seconds: float | None = None) -> dict[str, Any]:
    """How the written video looks by the evaluate stage's measures: the share of frames where FaceMesh finds a
    face, and the correlation of the mouth opening with the avatar voice's envelope (best lag within
    evaluate.max_lag_frames; positive lag = the mouth follows the audio)."""
    from tasks.evaluation import metrics

    e, fps, sr = cfg.evaluate, cfg.video.fps, cfg.audio.sample_rate
    frames = read_frames(video)
    kp = metrics.extract_keypoints(frames, norm_height=e.keypoint_norm_height, min_side=e.keypoint_min_side)
    wave = read_voice(voice, sr, seconds)
    env = metrics.audio_envelope(wave, sr, fps, len(frames))
    mouth = metrics.mouth_series(kp.face)
    lag = metrics.lagged_correlation(env, mouth, e.max_lag_frames)
    return {"face_rate": kp.detection_rates().get("face"), "lip_corr": lag["best_corr"], "lip_lag": lag["best_lag"],
            "lip_corr_null": metrics.lagged_correlation_null(env, mouth, e.max_lag_frames), "frames": len(frames),
            "envelope": env, "mouth": mouth}  # the series, for measures pooled over videos (bench --lip-sync)


def format_summary(s: dict[str, Any]) -> str:
    """The summary as a few lines for the terminal."""
    step = f" (step {s['checkpoint_step']})" if s.get("checkpoint_step") else ""
    where = s["device"] if s["device"] != "cpu" else f"cpu, {s['torch_threads']} threads"
    rt = "faster than real time" if s["rtf"] < 1 else "slower than real time"
    acted = ", ".join(f"{a} at frame {st}-{en}" for a, st, en in s.get("requests", [])) or "none"
    return "\n".join([
        f"generated {s['out']}",
        f"  video:      {s['frames']} frames = {s['seconds']:.2f} s at {s['size']} @ {s['fps']} fps "
        f"({s['chunks']} chunks of {s['chunk_video_frames']} frames), audio {s['audio_seconds']:.2f} s",
        f"  voices:     talks on {s['audio']}" + (f", listens to {s['listen_to']}" if s["listen_to"] else
                                                   " (no --listen-to: listens to silence)"),
        f"  reference:  {s['reference']}",
        f"  checkpoint: {s['checkpoint']}{step}",
        f"  speed:      real-time factor {s['rtf']:.3f} on this machine ({where}; {rt}): {s['stream_s']:.2f} s "
        f"generating + encoding for {s['audio_seconds']:.2f} s of audio; {s['wall_s']:.2f} s wall including "
        f"{s['load_s']:.2f} s of loading (RTF {s['rtf_with_load']:.3f})",
        *([f"  actions:    {acted} ({s['action_chunks']} chunks each, switched at chunk boundaries)"]
          if s.get("actions") else []),
    ])  # fmt: skip
