"""espeak-ng through ctypes, kept free of heavy imports: each utterance runs in a fresh process of this module.

Protocol: ``python -m tasks.corpus.espeak_worker VOICE RATE_WPM PITCH`` with UTF-8 text on stdin writes a
little-endian int32 sample rate followed by int16 mono samples to stdout; errors go to stderr, exit code 2.
"""

from __future__ import annotations

import ctypes
import struct
import sys
from pathlib import Path

_AUDIO_OUTPUT_SYNCHRONOUS = 0x02
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_PITCH = 1, 3
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
SEED = 1234


class VoiceError(RuntimeError):
    pass


def synthesize(text: str, voice: str, rate_wpm: int, pitch: int) -> tuple[int, bytes]:
    """(sample rate, int16 little-endian PCM bytes) of one utterance."""
    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
        ctypes.c_void_p, ctypes.c_void_p,
    ]
    data_path = Path(espeakng_loader.get_data_path())
    # espeak_Initialize takes the folder that holds espeak-ng-data
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, str(data_path.parent).encode(), 0)
    if rate <= 0:
        raise VoiceError(f"espeak-ng failed to initialise with data at {data_path}")
    chunks: list[bytes] = []

    def collect(wav, n, _events):  # called synchronously from espeak_Synth
        if n > 0 and wav:
            chunks.append(ctypes.string_at(wav, 2 * n))
        return 0

    callback = _CALLBACK(collect)
    lib.espeak_SetSynthCallback(callback)
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise VoiceError(f"espeak-ng has no voice {voice!r} (try e.g. 'en-us+m3' or 'en+f2')")
    lib.espeak_SetParameter(_PARAM_RATE, int(rate_wpm), 0)
    lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
    lib.espeak_ng_SetRandSeed(ctypes.c_long(SEED))
    buf = ctypes.create_string_buffer(text.encode("utf-8"))
    err = lib.espeak_Synth(buf, len(buf), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None)
    if err != 0:
        raise VoiceError(f"espeak_Synth failed with code {err} for {text!r}")
    lib.espeak_Synchronize()
    return int(rate), b"".join(chunks)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m tasks.corpus.espeak_worker VOICE RATE_WPM PITCH < text", file=sys.stderr)
        return 2
    try:
        rate, pcm = synthesize(sys.stdin.buffer.read().decode("utf-8"), argv[0], int(argv[1]), int(argv[2]))
    except VoiceError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    sys.stdout.buffer.write(struct.pack("<i", rate) + pcm)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
