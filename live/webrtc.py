"""The WebRTC transport (aiortc) for browsers: the same LiveSession as the WebSocket protocol.

Signalling is one HTTP exchange: the page POSTs ``/webrtc/offer`` with its SDP offer (ICE gathered), the
reference portrait (a base64 data URL) and the token when one is required; the answer comes back as JSON, or
an error with the same codes as the WebSocket protocol (HTTP 400), ``busy`` (HTTP 503) or 401.

The offer's media sections, in this order (the page's ``addTransceiver`` order):
  0 audio sendonly  the user's microphone (the avatar listens to it)
  1 audio sendonly  the avatar's own voice (a TTS or an agent's output; silence when the page has none)
  2 video recvonly  the avatar, 25 fps
  3 audio recvonly  the avatar's voice again, played in step with its frames
and a data channel on which the server sends one JSON line per chunk (index, latency, talking frames).

Frames and the avatar's returned voice are queued per chunk as the worker makes them and played out at the
frame rate; when generation falls behind, the last frame holds (and is counted as a stall); when more than
``live.max_pending_chunks`` chunks wait to be played (a client that cannot keep up) the oldest are dropped.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import fractions
import json
import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from live.protocol import AVATAR, USER, AudioFormat, LinearResampler, ProtocolError

if TYPE_CHECKING:
    from live.server import LiveServer
    from live.session import LiveSession, OutChunk

log = logging.getLogger("live")
VIDEO_CLOCK = 90000
AUDIO_PTIME = 0.02
INPUT_RATE = 48000  # what aiortc's Opus decoder gives; other rates are resampled to it


def _tracks():
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    return MediaStreamTrack, MediaStreamError


class Playout:
    """The generated chunks, played out at the frame rate by the video and the audio track together."""

    def __init__(self, fps: int, sample_rate: int, first: np.ndarray, max_frames: int, on_drop) -> None:
        self.fps, self.rate = fps, sample_rate
        self.frames: collections.deque[np.ndarray] = collections.deque()
        self.audio: collections.deque[np.ndarray] = collections.deque()  # per frame, sample_rate // fps samples
        self.max_frames = max_frames
        self.last = first
        self.on_drop = on_drop
        self.stalls = 0
        self.started = asyncio.Event()

    def add(self, frames: list[np.ndarray], pcm_s16: bytes) -> None:
        spf = self.rate // self.fps
        pcm = np.frombuffer(pcm_s16, "<i2")
        for i, f in enumerate(frames):
            self.frames.append(f)
            self.audio.append(pcm[i * spf : (i + 1) * spf])
        while len(self.frames) > self.max_frames:  # the client cannot keep up: drop the oldest
            self.frames.popleft()
            self.audio.popleft()
            self.on_drop(1)
        self.started.set()

    def next_frame(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self.frames:
            self.last = self.frames.popleft()
            return self.last, self.audio.popleft()
        self.stalls += 1
        return self.last, None


def video_track(playout: Playout):
    MediaStreamTrack, MediaStreamError = _tracks()
    from av import VideoFrame

    class AvatarVideo(MediaStreamTrack):
        kind = "video"

        def __init__(self) -> None:
            super().__init__()
            self._n = 0
            self._t0: float | None = None
            self.audio_out: collections.deque[np.ndarray] = collections.deque(maxlen=64)

        async def recv(self):
            if self.readyState != "live":
                raise MediaStreamError
            if self._t0 is None:
                await playout.started.wait()
                self._t0 = time.perf_counter()
            wait = self._t0 + self._n / playout.fps - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            rgb, audio = playout.next_frame()
            if audio is not None:
                self.audio_out.append(audio)
            frame = VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = self._n * VIDEO_CLOCK // playout.fps
            frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
            self._n += 1
            return frame

    return AvatarVideo()


def audio_track(video, rate: int):
    """The avatar's voice for the frames the video track has just played, in 20 ms frames."""
    MediaStreamTrack, MediaStreamError = _tracks()
    from av import AudioFrame

    class AvatarVoice(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self._buf = np.zeros(0, np.int16)
            self._n = 0
            self._t0: float | None = None

        async def recv(self):
            if self.readyState != "live":
                raise MediaStreamError
            step = int(AUDIO_PTIME * rate)
            if self._t0 is None:
                self._t0 = time.perf_counter()
            wait = self._t0 + self._n * AUDIO_PTIME - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            while video.audio_out and self._buf.size < step:
                self._buf = np.concatenate([self._buf, video.audio_out.popleft()])
            out = np.zeros(step, np.int16)
            k = min(step, self._buf.size)
            out[:k], self._buf = self._buf[:k], self._buf[k:]
            frame = AudioFrame.from_ndarray(out[None], format="s16", layout="mono")
            frame.sample_rate = rate
            frame.pts = self._n * step
            frame.time_base = fractions.Fraction(1, rate)
            self._n += 1
            return frame

    return AvatarVoice()


def _mono(frame) -> np.ndarray:
    """An av.AudioFrame (any sample format, packed or planar, mono or stereo) -> float32 mono in [-1, 1]."""
    x = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        x = x.reshape(channels, -1).mean(0)
    else:
        x = x.reshape(-1, channels).mean(1)
    if np.issubdtype(x.dtype, np.integer) or frame.format.name.startswith("s16"):
        return (x / 32768.0).astype(np.float32)
    return x.astype(np.float32)


async def _consume(track, kind: int, session: LiveSession, server: LiveServer, state: dict) -> None:
    """Feed one incoming voice to the session until the track ends."""
    _, MediaStreamError = _tracks()
    resample: LinearResampler | None = None
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        state["last_audio"] = time.perf_counter()
        x = _mono(frame)
        if frame.sample_rate != INPUT_RATE:
            resample = resample or LinearResampler(frame.sample_rate, INPUT_RATE)
            x = resample(x)
        if session.pending() >= server.cfg.live.max_pending_chunks:  # generation behind real time: skip audio
            state["skipped_samples"] += x.size
            continue
        session.push(kind, x)


async def offer(server: LiveServer, body: dict) -> tuple[int, dict]:
    """Handle one POST /webrtc/offer; returns (HTTP status, JSON body)."""
    from aiortc import RTCPeerConnection, RTCSessionDescription

    from live.session import LiveSession, release_logger, session_logger
    from tasks.config import resolve_path

    if not isinstance(body, dict) or not isinstance(body.get("sdp"), str) or body.get("type") != "offer":
        return 400, {"type": "error", "code": "bad_offer", "message": 'POST {"sdp": ..., "type": "offer", "reference": ...}'}
    if not server.authorized(body.get("token"), None):
        server.metrics.count("sessions_rejected", "unauthorized")
        return 401, {"type": "error", "code": "unauthorized", "message": "token required"}
    sid = server.admit()
    if sid is None:
        server.metrics.count("sessions_rejected", "busy")
        return 503, {"type": "busy", "message": f"the server is streaming its {server.cfg.live.max_sessions} sessions "
                                                "(live.max_sessions); try again later"}  # fmt: skip
    slog, handler = session_logger(resolve_path(server.cfg.live.log_dir, server.root), sid)
    pc = None
    session = None
    try:
        ref_field = body.get("reference")
        if not isinstance(ref_field, str) or not ref_field:
            raise ProtocolError("expected_reference", "the offer carries no reference image (a base64 data URL)")
        try:
            image = base64.b64decode(ref_field.split(",", 1)[-1], validate=False)
        except ValueError as exc:
            raise ProtocolError("bad_image", f"the reference is not base64 ({exc})") from None
        ref = await server.reference(image)
        pc = RTCPeerConnection()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="offer"))
        ts = pc.getTransceivers()
        kinds = [t.kind for t in ts]
        if kinds[:4] != ["audio", "audio", "video", "audio"]:
            raise ProtocolError("bad_offer", f"the offer's media must be audio, audio, video, audio (mic, avatar "
                                             f"voice, avatar video, avatar voice back); got {kinds}")  # fmt: skip
        gen = server.model.generator()
        v, rate = server.cfg.video, server.cfg.audio.sample_rate
        first = ((ref.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        state = {"last_audio": time.perf_counter(), "skipped_samples": 0, "chunks": 0, "frames": 0}

        def dropped(n: int) -> None:
            server.metrics.add("dropped_frames", n)

        playout = Playout(v.fps, rate, first, server.cfg.live.max_pending_chunks * gen.chunk_video_frames, dropped)
        channel: list = []
        loop = asyncio.get_running_loop()

        def deliver(chunk: OutChunk | None) -> None:  # on the event loop
            if chunk is None:
                return
            frames = list(chunk.rgb)
            latency = time.perf_counter() - chunk.ready_at
            playout.add(frames, chunk.avatar_pcm)
            server.metrics.chunk(len(frames), latency)
            state["chunks"] += 1
            state["frames"] += len(frames)
            if channel and channel[0].readyState == "open":
                channel[0].send(json.dumps({"chunk": chunk.index, "latency_ms": round(latency * 1000, 1),
                                            "talking": sum(chunk.talking), "frames": len(frames),
                                            "stalls": playout.stalls}))  # fmt: skip

        session = await asyncio.to_thread(
            LiveSession, sid, gen, ref, AudioFormat(INPUT_RATE, 1, "s16le"), sample_rate=rate, fps=v.fps,
            lead_chunks=server.cfg.live.lead_chunks, jpeg_quality=server.cfg.live.jpeg_quality,
            threshold_db=gen.settings.vad_threshold_db, emit=lambda c: loop.call_soon_threadsafe(deliver, c),
            metrics=server.metrics, log=slog)  # fmt: skip
        server.active[sid] = session
        server.metrics.add("sessions_started")
        video = video_track(playout)
        ts[2].sender.replaceTrack(video)
        ts[2].direction = "sendonly"
        ts[3].sender.replaceTrack(audio_track(video, rate))
        ts[3].direction = "sendonly"
        for t in ts[:2]:
            t.direction = "recvonly"
        consumers = [asyncio.ensure_future(_consume(ts[i].receiver.track, kind, session, server, state))
                     for i, kind in ((0, USER), (1, AVATAR))]  # fmt: skip

        @pc.on("datachannel")
        def on_channel(ch) -> None:
            channel.append(ch)

        done = asyncio.Event()

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            slog.info("WebRTC connection %s", pc.connectionState)
            if pc.connectionState in ("failed", "closed", "disconnected"):
                done.set()

        async def watch() -> None:
            idle = server.cfg.live.idle_timeout_s
            try:
                while not done.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(done.wait(), 1.0)
                    if time.perf_counter() - state["last_audio"] > idle:
                        slog.warning("no audio for %g s: closing", idle)
                        server.metrics.count("session_errors", "timeout")
                        break
                    if session.error is not None:
                        server.metrics.count("session_errors", "internal")
                        break
            finally:
                for c in consumers:
                    c.cancel()
                await pc.close()
                await asyncio.to_thread(session.close)
                server.release(sid)
                slog.info("session closed: %d chunks, %d frames, %d stalls, %d samples skipped", state["chunks"],
                          state["frames"], playout.stalls, state["skipped_samples"])  # fmt: skip
                release_logger(slog, handler)

        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
        server.background(watch())
        slog.info("WebRTC session ready; student %s", server.model.label)
        return 200, {"type": "answer", "sdp": pc.localDescription.sdp, "session": sid, "fps": v.fps,
                     "width": v.width, "height": v.height, "chunk_frames": session.frames_per_chunk,
                     "checkpoint": server.model.label}  # fmt: skip
    except ProtocolError as exc:
        slog.warning("refused: %s: %s", exc.code, exc)
        server.metrics.count("session_errors", exc.code)
        await _abort(server, sid, pc, session, slog, handler)
        return 400, {"type": "error", "code": exc.code, "message": str(exc)}
    except Exception as exc:  # noqa: BLE001  (this session fails; the server goes on)
        slog.exception("WebRTC session failed to start")
        server.metrics.count("session_errors", "internal")
        await _abort(server, sid, pc, session, slog, handler)
        return 500, {"type": "error", "code": "internal", "message": f"{type(exc).__name__}: {exc}"}


async def _abort(server, sid, pc, session, slog, handler) -> None:
    from live.session import release_logger

    if pc is not None:
        with contextlib.suppress(Exception):
            await pc.close()
    if session is not None:
        await asyncio.to_thread(session.close)
    server.release(sid)
    release_logger(slog, handler)
