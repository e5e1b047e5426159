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

from tasks.common.media import probe, read_audio
from tasks.config import Config, ConfigError, resolve_path
from tasks.curation import asd
from tasks.curation.asd import UNKNOWN, load_detector, speaking_mask
from tasks.curation.clip import analysis_frames, calibration_for, detector_scale
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
    """Decode, pose and ASD of one clip, exactly as ``curate_clip`` calls them, each timed into ``meter``."""
    c = cfg.curate
    fps, sr = cfg.video.fps, cfg.audio.sample_rate
    before = dict(meter.wall)
    # 1. decode: probe, frames at the analysis width and rate, audio; only the first `seconds` are read
    with meter.part("decode"):
        info = probe(path)
        frames = analysis_frames(path, info, c.analysis_width, fps, seconds)
        audio = read_audio(path, sr, duration=seconds)
    n = min(len(frames), len(audio) * fps // sr)
    frames, audio = frames[:n], audio[: n * sr // fps]
    # 2. head pose (before ASD, as in the stage: ASD may re-read a small face's clip into the frame buffer)
    with meter.part("pose"):
        stats = pose_stats(clip_pose(frames, c.pose_stride), c.max_yaw_deg, c.max_pitch_deg, c.max_roll_deg)
    # 3. active speaker mask: the face track, the detector's scale, the mask
    with meter.part("asd"), _timed_steps(asd, ASD_STEPS, steps):
        track = asd.detect_faces(frames, stride=c.face_stride)
        frames, track = detector_scale(path, info, frames, track, fps, seconds)
        result = speaking_mask(detector, frames, audio, list(c.asd_durations), sr,
                               calibration_for(c.asd_calibration, "local"),
                               c.asd_threshold, c.asd_min_gap, c.asd_min_share, track=track)  # fmt: skip
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
    torch_threads: int | None = None, workers: int = 1,
) -> dict[str, Any]:  # fmt: skip
    """Time decode, ASD and pose of the curate stage on each clip cut to its first ``seconds``, with torch's
    intra-op threads left as the stage leaves them unless ``torch_threads`` is given.

    ``workers`` > 1: that many processes side by side, as the stage runs them (``curate.workers``), each with
    ``torch_threads`` or cores / workers torch threads, each curating every clip after a shared start; the
    total is all the workers' video over the wall time until the last one finished, per core, and each part's
    figure is its mean wall time across the workers."""
    if not seconds > 0:
        raise ConfigError(f"--seconds must be positive, got {seconds}")
    if torch_threads is not None and torch_threads < 1:
        raise ConfigError(f"--torch-threads must be at least 1, got {torch_threads}")
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    clips = clips if clips is not None else curation_clips(None, Path(root))
    if not clips:
        raise ConfigError("no clips to benchmark")
    weights = resolve_path(cfg.curate.asd_weights, Path(root))
    if not weights.is_file():
        raise ConfigError(f"curate.asd_weights: {weights} not found")
    load_before = os.getloadavg()[0]
    if workers == 1:
        with _torch_threads(torch_threads):
            runs = [_worker_run(cfg, clips, seconds, weights, progress)]
            hw = hardware()
    else:
        runs = _run_workers(cfg, clips, seconds, weights, workers, torch_threads or max(1, usable_cores() // workers))
        hw = hardware()
        hw["torch_threads"] = runs[0]["torch_threads"]
    return _report(cfg, runs, weights, hw, load_before, seconds)


def _worker_run(cfg: Config, clips: list[Path], seconds: float, weights: Path, progress: bool = False,
                start=None) -> dict[str, Any]:  # fmt: skip
    """One worker's timings: load the detector, warm up, (wait at ``start``, a barrier), curate every clip."""
    c = cfg.curate
    t0 = time.perf_counter()
    detector = load_detector(c.asd, weights, c.asd_device)
    load_s = time.perf_counter() - t0
    # one-off costs of a worker (imports, mediapipe and torch first calls, oneDNN kernels per ASD window
    # length, the frame buffer grown to the largest clip) stay out of the timings: a stage worker pays them
    # once, then curates clip after clip
    t0 = time.perf_counter()
    _curate_parts(clips[0], min(seconds, max(c.asd_durations)), cfg, detector, _Meter(), {})
    for path in clips:
        analysis_frames(path, probe(path), c.analysis_width, cfg.video.fps, seconds)
    warmup_s = time.perf_counter() - t0
    if start is not None:
        start.wait()
    meter = _Meter()
    steps: dict[str, float] = {}
    t0 = time.perf_counter()
    rows = [_curate_parts(path, seconds, cfg, detector, meter, steps)
            for path in tqdm(clips, desc="curation bench", unit="clip", disable=not progress)]  # fmt: skip
    return {"wall": meter.wall, "cpu": meter.cpu, "child_cpu": meter.child_cpu, "steps": steps, "rows": rows,
            "elapsed_s": time.perf_counter() - t0, "load_s": load_s, "warmup_s": warmup_s,
            "torch_threads": torch.get_num_threads(), "process_threads": psutil.Process().num_threads()}  # fmt: skip


def _worker_main(cfg: Config, clips: list[Path], seconds: float, weights: Path, threads: int, start,
                 results) -> None:  # fmt: skip
    torch.set_num_threads(threads)
    try:
        results.put(_worker_run(cfg, clips, seconds, weights, start=start))
    except BaseException as exc:  # noqa: BLE001 -- reported by the parent, which would otherwise wait forever
        start.abort()
        results.put({"error": f"{type(exc).__name__}: {exc}"})


def _run_workers(cfg: Config, clips: list[Path], seconds: float, weights: Path, workers: int,
                 threads: int) -> list[dict[str, Any]]:  # fmt: skip
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # as the stage's pool: mediapipe and fork do not mix
    start, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(cfg, clips, seconds, weights, threads, start, results),
                         daemon=True) for _ in range(workers)]  # fmt: skip
    for proc in procs:
        proc.start()
    try:
        runs = [results.get() for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        raise RuntimeError(f"curation bench worker failed: {errors[0]}")
    return runs


def _report(cfg: Config, runs: list[dict[str, Any]], weights: Path, hw: dict[str, Any], load_before: float,
            seconds: float) -> dict[str, Any]:  # fmt: skip
    c, n = cfg.curate, len(runs)
    rows = [{**row, "worker": i} if n > 1 else row for i, run in enumerate(runs) for row in run["rows"]]
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
            "face_stride": c.face_stride,
            "workers": n,
        },
        "hardware": hw,
        "video_seconds": video_s,
        "clips": rows,
    }
    cores = hw["cores"]
    mean = lambda key, p: sum(run[key][p] for run in runs) / n  # noqa: E731
    for p in PARTS:  # each part: its mean wall time per worker (workers run side by side)
        report[p] = _rate(video_s, mean("wall", p), mean("cpu", p), mean("child_cpu", p), cores)
    total_wall = sum(runs[0]["wall"].values()) if n == 1 else max(run["elapsed_s"] for run in runs)
    report["total"] = _rate(video_s, total_wall, sum(sum(run["cpu"].values()) for run in runs),
                            sum(sum(run["child_cpu"].values()) for run in runs), cores)  # fmt: skip
    steps = {name: sum(run["steps"].get(name, 0.0) for run in runs) / n for name in ASD_STEPS}
    report["asd"]["steps_s"] = {**steps, "other": max(0.0, report["asd"]["wall_s"] - sum(steps.values()))}
    report["asd"]["load_s"] = max(run["load_s"] for run in runs)
    report["warmup_s"] = max(run["warmup_s"] for run in runs)
    report["hardware"]["process_threads"] = runs[0]["process_threads"]  # torch's, mediapipe's, ours
    # other work on the machine skews every figure: the 1-minute load average before and after says if it ran
    report["hardware"]["load_avg_1m"] = {"before": load_before, "after": os.getloadavg()[0]}
    return report


def format_report(r: dict) -> str:
    s, h = r["settings"], r["hardware"]
    lines = [
        f"curation benchmark  {len(r['clips'])} clips, {r['video_seconds']:.1f} s of video (each <= {s['seconds']:g} s), "
        f"analysis {s['analysis_width']} px @ {s['fps']} fps, {s['asd']} x {len(s['asd_durations'])} windows, "
        f"pose stride {s['pose_stride']}, face detection stride {s['face_stride']}, {s['workers']} worker process"
        f"{'es' if s['workers'] > 1 else ''}",
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
        who = f"w{c['worker']} " if "worker" in c else ""
        lines.append(f"  {who}{c['clip']:20s} {c['source']:>15s} {c['video_seconds']:5.1f} s  decode {c['decode_s']:5.2f} s  "
                     f"asd {c['asd_s']:5.2f} s  pose {c['pose_s']:5.2f} s  faces: asd {c['asd_face_fraction']:.0%}, "
                     f"pose {c['pose_face_fraction']:.0%}")  # fmt: skip
    return "\n".join(lines)
