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


class MergedAnno(BaseModel):
    """One merged_anno record. Extra fields of real records are kept, never rejected."""

    model_config = ConfigDict(extra="allow")

    video_name: str
    num_frames: int = Field(ge=0)
    is_talking: int | bool
    clip_speaker_num: int = Field(ge=0)
    clear: float | int | bool
    video_total_duration: float = Field(ge=0)
    start: float = Field(ge=0)
    org_start_seconds: float = Field(ge=0)
    duration: float = Field(ge=0)
    duration_new: float = Field(ge=0)
    start_seconds: float = Field(ge=0)
    end_seconds: float = Field(ge=0)
    bbox: list[float] = Field(min_length=4, max_length=4)  # x1 y1 x2 y2, normalised to the raw frame
    conf: float
    sync: float | list[float] | dict
    speaker: list[str] | str
    raw_video_height: int = Field(gt=0)
    raw_video_width: int = Field(gt=0)
    clip_video_height: int = Field(gt=0)
    clip_video_width: int = Field(gt=0)
