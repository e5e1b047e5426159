"""Video and audio files through ffmpeg-python, with the ffmpeg binary from imageio-ffmpeg (no system ffmpeg)."""

from __future__ import annotations

import contextlib
import math
import re
import subprocess
import tempfile
import wave
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import ffmpeg
import numpy as np

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None


class MediaError(RuntimeError):
    """A media file could not be read or written; the message names the file."""


def writable_output(out: str | Path, flag: str = "--out") -> None:
    """``out`` can be written: its folder exists (made if missing) and takes a new file, and ``out`` is not a
    folder. Checked before long work (a generated video, a live session) rather than after it. Raises a
    MediaError naming ``flag`` and the path."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MediaError(f"{flag} {out}: cannot create its folder {out.parent} ({exc.strerror or exc})") from None
    if out.is_dir():
        raise MediaError(f"{flag} {out}: is a folder, not a file")
    try:  # a file made and removed: what the final write needs (permission bits alone miss e.g. /proc for root)
        tempfile.NamedTemporaryFile(dir=out.parent, prefix=".write-check-").close()  # removed on close
    except OSError as exc:
        raise MediaError(f"{flag} {out}: its folder {out.parent} is not writable ({exc.strerror or exc})") from None


@lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@dataclass(frozen=True)
class MediaInfo:
    path: str
    duration_s: float
    video_codec: str | None
    width: int
    height: int
    fps: float
    audio_codec: str | None
    sample_rate: int
    channels: int


def probe(path: str | Path) -> MediaInfo:
    """Stream facts parsed from ``ffmpeg -i`` (imageio-ffmpeg ships no ffprobe)."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: file not found")
    proc = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True)
    text = proc.stderr
    if "Invalid data found" in text or "Stream #" not in text:
        raise MediaError(f"{path}: not a readable media file ({_last_line(text)})")
    dur = re.search(r"Duration: (\d+):(\d+):([\d.]+)", text)
    duration = int(dur[1]) * 3600 + int(dur[2]) * 60 + float(dur[3]) if dur else 0.0
    v = re.search(r"Stream #.*?Video: (\w+).*?, (\d{2,5})x(\d{2,5})", text)
    fps = re.search(r"Stream #.*?Video:.*?([\d.]+) fps", text)
    a = re.search(r"Stream #.*?Audio: (\w+).*?, (\d+) Hz, (mono|stereo|[\d.]+ channels|[\d.]+)", text)
    channels = 0
    if a:
        channels = {"mono": 1, "stereo": 2}.get(a[3]) or int(float(a[3].split()[0]))
    return MediaInfo(
        path=str(path), duration_s=duration,
        video_codec=v[1] if v else None, width=int(v[2]) if v else 0, height=int(v[3]) if v else 0,
        fps=float(fps[1]) if fps else 0.0,
        audio_codec=a[1] if a else None, sample_rate=int(a[2]) if a else 0, channels=channels,
    )


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> None:
    """Mono float [-1, 1] -> 16-bit PCM wav."""
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())


def _input(path: Path, duration: float | None):
    """ffmpeg input; ``duration`` (seconds) stops reading there (``-t`` on the input: nothing after is decoded)."""
    return ffmpeg.input(str(path)) if duration is None else ffmpeg.input(str(path), t=float(duration))


