"""Where clips come from: the demo corpus (``synthetic``), folders or files of clips (``local``), or a
SpeakerVid-5M download (``speakervid``, tasks/curation/speakervid.py); one run may take several.

Each clip carries its conversation (``group``: clips that share one, or its audio, always share a split) and the
person it shows (``identity``: a corpus clip's photo; a local clip is its own person). Each source yields
:class:`SourceClip` records with a sanitised, deterministic ``clip_id``: names taken from files or remote
metadata never reach a path unchecked (no traversal, no shell).
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
    rejected: str | None = None  # the source declined it (a quality filter of its record): why; not fetched
    source: str = ""  # synthetic | local | speakervid
    identity: str | None = None  # the person shown (None: unknown, the clip is taken as its own person)
    actions: str = ""  # the record's action annotation as JSON [[name, start_s, end_s], ...] ("": none)


def record_actions(record: dict, where: str) -> str:
    """A merged_anno record's optional ``actions`` (a list of {name, start_s, end_s}; the demo corpus writes
    it, SpeakerVid has none) as the manifest's JSON; an entry with an unknown name or bad times is an error
    naming the file."""
    from model.interaction import ACTIONS

    items = record.get("actions") or []
    out = []
    for i, a in enumerate(items if isinstance(items, list) else [items]):
        try:
            name, start, end = str(a["name"]), float(a["start_s"]), float(a["end_s"])
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"{where}: actions[{i}] needs name, start_s and end_s ({exc!r})") from None
        if name not in ACTIONS or not 0 <= start < end:
            raise ValueError(f"{where}: actions[{i}] = {a!r}: the name must be one of {', '.join(ACTIONS)} "
                             f"and 0 <= start_s < end_s")  # fmt: skip
        out.append([name, start, end])
    return json.dumps(out) if out else ""


def synthetic_clips(corpus_dir: Path) -> list[SourceClip]:
    table_path = corpus_dir / "corpus.parquet"
    if not table_path.is_file():
        raise FileNotFoundError(f"{table_path} not found: run `streamavatar corpus` first (curate.sources has synthetic)")
    table = pd.read_parquet(table_path)
    clips = []
    for row in table[table["status"] == "ok"].itertuples():
        m = CLIP_RE.match(row.clip_id)
        photo = getattr(row, "photo", None)  # the person: the photo the corpus animated
        anno = corpus_dir / "merged_anno" / f"{row.clip_id}.json"  # the corpus's layout
        actions = record_actions(json.loads(anno.read_text()), str(anno)) if anno.is_file() else ""
        clips.append(SourceClip(safe_id(row.clip_id), row.video_path, m["ytid"] if m else row.clip_id,
                                None, row.gt_path, source="synthetic",
                                identity=str(photo) if isinstance(photo, str) and photo else None,
                                actions=actions))  # fmt: skip
    return clips


def local_clips(entries: list[Path] | Path, groups: dict[str, str] | None = None
                ) -> tuple[list[SourceClip], list[str]]:  # fmt: skip
    """Every video in each folder of ``entries`` (or the entry itself when it is a video file): (clips, notes),
    a note per entry that is absent or holds no video (skipped, not fatal: the shared fixtures may be missing).
    A merged_anno JSON with the same stem (beside it or in merged_anno/) supplies the person box and, for
    SpeakerVid names, the conversation group; ``groups`` (clip id -> conversation) joins clips whose names do
    not say so; otherwise a clip is its own conversation. A local clip's person is the clip itself."""
    groups = groups or {}
    clips, notes = [], []
    for entry in [entries] if isinstance(entries, Path) else entries:
        if entry.is_dir():
            videos = sorted(p for p in entry.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
            if not videos:
                notes.append(f"curate.local_dirs: no videos ({', '.join(VIDEO_SUFFIXES)}) in {entry}: skipped")
        elif entry.is_file() and entry.suffix.lower() in VIDEO_SUFFIXES:
            videos = [entry]
        else:
            notes.append(f"curate.local_dirs: {entry} is absent (or not a video): skipped")
            continue
        for video in videos:
            folder, stem = video.parent, video.stem
            bbox, actions = None, ""
            for anno in (folder / f"{stem}.json", folder / "merged_anno" / f"{stem}.json"):
                if anno.is_file():
                    raw = json.loads(anno.read_text())
                    record = MergedAnno.model_validate(raw)
                    actions = record_actions(raw, str(anno))
                    bbox, note = record_box(video, record)
                    if note:
                        notes.append(f"{video}: {note}")
                    break
            clip_id = safe_id(stem)
            m = CLIP_RE.match(stem)
            group = groups.get(clip_id) or (m["ytid"] if m else clip_id)
            clips.append(SourceClip(clip_id, str(video), group, bbox, source="local", identity=identity_of(clip_id),
                                    actions=actions))  # fmt: skip
    return clips, notes


def record_box(video: Path, record: MergedAnno) -> tuple[tuple[float, float, float, float] | None, str]:
    """The record's person box for ``video`` when the file is the raw video it was drawn on, else None; and a
    note when the box is left out. The box is normalised to the RAW frame: on a file that is already the cut
    and cropped clip it would crop the person away. Told apart by the frame size (raw_video_width x height vs
    clip_video_width x height), and, when both sizes are the same, by the duration: a file as long as the
    clip's track (start_new + duration_new) or its scene segment (org_start_seconds + video_total_duration, what
    SpeakerVid's own cutting script cuts) is the clip."""
    from tasks.common.media import MediaError, probe

    try:
        info = probe(video)
    except (MediaError, FileNotFoundError) as exc:
        return None, f"cannot probe it to place its merged_anno box ({exc}); box not applied"
    size = (info.width, info.height)
    raw = size == (record.raw_video_width, record.raw_video_height)
    cut = size == (record.clip_video_width, record.clip_video_height)
    if raw and cut:  # the same size: a file as long as the clip is the clip
        def length(mode: str) -> float | None:
            try:
                start, end, _ = record.span(mode)
            except ValueError:  # the record has no time fields for this span
                return None
            return end - start

        lengths = [x for x in map(length, ("track", "scene")) if x is not None]
        cut = any(abs(info.duration_s - x) <= 0.5 for x in lengths)
        raw = not cut
    if raw:
        return tuple(float(v) for v in record.bbox), ""
    if cut:
        return None, ""  # already the clip: the box was applied when it was cut
    return None, (f"{size[0]}x{size[1]} is neither the record's raw video ({record.raw_video_width}x"
                  f"{record.raw_video_height}) nor its clip ({record.clip_video_width}x{record.clip_video_height}): "
                  "its person box is not applied")  # fmt: skip


def identity_of(clip_id: str) -> str:
    """The person a clip shows when nothing else says: a SpeakerVid clip's video and person number, else the
    clip itself."""
    m = CLIP_RE.match(clip_id)
    return f"{m['ytid']}_{m['person']}" if m else clip_id
