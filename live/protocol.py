"""The live WebSocket protocol (``/ws``), shared by the server and the Python client.

A session, in order (see docs/live.md for the full schema):

1. client -> text ``{"type": "start", "sample_rate": 16000, "channels": 1, "format": "s16le"}`` (any rate
   8-48 kHz, 1 or 2 interleaved channels, ``s16le`` or ``f32le``), then one binary REFERENCE message.
2. server -> text ``{"type": "ready", "session": id, "fps", "width", "height", "sample_rate",
   "chunk_frames", "samples_per_chunk"}``, or ``{"type": "error", "code", "message"}`` and the socket closes.
3. client -> binary AVATAR (the avatar's own voice) and USER (the user's microphone) messages of PCM, in any
   sizes, at the audio rate; text ``{"type": "end"}`` when done. At any time text ``{"type": "intent", "text":
   "..."}`` (what the user said: the reasoner picks the avatar's action and the server answers ``{"type":
   "intent", "action", "speak", "reason"}``) or ``{"type": "action", "name": "nod"}`` (an action directly);
   the action starts at the next chunk boundary (State-Cycling, Cache-Switching).
4. server -> binary CHUNK messages as chunks are generated; ``{"type": "done", ...}`` after "end".

Binary messages start with one kind byte. A CHUNK is: kind, a 4-byte big-endian header length, the header
(UTF-8 JSON: chunk, first_frame, frames, talking (0/1 per frame), state, action, latency_ms, audio_samples,
frame_bytes),
``frames`` JPEG pictures back to back (``frame_bytes`` gives their sizes), then the avatar's own voice for
those frames as s16le mono at ``sample_rate``. The server never echoes the user's microphone.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

REFERENCE, AVATAR, USER, CHUNK = 0x01, 0x02, 0x03, 0x10
FORMATS = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}
MIN_RATE, MAX_RATE = 8000, 48000


class ProtocolError(ValueError):
    """A message that breaks the protocol; ``code`` is the short machine-readable reason sent to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class AudioFormat:
    sample_rate: int = 16000
    channels: int = 1
    format: str = "s16le"

    @classmethod
    def from_start(cls, msg: dict) -> AudioFormat:
        """The "start" message's audio fields, checked; ProtocolError naming the field otherwise."""
        rate, channels, fmt = msg.get("sample_rate", 16000), msg.get("channels", 1), msg.get("format", "s16le")
        if not isinstance(rate, int) or isinstance(rate, bool) or not MIN_RATE <= rate <= MAX_RATE:
            raise ProtocolError("bad_sample_rate", f"start.sample_rate must be an integer in {MIN_RATE}..{MAX_RATE} Hz, "
                                                   f"got {rate!r}")  # fmt: skip
        if channels not in (1, 2) or isinstance(channels, bool):
            raise ProtocolError("bad_channels", f"start.channels must be 1 or 2 (interleaved), got {channels!r}")
        if fmt not in FORMATS:
            raise ProtocolError("bad_format", f"start.format must be one of {sorted(FORMATS)}, got {fmt!r}")
        return cls(rate, channels, fmt)

    @property
    def frame_bytes(self) -> int:
        return FORMATS[self.format].itemsize * self.channels

    def decode(self, payload: bytes) -> np.ndarray:
        """PCM bytes -> float32 mono in [-1, 1]; ProtocolError when the bytes are not whole sample frames."""
        if len(payload) % self.frame_bytes:
            raise ProtocolError("truncated_pcm", f"a PCM message of {len(payload)} bytes is not a whole number of "
                                                 f"{self.frame_bytes}-byte sample frames ({self.format}, "
                                                 f"{self.channels} channel(s))")  # fmt: skip
        x = np.frombuffer(payload, FORMATS[self.format]).astype(np.float32)
        if self.format == "s16le":
            x /= 32768.0
        elif not np.isfinite(x).all():
            raise ProtocolError("bad_pcm", "f32le PCM holds NaN or infinite samples")
        if self.channels == 2:
            x = x.reshape(-1, 2).mean(1)
        return x


