"""The conversation script: who says what when, the mixed audio, and per-side speech envelopes and masks."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tasks.corpus import tts

# Short, everyday sentences: varied length, so turns vary too.
SENTENCES = [
    "Hello there, how was your weekend at the lake?",
    "It was lovely, thank you for asking.",
    "We finally finished painting the kitchen.",
    "That sounds like a lot of work.",
    "Did you see the match last night?",
    "I missed it, was it any good?",
    "The traffic this morning was terrible.",
    "I think we should try the new place downtown.",
    "Honestly, I have never been so tired in my life.",
    "Could you send me the notes from the meeting?",
    "Sure, I will do that right after lunch.",
    "My sister is visiting from Canada next month.",
    "What are you reading at the moment?",
    "A long novel about a family of sailors.",
    "The weather is supposed to turn cold tomorrow.",
    "Then we should go for a walk today.",
    "I really like how the garden looks now.",
    "Let me think about it and call you back.",
    "That is a great idea, let us do it.",
    "Wait, say that again, I did not hear you.",
    "The train was late again this evening.",
    "We could cook pasta with fresh tomatoes.",
    "Nobody told me the office was closed.",
    "I will bring the cake if you bring the coffee.",
]


@dataclass
class Turn:
    side: int  # 0 = A, 1 = B
    text: str
    start_s: float
    end_s: float


@dataclass
class Conversation:
    index: int
    voices: tuple[str, str]
    pitches: tuple[int, int]
    turns: list[Turn] = field(default_factory=list)
    side_audio: np.ndarray | None = None  # (2, samples): each side's own speech, float32
    sample_rate: int = 16000

    @property
    def mix(self) -> np.ndarray:
        """The conversation's audio as both sides hear it (what a SpeakerVid clip carries)."""
        m = self.side_audio.sum(axis=0)
        peak = float(np.abs(m).max()) or 1.0
        return (m * min(1.0, 0.95 / peak)).astype(np.float32)


def plan_conversation(index: int, cfg, rng: np.random.Generator) -> Conversation:
    """Draw voices and turns for one conversation and synthesise its speech (deterministic for the rng)."""
    sr, dur = cfg.sample_rate, cfg.duration_s
    vi = rng.choice(len(cfg.voices), size=2, replace=False)
    voices = (cfg.voices[vi[0]], cfg.voices[vi[1]])
    pitches = (int(rng.integers(35, 60)), int(rng.integers(40, 70)))
    rates = [int(rng.integers(cfg.speech_rate_wpm[0], cfg.speech_rate_wpm[1] + 1)) for _ in range(2)]
    n = int(round(dur * sr))
    audio = np.zeros((2, n), np.float32)
    conv = Conversation(index=index, voices=voices, pitches=pitches, sample_rate=sr)
    side = int(rng.integers(0, 2))
    t = float(rng.uniform(0.2, 0.8))
    order = rng.permutation(len(SENTENCES))
    k = 0
    while t < dur - 0.5:
        text = SENTENCES[order[k % len(order)]]
        k += 1
        speech = tts.speak(text, voices[side], sr, rate_wpm=rates[side], pitch=pitches[side])
        start = int(round(t * sr))
        seg = speech[: max(0, n - start)]
        audio[side, start : start + seg.size] += seg
        end_s = (start + seg.size) / sr
        conv.turns.append(Turn(side=side, text=text, start_s=start / sr, end_s=end_s))
        if rng.random() < cfg.overlap_prob:  # the partner starts before this turn ends
            t = end_s - float(rng.uniform(*cfg.overlap_s))
        else:
            t = end_s + float(rng.uniform(*cfg.pause_s))
        side = 1 - side
    conv.side_audio = audio
    return conv


def frame_envelope(audio: np.ndarray, sr: int, fps: int, num_frames: int) -> np.ndarray:
    """RMS of the audio under each video frame, (num_frames,)."""
    hop = sr / fps
    out = np.zeros(num_frames, np.float32)
    for i in range(num_frames):
        a, b = int(round(i * hop)), int(round((i + 1) * hop))
        seg = audio[a:b]
        out[i] = float(np.sqrt(np.mean(seg.astype(np.float64) ** 2))) if seg.size else 0.0
    return out


def speaking_mask(conv: Conversation, side: int, fps: int, num_frames: int) -> np.ndarray:
    """1 where a frame's centre lies inside one of the side's utterances."""
    centres = (np.arange(num_frames) + 0.5) / fps
    mask = np.zeros(num_frames, np.uint8)
    for turn in conv.turns:
        if turn.side == side:
            mask[(centres >= turn.start_s) & (centres < turn.end_s)] = 1
    return mask
