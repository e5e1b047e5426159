"""`streamavatar bench --lip-sync`: does the product's mouth follow a voice? Issue [7]'s `generate` target (a
portrait and speech never seen in training: mouth opening against the voice's envelope, r >= 0.2) measured so
that chance cannot pass it.

One `generate --measure` is one video of 10-16 s: its best-of-7-lags r moves by +-0.3 from seed to seed (on
the same portrait and voice, measured: -0.18 to 0.43 over three seeds of one 5 s clip), so a single video says
little either way. Here every portrait is streamed on its voice with several seeds (``project.seed``: the
noise), and the videos are measured as `evaluate` measures its windows: FaceMesh's mouth opening against the
voice's envelope, each video standardised on its own, every video's pairs pooled at one lag for all (the best
within ``evaluate.max_lag_frames``; positive = the mouth follows the voice), with the same pooled with each
voice reversed beside it (the chance level). Videos under ``data/reports/lip_sync_bench/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config import Config, ConfigError
from tasks.evaluation import metrics
from tasks.evaluation.action_bench import avatar_pairs
from tasks.inference.generate import generate, measure


def _pooled(series: list[tuple[Any, Any]], max_lag: int) -> dict[str, Any]:
    real = metrics.pooled_lagged_correlation(series, max_lag)
    chance = metrics.pooled_lagged_correlation(series, max_lag, reverse_audio=True)
    return {"r": real["best_corr"], "lag": real["best_lag"], "chance": chance["best_corr"], "frames": real["frames"],
            "r_by_lag": {str(k): v for k, v in real["corr_by_lag"].items()}}  # fmt: skip


def run_lip_sync_bench(cfg: Config, root: Path, pairs: list[tuple[Path, Path]] | None = None, seeds: int = 3,
                       checkpoint: str | None = None, seconds: float | None = None, progress: bool = True
                       ) -> dict[str, Any]:  # fmt: skip
    """Stream each (portrait, voice) of ``pairs`` with ``seeds`` noise seeds and measure the videos, pooled."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    root = Path(root)
    pairs = pairs or avatar_pairs(root)
    e, fps = cfg.evaluate, cfg.video.fps
    out_dir = root / cfg.project.data_dir / "reports" / "lip_sync_bench"
    videos, by_portrait, every, summary = [], {}, [], None
    for image, voice in pairs:
        series = []
        for seed in range(seeds):
            run_cfg = cfg.model_copy(deep=True)
            run_cfg.project.seed = cfg.project.seed + seed
            out = out_dir / f"{image.stem}_{voice.stem}_seed{run_cfg.project.seed}.mp4"
            summary = generate(run_cfg, root, image, voice, out, checkpoint=checkpoint, seconds=seconds,
                               progress=progress)  # fmt: skip
            m = measure(cfg, out, voice, seconds)  # what `generate --measure` reports for this one video
            videos.append({"video": str(out), "reference": str(image), "voice": str(voice), "seed": run_cfg.project.seed,
                           "frames": m["frames"], "face_rate": m["face_rate"], "r_best": m["lip_corr"],
                           "lag_best": m["lip_lag"]})  # fmt: skip
            series.append((m["envelope"], m["mouth"]))
        by_portrait[image.stem] = {"voice": str(voice), **_pooled(series, e.max_lag_frames)}
        every += series
    faces = [v["face_rate"] for v in videos if v["face_rate"] is not None]
    return {"checkpoint": summary["checkpoint"] if summary else None, "seeds": seeds, "max_lag": e.max_lag_frames,
            "seconds": sum(v["frames"] for v in videos) / fps, "videos": videos, "by_portrait": by_portrait,
            "pooled": _pooled(every, e.max_lag_frames), "face_rate": sum(faces) / len(faces) if faces else None,
            "target_r": 0.2}  # fmt: skip


def format_report(r: dict[str, Any]) -> str:
    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    p = r["pooled"]
    reached = p["r"] is not None and p["r"] >= r["target_r"] and (p["chance"] or 0) < p["r"]
    face = "n/a" if r["face_rate"] is None else f"{100 * r['face_rate']:.0f}%"
    lines = [f"lip sync of generated videos: {len(r['videos'])} videos ({r['seeds']} seeds per portrait), "
             f"{r['seconds']:.1f} s in all, student {r['checkpoint']}",
             f"  pooled: r {num(p['r'])} at lag {p['lag']} (chance, the voices reversed: {num(p['chance'])}); "
             f"target r >= {r['target_r']:g}: {'reached' if reached else 'not reached'}; face found in {face} of frames",
             "  portrait              pooled r (lag)   chance   one video's best r (per seed)"]  # fmt: skip
    for name, v in r["by_portrait"].items():
        singles = " ".join(num(x["r_best"]) for x in r["videos"] if Path(x["reference"]).stem == name)
        lines.append(f"  {name:<21} {num(v['r']):>8} ({v['lag']})   {num(v['chance']):>6}   {singles}")
    return "\n".join(lines)
