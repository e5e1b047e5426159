"""`streamavatar live`: the real-time session server (FastAPI + uvicorn) around the trained student.

Routes: ``/`` (the browser page), ``/webrtc/offer`` (WebRTC signalling, live/webrtc.py), ``/ws`` (the
WebSocket session protocol, live/protocol.py), ``/health`` (JSON), ``/metrics`` (Prometheus text).
The weights load once; each session gets its own StreamingGenerator (its caches) around them. Admission
control: ``live.max_sessions`` sessions stream at once, one more gets ``{"type": "busy"}`` and close code 1013,
so a full server refuses rather than slowing everyone down. Every failure of a session (a bad message, a
picture without a face, a client that vanishes, an error in generation) ends that session alone, with an
``{"type": "error", "code", "message"}`` to its client when it is still there.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from live.protocol import (
    AVATAR,
    REFERENCE,
    USER,
    AudioFormat,
    ProtocolError,
    control,
    intent_text,
    pack_chunk,
    unpack,
)
from live.session import LiveMetrics, LiveSession, Outbox, OutChunk, release_logger, session_logger
from model.streaming import StreamingGenerator
from tasks.common.media import MediaError
from tasks.common.reference import NoFaceError, reference_from_bytes
from tasks.config import Config, ConfigError, resolve_path

log = logging.getLogger("live")
TOKEN_ENV = "STREAMAVATAR_LIVE_TOKEN"


# ------------------------------------------------------------------------------------------------ model
@dataclass
class Model:
    """The weights every session shares, and what they are."""

    template: StreamingGenerator
    label: str

    def generator(self) -> StreamingGenerator:
        t = self.template
        gen = StreamingGenerator(t.dit, t.vae, t.audio, t._text, t.settings)
        gen.action_text = dict(t.action_text)
        return gen


def resolve_checkpoint(cfg: Config, root: Path) -> tuple[str | None, str]:
    """live.checkpoint -> (what build_stream takes, a label). "auto": the registry's champion when the
    project's MLflow store has one, else the last trained student; "champion": the champion or an error."""
    from tasks.common.student import RANDOM, default_checkpoint

    choice = cfg.live.checkpoint
    if choice == RANDOM:
        return RANDOM, "random (seeded untrained student)"
    if choice not in ("auto", "champion"):
        path = resolve_path(choice, root)
        if not path.is_file():
            raise ConfigError(f"live.checkpoint {choice}: no such file")
        return str(path), str(choice)
    champion = _champion(cfg, root)
    if champion is not None:
        return champion
    if choice == "champion":
        raise ConfigError(f"live.checkpoint champion: the registry has no '{cfg.registry.model_name}' version with "
                          "alias champion (run the re-evaluation flow, or use live.checkpoint=auto)")  # fmt: skip
    path = default_checkpoint(cfg, root)
    if path is None:
        raise ConfigError("live.checkpoint auto: no champion in the registry and no trained student under "
                          f"{cfg.train.checkpoint_dir}/(refine|distill)/final.pt; run `make demo` first, or pass "
                          "--checkpoint PATH (or random for the untrained student)")  # fmt: skip
    return str(path), str(path.relative_to(root) if path.is_relative_to(root) else path)


def _champion(cfg: Config, root: Path) -> tuple[str, str] | None:
    db = cfg.tracking.tracking_uri
    if not cfg.registry.enabled or (db.startswith("sqlite:///") and not (root / db.removeprefix("sqlite:///")).is_file()):
        return None
    from mlflow import MlflowClient

    from tasks.common import model_registry, tracking

    tracking.setup(cfg, root)
    version = model_registry.version_by_alias(MlflowClient(), cfg.registry.model_name, model_registry.CHAMPION)
    if version is None:
        return None
    dst = root / "data" / "cache" / "live" / f"v{version.version}"
    path = model_registry.download_checkpoint(cfg.registry.model_name, version.version, dst)
    return str(path), f"models:/{cfg.registry.model_name}/{version.version} (champion)"


