"""Where clips come from: the demo corpus (``synthetic``) or a folder of clips (``local``).

Each source yields :class:`SourceClip` records with a sanitised, deterministic ``clip_id``: names taken from
files or remote metadata never reach a path unchecked (no traversal, no shell).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tasks.corpus.speakervid import CLIP_RE, MergedAnno

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm", ".avi")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_id(name: str) -> str:
    """A file-system-safe id: letters, digits, '_', '-', '.'; no leading dots; at most 120 characters."""
    cleaned = _SAFE.sub("_", name).strip("._")[:120]
    if not cleaned:
        raise ValueError(f"cannot make a clip id from {name!r}")
    return cleaned


@dataclass(frozen=True)
class SourceClip:
    clip_id: str
    video_path: str  # absolute, or relative to the project root
    group: str  # clips of one conversation (SpeakerVid: the YouTube id) share a group and a split
    bbox: tuple[float, float, float, float] | None = None  # person box, normalised x1 y1 x2 y2 of the video
    gt_path: str | None = None  # ground truth (synthetic corpus only)
    error: str | None = None  # the source could not supply this clip (download failed, bad list entry): why


def synthetic_clips(corpus_dir: Path) -> list[SourceClip]:
    table_path = corpus_dir / "corpus.parquet"
    if not table_path.is_file():
        raise FileNotFoundError(f"{table_path} not found: run `streamavatar corpus` first (curate.source=synthetic)")
    table = pd.read_parquet(table_path)
    clips = []
    for row in table[table["status"] == "ok"].itertuples():
        m = CLIP_RE.match(row.clip_id)
        clips.append(SourceClip(safe_id(row.clip_id), row.video_path, m["ytid"] if m else row.clip_id,
                                None, row.gt_path))  # fmt: skip
    return clips


def local_clips(folder: Path) -> list[SourceClip]:
    """Every video in ``folder``; a merged_anno JSON with the same stem (beside it or in merged_anno/)
    supplies the person box and, for SpeakerVid names, the conversation group."""
    if not folder.is_dir():
        raise FileNotFoundError(f"curate.local_dir: {folder} is not a folder")
    clips = []
    for video in sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()):
        stem = video.stem
        bbox = None
        for anno in (folder / f"{stem}.json", folder / "merged_anno" / f"{stem}.json"):
            if anno.is_file():
                record = MergedAnno.model_validate(json.loads(anno.read_text()))
                bbox = tuple(float(v) for v in record.bbox)
                break
        m = CLIP_RE.match(stem)
        clips.append(SourceClip(safe_id(stem), str(video), m["ytid"] if m else safe_id(stem), bbox))
    if not clips:
        raise FileNotFoundError(f"curate.local_dir: no videos ({', '.join(VIDEO_SUFFIXES)}) in {folder}")
    return clips
