"""`streamavatar live-client`: drive a live session from files, as a program would, and record what comes back.

The avatar's voice (``--audio``) and the user's (``--listen-to``) are decoded to 16 kHz mono and sent in 40 ms
pieces paced at the audio rate (``pace=False`` sends as fast as the socket takes them). The frames and the
avatar's voice that come back are written to an mp4 (with both voices as its sound) and the latency of each
chunk is measured from when its last audio sample was sent to when its frames arrived.
"""

from __future__ import annotations

import asyncio
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from live.protocol import AVATAR, REFERENCE, USER, pack, unpack_chunk

PIECE_S = 0.04


class LiveClientError(RuntimeError):
    """The server refused or ended the session; the message says why (the server's code and message)."""


def _refusal(msg: dict) -> str:
    what = "the server is busy" if msg.get("type") == "busy" else f"the server ended the session ({msg.get('code')})"
    return f"{what}: {msg.get('message', '')}"


def _pcm(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).round().astype("<i2").tobytes()


async def run_session(url: str, reference: bytes, avatar: np.ndarray, user: np.ndarray | None, *, rate: int = 16000,
                      token: str = "", pace: bool = True, open_timeout: float = 30.0, read_delay_s: float = 0.0,
                      stall_s: float = 0.0, receive_buffer: int = 0) -> dict[str, Any]:  # fmt: skip
    """One session: returns {"ready", "chunks": [(header, frames RGB uint8, avatar pcm float32)], "done",
    "latencies_ms", "sent_s"}; LiveClientError when the server says busy or error. ``read_delay_s`` (after
    each chunk), ``stall_s`` (once, before reading any) and ``receive_buffer`` (SO_RCVBUF bytes) make a
    deliberately slow reader (bench --live, tests)."""
    from websockets.asyncio.client import connect

    user = np.zeros_like(avatar) if user is None else user
    n = max(avatar.size, user.size)
    avatar, user = np.pad(avatar, (0, n - avatar.size)), np.pad(user, (0, n - user.size))
    headers = {"Authorization": f"Bearer {token}"} if token else None
    extra: dict[str, Any] = {}
    if receive_buffer:
        import socket
        from urllib.parse import urlparse

        u = urlparse(url)
        sock = socket.socket(socket.AF_INET6 if ":" in (u.hostname or "") else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.connect((u.hostname, u.port or 80))
        extra["sock"] = sock
    if read_delay_s or stall_s:
        extra["max_queue"] = 1  # websockets' own buffer of received messages: keep it from hiding the slowness
    async with connect(url, additional_headers=headers, max_size=None, open_timeout=open_timeout, **extra) as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": rate, "channels": 1, "format": "s16le"}))
        await ws.send(pack(REFERENCE, reference))
        first = json.loads(await ws.recv())
        if first.get("type") != "ready":
            raise LiveClientError(_refusal(first))
        spc = first["samples_per_chunk"] * rate // first["sample_rate"]
        sent_at: dict[int, float] = {}  # chunk index -> when its last sample was sent
        t0 = time.perf_counter()

        async def send() -> None:
            step = round(PIECE_S * rate)
            for i in range(0, n, step):
                if pace:
                    await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
                await ws.send(pack(AVATAR, _pcm(avatar[i : i + step])))
                await ws.send(pack(USER, _pcm(user[i : i + step])))
                now = time.perf_counter()
                for k in range(len(sent_at), min(n, i + step) // spc):  # chunks whose last sample is now sent
                    sent_at[k] = now
            await ws.send(json.dumps({"type": "end"}))
            for k in range(math.ceil(n / spc)):
                sent_at.setdefault(k, time.perf_counter())  # the last, partial chunk: complete at "end"

        sender = asyncio.create_task(send())
        chunks, done, latencies = [], None, []
        try:
            if stall_s:
                await asyncio.sleep(stall_s)
            async for message in ws:
                if isinstance(message, str):
                    body = json.loads(message)
                    if body.get("type") == "done":
                        done = body
                        break
                    raise LiveClientError(_refusal(body))
                header, jpegs, pcm = unpack_chunk(message)
                arrived = time.perf_counter()
                if header["chunk"] in sent_at:
                    latencies.append((arrived - sent_at[header["chunk"]]) * 1000)
                frames = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1] for j in jpegs]
                chunks.append((header, frames, np.frombuffer(pcm, "<i2").astype(np.float32) / 32768))
                if read_delay_s:
                    await asyncio.sleep(read_delay_s)
        finally:
            if not sender.done():
                sender.cancel()
        await sender
    if done is None:
        raise LiveClientError("the server closed the session before it was done")
    return {"ready": first, "chunks": chunks, "done": done, "latencies_ms": latencies,
            "sent_s": time.perf_counter() - t0, "samples": n}  # fmt: skip


