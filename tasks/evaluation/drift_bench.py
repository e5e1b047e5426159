"""Identity-drift benchmark: the same student streamed for a long time under three cache layouts.

The paper's Table 1 ablation adds the Reference Sink and then RAPR to a Self-Forcing-style rolling KV cache
and reports that identity holds over long streams. This bench isolates that claim on whatever student the
project has trained: ONE set of weights, ONE seed, ONE reference image and audio track, and three
``CausalLayout`` s that differ only where the paper's ablation differs:

* ``baseline rolling cache``: no sink, absolute RoPE. The reference frame is an ordinary cached frame and is
  evicted once the rolling window has moved past it (Self-Forcing);
* ``+ reference sink``: the reference and the first chunk are never evicted, still absolute RoPE, so the
  distance between a new chunk and the reference (and every RoPE index) grows without bound;
* ``+ sink + RAPR``: the sink plus Reference-Anchored Positional Re-encoding, which caps every index at D.

Drift is measured in a FIXED feature space (the frozen VAE encoder, each frame encoded alone as a reference
frame is, so no causal state leaks between frames) and in pixels, per time window, against the reference.
A trained model should keep the distance flat; a drifting one shows it growing. The demo's VAE is random,
so its latents are a fixed random projection, not a semantic embedding: the figures show whether the
layouts change how far the stream wanders from the reference, not the paper's quality.
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
from tasks.evaluation.model_bench import hardware

log = logging.getLogger(__name__)

BASELINE, SINK, SINK_RAPR = "baseline rolling cache", "+ reference sink", "+ sink + RAPR"
SETTINGS = (BASELINE, SINK, SINK_RAPR)
METRICS = ("latent_cosine", "latent_rel_l2", "pixel_mad")
FIXTURES = "../shared/fixtures/avatars"
ENCODE_BATCH = 64  # frames per VAE-encoder call for the features: bounded memory, few calls


# ------------------------------------------------------------------------------------------------ layouts
def drift_layouts(cfg: Config) -> dict[str, CausalLayout]:
    """The three ablation layouts, all derived from the profile's so that chunk size and window agree."""
    s = cfg.student
    if s.sink_frames < 1:
        raise ConfigError("student.sink_frames is 0: the '+ reference sink' settings would equal the "
                          "baseline; set it to 1 or 1 + k * chunk_frames")  # fmt: skip
    base = build_layout(cfg)
    return {
        BASELINE: replace(base, sink_frames=0, rapr=False),
        SINK: replace(base, sink_frames=s.sink_frames, rapr=False),
        SINK_RAPR: replace(base, sink_frames=s.sink_frames, rapr=True, max_distance=s.rapr_max_distance),
    }


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