def read_audio(path: str | Path, sample_rate: int = 16000, duration: float | None = None) -> np.ndarray:
    """Any audio or video file's audio as float32 mono at ``sample_rate`` (ffmpeg converts rate and channels),
    the first ``duration`` seconds only when given."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: file not found")
    try:
        out, _ = (
            _input(path, duration)
            .output("pipe:", format="f32le", acodec="pcm_f32le", ac=1, ar=int(sample_rate))
            .run(cmd=ffmpeg_exe(), capture_stdout=True, capture_stderr=True)
        )
    except ffmpeg.Error as exc:
        raise MediaError(f"{path}: cannot decode audio ({_last_line(exc.stderr.decode(errors='replace'))})") from None
    return np.frombuffer(out, dtype="<f4").copy()


PIPE_BYTES = 1 << 20  # the frame pipe's kernel buffer (Linux default 64 KiB: ~9 syscalls and wake-ups per frame)


def _frame_pipe(path: str | Path, width: int | None, height: int | None, fps: float | None,
                duration: float | None, scale_flags: str | None = None
                ) -> tuple[subprocess.Popen, int, int, int]:  # fmt: skip
    """ffmpeg decoding ``path`` to raw RGB frames on its stdout: (process, width, height, expected frame count).
    ``scale_flags``: swscale's algorithm when resizing (ffmpeg's default: bicubic)."""
    path = Path(path)
    info = probe(path)
    if info.video_codec is None:
        raise MediaError(f"{path}: no video stream")
    w, h = (width or info.width), (height or info.height)
    if width and not height:
        h = max(2, 2 * round(info.height * width / info.width / 2))
    elif height and not width:
        w = max(2, 2 * round(info.width * height / info.height / 2))
    stream = _input(path, duration)
    if fps is not None and fps != info.fps:
        stream = stream.filter("fps", fps=fps)
    if (w, h) != (info.width, info.height):
        stream = stream.filter("scale", w, h, **({"flags": scale_flags} if scale_flags else {}))
    proc = stream.output("pipe:", format="rawvideo", pix_fmt="rgb24").run_async(
        cmd=ffmpeg_exe(), pipe_stdout=True, pipe_stderr=subprocess.DEVNULL
    )
    set_pipe_size = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    if set_pipe_size is not None:
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep the default
            fcntl.fcntl(proc.stdout.fileno(), set_pipe_size, PIPE_BYTES)
    seconds = min(info.duration_s, duration) if duration else info.duration_s
    expected = int(math.ceil(seconds * (fps or info.fps or 25))) + 2 if seconds > 0 else 64
    return proc, w, h, expected


def iter_frames(
    path: str | Path, width: int | None = None, height: int | None = None, fps: float | None = None,
    duration: float | None = None,
) -> Iterator[np.ndarray]:  # fmt: skip
    """RGB uint8 frames of a video, optionally scaled to width x height (one of them: aspect kept, even),
    resampled to a constant ``fps`` and cut to the first ``duration`` seconds."""
    proc, w, h, _ = _frame_pipe(path, width, height, fps, duration)
    size = w * h * 3
    try:
        while True:
            buf = proc.stdout.read(size)
            if len(buf) < size:
                break
            yield np.frombuffer(buf, np.uint8).reshape(h, w, 3)
    finally:
        proc.stdout.close()
        proc.wait()


_REUSED: list[np.ndarray] = []  # read_frames(reuse=True)'s buffer, kept for the process's next clip


def read_frames(
    path: str | Path, width: int | None = None, height: int | None = None, fps: float | None = None,
    duration: float | None = None, reuse: bool = False, scale_flags: str | None = None,
) -> np.ndarray:  # fmt: skip
    """All frames [T, H, W, 3] (as :func:`iter_frames`), read straight into one array: no per-frame buffers,
    no final copy (4x faster than stacking the iterator's frames on a 2-core box).

    ``reuse``: read into a buffer this process keeps for its next ``reuse`` read and return a view of it,
    valid until then (a worker curating clip after clip touches no fresh memory: on a VM each new page is a
    fault to the host, ~1 s per 150 MB of frames here). ``scale_flags``: swscale's algorithm when resizing."""
    proc, w, h, expected = _frame_pipe(path, width, height, fps, duration, scale_flags)
    size = w * h * 3
    pooled = reuse and bool(_REUSED) and _REUSED[0].nbytes >= expected * size
    if pooled:
        out = _REUSED[0][: expected * size].reshape(expected, h, w, 3)
    else:
        out = np.empty((expected, h, w, 3), np.uint8)
    got = 0
    pipe = getattr(proc.stdout, "raw", proc.stdout)  # unbuffered: read the kernel's pipe straight into ``out``
    try:
        while True:
            if got + size > out.nbytes:  # more frames than the container said: grow
                grown = np.empty((2 * len(out), h, w, 3), np.uint8)
                grown[: len(out)] = out
                out = grown
            view = memoryview(out).cast("B")
            n = pipe.readinto(view[got : min(out.nbytes, got + 16 * size)])
            view.release()
            if not n:
                break
            got += n
    finally:
        proc.stdout.close()
        proc.wait()
    count = got // size
    if not count:
        raise MediaError(f"{path}: no frames could be decoded")
    if reuse and (not _REUSED or out.nbytes > _REUSED[0].nbytes):
        _REUSED[:] = [out.reshape(-1)]  # the buffer grown for this clip (or the first) is kept
    return out[:count]


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: int,
    audio_path: str | Path | None = None,
    audio_rate: int = 16000,
    crf: int = 20,
    audio_bitrate: str = "64k",
) -> None:
    """H.264 (yuv420p) mp4 from RGB uint8 frames, with an AAC track from ``audio_path`` when given.

    Encoding is single-threaded and bit-exact flags are set, so the same frames give the same bytes.
    """
    path = Path(path)
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise MediaError(f"{path}: no frames to write")
    h, w = first.shape[:2]
    video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", framerate=fps)
    streams = [video.video]
    kwargs = dict(vcodec="libx264", pix_fmt="yuv420p", crf=crf, preset="veryfast", r=fps, threads=1,
                  movflags="+faststart", fflags="+bitexact", flags="+bitexact", map_metadata=-1)
    if audio_path is not None:
        streams.append(ffmpeg.input(str(audio_path)).audio)
        kwargs.update(acodec="aac", ar=int(audio_rate), ac=1, audio_bitrate=audio_bitrate, shortest=None)
    tmp = path.with_name(path.stem + ".partial" + path.suffix)
    proc = (
        ffmpeg.output(*streams, str(tmp), **kwargs)
        .global_args("-hide_banner", "-loglevel", "error")
        .overwrite_output()
        .run_async(cmd=ffmpeg_exe(), pipe_stdin=True, pipe_stderr=True)
    )
    try:
        proc.stdin.write(np.ascontiguousarray(first, dtype=np.uint8).tobytes())
        for frame in frames:
            proc.stdin.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    err = proc.stderr.read().decode(errors="replace")
    if proc.wait() != 0:
        tmp.unlink(missing_ok=True)
        raise MediaError(f"{path}: ffmpeg failed ({_last_line(err)})")
    tmp.replace(path)  # only complete files ever carry the final name