def load_model(cfg: Config, root: Path) -> Model:
    from tasks.common.student import build_stream

    checkpoint, label = resolve_checkpoint(cfg, root)
    gen, _ = build_stream(cfg, root, checkpoint, actions=True)  # every action's prompt: intents switch to them
    return Model(gen, label)


# ------------------------------------------------------------------------------------------------ server
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_token(cfg: Config) -> str:
    """The token clients must send; ConfigError when the server would be reachable beyond loopback without one."""
    token = os.environ.get(TOKEN_ENV) or cfg.live.token
    if not token and not is_loopback(cfg.live.host):
        raise ConfigError(f"live.host {cfg.live.host} is reachable beyond this machine: set live.token (or "
                          f"${TOKEN_ENV}) so that only clients with the token can start sessions")  # fmt: skip
    return token


class LiveServer:
    """The app's state: the shared model, admission control, metrics."""

    def __init__(self, cfg: Config, root: Path, model: Model) -> None:
        self.cfg, self.root, self.model = cfg, root, model
        self.token = server_token(cfg)
        self.metrics = LiveMetrics()
        self.active: dict[str, LiveSession | None] = {}  # admitted sessions (None until the model is started)
        self._lock = threading.Lock()
        self.started = time.time()
        self._tasks: set[asyncio.Task] = set()
        self.app = Starlette(routes=[
            Route("/", self.page),
            Route("/favicon.ico", lambda request: Response(status_code=204)),
            Route("/webrtc/offer", self.webrtc_offer, methods=["POST"]),
            Route("/health", self.health),
            Route("/metrics", self.prometheus),
            WebSocketRoute("/ws", self.websocket),
        ])  # fmt: skip

    # -- auth and admission -----------------------------------------------------------------------------------
    def authorized(self, query_token: str | None, header: str | None) -> bool:
        if not self.token:
            return True
        given = query_token or (header.removeprefix("Bearer ").strip() if header else "")
        return secrets.compare_digest(given.encode(), self.token.encode())

    def admit(self) -> str | None:
        with self._lock:
            if len(self.active) >= self.cfg.live.max_sessions:
                return None
            sid = uuid.uuid4().hex[:12]
            self.active[sid] = None
            return sid

    def release(self, sid: str) -> None:
        with self._lock:
            self.active.pop(sid, None)

    async def reference(self, image: bytes) -> torch.Tensor:
        """The session's reference portrait from its encoded bytes; ProtocolError (image_too_large, bad_image,
        no_face) when it cannot be one."""
        live, v = self.cfg.live, self.cfg.video
        if len(image) > live.max_image_bytes:
            raise ProtocolError("image_too_large", f"the reference image is {len(image)} bytes; at most "
                                                   f"{live.max_image_bytes} (live.max_image_bytes)")  # fmt: skip
        try:
            return await asyncio.to_thread(reference_from_bytes, image, v.width, v.height, self.cfg.curate.head_scale,
                                           live.max_image_pixels)  # fmt: skip
        except NoFaceError as exc:
            raise ProtocolError("no_face", str(exc)) from None
        except MediaError as exc:
            raise ProtocolError("bad_image", str(exc)) from None

    def background(self, coro) -> None:
        """Run a session's coroutine on the server's loop, keeping a reference until it ends."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- plain HTTP -------------------------------------------------------------------------------------------
    async def page(self, request: Request) -> HTMLResponse:
        return HTMLResponse((Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8"))

    async def webrtc_offer(self, request: Request) -> JSONResponse:
        from live.webrtc import offer

        raw = await request.body()
        if len(raw) > self.cfg.live.max_message_bytes:
            return JSONResponse({"type": "error", "code": "too_large", "message": f"the offer is {len(raw)} bytes; at "
                                 f"most {self.cfg.live.max_message_bytes} (live.max_message_bytes)"}, status_code=413)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return JSONResponse({"type": "error", "code": "bad_json", "message": f"the offer is not JSON ({exc})"},
                                status_code=400)  # fmt: skip
        status, answer = await offer(self, body)
        return JSONResponse(answer, status_code=status)

    async def health(self, request: Request) -> JSONResponse:
        proc = psutil.Process()
        return JSONResponse({
            "status": "ok", "sessions": len(self.active), "max_sessions": self.cfg.live.max_sessions,
            "checkpoint": self.model.label, "threads": threading.active_count(),
            "session_threads": sum(t.name.startswith("live-") for t in threading.enumerate()),
            "rss_mib": round(proc.memory_info().rss / 2**20, 1), "uptime_s": round(time.time() - self.started, 1),
            "fps": self.cfg.video.fps, "size": f"{self.cfg.video.width}x{self.cfg.video.height}",
            "token_required": bool(self.token),
        })  # fmt: skip

    async def prometheus(self, request: Request) -> PlainTextResponse:
        if not self.authorized(request.query_params.get("token"), request.headers.get("authorization")):
            return PlainTextResponse("token required\n", status_code=401)
        text = self.metrics.prometheus(len(self.active), self.cfg.live.max_sessions)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # -- sessions ---------------------------------------------------------------------------------------------
    async def websocket(self, ws: WebSocket) -> None:
        if not self.authorized(ws.query_params.get("token"), ws.headers.get("authorization")):
            self.metrics.count("sessions_rejected", "unauthorized")
            await ws.close(code=1008, reason="token required")
            return
        await ws.accept()
        sid = self.admit()
        if sid is None:
            self.metrics.count("sessions_rejected", "busy")
            await ws.send_text(json.dumps({"type": "busy", "message": f"the server is streaming its "
                                           f"{self.cfg.live.max_sessions} sessions (live.max_sessions); try again later"}))
            await ws.close(code=1013, reason="busy")
            return
        slog, handler = session_logger(resolve_path(self.cfg.live.log_dir, self.root), sid)
        slog.info("session %s from %s", sid, ws.client)
        session: LiveSession | None = None
        try:
            session = await self._run(ws, sid, slog)
        except ProtocolError as exc:
            slog.warning("ended: %s: %s", exc.code, exc)
            self.metrics.count("session_errors", exc.code)
            await _send_error(ws, exc.code, str(exc))
        except (WebSocketDisconnect, OSError) as exc:  # uvicorn's ClientDisconnected is an OSError
            slog.warning("the client went away (%s)", type(exc).__name__)
            self.metrics.count("session_errors", "disconnected")
        except Exception as exc:  # noqa: BLE001  (this session ends; the server and other sessions go on)
            slog.exception("internal error")
            self.metrics.count("session_errors", "internal")
            await _send_error(ws, "internal", f"{type(exc).__name__}: {exc}")
        finally:
            session = session or self.active.get(sid)
            if session is not None:
                await asyncio.to_thread(session.close)
            self.release(sid)
            slog.info("session closed")
            release_logger(slog, handler)
            with contextlib.suppress(Exception):
                await ws.close()

    async def _receive(self, ws: WebSocket, timeout: float, what: str) -> dict[str, Any]:
        try:
            msg = await asyncio.wait_for(ws.receive(), timeout)
        except TimeoutError:
            raise ProtocolError("timeout", f"nothing received for {timeout:g} s ({what})") from None
        if msg["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(msg.get("code", 1000))
        return msg

    async def _start(self, ws: WebSocket, sid: str, slog: logging.Logger) -> tuple[LiveSession, Outbox]:
        live = self.cfg.live
        msg = await self._receive(ws, live.start_timeout_s, "waiting for the start message")
        if msg.get("text") is None:
            raise ProtocolError("expected_start", 'the first message must be text: {"type": "start", ...}')
        fmt = AudioFormat.from_start(control(msg["text"], "start", "the first message"))
        msg = await self._receive(ws, live.start_timeout_s, "waiting for the reference image")
        if msg.get("bytes") is None:
            raise ProtocolError("expected_reference", "after start, send the reference image as a binary message "
                                                      "(kind byte 0x01, then the encoded image)")  # fmt: skip
        kind, image = unpack(msg["bytes"])
        if kind != REFERENCE:
            raise ProtocolError("expected_reference", f"after start, send the reference image (kind 0x01), got 0x{kind:02x}")
        ref = await self.reference(image)
        v = self.cfg.video
        loop = asyncio.get_running_loop()
        report_holder: list[LiveSession] = []

        def dropped(chunk: OutChunk) -> None:
            n = len(chunk.jpegs)
            report_holder[0].report.dropped_out_frames += n
            self.metrics.add("dropped_frames", n)
            slog.warning("client reads too slowly: dropped chunk %d (%d frames)", chunk.index, n)

        outbox = Outbox(loop, live.max_pending_chunks, dropped)
        gen = self.model.generator()
        session = await asyncio.to_thread(
            LiveSession, sid, gen, ref, fmt, sample_rate=self.cfg.audio.sample_rate, fps=v.fps,
            lead_chunks=live.lead_chunks, jpeg_quality=live.jpeg_quality,
            threshold_db=gen.settings.vad_threshold_db, emit=outbox.put_threadsafe, metrics=self.metrics, log=slog,
            action_chunks=max(1, round(sum(self.cfg.corpus.action_s) / 2 * v.fps / gen.chunk_video_frames)))
        report_holder.append(session)
        self.active[sid] = session
        self.metrics.add("sessions_started")
        await ws.send_text(json.dumps({
            "type": "ready", "session": sid, "fps": v.fps, "width": v.width, "height": v.height,
            "sample_rate": self.cfg.audio.sample_rate, "chunk_frames": session.frames_per_chunk,
            "samples_per_chunk": session.spc, "checkpoint": self.model.label,
        }))  # fmt: skip
        slog.info("ready: %s %d Hz x%d; student %s", fmt.format, fmt.sample_rate, fmt.channels, self.model.label)
        return session, outbox

    async def _run(self, ws: WebSocket, sid: str, slog: logging.Logger) -> LiveSession:
        session, outbox = await self._start(ws, sid, slog)
        sender = asyncio.create_task(self._send_chunks(ws, session, outbox))
        try:
            ended = False
            while not ended:
                if sender.done():  # generation failed or the client stopped reading: stop listening
                    break
                if session.pending() >= self.cfg.live.max_pending_chunks:  # backpressure: stop reading for now
                    await asyncio.sleep(0.005)
                    continue
                recv = asyncio.create_task(self._receive(ws, self.cfg.live.idle_timeout_s, "idle session"))
                done, _ = await asyncio.wait({recv, sender}, return_when=asyncio.FIRST_COMPLETED)
                if recv not in done:
                    recv.cancel()
                    with contextlib.suppress(BaseException):
                        await recv
                    break
                msg = recv.result()
                if msg.get("text") is not None:
                    body = control(msg["text"], ("end", "intent", "action"), "a text message after start")
                    if body["type"] == "end":
                        session.finish()
                        ended = True
                    elif body["type"] == "intent":
                        decision = session.intent(intent_text(body))
                        await ws.send_text(json.dumps({"type": "intent", "action": decision.action,
                                                       "speak": decision.speak, "reason": decision.reason}))  # fmt: skip
                    else:
                        try:
                            session.act(str(body.get("name")))
                        except ValueError as exc:
                            raise ProtocolError("bad_action", str(exc)) from None
                elif msg.get("bytes") is not None:
                    kind, payload = unpack(msg["bytes"])
                    if kind not in (AVATAR, USER):
                        raise ProtocolError("unexpected_reference", "the reference is sent once, right after start")
                    session.push(kind, session.fmt.decode(payload))
            await sender  # the rest of the stream, then "done"
            if session.error is not None:
                raise RuntimeError(f"generation failed: {session.error}")
        finally:
            if not sender.done():
                sender.cancel()
                with contextlib.suppress(BaseException):
                    await sender
        return session

    async def _send_chunks(self, ws: WebSocket, session: LiveSession, outbox: Outbox) -> None:
        while True:
            chunk = await outbox.get()
            if chunk is None:
                break
            latency = time.perf_counter() - chunk.ready_at
            header = {"chunk": chunk.index, "first_frame": chunk.first_frame, "frames": len(chunk.jpegs),
                      "talking": chunk.talking, "state": chunk.state, "action": chunk.action,
                      "latency_ms": round(latency * 1000, 1),
                      "audio_samples": len(chunk.avatar_pcm) // 2}  # fmt: skip
            await ws.send_bytes(pack_chunk(header, chunk.jpegs, chunk.avatar_pcm))
            self.metrics.chunk(len(chunk.jpegs), latency)
            r = session.report
            r.chunks_out += 1
            r.frames_out += len(chunk.jpegs)
            r.latencies_ms.append(latency * 1000)
        if session.error is None:
            r = session.report
            lat = sorted(r.latencies_ms)
            await ws.send_text(json.dumps({
                "type": "done", "chunks": r.chunks_out, "frames": r.frames_out,
                "dropped_frames": r.dropped_out_frames,
                "latency_ms_p50": lat[len(lat) // 2] if lat else None,
                "latency_ms_max": lat[-1] if lat else None,
            }))  # fmt: skip
            session.log.info("done: %d chunks, %d frames, %d dropped", r.chunks_out, r.frames_out, r.dropped_out_frames)


async def _send_error(ws: WebSocket, code: str, message: str) -> None:
    with contextlib.suppress(Exception):
        await ws.send_text(json.dumps({"type": "error", "code": code, "message": message}))
        await ws.close(code=1011 if code == "internal" else 1008)


def warm_up(model: Model, cfg: Config) -> float:
    """One chunk through a throwaway session (kernels, allocator) so the first client does not pay for it."""
    gen = model.generator()
    t0 = time.perf_counter()
    gen.start(torch.zeros(3, cfg.video.height, cfg.video.width))
    silence = torch.zeros(gen.samples_per_chunk)
    gen.step(silence, silence)
    return time.perf_counter() - t0


def bind_socket(cfg: Config) -> socket.socket:
    """The server's socket bound to live.host:live.port; a ConfigError naming them when the address is taken or
    cannot be bound (instead of an OSError traceback)."""
    host, port = cfg.live.host, cfg.live.port
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if cfg.live.send_buffer_bytes:  # accepted connections inherit it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, cfg.live.send_buffer_bytes)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"live.port {port}: {host}:{port} is already in use (another server?); pick another "
                              f"with --port N, or --port 0 for any free port") from None  # fmt: skip
        raise ConfigError(f"live.host {host}, live.port {port}: cannot bind ({exc.strerror or exc})") from None
    return sock


def serve(cfg: Config, root: Path, ready_file: Path | None = None) -> None:
    """Load the student, warm it up and serve until interrupted (Ctrl-C)."""
    import uvicorn

    server_token(cfg)  # refuse an open, token-less bind before loading anything
    for noisy in ("aioice", "aiortc"):  # one line per ICE candidate check otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if cfg.live.torch_threads:
        torch.set_num_threads(cfg.live.torch_threads)
    sock = bind_socket(cfg)  # a taken port is said before the model loads
    model = load_model(cfg, root)
    warm = warm_up(model, cfg)
    app = LiveServer(cfg, root, model)
    port = sock.getsockname()[1]
    url = f"http://{cfg.live.host}:{port}"
    log.info("live: student %s, warm-up %.2f s; serving %s (WebSocket %s/ws)", model.label, warm, url,
             url.replace("http", "ws", 1))  # fmt: skip
    print(f"streamavatar live: {url}  (student {model.label}; max {cfg.live.max_sessions} sessions)", flush=True)
    if ready_file is not None:
        ready_file.write_text(json.dumps({"url": url, "port": port, "pid": os.getpid()}))
    config = uvicorn.Config(app.app, ws_max_size=cfg.live.max_message_bytes, log_level="warning", ws="websockets-sansio",
                            lifespan="off")  # fmt: skip
    uvicorn.Server(config).run(sockets=[sock])