# ------------------------------------------------------------------------------------------------ the bench
def run_drift_bench(
    cfg: Config, root: Path, frames: int = 1000, checkpoint: str | Path | None = None, window_s: float = 2.0,
    progress: bool = True, streams_out: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Stream ``frames`` frames under each of the three layouts and measure drift per ``window_s`` window.

    ``checkpoint``: a student checkpoint path, None for the last trained one, or "random". ``streams_out``:
    when a dict is given, each setting's frames [T, 3, H, W] are stored in it (to compare the streams).
    """
    if frames < 1:
        raise ConfigError(f"--frames must be at least 1, got {frames}")
    if not window_s > 0:
        raise ConfigError(f"--window-s must be positive, got {window_s}")
    t_all = time.perf_counter()
    root = Path(root)
    # the product's generator; each layout below streams the same student, VAE, audio and prompt
    probe, student = build_stream(cfg, root, checkpoint)
    dit, vae, audio, text, base_settings = probe.dit, probe.vae, probe.audio, probe._text, probe.settings
    layouts = drift_layouts(cfg)
    fps = cfg.video.fps
    cvf, spc = probe.chunk_video_frames, probe.samples_per_chunk
    chunks = math.ceil(frames / cvf)
    inputs = drift_inputs(cfg, root, chunks * spc)
    edges = window_edges(frames, fps, window_s)
    # the scale of "far": a flat mid-grey frame knows nothing about the reference
    grey = frame_distances(vae, torch.zeros_like(inputs.reference)[None], inputs.reference)
    anchor = {m: float(v[0]) for m, v in grey.items()}
    centres = [(a + b) / 2 for a, b in edges]

    results: dict[str, dict[str, Any]] = {}
    baseline: torch.Tensor | None = None
    for name, layout in layouts.items():
        gen = StreamingGenerator(dit, vae, audio, text, replace(base_settings, layout=layout))
        t0 = time.perf_counter()
        video = stream(gen, inputs, frames, progress, desc=name)
        stream_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        per_frame = frame_distances(vae, video, inputs.reference)
        features_s = time.perf_counter() - t0
        row: dict[str, Any] = {
            "layout": layout_facts(layout, chunks, cvf / fps),
            "stream_s": stream_s, "features_s": features_s, "seconds": stream_s + features_s,
            "metrics": {m: summarise(windowed(per_frame[m], fps, window_s), centres) for m in METRICS},
        }  # fmt: skip
        if baseline is None:
            baseline = video
        else:
            first, biggest = _first_difference(baseline, video, cvf)
            row["first_chunk_differing_from_baseline"] = first
            row["max_abs_pixel_diff_vs_baseline"] = biggest
        if streams_out is not None:
            streams_out[name] = video
        results[name] = row

    report = {
        "benchmark": "drift",
        "frames": frames, "seconds_of_video": frames / fps, "fps": fps, "chunks": chunks,
        "chunk_video_frames": cvf, "window_s": window_s, "windows": len(edges), "window_edges_s": edges,
        "checkpoint": student["label"], "checkpoint_path": student["path"],
        "checkpoint_step": student["step"], "trained_student": student["trained"],
        "reference_source": inputs.reference_source, "audio_source": inputs.audio_source,
        "feature_space": "frozen VAE encoder latent of each frame encoded alone (vae.encode_reference), "
                         "flattened; " + ("pretrained VAE" if cfg.vae.pretrained_path
                                          else "RANDOMLY INITIALISED demo VAE"),
        "metrics": {"latent_cosine": "1 - cos(latent(frame), latent(reference))",
                    "latent_rel_l2": "||latent(frame) - latent(reference)|| / ||latent(reference)||",
                    "pixel_mad": "mean |frame - reference| with pixels in [0, 1]"},
        "profile": {"video": f"{cfg.video.width}x{cfg.video.height}@{fps}", "backbone": cfg.model.backbone,
                    "dit_params_m": round(sum(p.numel() for p in dit.parameters()) / 1e6, 3),
                    "vae_params_m": round(sum(p.numel() for p in vae.parameters()) / 1e6, 3),
                    "vae_weights": "pretrained" if cfg.vae.pretrained_path else "random",
                    "dtype": cfg.project.dtype, "steps": base_settings.steps,
                    "context": base_settings.context, "seed": base_settings.seed},
        "flat_grey_frame": anchor,
        "hardware": hardware(probe.device),
        "settings": results,
        "wall_s": time.perf_counter() - t_all,
    }  # fmt: skip
    report["interpretation"] = interpret(report, cfg)
    return report


SAME_PCT = 1.0  # settings whose last-window distances are within this many percent are called the same
FLAT_PCT = 5.0  # a last/first ratio within this many percent of 1 is called no drift


def interpret(report: dict, cfg: Config) -> str:
    """A few sentences read off the numbers: who drifts least at the end and by how much relative to the
    baseline, whether anything drifts at all, and what to discount (an untrained or demo-sized model)."""
    s = report["settings"]
    end = edges_label(report["window_edges_s"][-1])

    def stat(name: str, metric: str, key: str) -> float:
        return s[name]["metrics"][metric][key]

    parts, same = [], []
    for metric, what in (("latent_cosine", "latent cosine distance"), ("pixel_mad", "pixel distance")):
        base = stat(BASELINE, metric, "last")
        best = min(SETTINGS, key=lambda n: stat(n, metric, "last"))
        pcts = {n: _rel(stat(n, metric, "last"), base) for n in SETTINGS[1:]}
        detail = ", ".join(f"'{n}' {stat(n, metric, 'last'):.4g} ({_pct(pcts[n])})" for n in SETTINGS[1:])
        same.append(all(p is not None and abs(p) < SAME_PCT for p in pcts.values()))
        if same[-1]:
            verdict = f"the three settings end within {SAME_PCT:g}% of each other (no measurable difference)"
        else:
            verdict = f"'{best}' ends closest to the reference"
        parts.append(f"{what.capitalize()} in the last window ({end}): {verdict}; baseline {base:.4g}, "
                     f"{detail}.")
    ratios = {n: stat(n, "latent_cosine", "last_over_first") for n in SETTINGS}
    if all(r is not None and abs(r - 1) < FLAT_PCT / 100 for r in ratios.values()):
        parts.append(f"No setting drifts over {report['seconds_of_video']:g} s: latent cosine last/first is "
                     + ", ".join(f"{r:.3f}" for r in ratios.values()) + ".")  # fmt: skip
    else:
        trend = {n: stat(n, "latent_cosine", "slope_per_min") for n in SETTINGS}
        ratio_txt = ", ".join(f"'{n}' {_fmt(r, '.3f')}" for n, r in ratios.items())
        trend_txt = ", ".join(f"'{n}' {_fmt(v, '+.3g')}" for n, v in trend.items())
        parts.append(f"Latent cosine last/first: {ratio_txt}; trend per minute: {trend_txt}.")
    first_diff = s[SINK].get("first_chunk_differing_from_baseline")
    if first_diff is not None:
        biggest = s[SINK]["max_abs_pixel_diff_vs_baseline"]
        parts.append(f"The layouts do change the frames (the sink streams part from the baseline at chunk "
                     f"{first_diff}, max |pixel difference| {biggest:.3g} in [-1, 1])"
                     + (", so the equal drift means the student leans little on its cached context."
                        if all(same) else "."))  # fmt: skip
    if s[BASELINE]["layout"]["reference_evicted_from_s"] is None:
        parts.append("The stream is too short for the rolling window to evict the reference, so the baseline "
                     "and the sink settings cannot differ yet.")  # fmt: skip
    if s[SINK_RAPR]["layout"]["rapr_reencoding_from_s"] is None:
        parts.append("The stream is too short for RAPR to re-encode any position, so the two sink settings "
                     "cannot differ yet.")  # fmt: skip
    start_px, grey_px = stat(BASELINE, "pixel_mad", "first"), report["flat_grey_frame"]["pixel_mad"]
    start_cos, grey_cos = stat(BASELINE, "latent_cosine", "first"), report["flat_grey_frame"]["latent_cosine"]
    scale = (f"In the first window the distance to the reference is already {start_px:.3f} in pixels and "
             f"{start_cos:.4f} in latent cosine, against {grey_px:.3f} and {grey_cos:.4f} for a flat grey "
             "frame")  # fmt: skip
    if start_px >= 0.8 * grey_px:
        parts.append(f"{scale}: the student does not reproduce the reference to begin with, so there is "
                     "little identity to lose and these figures cannot show the paper's effect.")  # fmt: skip
    else:
        parts.append(f"{scale}.")
    if not report["trained_student"]:
        parts.append("The student is RANDOMLY INITIALISED (--checkpoint random): these numbers only show "
                     "that the layouts change the stream, nothing about a trained model's drift.")
    else:
        step = f" (checkpoint step {report['checkpoint_step']})" if report.get("checkpoint_step") else ""
        why = []
        if cfg.model.backbone.startswith("tiny"):
            why.append(f"the demo student{step} is tiny and trained for minutes on a self-made corpus")
        if not cfg.vae.pretrained_path:
            why.append("the VAE is randomly initialised, so the feature space is a fixed random projection")
        if why:
            parts.append(f"Caveat: {' and '.join(why)}: this shows the mechanisms' effect on a tiny model, "
                         "not the paper's quality.")
    return " ".join(parts)


def _rel(x: float, base: float) -> float | None:
    return 100 * (x - base) / base if base > 0 else None


def _pct(p: float | None) -> str:
    return "n/a vs baseline" if p is None else f"{p:+.2f}% vs baseline"


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else f"{x:{spec}}"


def edges_label(edge: tuple[float, float] | list[float]) -> str:
    return f"t={edge[0]:g}-{edge[1]:g}s"


def format_report(r: dict) -> str:
    s, hw, prof = r["settings"], r["hardware"], r["profile"]
    step = f" (step {r['checkpoint_step']})" if r["checkpoint_step"] else ""
    head = (f"  {'setting':24s} {'first':>8s} {'last':>8s} {'slope/min':>9s} {'last/1st':>8s} {'first':>7s} "
            f"{'last':>7s} {'first':>8s} {'last':>8s} {'slope/min':>9s} {'time s':>7s}")  # fmt: skip
    lines = [
        f"drift benchmark  {r['frames']} frames ({r['seconds_of_video']:.1f} s) per setting, "
        f"{r['window_s']:g} s windows, {prof['video']} {prof['backbone']} on {hw.get('gpu', hw['cpu'])} "
        f"({hw['cpu_threads']} threads)",
        f"  student:   {r['checkpoint']}{step}",
        f"  reference: {r['reference_source']}",
        f"  audio:     {r['audio_source']}",
        f"  features:  {r['feature_space']}",
        "",
        f"  {'':24s} {'latent cosine dist (1-cos)':^35s} {'latent rel L2':^15s} "
        f"{'pixel |x-ref| in [0,1]':^27s}",
        head,
    ]
    for name in SETTINGS:
        m = s[name]["metrics"]
        c, l2, p = m["latent_cosine"], m["latent_rel_l2"], m["pixel_mad"]
        lines.append(
            f"  {name:24s} {c['first']:8.4f} {c['last']:8.4f} {_num(c['slope_per_min'], '+9.4f', 9)} "
            f"{_num(c['last_over_first'], '8.3f', 8)} {l2['first']:7.3f} {l2['last']:7.3f} {p['first']:8.4f} "
            f"{p['last']:8.4f} {_num(p['slope_per_min'], '+9.4f', 9)} {s[name]['seconds']:7.1f}"
        )
    edges = r["window_edges_s"]
    picks = sorted({0, len(edges) // 4, len(edges) // 2, (3 * len(edges)) // 4, len(edges) - 1})
    labels = " ".join(f"{edges_label(edges[k]):>11s}" for k in picks)
    lines += ["", f"  {'latent cosine per window':24s} {labels}"]
    for name in SETTINGS:
        series = s[name]["metrics"]["latent_cosine"]["series"]
        lines.append(f"  {name:24s} " + " ".join(f"{series[k]:11.4f}" for k in picks))
    lines += ["", "  when the layouts act (times are chunk starts in the generated video):"]
    for name in SETTINGS:
        f = s[name]["layout"]
        differs = s[name].get("first_chunk_differing_from_baseline")
        lines.append(
            f"  {name:24s} sink {f['sink_frames']}, window {f['window_frames']}, rapr {f['rapr']}: reference "
            f"evicted {_seen(f['reference_evicted_from_s'])}, RAPR re-encoding "
            f"{_seen(f['rapr_reencoding_from_s'])}, "
            f"max RoPE time index {f['last_chunk_max_rope_time_index']}"
            + ("" if name == BASELINE else f", frames differ from baseline from chunk {differs or 'never'}")
        )
    lines += ["", textwrap.fill(r["interpretation"], 108, initial_indent="  ", subsequent_indent="  "),
              f"  wall time {r['wall_s']:.1f} s"]  # fmt: skip
    return "\n".join(lines)


def _num(x: float | None, spec: str, width: int) -> str:
    return f"{'n/a':>{width}s}" if x is None else f"{x:{spec}}"


def _seen(seconds: float | None) -> str:
    return "never" if seconds is None else f"from {seconds:g} s"
