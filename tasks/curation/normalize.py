"""Normalise a clip with ffmpeg-python: constant frame rate, 16 kHz mono, cropped around the person and
resized to the profile's resolution, H.264 + AAC, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import ffmpeg

from tasks.common.media import MediaError, MediaInfo, ffmpeg_exe


def crop_window(info: MediaInfo, width: int, height: int, bbox: tuple[float, float, float, float] | None,
                margin: float = 1.3) -> tuple[int, int, int, int]:  # fmt: skip
    """(w, h, x, y) in source pixels: the person box grown by ``margin`` to the target aspect, inside the frame.
    Without a box: the largest centred window of the target aspect."""
    aspect = width / height
    fw, fh = info.width, info.height
    if bbox is None:
        cw = min(fw, fh * aspect)
        cx, cy = fw / 2, fh / 2
    else:
        x1, y1, x2, y2 = bbox[0] * fw, bbox[1] * fh, bbox[2] * fw, bbox[3] * fh
        cw = max(x2 - x1, (y2 - y1) * aspect) * margin
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    cw = min(cw, fw, fh * aspect)
    ch = cw / aspect
    w, h = int(cw) // 2 * 2, int(ch) // 2 * 2
    x = int(min(max(cx - w / 2, 0), fw - w))
    y = int(min(max(cy - h / 2, 0), fh - h))
    return w, h, x, y


def normalize_clip(src: str | Path, dst: str | Path, info: MediaInfo, fps: int, sample_rate: int, width: int,
                   height: int, bbox: tuple[float, float, float, float] | None = None, crf: int = 18,
                   margin: float = 1.3, duration: float | None = None) -> None:  # fmt: skip
    """The clip at ``fps`` and ``sample_rate`` mono, the crop around ``bbox`` (grown by ``margin``) scaled to
    width x height; its first ``duration`` seconds when given."""
    if info.video_codec is None:
        raise MediaError(f"{src}: no video stream")
    if info.audio_codec is None:
        raise MediaError(f"{src}: no audio stream")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.stem}.partial.{os.getpid()}{dst.suffix}")
    w, h, x, y = crop_window(info, width, height, bbox, margin)
    stream = ffmpeg.input(str(src), **({"t": f"{duration:.3f}"} if duration else {}))
    video = stream.video.filter("fps", fps=fps).filter("crop", w, h, x, y).filter("scale", width, height)
    audio = stream.audio.filter("aresample", sample_rate)
    out = ffmpeg.output(video, audio, str(tmp), vcodec="libx264", pix_fmt="yuv420p", crf=crf, preset="fast",
                        acodec="aac", ac=1, ar=sample_rate, movflags="+faststart", loglevel="error")  # fmt: skip
    _run(out, src, tmp, dst, "normalise")


def cut_clip(src: str | Path, dst: str | Path, info: MediaInfo, start_s: float, end_s: float,
             bbox: tuple[float, float, float, float], width: int, height: int, crf: int = 18) -> None:  # fmt: skip
    """SpeakerVid's clip from a raw video: [start_s, end_s) cut, the person box (normalised x1 y1 x2 y2)
    cropped and scaled to width x height; source frame rate and audio kept (normalisation comes later)."""
    if info.video_codec is None or info.audio_codec is None:
        raise MediaError(f"{src}: needs a video and an audio stream")
    if not 0 <= start_s < end_s:
        raise MediaError(f"{src}: bad clip interval [{start_s}, {end_s}) s")
    if info.duration_s and start_s >= info.duration_s:
        raise MediaError(f"{src}: the clip starts at {start_s:.2f} s but the video lasts {info.duration_s:.2f} s")
    x1, y1, x2, y2 = (min(max(float(v), 0.0), 1.0) for v in bbox)
    if x2 <= x1 or y2 <= y1:
        raise MediaError(f"{src}: empty person box {list(bbox)}")
    w = max(2, int((x2 - x1) * info.width) // 2 * 2)
    h = max(2, int((y2 - y1) * info.height) // 2 * 2)
    x, y = min(int(x1 * info.width), info.width - w), min(int(y1 * info.height), info.height - h)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.stem}.partial.{os.getpid()}{dst.suffix}")
    stream = ffmpeg.input(str(src), ss=f"{start_s:.3f}", t=f"{end_s - start_s:.3f}")
    video = stream.video.filter("crop", w, h, x, y).filter("scale", width // 2 * 2, height // 2 * 2)
    out = ffmpeg.output(video, stream.audio, str(tmp), vcodec="libx264", pix_fmt="yuv420p", crf=crf,
                        preset="fast", acodec="aac", movflags="+faststart", loglevel="error")  # fmt: skip
    _run(out, src, tmp, dst, "cut")


def _run(out, src, tmp: Path, dst: Path, what: str) -> None:
    try:
        out.overwrite_output().run(cmd=ffmpeg_exe(), capture_stdout=True, capture_stderr=True)
    except ffmpeg.Error as exc:
        tmp.unlink(missing_ok=True)
        lines = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
        raise MediaError(f"{src}: ffmpeg could not {what} it: {lines[-1] if lines else exc}") from None
    tmp.replace(dst)
