"""One live session and the registry of sessions, independent of the transport (WebSocket today).

A session owns its own :class:`StreamingGenerator` (KV cache, VAE decoder cache, audio history) around the
model weights every session shares, and one worker thread that runs the generator chunk by chunk, so a
slow session never blocks the server's event loop or another session. The two voices arrive as PCM in
pieces of any size; they are resampled to ``audio.sample_rate`` and cut into chunks of 4C video frames. The
avatar talks while the generator's voice detector (``audio.vad``, model/vad.py: Silero VAD with hangover, or
the energy gate) hears speech on its own stream and listens otherwise; each chunk carries that per-frame
mask, the one the generator conditioned the chunk on.

Both directions are bounded (``live.max_pending_chunks``): while that many chunks of audio wait for
generation the server stops reading the socket (TCP pushes back on a client that sends faster than real
time; nothing is lost), and when the client reads too slowly the oldest unsent video chunk is dropped and
counted. Memory stays flat either way.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from live.protocol import AVATAR, USER, AudioFormat, LinearResampler
from model.interaction import ACTIONS, Intent, RuleReasoner, StateCycler
from model.streaming import StreamingGenerator

_STOP = object()


# ------------------------------------------------------------------------------------------------ metrics
class LiveMetrics:
    """Server-wide counters for /metrics (Prometheus text format) and /health; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sessions_started = 0
        self.sessions_rejected: collections.Counter[str] = collections.Counter()  # reason -> count
        self.session_errors: collections.Counter[str] = collections.Counter()  # code -> count
        self.chunks = 0
        self.frames = 0
        self.dropped_frames = 0
        self.latencies: collections.deque[float] = collections.deque(maxlen=2000)  # seconds, newest last
        self.latency_sum = 0.0

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def count(self, counter: str, key: str) -> None:
        with self._lock:
            getattr(self, counter)[key] += 1

    def chunk(self, frames: int, latency_s: float) -> None:
        with self._lock:
            self.chunks += 1
            self.frames += frames
            self.latencies.append(latency_s)
            self.latency_sum += latency_s

    def latency_quantiles(self) -> dict[str, float]:
        with self._lock:
            lat = np.array(self.latencies, dtype=np.float64)
        if lat.size == 0:
            return {}
        return {q: float(np.quantile(lat, float(q))) for q in ("0.5", "0.95", "0.99")}

    def prometheus(self, active: int, capacity: int) -> str:
        q = self.latency_quantiles()
        with self._lock:
            lines = [
                "# HELP streamavatar_live_sessions Sessions streaming now.",
                "# TYPE streamavatar_live_sessions gauge",
                f"streamavatar_live_sessions {active}",
                "# HELP streamavatar_live_max_sessions Admission limit (live.max_sessions).",
                "# TYPE streamavatar_live_max_sessions gauge",
                f"streamavatar_live_max_sessions {capacity}",
                "# HELP streamavatar_live_sessions_started_total Sessions that reached ready.",
                "# TYPE streamavatar_live_sessions_started_total counter",
                f"streamavatar_live_sessions_started_total {self.sessions_started}",
                "# HELP streamavatar_live_sessions_rejected_total Sessions refused before ready, by reason.",
                "# TYPE streamavatar_live_sessions_rejected_total counter",
                *[f'streamavatar_live_sessions_rejected_total{{reason="{k}"}} {v}'
                  for k, v in sorted(self.sessions_rejected.items())],
                "# HELP streamavatar_live_session_errors_total Sessions ended by an error, by code.",
                "# TYPE streamavatar_live_session_errors_total counter",
                *[f'streamavatar_live_session_errors_total{{code="{k}"}} {v}' for k, v in sorted(self.session_errors.items())],
                "# HELP streamavatar_live_chunks_total Video chunks sent.",
                "# TYPE streamavatar_live_chunks_total counter",
                f"streamavatar_live_chunks_total {self.chunks}",
                "# HELP streamavatar_live_frames_total Video frames sent.",
                "# TYPE streamavatar_live_frames_total counter",
                f"streamavatar_live_frames_total {self.frames}",
                "# HELP streamavatar_live_dropped_frames_total Frames skipped by backpressure (either way).",
                "# TYPE streamavatar_live_dropped_frames_total counter",
                f"streamavatar_live_dropped_frames_total {self.dropped_frames}",
                "# HELP streamavatar_live_chunk_latency_seconds Audio-in (last sample of the chunk) to frames-out.",
                "# TYPE streamavatar_live_chunk_latency_seconds summary",
                *[f'streamavatar_live_chunk_latency_seconds{{quantile="{k}"}} {v:.6f}' for k, v in q.items()],
                f"streamavatar_live_chunk_latency_seconds_sum {self.latency_sum:.6f}",
                f"streamavatar_live_chunk_latency_seconds_count {self.chunks}",
            ]  # fmt: skip
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ session
@dataclass
class OutChunk:
    """What the worker hands the transport: one generated chunk, ready to send."""

    index: int
    first_frame: int
    jpegs: list[bytes]
    talking: list[int]
    avatar_pcm: bytes  # s16le mono at the model's rate, the frames' span of the avatar's voice
    ready_at: float  # perf_counter when the chunk's last audio sample arrived
    rgb: np.ndarray | None = None  # the frames [T, H, W, 3] uint8 (what the WebRTC track plays)
    state: str = "idle"  # State-Cycling's state of this chunk: idle, listening, reacting, speaking
    action: str = "idle"  # the action the chunk was conditioned on


