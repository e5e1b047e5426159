"""SpeakerVid-5M naming and merged_anno records (the layout a SpeakerVid download has on disk)."""

from __future__ import annotations

import hashlib
import re

from pydantic import BaseModel, ConfigDict, Field

_YTID = re.compile(r"^[A-Za-z0-9_-]{11}$")
CLIP_RE = re.compile(
    r"^(?P<ytid>[A-Za-z0-9_-]{11})_(?P<w>\d+)x(?P<h>\d+)_full_video_(?P<scene>\d{3})_(?P<side>A|B|None)_(?P<person>\d{2})$"
)


def synthetic_ytid(seed: int, conversation: int) -> str:
    """A deterministic 11-character id in YouTube's alphabet, marked as ours by its 'sy' prefix."""
    return "sy" + hashlib.sha1(f"streamavatar-corpus/{seed}/{conversation}".encode()).hexdigest()[:9]


def clip_name(ytid: str, width: int, height: int, scene: int, side: str, person: int) -> str:
    """``{ytid}_{W}x{H}_full_video_{scene:03d}_{A|B|None}_{person:02d}``."""
    if not _YTID.match(ytid):
        raise ValueError(f"not a YouTube-style id: {ytid!r}")
    if side not in ("A", "B", "None"):
        raise ValueError(f"side must be A, B or None, got {side!r}")
    return f"{ytid}_{width}x{height}_full_video_{scene:03d}_{side}_{person:02d}"


# The clip's time span, by `curate.speakervid.span` (docs/data.md "Sources"). SpeakerVid-5M's own curation code writes
# each record with `org_start_seconds` / `video_total_duration` (the scene segment of the raw video the person was
# tracked in) and `start_new` / `duration_new` (the part of it the clip keeps: `num_frames` frames at 25 fps, the
# frames its person box, SyncNet `conf` and `sync` describe); the authors' cutting script cuts the scene segment.
# Older or re-packed records may carry start_seconds / end_seconds or start / duration instead.
SPAN_FIELDS = {
    "track": (("start_new", "duration_new"), ("start_seconds", "end_seconds"), ("start", "duration")),
    "scene": (("org_start_seconds", "video_total_duration"),),
}


class MergedAnno(BaseModel):
    """One merged_anno record. Extra fields of real records are kept, never rejected. The time fields are
    optional one by one; :meth:`span` says which pair places the clip and refuses a record without one."""

    model_config = ConfigDict(extra="allow")

    video_name: str
    num_frames: int = Field(ge=0)
    is_talking: int | bool
    clip_speaker_num: int = Field(ge=0)
    clear: float | int | bool  # SpeakerVid's clarity: bit rate over the frame's size
    video_total_duration: float | None = Field(None, ge=0)
    org_start_seconds: float | None = Field(None, ge=0)
    start_new: float | None = Field(None, ge=0)
    duration_new: float | None = Field(None, ge=0)
    start: float | None = Field(None, ge=0)
    duration: float | None = Field(None, ge=0)
    start_seconds: float | None = Field(None, ge=0)
    end_seconds: float | None = Field(None, ge=0)
    bbox: list[float] = Field(min_length=4, max_length=4)  # x1 y1 x2 y2, normalised to the raw frame
    conf: float
    # a number, a list of numbers, or SpeakerVid's per-person map {person: [[conf, dist, offset], ...]}
    sync: float | list | dict
    dover: float | None = None  # DOVER video quality, where the record has it
    speaker: list[str] | str
    raw_video_height: int = Field(gt=0)
    raw_video_width: int = Field(gt=0)
    clip_video_height: int = Field(gt=0)
    clip_video_width: int = Field(gt=0)

    def span(self, mode: str = "track") -> tuple[float, float, str]:
        """(start, end, the two fields used) of the clip in the raw video: the first pair of SPAN_FIELDS[mode]
        the record has (the second of a pair is a duration, or an end for end_seconds). ValueError naming the
        fields when none is there or the pair gives no time."""
        if mode not in SPAN_FIELDS:
            raise ValueError(f"span {mode!r}: expected one of {', '.join(SPAN_FIELDS)}")
        for first, second in SPAN_FIELDS[mode]:
            a, b = getattr(self, first), getattr(self, second)
            if a is None or b is None:
                continue
            end = b if second == "end_seconds" else a + b
            if end <= a:
                raise ValueError(f"{first} {a:g} and {second} {b:g} give an empty clip")
            return float(a), float(end), f"{first} + {second}"
        pairs = " or ".join(f"{a} + {b}" for a, b in SPAN_FIELDS[mode])
        raise ValueError(f"no time fields for span {mode!r}: the record has none of {pairs}")
