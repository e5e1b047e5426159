"""Stage `curate`: from raw clips to the curated manifest the training stages read.

For every clip of the source (``curate.source``): probe, length check, per-frame speaking/listening mask by
active speaker detection, head-pose filter, quality filters, normalisation to the profile's size and rate
(tasks/curation/clip.py). Then listen-ratio categories, balancing and a train/val split by conversation.

Outputs: ``curate.out_dir``/clips/*.mp4 and masks/*.npy, the manifest ``curate.manifest`` (one row per
clip, columns in MANIFEST_COLUMNS, documented in the README), and a report under ``curate.report_dir``.
Resumable: each finished clip's row is written at once to ``curate.out_dir``/rows/<clip_id>.json, so a run
killed halfway keeps what it finished; a clip whose previous row (journal or manifest) has the same
fingerprint (its file, the settings that shape it, the code version) and whose outputs exist is not processed
again. A clip that fails is recorded, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from functools import partial
from pathlib import Path

import pandas as pd

from tasks.common.parallel import map_jobs
from tasks.common.stage import StageResult
from tasks.config import Config, ConfigError, resolve_path
from tasks.curation.balance import balance, category, split_of
from tasks.curation.clip import ClipSettings, curate_clip
from tasks.curation.sources import SourceClip, local_clips, synthetic_clips

CURATE_VERSION = 1  # bump when per-clip processing changes, so old rows are recomputed
MANIFEST_COLUMNS = [
    "clip_id", "group", "source_path", "video_path", "mask_path", "duration_s", "num_frames", "fps",
    "source_fps", "source_width", "source_height", "speaking_ratio", "listen_ratio", "unknown_ratio",
    "asd_threshold", "category", "selected", "split", "pose_frames", "pose_face_frames", "pose_mean_abs_yaw",
    "pose_mean_abs_pitch", "pose_mean_abs_roll", "pose_max_abs_yaw", "pose_max_abs_pitch", "pose_max_abs_roll",
    "pose_beyond_fraction", "luminance", "face_sharpness", "status", "reason", "fingerprint",
]  # fmt: skip


def clip_settings(cfg: Config, root: Path) -> ClipSettings:
    c = cfg.curate
    weights = resolve_path(c.asd_weights, root)
    if not weights.is_file():
        raise ConfigError(f"curate.asd_weights: no file at {weights}")
    return ClipSettings(
        out_dir=str((root / c.out_dir).resolve()), fps=cfg.video.fps, sample_rate=cfg.audio.sample_rate,
        width=cfg.video.width, height=cfg.video.height, analysis_width=c.analysis_width,
        min_duration_s=c.min_duration_s, asd=c.asd, asd_weights=str(weights.resolve()),
        asd_durations=tuple(c.asd_durations), asd_calibration=c.asd_calibration, asd_threshold=c.asd_threshold,
        asd_min_gap=c.asd_min_gap, asd_min_share=c.asd_min_share, max_yaw_deg=c.max_yaw_deg,
        max_pitch_deg=c.max_pitch_deg, max_roll_deg=c.max_roll_deg, max_pose_fraction=c.max_pose_fraction,
        min_face_fraction=c.min_face_fraction, pose_stride=c.pose_stride, luminance_range=tuple(c.luminance_range),
        min_face_sharpness=c.min_face_sharpness, torch_threads=max(1, (os.cpu_count() or 1) // c.workers),
    )  # fmt: skip


def list_sources(cfg: Config, root: Path, progress: bool = True) -> list[SourceClip]:
    c = cfg.curate
    if c.source == "synthetic":
        return synthetic_clips(root / cfg.corpus.out_dir)
    if c.source == "speakervid":
        from tasks.curation.speakervid import speakervid_clips

        return speakervid_clips(c.speakervid, root, c.workers, progress)
    folder = Path(c.local_dir)
    return local_clips(folder if folder.is_absolute() else root / folder)


def fingerprint(clip: SourceClip, settings: ClipSettings, root: Path) -> str:
    src = Path(clip.video_path)
    src = src if src.is_absolute() else root / src
    stat = src.stat() if src.exists() else None
    shaped = {k: v for k, v in asdict(settings).items() if k not in ("out_dir", "torch_threads")}
    blob = json.dumps([CURATE_VERSION, str(src.resolve()), stat and stat.st_size, stat and stat.st_mtime_ns,
                       clip.bbox, clip.error, shaped], sort_keys=True, default=str)  # fmt: skip
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _still_valid(row: dict, root: Path) -> bool:
    for key in ("video_path", "mask_path"):
        path = row.get(key)
        if isinstance(path, str) and path and not (Path(path) if Path(path).is_absolute() else root / path).exists():
            return False
    return True


Mapper = Callable[..., Iterator[tuple[SourceClip, dict | None, Exception | None]]]


def run_curate(cfg: Config, root: Path, progress: bool = True, mapper: Mapper = map_jobs) -> StageResult:
    """``mapper(fn, clips, workers, desc, unit, progress)`` runs ``fn`` over the clips and yields
    (clip, row, exception) as each finishes: a local process pool by default, Prefect tasks on a Dask or Ray
    cluster from the flow (flows/curate.py)."""
    root = Path(root).resolve()
    c = cfg.curate
    t0 = time.perf_counter()
    settings = clip_settings(cfg, root)
    clips = list_sources(cfg, root, progress)
    if len({clip.clip_id for clip in clips}) != len(clips):
        raise ValueError("curate: two source clips share an id; rename one of them")
    manifest_path = root / c.manifest
    journal = root / c.out_dir / "rows"  # one JSON per finished clip, written as it finishes
    previous: dict[str, dict] = {}
    if manifest_path.is_file():
        previous = {r["clip_id"]: r for r in pd.read_parquet(manifest_path).to_dict("records")}
    previous.update(_read_journal(journal, {clip.clip_id for clip in clips}))

    rows: dict[str, dict] = {}
    todo: list[tuple[SourceClip, str]] = []
    for clip in clips:
        fp = fingerprint(clip, settings, root)
        old = previous.get(clip.clip_id)
        if old is not None and old.get("fingerprint") == fp and old.get("status") != "failed" and _still_valid(old, root):
            rows[clip.clip_id] = old
        else:
            todo.append((clip, fp))

    failures: dict[str, str] = {}
    prints = {clip.clip_id: fp for clip, fp in todo}
    work = partial(curate_clip, s=settings, root=str(root))
    for clip, row, exc in mapper(work, [clip for clip, _ in todo], c.workers, "curate: clips", "clip", progress):
        row = _failed(clip, exc) if exc is not None else row  # a crash in one clip never stops the batch
        rows[clip.clip_id] = {**row, "fingerprint": prints[clip.clip_id]}
        _write_journal(journal, rows[clip.clip_id])  # a run killed now keeps this clip

    table = finish_table([rows[clip.clip_id] for clip in clips], cfg)
    for row in table[table["status"] == "failed"].itertuples():
        failures[row.clip_id] = row.reason
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = manifest_path.with_suffix(".partial.parquet")
    table.to_parquet(tmp, index=False)
    tmp.replace(manifest_path)

    from tasks.curation.report import write_report

    report_dir = root / c.report_dir
    metrics, artifacts = write_report(table, report_dir, root)
    metrics.update(clips_processed=float(len(todo)), clips_skipped=float(len(clips) - len(todo)),
                   seconds=time.perf_counter() - t0)  # fmt: skip
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    summary = (f"curate: {int(metrics['clips_ok'])} ok, {int(metrics['clips_rejected'])} rejected, "
               f"{int(metrics['clips_failed'])} failed of {len(clips)} ({len(todo)} processed, "
               f"{len(clips) - len(todo)} up to date); {int(metrics['clips_selected'])} selected "
               f"-> {c.manifest}")  # fmt: skip
    return StageResult("curate", metrics=metrics, artifacts=[manifest_path, report_dir / "metrics.json", *artifacts],
                       outputs=[root / c.out_dir, manifest_path, report_dir], failures=failures, summary=summary)  # fmt: skip


def _write_journal(journal: Path, row: dict) -> None:
    journal.mkdir(parents=True, exist_ok=True)
    path = journal / f"{row['clip_id']}.json"  # clip ids are sanitised by the sources
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(row, default=_jsonable))
    tmp.replace(path)


def _read_journal(journal: Path, ids: set[str]) -> dict[str, dict]:
    rows = {}
    for path in journal.glob("*.json") if journal.is_dir() else []:
        if path.stem in ids:
            try:
                rows[path.stem] = json.loads(path.read_text())
            except (json.JSONDecodeError, OSError):
                continue  # torn or unreadable: the clip is redone
    return rows


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _failed(clip: SourceClip, exc: Exception) -> dict:
    return {"clip_id": clip.clip_id, "group": clip.group, "source_path": clip.video_path, "status": "failed",
            "reason": f"{type(exc).__name__}: {exc}"}  # fmt: skip


def finish_table(rows: list[dict], cfg: Config) -> pd.DataFrame:
    """Categories, balanced selection and split over all rows; fixed column order."""
    c = cfg.curate
    table = pd.DataFrame(rows)
    for col in MANIFEST_COLUMNS:
        if col not in table:
            table[col] = None
    table = table[MANIFEST_COLUMNS].copy()
    table["category"] = [
        category(float(r), c.speaking_max_listen, c.listening_min_listen) if s == "ok" else ""
        for r, s in zip(table["listen_ratio"].astype(float), table["status"], strict=True)
    ]
    table["selected"] = balance(table, c.proportions, c.seed)
    table["split"] = [split_of(str(g), c.val_fraction, c.seed) for g in table["group"]]
    return table



