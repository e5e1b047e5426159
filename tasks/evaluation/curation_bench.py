"""Curation benchmark: throughput of the curate stage's three heavy parts on real clips, each timed alone --
decode (ffmpeg frames at the analysis size + audio), active speaker detection (face track, crops, MFCCs,
Light-ASD, smoothing and threshold: ``speaking_mask`` itself) and head pose (FaceMesh per ``pose_stride``-th
frame) -- and the three together.

Unit: seconds of video curated per wall second per core, cores being the CPUs this process may run on, so
that figures from machines of different sizes compare (``curate.workers`` processes run side by side).
Prints figures; asserts nothing. The stage's cheaper steps (quality check, normalising encode) are not timed.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm import tqdm

from tasks.common.media import probe, read_audio, read_frames
from tasks.config import Config, ConfigError, resolve_path
from tasks.curation import asd
from tasks.curation.asd import UNKNOWN, load_detector, speaking_mask
from tasks.curation.pose import clip_pose, pose_stats

DEFAULT_CLIPS_DIR = "../shared/fixtures/speakervid"
DEFAULT_CLIPS = ("head_4.mp4", "half_body_2.mp4", "side_2.mp4")  # ~10 s each: close-up, half body, side view
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
PARTS = ("decode", "asd", "pose")
ASD_STEPS = ("detect_faces", "face_crops", "mfcc_100hz", "asd_scores", "smooth")
UNIT = "video seconds curated per wall second per core"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    return {
        "cpu": cpu_model(), "cores": usable_cores(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
    }  # fmt: skip


def curation_clips(paths: list[str] | None, root: Path) -> list[Path]:
    """The clips to time: each path a video file or a directory of them (all its videos, sorted); by default
    ``DEFAULT_CLIPS`` from the shared SpeakerVid fixtures."""
    if not paths:
        folder = resolve_path(DEFAULT_CLIPS_DIR, root)
        found = [folder / name for name in DEFAULT_CLIPS if (folder / name).is_file()]
        if not found:
            raise ConfigError(f"no default clips: {folder} holds none of {', '.join(DEFAULT_CLIPS)} "
                              "(put the shared fixtures there, set $STREAMAVATAR_SHARED, or pass --clips)")  # fmt: skip
        return found
    clips: list[Path] = []
    for given in paths:
        p = resolve_path(given, root)
        if p.is_dir():
            inside = sorted(f for f in p.iterdir() if f.suffix.lower() in VIDEO_SUFFIXES and f.is_file())
            if not inside:
                raise ConfigError(f"--clips: no video files ({', '.join(VIDEO_SUFFIXES)}) in {p}")
            clips += inside
        elif p.is_file():
            clips.append(p)
        else:
            raise ConfigError(f"--clips: {p} does not exist")
    return clips


class _Meter:
    """Wall and CPU seconds of what runs inside ``part(name)``, summed per name. CPU is this process (all its
    threads: torch, mediapipe) plus its finished child processes (ffmpeg, waited for by the readers)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.child_cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), os.times()
        try:
            yield
        finally:
            t1, c1 = time.perf_counter(), os.times()
            self.wall[name] = self.wall.get(name, 0.0) + t1 - t0
            self.cpu[name] = self.cpu.get(name, 0.0) + (c1.user - c0.user) + (c1.system - c0.system)
            child = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
            self.child_cpu[name] = self.child_cpu.get(name, 0.0) + child


