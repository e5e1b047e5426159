"""Voice activity of a live audio stream, per video frame, decided causally chunk by chunk.

The live talk/listen mask says, for every video frame, whether the avatar speaks (its own stream carries speech)
and whether the other person does. Two detectors, one interface:

* ``energy`` -- the frame's RMS level above ``threshold_db`` (no model; word gaps and breaths read as silence,
  and noise above the threshold reads as speech);
* ``silero`` -- Silero VAD (the model file shipped inside the ``silero-vad`` wheel, or a local path): a speech
  probability for every 512-sample window at 16 kHz (32 ms), with its recurrent state carried across chunks.

Both go through the same hysteresis and hangover: a frame turns speech when its score crosses the onset
threshold, and speech ends only after ``hangover_frames`` frames below the offset threshold -- so a pause
between words does not flip the avatar to listening for 40 ms. Everything is causal (a frame's decision uses
no sample after it), so a stream pushed in chunks of any size gets exactly the mask the whole clip gets
(tests/test_vad.py); the decision of a frame is known when its last sample arrives.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch

SILERO_WINDOW = 512  # samples per Silero decision at 16 kHz (its fixed input size)
SILERO_RATE = 16000


def silero_model(path: str | Path | None = None) -> torch.jit.ScriptModule:
    """The Silero VAD TorchScript model: ``path``, or the one inside the installed silero-vad wheel. Loading
    it does not change torch's thread count (importing ``silero_vad`` itself would set it to 1)."""
    if path:
        file = Path(path)
    else:
        from importlib.util import find_spec

        spec = find_spec("silero_vad")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("audio.vad=silero needs the silero-vad package (pip install silero-vad) "
                                    "or audio.vad_model_path")  # fmt: skip
        file = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.jit"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no Silero VAD model there (audio.vad_model_path)")
    threads = torch.get_num_threads()
    with warnings.catch_warnings():  # TorchScript's deprecation notice: the file is TorchScript, nothing to do
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(str(file), map_location="cpu").eval()
        # TorchScript optimises the graph on its first calls (~170 ms on 2 cores): do it here, at load time,
        # not on the first chunk of a stream (the first-frame delay)
        with torch.no_grad():
            for _ in range(3):
                model(torch.zeros(SILERO_WINDOW), SILERO_RATE)
        model.reset_states()
    torch.set_num_threads(threads)
    return model


class VoiceActivity:
    """One stream's voice activity, pushed chunk by chunk: ``push(samples)`` -> the 0/1 speech mask of the whole
    video frames those samples complete (samples of a partial frame wait for the rest)."""

    def __init__(self, kind: str = "silero", sample_rate: int = 16000, fps: int = 25, threshold: float = 0.5,
                 threshold_db: float = -45.0, hangover_frames: int = 5, model_path: str | None = None,
                 model: torch.jit.ScriptModule | None = None, leak_db: float = 0.0) -> None:  # fmt: skip
        if kind not in ("energy", "silero"):
            raise ValueError(f"audio.vad must be 'energy' or 'silero', got {kind!r}")
        if sample_rate % fps:
            raise ValueError(f"{sample_rate} Hz does not split into {fps} video frames per second")
        if kind == "silero" and sample_rate != SILERO_RATE:
            raise ValueError(f"Silero VAD runs at {SILERO_RATE} Hz (audio.sample_rate is {sample_rate})")
        self.kind, self.spf, self.leak_db = kind, sample_rate // fps, leak_db  # leak_db: see both_streams
        self.sample_rate = sample_rate
        # hysteresis: onset above ``on``, offset below ``off`` (Silero's own rule: 0.15 below the threshold)
        if kind == "silero":
            self.on, self.off = threshold, max(0.0, threshold - 0.15)
        else:  # the plain gate: no hysteresis (hangover_frames 0 is the old -45 dBFS gate exactly)
            self.on = self.off = threshold_db
        self.hangover = int(hangover_frames)
        # the Silero model keeps its recurrent state inside: every detector has its own copy
        self.model = None
        if kind == "silero":
            self.model = copy.deepcopy(model) if model is not None else silero_model(model_path)
        self.reset()

    def reset(self) -> None:
        if self.model is not None:
            self.model.reset_states()
        self._pending = np.zeros(0, np.float32)  # samples of the frame not yet complete
        self._window = np.zeros(0, np.float32)  # samples not yet in a Silero window
        self._prob = 0.0  # the newest Silero probability
        self._speech = False
        self._quiet = 0  # frames below the offset threshold since speech

    def _frame_score(self, frame: np.ndarray) -> float:
        if self.kind == "energy":
            return float(10.0 * np.log10(max(float(np.mean(frame.astype(np.float64) ** 2)), 1e-12)))
        buf = np.concatenate([self._window, frame])
        probs = []
        n = len(buf) // SILERO_WINDOW
        with torch.no_grad():
            for i in range(n):
                x = torch.from_numpy(np.ascontiguousarray(buf[i * SILERO_WINDOW : (i + 1) * SILERO_WINDOW]))
                probs.append(float(self.model(x, SILERO_RATE)))
        self._window = buf[n * SILERO_WINDOW :]
        if probs:  # the frame scores as its most speech-like window that ended inside it
            self._prob = max(probs)
        return self._prob

    def push(self, samples: np.ndarray | torch.Tensor) -> np.ndarray:
        """Mono samples in [-1, 1] -> uint8 mask of the video frames they complete."""
        x = samples.detach().cpu().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
        x = np.concatenate([self._pending, x.astype(np.float32).reshape(-1)])
        n = len(x) // self.spf
        out = np.zeros(n, np.uint8)
        for i in range(n):
            score = self._frame_score(x[i * self.spf : (i + 1) * self.spf])
            if score > self.on:
                self._speech, self._quiet = True, 0
            elif self._speech and score < self.off:
                self._quiet += 1
                if self._quiet > self.hangover:
                    self._speech = False
            out[i] = self._speech
        self._pending = x[n * self.spf :]
        return out


