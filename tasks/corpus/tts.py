"""Real text-to-speech, offline: espeak-ng from the library and voices inside the espeakng-loader wheel.

espeak-ng keeps hidden global state between utterances (its noise generator and voice state survive even
espeak_Terminate), so the same sentence synthesised twice in one process differs. The first utterance of a
fresh process with a fixed random seed is bit-exact, so every utterance is synthesised in its own short-lived
process (tasks/corpus/espeak_worker.py, a few tens of ms) and the corpus is reproducible to the byte.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from math import gcd
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parents[2]


class TTSError(RuntimeError):
    pass


def synth(text: str, voice: str, rate_wpm: int = 170, pitch: int = 50) -> tuple[np.ndarray, int]:
    """(float32 samples in [-1, 1], native sample rate) of one utterance, bit-exact for the same arguments."""
    cmd = [sys.executable, "-m", "tasks.corpus.espeak_worker", voice, str(int(rate_wpm)), str(int(pitch))]
    proc = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True, cwd=_ROOT, timeout=120)
    if proc.returncode != 0 or len(proc.stdout) < 4:
        err = proc.stderr.decode(errors="replace").strip()
        raise TTSError(err.splitlines()[-1] if err else f"espeak-ng worker exited with {proc.returncode}")
    (rate,) = struct.unpack("<i", proc.stdout[:4])
    samples = np.frombuffer(proc.stdout[4:], dtype="<i2").astype(np.float32) / 32768.0
    return samples, rate


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    if sr_in == sr_out:
        return x.astype(np.float32)
    from scipy.signal import resample_poly

    g = gcd(sr_in, sr_out)
    return resample_poly(x, sr_out // g, sr_in // g).astype(np.float32)


def trim_silence(x: np.ndarray, sr: int, threshold: float = 0.01, pad_s: float = 0.02) -> np.ndarray:
    """Cut leading and trailing silence so an utterance's interval is where its speech is."""
    idx = np.flatnonzero(np.abs(x) > threshold)
    if idx.size == 0:
        return x[:0]
    pad = int(pad_s * sr)
    return x[max(0, idx[0] - pad) : idx[-1] + pad + 1]


def speak(text: str, voice: str, sample_rate: int, rate_wpm: int = 170, pitch: int = 50) -> np.ndarray:
    """One utterance as float32 mono at ``sample_rate``, leading and trailing silence trimmed."""
    raw, native_rate = synth(text, voice, rate_wpm=rate_wpm, pitch=pitch)
    return trim_silence(resample(raw, native_rate, sample_rate), sample_rate)