@contextlib.contextmanager
def _timed_steps(module, names: tuple[str, ...], into: dict[str, float]) -> Iterator[None]:
    """Time the module-level functions ``names`` while they run, by swapping in timing wrappers: the bench
    then calls ``speaking_mask`` itself (the stage's exact path, not a copy that could drift) and still sees
    where its time goes."""
    originals = {name: getattr(module, name) for name in names}

    def timed(name: str, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                into[name] = into.get(name, 0.0) + time.perf_counter() - t0

        return run

    try:
        for name, fn in originals.items():
            setattr(module, name, timed(name, fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def _rate(video_s: float, wall_s: float, cpu_s: float, child_cpu_s: float, cores: int) -> dict[str, float]:
    return {
        "wall_s": wall_s, "process_cpu_s": cpu_s, "child_cpu_s": child_cpu_s,
        "cpu_utilisation": (cpu_s + child_cpu_s) / (wall_s * cores) if wall_s > 0 else math.nan,
        "realtime_x": video_s / wall_s if wall_s > 0 else math.nan,
        "throughput": video_s / wall_s / cores if wall_s > 0 else math.nan,
    }  # fmt: skip


def _curate_parts(
    path: Path, seconds: float, cfg: Config, detector, meter: _Meter, steps: dict
) -> dict[str, Any]:
    """Decode, ASD and pose of one clip, exactly as ``curate_clip`` calls them, each timed into ``meter``."""
    c = cfg.curate
    fps, sr = cfg.video.fps, cfg.audio.sample_rate
    before = dict(meter.wall)
    # 1. decode: probe, frames at the analysis width and rate, audio; only the first `seconds` are read
    with meter.part("decode"):
        info = probe(path)
        frames = read_frames(path, width=min(c.analysis_width, info.width), fps=fps, duration=seconds)
        audio = read_audio(path, sr, duration=seconds)
    n = min(len(frames), len(audio) * fps // sr)
    frames, audio = frames[:n], audio[: n * sr // fps]
    # 2. active speaker mask
    with meter.part("asd"), _timed_steps(asd, ASD_STEPS, steps):
        result = speaking_mask(detector, frames, audio, list(c.asd_durations), sr, c.asd_calibration,
                               c.asd_threshold, c.asd_min_gap, c.asd_min_share)  # fmt: skip
    # 3. head pose
    with meter.part("pose"):
        stats = pose_stats(clip_pose(frames, c.pose_stride), c.max_yaw_deg, c.max_pitch_deg, c.max_roll_deg)
    return {
        "clip": path.name, "path": str(path), "source": f"{info.width}x{info.height}@{info.fps:g}",
        "video_seconds": n / fps, "frames": n,
        "asd_face_fraction": float((result.mask != UNKNOWN).mean()) if n else 0.0,
        "pose_face_fraction": stats.face_frames / stats.frames if stats.frames else 0.0,
        **{f"{p}_s": meter.wall[p] - before.get(p, 0.0) for p in PARTS},
    }  # fmt: skip


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_curation_bench(
    cfg: Config, root: Path, clips: list[Path] | None = None, seconds: float = 10.0, progress: bool = True,
    torch_threads: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Time decode, ASD and pose of the curate stage on each clip cut to its first ``seconds``, with torch's
    intra-op threads left as the stage leaves them unless ``torch_threads`` is given."""
    if not seconds > 0:
        raise ConfigError(f"--seconds must be positive, got {seconds}")
    if torch_threads is not None and torch_threads < 1:
        raise ConfigError(f"--torch-threads must be at least 1, got {torch_threads}")
    with _torch_threads(torch_threads):
        return _run(cfg, Path(root), clips, seconds, progress)


def _run(cfg: Config, root: Path, clips: list[Path] | None, seconds: float, progress: bool) -> dict[str, Any]:
    clips = clips if clips is not None else curation_clips(None, root)
    if not clips:
        raise ConfigError("no clips to benchmark")
    c = cfg.curate
    weights = resolve_path(c.asd_weights, root)
    if not weights.is_file():
        raise ConfigError(f"curate.asd_weights: {weights} not found")

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    detector = load_detector(c.asd, weights)
    load_s = time.perf_counter() - t0
    # one-off costs of a worker (imports, mediapipe and torch first calls, oneDNN kernels per ASD window
    # length) stay out of the timings: a stage worker pays them once, then curates clip after clip
    t0 = time.perf_counter()
    _curate_parts(clips[0], min(seconds, max(c.asd_durations)), cfg, detector, _Meter(), {})
    warmup_s = time.perf_counter() - t0

    meter = _Meter()
    steps: dict[str, float] = {}
    rows = [_curate_parts(path, seconds, cfg, detector, meter, steps)
            for path in tqdm(clips, desc="curation bench", unit="clip", disable=not progress)]  # fmt: skip

    video_s = float(sum(r["video_seconds"] for r in rows))
    report: dict[str, Any] = {
        "unit": UNIT,
        "settings": {
            "seconds": seconds,
            "analysis_width": c.analysis_width,
            "fps": cfg.video.fps,
            "sample_rate": cfg.audio.sample_rate,
            "asd": c.asd,
            "asd_weights": str(weights),
            "asd_durations": list(c.asd_durations),
            "asd_calibration": c.asd_calibration,
            "pose_stride": c.pose_stride,
        },
        "hardware": hardware(),
        "video_seconds": video_s,
        "clips": rows,
    }
    cores = report["hardware"]["cores"]
    for p in PARTS:
        report[p] = _rate(video_s, meter.wall[p], meter.cpu[p], meter.child_cpu[p], cores)
    report["total"] = _rate(video_s, sum(meter.wall.values()), sum(meter.cpu.values()),
                            sum(meter.child_cpu.values()), cores)  # fmt: skip
    report["asd"]["steps_s"] = {**{name: steps.get(name, 0.0) for name in ASD_STEPS},
                                "other": max(0.0, meter.wall["asd"] - sum(steps.values()))}  # fmt: skip
    report["asd"]["load_s"] = load_s
    report["warmup_s"] = warmup_s
    report["hardware"]["process_threads"] = psutil.Process().num_threads()  # torch's, mediapipe's, ours
    # other work on the machine skews every figure: the 1-minute load average before and after says if it ran
    report["hardware"]["load_avg_1m"] = {"before": load_before, "after": os.getloadavg()[0]}
    return report


def format_report(r: dict) -> str:
    s, h = r["settings"], r["hardware"]
    lines = [
        f"curation benchmark  {len(r['clips'])} clips, {r['video_seconds']:.1f} s of video (each <= {s['seconds']:g} s), "
        f"analysis {s['analysis_width']} px @ {s['fps']} fps, {s['asd']} x {len(s['asd_durations'])} windows, "
        f"pose stride {s['pose_stride']}",
        f"  on {h['cpu']}, {h['cores']} cores (of {h['cpu_count']}), torch {h['torch']} "
        f"({h['torch_threads']} intra-op / {h['torch_interop_threads']} inter-op threads), load average "
        f"{h['load_avg_1m']['before']:.2f} before, {h['load_avg_1m']['after']:.2f} after",
        f"  throughput = {r['unit']}",
        f"  {'part':8s} {'wall s':>8s} {'cpu s':>8s} {'ffmpeg s':>9s} {'cpu use':>8s} {'x realtime':>11s} "
        f"{'throughput':>11s}",
    ]
    for p in (*PARTS, "total"):
        x = r[p]
        lines.append(f"  {p:8s} {x['wall_s']:8.2f} {x['process_cpu_s']:8.2f} {x['child_cpu_s']:9.2f} "
                     f"{x['cpu_utilisation']:8.0%} {x['realtime_x']:11.3f} {x['throughput']:11.3f}")  # fmt: skip
    st = r["asd"]["steps_s"]
    lines.append("  asd steps: " + ", ".join(f"{k} {v:.2f} s" for k, v in st.items())
                 + f"; not counted: detector load {r['asd']['load_s']:.2f} s, warm-up {r['warmup_s']:.2f} s")  # fmt: skip
    for c in r["clips"]:
        lines.append(f"  {c['clip']:20s} {c['source']:>15s} {c['video_seconds']:5.1f} s  decode {c['decode_s']:5.2f} s  "
                     f"asd {c['asd_s']:5.2f} s  pose {c['pose_s']:5.2f} s  faces: asd {c['asd_face_fraction']:.0%}, "
                     f"pose {c['pose_face_fraction']:.0%}")  # fmt: skip
    return "\n".join(lines)