@dataclass
class SessionReport:
    chunks_in: int = 0
    chunks_out: int = 0
    frames_out: int = 0
    dropped_out_frames: int = 0
    latencies_ms: list[float] = field(default_factory=list)


class LiveSession:
    """Audio in (two voices, any rate), video chunks out; ``emit`` is called from the worker thread."""

    def __init__(self, sid: str, gen: StreamingGenerator, reference: torch.Tensor, fmt: AudioFormat, *,
                 sample_rate: int, fps: int, lead_chunks: int, jpeg_quality: int,
                 threshold_db: float, emit, metrics: LiveMetrics, log: logging.Logger, reasoner=None,
                 action_chunks: int = 3) -> None:  # fmt: skip
        self.sid, self.gen, self.fmt, self.metrics, self.log = sid, gen, fmt, metrics, log
        self.sample_rate, self.fps = sample_rate, fps
        self.spc = gen.samples_per_chunk
        self.frames_per_chunk = gen.chunk_video_frames
        self.spf = sample_rate // fps
        self.lead, self.jpeg_quality, self.threshold_db = lead_chunks, jpeg_quality, threshold_db
        self.emit = emit
        self.report = SessionReport()
        self._resample = {AVATAR: LinearResampler(fmt.sample_rate, sample_rate),
                          USER: LinearResampler(fmt.sample_rate, sample_rate)}  # fmt: skip
        self._buf: dict[int, list[np.ndarray]] = {AVATAR: [], USER: []}
        self._have = {AVATAR: 0, USER: 0}
        self._inbox: queue.Queue = queue.Queue()  # bounded by the transport, which waits on pending()
        self._next_chunk = 0
        self._error: BaseException | None = None
        # the Reasoning-Reaction Module (model/interaction.py): intents from the event loop, applied per chunk
        self.reasoner = reasoner or RuleReasoner()
        self.action_chunks = action_chunks
        self._cycler = StateCycler()
        self._requests: queue.Queue = queue.Queue()
        self._speaking = self._partner = False
        gen.start(reference)
        self._thread = threading.Thread(target=self._work, name=f"live-{sid}", daemon=True)
        self._thread.start()

    # -- audio in (event loop thread) ---------------------------------------------------------------------
    def push(self, kind: int, samples: np.ndarray) -> None:
        """Append decoded mono float32 samples (at the client's rate) of one voice; queue whole chunks."""
        x = self._resample[kind](samples)
        if x.size:
            self._buf[kind].append(x)
            self._have[kind] += x.size
        self._cut(final=False)

    def intent(self, text: str) -> Intent:
        """What the user said -> the reasoner's action (and whether to answer); the action is requested for the
        next chunk (nothing for idle). Returns the decision, which the transport reports to the client."""
        decision = self.reasoner.decide(text)
        self.log.info("intent %r -> %s (%s)", text[:200], decision.action, decision.reason)
        if decision.action != "idle":
            self.act(decision.action)
        return decision

    def act(self, name: str) -> None:
        """Request ``name`` (one of model.interaction.ACTIONS) from the next chunk on, for ``action_chunks``."""
        if name not in ACTIONS:
            raise ValueError(f"unknown action {name!r}; the vocabulary is {', '.join(ACTIONS)}")
        if name != "idle" and name not in self.gen.action_text:
            raise ValueError(f"the model has no prompt for action {name!r}")
        self._requests.put_nowait(name)

    def finish(self) -> None:
        """The client said "end": the rest of both voices becomes a last chunk padded with silence."""
        self._cut(final=True)
        self._put(_STOP)

    def _take(self, kind: int, n: int) -> np.ndarray:
        """The first n buffered samples of one voice (silence where it has fewer)."""
        out = np.zeros(n, np.float32)
        got, parts = 0, self._buf[kind]
        while parts and got < n:
            piece = parts[0]
            k = min(n - got, piece.size)
            out[got : got + k] = piece[:k]
            got += k
            if k == piece.size:
                parts.pop(0)
            else:
                parts[0] = piece[k:]
        self._have[kind] -= got
        return out

    def _cut(self, final: bool) -> None:
        while True:
            a, u = self._have[AVATAR], self._have[USER]
            both = min(a, u) >= self.spc
            # one voice far ahead (a client that sends only one stream, or a late one): the other is silence
            ahead = max(a, u) >= (self.lead + 1) * self.spc
            last = final and max(a, u) > 0
            if not (both or ahead or last):
                return
            chunk = (self._take(AVATAR, self.spc), self._take(USER, self.spc), time.perf_counter())
            self._put(chunk)

    def _put(self, item) -> None:
        self._inbox.put_nowait(item)

    def pending(self) -> int:
        """Chunks of audio waiting for generation (the transport stops reading while there are too many)."""
        return self._inbox.qsize()

    # -- generation (worker thread) -----------------------------------------------------------------------
    def _work(self) -> None:
        try:
            while True:
                item = self._inbox.get()
                if item is _STOP:
                    break
                avatar, user, ready_at = item
                self.report.chunks_in += 1
                while not self._requests.empty():  # State-Cycling: requests due before this chunk
                    self._cycler.request(self._requests.get_nowait(), self.action_chunks)
                state, action = self._cycler.step(self._speaking, self._partner)
                if action != self.gen.action:
                    self.gen.set_action(action)  # Cache-Switching at this chunk boundary
                video = self.gen.step(torch.from_numpy(avatar), torch.from_numpy(user))[0]  # [3, T, H, W]
                self._speaking = bool(self.gen.last_mask.float().mean() > 0.5)
                self._partner = bool(self.gen.last_partner_mask.float().mean() > 0.5)
                frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()
                talking = self.gen.last_mask[0]  # the live mask the generator conditioned this chunk on
                enc = [cv2.imencode(".jpg", f[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])[1].tobytes()
                       for f in frames]  # fmt: skip
                pcm = (np.clip(avatar, -1, 1) * 32767).round().astype("<i2").tobytes()
                out = OutChunk(self._next_chunk, self._next_chunk * self.frames_per_chunk, enc,
                               [int(v) for v in talking.tolist()], pcm, ready_at, frames, state,
                               self.gen.action)  # fmt: skip
                self._next_chunk += 1
                self.emit(out)
        except BaseException as exc:  # reported to the transport, which ends this session only
            self._error = exc
            self.log.exception("generation failed")
        finally:
            self.emit(None)  # end of stream

    @property
    def error(self) -> BaseException | None:
        return self._error

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker (what is queued is abandoned) and wait for it; idempotent."""
        while True:
            try:
                self._inbox.get_nowait()
            except queue.Empty:
                break
        self._inbox.put_nowait(_STOP)  # the inbox is unbounded: this never waits
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


class Outbox:
    """Bounded queue from a session's worker thread to its sender coroutine: when the client reads too slowly
    the oldest unsent chunk is dropped (counted), so a slow consumer costs frames, not memory."""

    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int, on_drop) -> None:
        self.loop, self.maxsize, self.on_drop = loop, maxsize, on_drop
        self.items: collections.deque = collections.deque()
        self.event = asyncio.Event()

    def put_threadsafe(self, item: OutChunk | None) -> None:
        self.loop.call_soon_threadsafe(self._put, item)

    def _put(self, item: OutChunk | None) -> None:
        if item is not None:
            chunks = [i for i in self.items if i is not None]
            if len(chunks) >= self.maxsize:
                self.items.remove(chunks[0])
                self.on_drop(chunks[0])
        self.items.append(item)
        self.event.set()

    async def get(self) -> OutChunk | None:
        while not self.items:
            self.event.clear()
            await self.event.wait()
        return self.items.popleft()


def session_logger(log_dir: Path, sid: str) -> tuple[logging.Logger, logging.Handler]:
    """A logger writing this session's lines to ``log_dir/<sid>.log`` (and on to the server's log)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger(f"live.session.{sid}")
    handler = logging.FileHandler(log_dir / f"{sid}.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return log, handler


def release_logger(log: logging.Logger, handler: logging.Handler) -> None:
    log.removeHandler(handler)
    handler.close()
    logging.Logger.manager.loggerDict.pop(log.name, None)  # no logger object per finished session stays behind

