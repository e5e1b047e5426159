"""Stage `curate`: from raw clips to the curated manifest the training stages read.

For every clip of the sources (``curate.sources``, all in one run): probe, length check, head-pose filter,
quality filters, per-frame speaking/listening mask by active speaker detection, a head (or person) crop and
normalisation to the profile's size and rate (tasks/curation/clip.py). Then listen-ratio categories, the
train / val / unseen split by conversation (tasks/curation/balance.py: held-out data shares neither a
conversation nor its audio with training; one whole identity is held out as ``unseen``) and balancing of the
training clips.

Outputs: ``curate.out_dir``/clips/*.mp4 and masks/*.npy, the manifest ``curate.manifest`` (one row per
clip, columns in MANIFEST_COLUMNS, documented in docs/data.md), and a report under ``curate.report_dir``.
Resumable: each finished clip's row is written at once to ``curate.out_dir``/rows/<clip_id>.json, so a run
killed halfway keeps what it finished; a clip whose previous row (journal or manifest) has the same
fingerprint (its file, the settings that shape it, the code version) and whose outputs exist is not processed
again. A clip that fails is recorded, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import pandas as pd

from tasks.common.parallel import map_jobs
from tasks.common.stage import StageResult
from tasks.config import Config, ConfigError, resolve_path
from tasks.curation.balance import SPLITS, balance, category, explain_balance, plan_splits
from tasks.curation.clip import ClipSettings, curate_clip
from tasks.curation.sources import SourceClip, identity_of, local_clips, synthetic_clips

log = logging.getLogger(__name__)

CURATE_VERSION = 3  # bump when per-clip processing changes, so old rows are recomputed
MANIFEST_COLUMNS = [
    "clip_id", "group", "source", "identity", "source_path", "video_path", "mask_path", "duration_s", "num_frames",
    "fps", "source_fps", "source_width", "source_height", "speaking_ratio", "listen_ratio", "unknown_ratio",
    "asd_threshold", "category", "selected", "split", "pose_frames", "pose_face_frames", "pose_mean_abs_yaw",
    "pose_mean_abs_pitch", "pose_mean_abs_roll", "pose_max_abs_yaw", "pose_max_abs_pitch", "pose_max_abs_roll",
    "pose_beyond_fraction", "luminance", "face_sharpness", "crop_box", "actions", "status", "reason", "fingerprint",
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
        max_duration_s=c.max_duration_s, crop=c.crop, head_scale=c.head_scale, face_stride=c.face_stride,
        asd_device=c.asd_device,
    )  # fmt: skip


def list_sources(cfg: Config, root: Path, progress: bool = True, notes: list[str] | None = None) -> list[SourceClip]:
    """The clips of every source in ``curate.sources``, in that order. Local folders that are absent are
    skipped with a logged reason, added to ``notes``."""
    c = cfg.curate
    clips: list[SourceClip] = []
    for source in c.sources:
        if source == "synthetic":
            clips += synthetic_clips(root / cfg.corpus.out_dir)
        elif source == "speakervid":
            from tasks.curation.speakervid import speakervid_clips

            clips += [replace(clip, source="speakervid", identity=identity_of(clip.clip_id))
                      for clip in speakervid_clips(c.speakervid, root, c.workers, progress)]  # fmt: skip
        else:
            found, skipped = local_clips([resolve_path(d, root) for d in c.local_dirs], c.local_groups)
            for note in skipped:
                log.warning("curate: %s", note)
            if notes is not None:
                notes += skipped
            clips += found
    if not clips:
        raise FileNotFoundError(f"curate: no clips in curate.sources {c.sources} (local_dirs: {c.local_dirs})")
    return clips


def fingerprint(clip: SourceClip, settings: ClipSettings, root: Path) -> str:
    src = Path(clip.video_path)
    src = src if src.is_absolute() else root / src
    stat = src.stat() if src.exists() else None
    shaped = {k: v for k, v in asdict(settings).items() if k not in ("out_dir", "torch_threads", "asd_device")}
    blob = json.dumps([CURATE_VERSION, str(src.resolve()), stat and stat.st_size, stat and stat.st_mtime_ns,
                       clip.bbox, clip.error, clip.rejected, shaped], sort_keys=True, default=str)  # fmt: skip
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
    notes: list[str] = []
    clips = list_sources(cfg, root, progress, notes)
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

    # where a clip comes from, its conversation and its person are the listing's, not the processing's: a
    # resumed row takes today's (e.g. after curate.local_groups changed)
    listed = [{**rows[clip.clip_id], "group": clip.group, "source": clip.source,
               "identity": clip.identity or clip.clip_id, "actions": clip.actions} for clip in clips]  # fmt: skip
    table, split_info = finish_table(listed, cfg)
    for row in table[table["status"] == "failed"].itertuples():
        failures[row.clip_id] = row.reason
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = manifest_path.with_suffix(".partial.parquet")
    table.to_parquet(tmp, index=False)
    tmp.replace(manifest_path)

    from tasks.curation.report import write_report

    report_dir = root / c.report_dir
    metrics, artifacts = write_report(table, report_dir, root)
    metrics.update(split_info.pop("metrics"))
    metrics.update(clips_processed=float(len(todo)), clips_skipped=float(len(clips) - len(todo)),
                   local_dirs_skipped=float(len(notes)), seconds=time.perf_counter() - t0)  # fmt: skip
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    splits_path = report_dir / "splits.json"  # who is held out, why, and what balancing kept
    splits_path.write_text(json.dumps({**split_info, "skipped_sources": notes}, indent=1))
    sizes = ", ".join(f"{s} {int(metrics[f'split_{s}_clips'])} clips / {int(metrics[f'split_{s}_conversations'])} "
                      f"conversations" for s in SPLITS)  # fmt: skip
    summary = (f"curate: {int(metrics['clips_ok'])} ok, {int(metrics['clips_rejected'])} rejected, "
               f"{int(metrics['clips_failed'])} failed of {len(clips)} ({len(todo)} processed, "
               f"{len(clips) - len(todo)} up to date); ok clips by split: {sizes}; unseen identities "
               f"{split_info['unseen_identities']}; {int(metrics['clips_selected'])} training clips selected "
               f"({split_info['balance']}) -> {c.manifest}" + "".join(f"; {n}" for n in notes))  # fmt: skip
    return StageResult("curate", metrics=metrics,
                       artifacts=[manifest_path, report_dir / "metrics.json", splits_path, *artifacts],
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


def finish_table(rows: list[dict], cfg: Config) -> tuple[pd.DataFrame, dict]:
    """Categories, the split by conversation and the balanced selection of the training clips over all rows
    (fixed column order), and what the split and the balancing did: {"metrics": {...}, ...} for the report."""
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
    # the clips the `pretrain` stage holds out to measure its autoencoder are never trained on here either
    pretrain_holdout = list(getattr(getattr(cfg, "pretrain", None), "holdout", None) or [])
    plan = plan_splits(table, c.val_fraction, c.val_min_conversations, c.seed, c.unseen_identities,
                       c.unseen_min_identities, [*c.val_clips, *pretrain_holdout])  # fmt: skip
    table["split"] = plan.split
    train = table["split"] == "train"
    # only training clips are balanced: held-out clips are never selected
    table["selected"] = False
    table.loc[train, "selected"] = balance(table[train], c.proportions, c.seed, c.balance_min_keep)
    table["selected"] = table["selected"].astype(bool)
    numbers, why = explain_balance(table[train], table.loc[train, "selected"], c.proportions, c.balance_min_keep)
    ok = table["status"] == "ok"
    metrics: dict[str, float] = {}
    for s in SPLITS:
        part = table[ok & (table["split"] == s)]
        metrics[f"split_{s}_clips"] = float(len(part))
        metrics[f"split_{s}_conversations"] = float(part["group"].nunique())
        metrics[f"split_{s}_identities"] = float(part["identity"].nunique())
        metrics[f"split_{s}_seconds"] = float(part["duration_s"].astype(float).sum()) if len(part) else 0.0
    metrics["identities_ok"] = float(table.loc[ok, "identity"].nunique())
    metrics["balance_min_keep"] = float(c.balance_min_keep)
    metrics.update(numbers)
    by_split = {s: {"conversations": sorted(set(table.loc[ok & (table["split"] == s), "group"])),
                    "identities": sorted(set(table.loc[ok & (table["split"] == s), "identity"]))}
                for s in ("val", "unseen")}  # fmt: skip
    info = {"metrics": metrics, "unseen_identities": plan.unseen_identities, "held_out": by_split,
            "split_notes": plan.notes, "balance": why}  # fmt: skip
    return table, info



