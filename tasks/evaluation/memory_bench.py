"""`streamavatar bench --memory` (issue [10]): does the stream keep what appeared after the reference, once it
has left the rolling window?

The input is a curated corpus clip with the coloured cheek mark (``corpus.mark_prob``; tasks/evaluation/memory.py
tells a frame with the mark from one without). Its reference frame (frame 0) has no mark. The stream is shown
the real clip chunk by chunk (:meth:`StreamingGenerator.observe`, context injection) until the mark has been on
screen for one whole chunk; from then on it generates, driven by the clip's own audio, looped, for ``seconds``.
Per ``window_s`` window of the generated video: the share of frames that show the mark. The frames it saw with
the mark leave the short window after ``student.window_frames`` latent frames of generation; what the stream
shows after that can only come from a longer memory:

* ``no sink``: the rolling window alone (student.sink_frames 0);
* ``sink + window``: the product's cache (the reference sink never had the mark);
* ``LSVM``: a student trained with ``model.memory_slots`` (``--memory-checkpoint``; model/memory.py), its own
  sink + window + memory.

Every setting streams the same clips with the same seed; a setting without its student is skipped with the reason.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from model.streaming import StreamingGenerator
from tasks.common.media import MediaError, read_audio, read_frames
from tasks.common.student import build_stream, load_student
from tasks.config import Config, ConfigError, resolve_path
from tasks.evaluation.memory import mark_contrast, mark_region, mark_shown
from tasks.training.vae import _to_video

log = logging.getLogger(__name__)

NO_SINK, SINK, LSVM = "no sink", "sink + window", "LSVM"
SETTINGS = (NO_SINK, SINK, LSVM)


@dataclass
class MarkedClip:
    name: str
    frames: np.ndarray  # [T, H, W, 3] uint8, the curated clip at the demo size
    wave: np.ndarray  # [T * spf] float32, the conversation's mix
    speaking: np.ndarray  # [T] 1 where this side talks (the corpus truth)
    color: tuple[int, int, int]
    first_shown: int  # the first frame whose pixels show the mark
    split: str = "?"  # the curated manifest's split (train / val / unseen)


def marked_clips(cfg: Config, root: Path, limit: int) -> tuple[list[MarkedClip], dict[str, str]]:
    """Up to ``limit`` curated clips of the corpus whose ground truth has a mark and whose own frames show it
    after frame 0 (and not in it), held-out ones (the curated manifest's val / unseen split) first; the others
    are named with the reason."""
    gt_dir = resolve_path(cfg.corpus.out_dir, root) / "gt"
    clips_dir = resolve_path(cfg.curate.out_dir, root) / "clips"
    spf = cfg.audio.sample_rate // cfg.video.fps
    split: dict[str, str] = {}
    manifest = resolve_path(cfg.curate.manifest, root)
    if manifest.is_file():
        rows = pd.read_parquet(manifest, columns=["video_path", "split"])
        split = {Path(str(v)).stem: str(s) for v, s in zip(rows.video_path, rows.split, strict=True)}
    out, skipped = [], {}
    files = sorted(gt_dir.glob("*.json")) if gt_dir.is_dir() else []
    for gt in sorted(files, key=lambda f: split.get(f.stem) == "train"):  # held-out clips first
        truth = json.loads(gt.read_text())
        if not truth.get("mark"):
            continue
        clip = clips_dir / f"{gt.stem}.mp4"
        if not clip.is_file():
            skipped[gt.stem] = f"not curated (no {clip})"
            continue
        try:
            frames = read_frames(clip, cfg.video.width, cfg.video.height, fps=cfg.video.fps)
            wave = read_audio(clip, cfg.audio.sample_rate)
        except MediaError as exc:
            skipped[gt.stem] = str(exc)
            continue
        color = tuple(int(c) for c in truth["mark"]["color"])
        shown = mark_shown(frames, color)
        if shown[0] or not shown.any():
            skipped[gt.stem] = "the mark is in the reference frame" if shown[0] else "no frame shows the mark"
            continue
        t = len(frames)
        wave = np.pad(wave, (0, max(0, t * spf - len(wave))))[: t * spf].astype(np.float32)
        speaking = np.zeros(t, dtype=np.float32)
        said = np.asarray(truth.get("speaking", []), dtype=np.float32)[:t]
        speaking[: len(said)] = said > 0
        out.append(MarkedClip(gt.stem, frames, wave, speaking, color, int(np.argmax(shown)), split.get(gt.stem, "?")))
        if len(out) >= limit:
            break
    if not out:
        raise ConfigError(f"bench --memory: no curated clip with a visible mark in {clips_dir} (ground truth "
                          f"{gt_dir}): make the corpus with marks and curate it, e.g. `streamavatar corpus --set "
                          f"corpus.mark_prob=1` then `streamavatar curate` with the same settings"
                          + (f"; skipped: {skipped}" if skipped else ""))  # fmt: skip
    return out, skipped


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()


@torch.no_grad()
def memory_stream(gen: StreamingGenerator, clip: MarkedClip, seconds: float, fps: int, progress: bool = False,
                  desc: str = "stream") -> dict[str, Any]:  # fmt: skip
    """Observe ``clip`` until its mark has been on screen for a whole chunk, then generate ``seconds``.
    Returns the observed chunks' count, the generated frames [T, H, W, 3] uint8 and when (in generated frames)
    the last observed frame left the short window."""
    cvf, c = gen.chunk_video_frames, gen.layout.chunk_frames
    spf = len(clip.wave) // len(clip.frames)
    # video frame 0 is the reference; chunk j holds frames 1 + j * cvf .. (j + 1) * cvf
    observed = max(1, math.ceil((clip.first_shown + cvf - 1) / cvf))
    if 1 + observed * cvf > len(clip.frames):
        raise ConfigError(f"bench --memory: {clip.name}: the mark appears at frame {clip.first_shown}, too late to "
                          f"be seen for a whole chunk of {cvf} frames in its {len(clip.frames)}")  # fmt: skip
    talk, other = clip.wave * np.repeat(clip.speaking, spf), clip.wave * np.repeat(1 - clip.speaking, spf)
    gen.start(_to_video(clip.frames[:1])[:, 0])
    latents = gen.vae.encode(_to_video(clip.frames[: 1 + observed * cvf])[None].to(gen.device))
    for j in range(observed):
        piece = slice((1 + j * cvf) * spf, (1 + (j + 1) * cvf) * spf)
        x0 = gen.observe(latents[:, :, 1 + j * c : 1 + (j + 1) * c], torch.from_numpy(talk[piece]),
                         torch.from_numpy(other[piece]))  # fmt: skip
        gen.decode(x0)  # the decoder's causal cache follows the observed frames
    chunks = math.ceil(seconds * fps / cvf)
    loop = np.arange(chunks * cvf * spf) % len(clip.wave)  # the clip's audio, looped
    frames = []
    for j in tqdm(range(chunks), desc=desc, unit="chunk", disable=not progress, leave=False):
        piece = loop[j * cvf * spf : (j + 1) * cvf * spf]
        frames.append(to_uint8(gen.step(torch.from_numpy(talk[piece]), torch.from_numpy(other[piece]))[0]))
    return {"observed_chunks": observed, "frames": np.concatenate(frames), "cvf": cvf,
            "left_window_frame": (gen.layout.window_frames // c) * cvf}  # fmt: skip


def _region(clip: MarkedClip, frames: int) -> np.ndarray:
    """Where the clip's mark sits: its pixels in most of the ``frames`` real frames after it appears."""
    return mark_region(clip.frames[clip.first_shown : clip.first_shown + frames], clip.color)


def shares_by_window(shown: np.ndarray, fps: int, window_s: float) -> list[float]:
    n = max(1, int(round(window_s * fps)))
    return [float(shown[i : i + n].mean()) for i in range(0, len(shown), n)]


def run_memory_bench(cfg: Config, root: Path, seconds: float = 60.0, window_s: float = 10.0, clips: int = 2,
                     checkpoint: str | Path | None = None, memory_checkpoint: str | Path | None = None,
                     progress: bool = True, plot_path: str | Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Each setting streams every marked clip (:func:`memory_stream`); per setting and per ``window_s`` window
    of the generated video, the share of frames that show the mark, pooled over the clips, and that share
    after the frames it saw have left the short window."""
    if not seconds > 0 or not window_s > 0:
        raise ConfigError(f"bench --memory: --seconds ({seconds}) and --window-s ({window_s}) must be positive")
    t_all = time.perf_counter()
    root = Path(root)
    marked, skipped = marked_clips(cfg, root, clips)
    gen, info = build_stream(cfg, root, checkpoint)
    fps = cfg.video.fps
    base = gen.settings
    streams: dict[str, tuple[StreamingGenerator | None, str]] = {
        NO_SINK: (StreamingGenerator(gen.dit, gen.vae, gen.audio, gen._text,
                                     replace(base, layout=replace(base.layout, sink_frames=0, rapr=False))),
                  info["label"]),
        SINK: (gen, info["label"]),
    }  # fmt: skip
    if memory_checkpoint is None:
        streams[LSVM] = (None, "no --memory-checkpoint: a student trained with model.memory_slots > 0 (configs "
                               "with train.window_chunks long enough that frames are evicted)")  # fmt: skip
    else:
        path = resolve_path(memory_checkpoint, root)
        if not path.is_file():
            raise ConfigError(f"--memory-checkpoint {memory_checkpoint}: no such file")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        spec = (blob.get("spec") or {}) if isinstance(blob, dict) else {}
        slots = int(spec.get("memory_slots") or 0)
        mcfg = cfg.model_copy(deep=True)  # its own memory (slots, kind, read); everything else as the profile's
        mcfg.model = mcfg.model.model_copy(update={"memory_slots": slots, "memory_kind": spec.get("memory_kind", "global"),
                                                   "memory_read": spec.get("memory_read", "gated")})  # fmt: skip
        dit, more = load_student(mcfg, root, path, gen.audio, gen.device)
        if not dit.spec.memory_slots:
            streams[LSVM] = (None, f"{path} has no memory (model.memory_slots 0)")
        else:
            streams[LSVM] = (StreamingGenerator(dit, gen.vae, gen.audio, gen._text, base), more["label"])
    results: dict[str, Any] = {}
    for name in SETTINGS:
        g, label = streams[name]
        if g is None:
            results[name] = {"skipped": label}
            continue
        t0 = time.perf_counter()
        shown, graded, per_clip, left = [], [], {}, 0
        for clip in marked:
            s = memory_stream(g, clip, seconds, fps, progress, desc=f"{name}: {clip.name}")
            mark = mark_shown(s["frames"], clip.color)
            contrast = mark_contrast(s["frames"], clip.frames[0], _region(clip, s["cvf"]), clip.color)
            shown.append(mark)
            graded.append(contrast)
            left = s["left_window_frame"]
            per_clip[clip.name] = {"observed_chunks": s["observed_chunks"], "first_shown_frame": clip.first_shown,
                                   "share_after_left_window": float(mark[left:].mean()) if len(mark) > left else None,
                                   "share_by_window": shares_by_window(mark, fps, window_s),
                                   "contrast_after_left_window": float(contrast[left:].mean()) if len(mark) > left else None,
                                   "contrast_by_window": shares_by_window(contrast, fps, window_s)}  # fmt: skip
        both, cont = np.stack(shown), np.stack(graded)  # [clips, frames]
        results[name] = {"student": label, "left_window_s": left / fps,
                         "share_while_in_window": float(both[:, :left].mean()) if left else None,
                         "share_by_window": shares_by_window(both.mean(0), fps, window_s),
                         "share_after_left_window": float(both[:, left:].mean()) if both.shape[1] > left else None,
                         "contrast_while_in_window": float(cont[:, :left].mean()) if left else None,
                         "contrast_by_window": shares_by_window(cont.mean(0), fps, window_s),
                         "contrast_after_left_window": float(cont[:, left:].mean()) if cont.shape[1] > left else None,
                         "clips": per_clip, "seconds": time.perf_counter() - t0}  # fmt: skip
    real = [float(mark_shown(c.frames[c.first_shown :], c.color).mean()) for c in marked]
    real_contrast = [float(mark_contrast(c.frames[c.first_shown :], c.frames[0], _region(c, gen.chunk_video_frames),
                                         c.color).mean()) for c in marked]  # fmt: skip
    report = {"seconds_generated": math.ceil(seconds * fps / gen.chunk_video_frames) * gen.chunk_video_frames / fps,
              "window_s": window_s, "clips": {c.name: c.split for c in marked}, "skipped_clips": skipped,
              "real_share_after_mark": float(np.mean(real)), "real_contrast_after_mark": float(np.mean(real_contrast)),
              "settings": results,
              "wall_seconds": time.perf_counter() - t_all}  # fmt: skip
    if plot_path is not None:
        report["plot"] = str(plot_memory(report, Path(plot_path)))
    return report


def plot_memory(report: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graded = "real_contrast_after_mark" in report
    fig, axes = plt.subplots(1, 2 if graded else 1, figsize=(12 if graded else 7, 3.5), squeeze=False)
    w = report["window_s"]
    panels = [("share_by_window", "real_share_after_mark", "frames showing the mark", (-0.02, 1.02))]
    if graded:
        panels.append(("contrast_by_window", "real_contrast_after_mark",
                       "mark contrast (1 the mark, 0 the reference)", None))  # fmt: skip
    for ax, (key, real, label, ylim) in zip(axes[0], panels, strict=True):
        for name, r in report["settings"].items():
            if "skipped" in r or key not in r:
                continue
            x = [w * (i + 0.5) for i in range(len(r[key]))]
            ax.plot(x, r[key], marker="o", label=name)
        ax.axhline(report[real], color="grey", ls="--", label="the real clip after the mark")
        ax.set_xlabel("seconds generated after the observed clip")
        ax.set_ylabel(label)
        if ylim:
            ax.set_ylim(*ylim)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def format_report(r: dict) -> str:
    splits = ", ".join(sorted(set(r["clips"].values())))
    lines = [f"memory bench: {len(r['clips'])} marked clip(s) ({splits}), {r['seconds_generated']:.0f} s generated per clip "
             f"after the mark was seen; the real clips show it in {100 * r['real_share_after_mark']:.0f} % of their "
             "frames after it appears"]  # fmt: skip
    for name, s in r["settings"].items():
        if "skipped" in s:
            lines.append(f"  {name:14s} skipped: {s['skipped']}")
            continue
        after = s["share_after_left_window"]
        windows = " ".join(f"{100 * v:3.0f}" for v in s["share_by_window"])
        inside = s.get("share_while_in_window")
        lines.append(f"  {name:14s} while the seen frames are in the window "
                     f"{'n/a' if inside is None else f'{100 * inside:.0f} %'}; after they left ({s['left_window_s']:.2f} s): "
                     f"{'n/a' if after is None else f'{100 * after:.1f} %'} of frames show the mark; "
                     f"per {r['window_s']:g} s: {windows} %")  # fmt: skip
        if s.get("contrast_by_window") is not None:
            ci, ca = s.get("contrast_while_in_window"), s.get("contrast_after_left_window")
            lines.append(f"  {'':14s} mark contrast (real clips {r.get('real_contrast_after_mark', float('nan')):.2f}): "
                         f"in the window {'n/a' if ci is None else f'{ci:.3f}'}, after {'n/a' if ca is None else f'{ca:.3f}'}; "
                         f"per {r['window_s']:g} s: " + " ".join(f"{v:.3f}" for v in s["contrast_by_window"]))  # fmt: skip
    if r.get("plot"):
        lines.append(f"  plot: {r['plot']}")
    return "\n".join(lines)