def build_vad(audio_cfg, model: torch.jit.ScriptModule | None = None, fps: int = 25) -> VoiceActivity:
    """A detector with the settings of ``audio.*`` (an AudioConfig)."""
    return VoiceActivity(audio_cfg.vad, audio_cfg.sample_rate, fps, audio_cfg.vad_threshold, audio_cfg.vad_threshold_db,
                         round(audio_cfg.vad_hangover_ms * fps / 1000), audio_cfg.vad_model_path, model,
                         audio_cfg.vad_leak_db)  # fmt: skip


def clip_mask(wave: np.ndarray | torch.Tensor, detector: VoiceActivity, num_frames: int) -> np.ndarray:
    """The mask a live stream of ``wave`` gets, for a whole clip (``num_frames`` frames, zero-padded)."""
    detector.reset()
    x = wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave, np.float32)
    x = x.reshape(-1)[: num_frames * detector.spf]
    x = np.pad(x, (0, num_frames * detector.spf - len(x)))
    return detector.push(x)


def frame_levels_db(samples: np.ndarray, spf: int) -> np.ndarray:
    """RMS level of each whole video frame of ``samples``, in dBFS."""
    n = len(samples) // spf
    x = np.asarray(samples[: n * spf], np.float64).reshape(n, spf)
    return 10.0 * np.log10(np.maximum((x**2).mean(1), 1e-12))


def both_streams(avatar_vad: VoiceActivity, other_vad: VoiceActivity, avatar: np.ndarray | torch.Tensor,
                 other: np.ndarray | torch.Tensor, leak_db: float) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """One chunk of both streams (whole video frames) -> (avatar talks, other person talks), uint8 per frame.

    Each stream has its own detector. A voice detector cannot tell whose voice it hears, so when both fire on a
    frame, a stream more than ``leak_db`` quieter than the other is taken for the other's voice leaking into
    it (a microphone that hears the avatar's loudspeaker, or the room) and does not count as speech; when both
    speak at comparable levels both count (overlapping speech). ``leak_db`` 0 turns the rule off."""
    a = avatar.detach().cpu().numpy() if isinstance(avatar, torch.Tensor) else np.asarray(avatar, np.float32)
    o = other.detach().cpu().numpy() if isinstance(other, torch.Tensor) else np.asarray(other, np.float32)
    ma, mo = avatar_vad.push(a), other_vad.push(o)
    if leak_db > 0 and len(ma) and len(ma) == len(mo):
        la, lo = frame_levels_db(a, avatar_vad.spf), frame_levels_db(o, other_vad.spf)
        both = (ma == 1) & (mo == 1)
        ma = np.where(both & (la < lo - leak_db), 0, ma).astype(np.uint8)
        mo = np.where(both & (lo < la - leak_db), 0, mo).astype(np.uint8)
    return ma, mo