class LinearResampler:
    """Streaming linear-interpolation resampler from ``src`` to ``dst`` Hz: pieces of any size in, the same
    output as resampling the concatenation (the phase and the last input sample carry over)."""

    def __init__(self, src: int, dst: int) -> None:
        self.src, self.dst = src, dst
        self._last: float | None = None  # the previous piece's last sample (position -1 of this piece)
        self._pos = 0.0  # the next output sample's position in input samples, relative to this piece

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.src == self.dst or x.size == 0:
            return x.astype(np.float32, copy=False)
        if self._last is None:
            buf, offset = x, 0
        else:
            buf, offset = np.concatenate([[self._last], x]), 1
        step = self.src / self.dst
        pos = self._pos + offset  # positions in buf
        n = max(0, int(np.floor((len(buf) - 1 - pos) / step)) + 1) if pos <= len(buf) - 1 else 0
        at = pos + step * np.arange(n)
        out = np.interp(at, np.arange(len(buf)), buf).astype(np.float32)
        self._pos = (pos + step * n) - len(buf)  # relative to the next piece (which starts after buf's end)
        self._last = float(buf[-1])
        return out


def control(text: str, expected: str | tuple[str, ...], where: str) -> dict:
    """A text message parsed as the JSON object ``{"type": one of expected, ...}``; ProtocolError (bad_json, or
    expected_start / unknown_message) naming ``where`` otherwise."""
    allowed = (expected,) if isinstance(expected, str) else expected
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError("bad_json", f"{where} is not JSON ({exc})") from None
    if not isinstance(body, dict) or body.get("type") not in allowed:
        code = "expected_start" if allowed == ("start",) else "unknown_message"
        kinds = " or ".join(f'{{"type": "{t}", ...}}' for t in allowed)
        raise ProtocolError(code, f"{where} must be {kinds}")
    return body


def intent_text(body: dict) -> str:
    """The user's message of an ``intent`` control message (a non-empty string of at most 2000 characters)."""
    text = body.get("text")
    if not isinstance(text, str) or not text.strip() or len(text) > 2000:
        raise ProtocolError("bad_intent", '{"type": "intent", "text": "..."} needs a non-empty text of at most '
                                          "2000 characters")  # fmt: skip
    return text


def pack(kind: int, payload: bytes = b"") -> bytes:
    return bytes([kind]) + payload


def unpack(message: bytes) -> tuple[int, bytes]:
    if not message:
        raise ProtocolError("empty_message", "an empty binary message (expected a kind byte first)")
    kind = message[0]
    if kind not in (REFERENCE, AVATAR, USER):
        raise ProtocolError("unknown_kind", f"unknown binary message kind 0x{kind:02x} (0x01 reference, "
                                            "0x02 avatar PCM, 0x03 user PCM)")  # fmt: skip
    return kind, bytes(message[1:])


def pack_chunk(header: dict, jpegs: list[bytes], pcm_s16: bytes) -> bytes:
    head = json.dumps({**header, "frame_bytes": [len(j) for j in jpegs]}).encode()
    return bytes([CHUNK]) + struct.pack(">I", len(head)) + head + b"".join(jpegs) + pcm_s16


def unpack_chunk(message: bytes) -> tuple[dict, list[bytes], bytes]:
    """A CHUNK message -> (header, JPEG frames, s16le PCM); ProtocolError when it is malformed."""
    if len(message) < 5 or message[0] != CHUNK:
        raise ProtocolError("bad_chunk", "not a chunk message")
    (n,) = struct.unpack(">I", message[1:5])
    if 5 + n > len(message):
        raise ProtocolError("bad_chunk", f"chunk header of {n} bytes runs past the message ({len(message)} bytes)")
    header = json.loads(message[5 : 5 + n])
    at, jpegs = 5 + n, []
    for size in header["frame_bytes"]:
        jpegs.append(message[at : at + size])
        at += size
    if at > len(message):
        raise ProtocolError("bad_chunk", "chunk frames run past the message")
    return header, jpegs, message[at:]