def record(result: dict[str, Any], user: np.ndarray | None, out: Path, rate: int) -> dict[str, Any]:
    """Write the session's frames (in order, a dropped chunk's span as its last frame repeated) with the
    avatar's returned voice mixed with the user's to ``out``; returns what was written."""
    from tasks.common.media import write_video, write_wav

    ready = result["ready"]
    fps = ready["fps"]
    spf = rate // fps
    chunks = sorted(result["chunks"], key=lambda c: c[0]["first_frame"])
    if not chunks:
        raise LiveClientError("no video came back")
    total = max(h["first_frame"] + h["frames"] for h, _, _ in chunks)
    total = min(total, math.ceil(result.get("samples", total * spf) / spf))  # the last chunk's silent padding
    frames: list[np.ndarray | None] = [None] * total
    voice = np.zeros(total * spf, np.float32)
    talking = np.zeros(total, np.int8)
    for header, fr, pcm in chunks:
        f0 = header["first_frame"]
        fr = fr[: max(0, total - f0)]
        for i, f in enumerate(fr):
            frames[f0 + i] = f
        talking[f0 : f0 + len(fr)] = header["talking"][: len(fr)]
        seg = pcm[: len(fr) * spf]
        voice[f0 * spf : f0 * spf + seg.size] = seg
    last = next(f for f in frames if f is not None)
    filled = []
    for f in frames:
        last = f if f is not None else last
        filled.append(last)
    heard = voice.copy()
    if user is not None:
        m = min(heard.size, user.size)
        heard[:m] += user[:m]
    peak = float(np.abs(heard).max()) if heard.size else 0.0
    heard = heard / peak if peak > 1 else heard
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "mix.wav"
        write_wav(wav, heard, rate)
        write_video(out, filled, fps, audio_path=wav, audio_rate=rate)
    return {"frames": total, "seconds": total / fps, "talking_frames": int(talking.sum()),
            "missing_frames": sum(f is None for f in frames), "talking": talking}  # fmt: skip


def run_client(server: str, reference: Path, audio: Path, out: Path, listen_to: Path | None = None,
               token: str = "", pace: bool = True, seconds: float | None = None) -> dict[str, Any]:  # fmt: skip
    """The whole client: read the files, stream them, record the result; returns a summary."""
    from tasks.common.media import read_audio, writable_output

    writable_output(out)  # before the session, not after it
    rate = 16000
    image = Path(reference).read_bytes()
    avatar = read_audio(audio, rate, duration=seconds)
    user = read_audio(listen_to, rate, duration=seconds) if listen_to else None
    url = server.rstrip("/")
    url = url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
    if not url.endswith("/ws"):
        url += "/ws"
    result = asyncio.run(run_session(url, image, avatar, user, rate=rate, token=token, pace=pace))
    written = record(result, user, Path(out), rate)
    lat = np.array(result["latencies_ms"]) if result["latencies_ms"] else np.array([np.nan])
    return {
        "out": str(out), "session": result["ready"]["session"], "checkpoint": result["ready"].get("checkpoint"),
        "frames": written["frames"], "seconds": written["seconds"], "talking_frames": written["talking_frames"],
        "chunks": len(result["chunks"]), "dropped_frames": result["done"]["dropped_frames"],
        "latency_ms_p50": float(np.nanpercentile(lat, 50)), "latency_ms_p95": float(np.nanpercentile(lat, 95)),
        "latency_ms_max": float(np.nanmax(lat)), "server_latency_ms_p50": result["done"]["latency_ms_p50"],
        "sent_s": result["sent_s"], "talking": written["talking"].tolist(),
    }  # fmt: skip


def format_summary(s: dict[str, Any]) -> str:
    return (f"{s['out']}: {s['frames']} frames ({s['seconds']:.2f} s) in {s['chunks']} chunks, "
            f"{s['talking_frames']} talking; dropped {s['dropped_frames']}; latency audio-in to frames-out "
            f"p50 {s['latency_ms_p50']:.0f} ms, p95 {s['latency_ms_p95']:.0f} ms, max {s['latency_ms_max']:.0f} ms "
            f"(student {s['checkpoint']}, session {s['session']})")  # fmt: skip
