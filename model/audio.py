"""Audio features at the video frame rate, the talking/listening split, and a streaming front end.

Paper 3.2: features are extracted from the ORIGINAL waveform (the conversation mix) and the per-frame
speaking mask is applied AFTER extraction: talking = features x mask, listening = features x (1 - mask).
Each video frame gets a window of +-k frames of features; the frames of one latent frame are grouped into
that latent frame's audio tokens ([B, latent_frames, tokens, dim]).

Extractors: :class:`LogMelFeatures` (no weights; the demo's honest substitute) and
:class:`Wav2Vec2Features` (transformers Wav2Vec2 from a local path; hidden states of chosen layers,
resampled from 50 Hz to the video frame rate).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def _hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int) -> torch.Tensor:
    """HTK-style triangular filters, [n_fft // 2 + 1, n_mels]."""
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mels = torch.linspace(0.0, float(_hz_to_mel(torch.tensor(sample_rate / 2.0))), n_mels + 2, dtype=torch.float64)
    edges = _mel_to_hz(mels)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    up = (freqs[:, None] - lower[None]) / (centre - lower)[None]
    down = (upper[None] - freqs[:, None]) / (upper - centre)[None]
    return torch.clamp(torch.minimum(up, down), min=0.0).float()


class LogMelFeatures(nn.Module):
    """Log-mel spectrogram, ``sub`` frames per video frame concatenated: [B, T, sub * n_mels]."""

    name = "logmel"

    def __init__(self, sample_rate: int = 16000, fps: int = 25, n_mels: int = 40, sub_frames: int = 4) -> None:
        super().__init__()
        if sample_rate % fps or (sample_rate // fps) % sub_frames:
            raise ValueError(f"{sample_rate} Hz does not split into {fps} fps x {sub_frames} sub-frames")
        self.sample_rate, self.fps, self.sub = sample_rate, fps, sub_frames
        self.samples_per_frame = sample_rate // fps
        self.hop = self.samples_per_frame // sub_frames
        self.n_fft = 1 << math.ceil(math.log2(self.hop * 2.5))
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)
        self.register_buffer("fbank", mel_filterbank(n_mels, self.n_fft, sample_rate), persistent=False)
        self.dim = n_mels * sub_frames

    def forward(self, wave: torch.Tensor, num_frames: int) -> torch.Tensor:
        wave = _fit(wave, num_frames * self.samples_per_frame)
        spec = torch.stft(wave.float(), self.n_fft, self.hop, window=self.window, center=True, return_complex=True)
        mel = spec.abs().pow(2).transpose(1, 2) @ self.fbank  # [B, frames, n_mels]
        logmel = torch.log10(mel.clamp(min=1e-10)).clamp(min=-8.0) / 4.0 + 1.0
        logmel = logmel[:, : num_frames * self.sub]
        return logmel.reshape(wave.shape[0], num_frames, -1)


class Wav2Vec2Features(nn.Module):
    """Hidden states of ``layers`` of a local Wav2Vec2 checkpoint, linearly resampled to the video rate."""

    name = "wav2vec2"

    def __init__(self, model: nn.Module, layers: list[int], fps: int = 25, normalize: bool = True) -> None:
        super().__init__()
        self.model = model.eval()
        n_hidden = model.config.num_hidden_layers + 1  # embeddings + each layer
        bad = [i for i in layers if not -n_hidden <= i < n_hidden]
        if bad:
            raise ValueError(f"audio.wav2vec2_layers {bad} out of range for a model with {n_hidden} hidden states")
        self.layers, self.fps, self.normalize = list(layers), fps, normalize
        self.sample_rate = 16000
        self.samples_per_frame = self.sample_rate // fps
        self.dim = len(layers) * model.config.hidden_size

    @classmethod
    def from_pretrained(cls, path: str | Path, layers: list[int], fps: int = 25) -> Wav2Vec2Features:
        from transformers import Wav2Vec2Model

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no Wav2Vec2 checkpoint at {path} (audio.wav2vec2_path)")
        normalize = True
        prep = path / "preprocessor_config.json"
        if prep.is_file():
            normalize = bool(json.loads(prep.read_text()).get("do_normalize", True))
        return cls(Wav2Vec2Model.from_pretrained(str(path)), layers, fps, normalize)

    def forward(self, wave: torch.Tensor, num_frames: int) -> torch.Tensor:
        wave = (wave[None] if wave.ndim == 1 else wave)[..., : num_frames * self.samples_per_frame].float()
        if self.normalize:  # what Wav2Vec2FeatureExtractor does: the real samples, biased variance
            wave = (wave - wave.mean(-1, keepdim=True)) / torch.sqrt(wave.var(-1, keepdim=True, correction=0) + 1e-7)
        wave = _fit(wave, num_frames * self.samples_per_frame)
        out = self.model(wave.to(next(self.model.parameters()).dtype), output_hidden_states=True)
        hidden = torch.cat([out.hidden_states[i] for i in self.layers], dim=-1)  # [B, ~50 Hz, dim]
        hidden = F.interpolate(hidden.transpose(1, 2).float(), size=num_frames, mode="linear", align_corners=True)
        return hidden.transpose(1, 2)


def _fit(wave: torch.Tensor, length: int) -> torch.Tensor:
    if wave.ndim == 1:
        wave = wave[None]
    if wave.shape[-1] >= length:
        return wave[..., :length]
    return F.pad(wave, (0, length - wave.shape[-1]))


# -- windows, masks, grouping -----------------------------------------------------------------------------


def window_frames(features: torch.Tensor, k: int) -> torch.Tensor:
    """[B, T, D] -> [B, T, 2k + 1, D]: each frame with k frames either side (edges repeated)."""
    if k == 0:
        return features[:, :, None]
    t = features.shape[1]
    idx = (torch.arange(t, device=features.device)[:, None] + torch.arange(-k, k + 1, device=features.device)).clamp(0, t - 1)
    return features[:, idx]


def split_talk_listen(features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """features [B, T, ...], mask [B, T] in {0, 1} (1 = the avatar speaks) -> (talking, listening)."""
    m = mask.to(features.dtype).reshape(*mask.shape, *([1] * (features.ndim - 2)))
    return features * m, features * (1 - m)


def group_latent(tokens: torch.Tensor, frames_per_latent: int) -> torch.Tensor:
    """[B, T, K, D] per video frame -> [B, T / n, n * K, D] per latent frame (T a multiple of n)."""
    b, t, k, d = tokens.shape
    if t % frames_per_latent:
        raise ValueError(f"{t} video frames do not fill whole latent frames of {frames_per_latent}")
    return tokens.reshape(b, t // frames_per_latent, frames_per_latent * k, d)


def with_reference_slot(audio: torch.Tensor) -> torch.Tensor:
    """Prepend the reference frame's (silent) audio tokens: [B, F, A, D] -> [B, 1 + F, A, D]."""
    return torch.cat([torch.zeros_like(audio[:, :1]), audio], dim=1)


def frame_rms_db(wave: torch.Tensor, samples_per_frame: int, num_frames: int) -> torch.Tensor:
    """RMS level of each video frame in dBFS, [B, T]."""
    w = _fit(wave, num_frames * samples_per_frame).float().reshape(-1, num_frames, samples_per_frame)
    return 10.0 * torch.log10(w.pow(2).mean(-1).clamp(min=1e-12))


def speaking_mask(
    avatar: torch.Tensor,
    interlocutor: torch.Tensor | None,
    samples_per_frame: int,
    num_frames: int,
    threshold_db: float = -45.0,
) -> torch.Tensor:
    """Live mask from two streams: 1 where the avatar's own stream has speech (an energy gate), else 0.

    When both speak the avatar counts as speaking; when neither does, it listens (idle). The
    interlocutor stream only matters through the mix that the features are taken from.
    """
    del interlocutor  # the avatar's stream alone decides who is talking
    return (frame_rms_db(avatar, samples_per_frame, num_frames) > threshold_db).float()


class AudioConditioner(nn.Module):
    """Waveform + mask -> (talking, listening) tokens per latent frame, the DiT's audio inputs."""

    def __init__(self, extractor: nn.Module, window: int, frames_per_latent: int) -> None:
        super().__init__()
        self.extractor, self.window, self.frames_per_latent = extractor, window, frames_per_latent

    @property
    def token_dim(self) -> int:
        return self.extractor.dim

    @property
    def tokens_per_latent(self) -> int:
        return self.frames_per_latent * (2 * self.window + 1)

    def features(self, wave: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Windowed per-video-frame features [B, T, 2k + 1, D] of the (unmasked) waveform."""
        return window_frames(self.extractor(wave, num_frames), self.window)

    def forward(self, wave: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wave [B, samples] of T video frames, mask [B, T] -> talk, listen, each [B, T / n, n(2k+1), D]."""
        talk, listen = split_talk_listen(self.features(wave, mask.shape[1]), mask)
        return group_latent(talk, self.frames_per_latent), group_latent(listen, self.frames_per_latent)


class AudioStream:
    """Feeds live audio chunk by chunk: keeps ``history_frames`` of past samples so that the extractor sees
    context, and returns the features of the newest frames only (frames after the chunk are unknown, so
    the right edge of the +-k window repeats the last frame, as at the end of a clip)."""

    def __init__(self, conditioner: AudioConditioner, history_frames: int, vad=None, batch: int | None = None) -> None:
        """``vad``: a callable that makes one model.vad.VoiceActivity (a detector per stream and batch item;
        made here when ``batch`` is given, else at the first push); None: the plain energy gate of
        :func:`speaking_mask` on the avatar's stream."""
        self.cond = conditioner
        self.history_frames = history_frames
        self.spf = conditioner.extractor.samples_per_frame
        self._avatar: torch.Tensor | None = None
        self._other: torch.Tensor | None = None
        self._vad = vad
        self._detectors: list[tuple] | None = None
        if vad is not None and batch:
            self._detectors = [(vad(), vad()) for _ in range(batch)]
        self.partner_mask: torch.Tensor | None = None  # the other person's voice activity in the last push

    def features(self, avatar: torch.Tensor, interlocutor: torch.Tensor) -> torch.Tensor:
        """Append n frames of both streams; the windowed features [B, n, 2k + 1, D] of those frames, computed
        from the mix of the kept history and the new frames only: no audio after the newest frame (the +-k
        window repeats it at the right edge). Training computes its features with this same function
        (:func:`streamed_features`), so the student is trained on what it sees live."""
        n = avatar.shape[-1] // self.spf
        if avatar.shape != interlocutor.shape or n * self.spf != avatar.shape[-1]:
            raise ValueError(f"give both streams the same whole number of video frames ({self.spf} samples each)")
        keep = self.history_frames * self.spf
        self._avatar = avatar if self._avatar is None else torch.cat([self._avatar, avatar], -1)[..., -keep - avatar.shape[-1]:]
        self._other = interlocutor if self._other is None else torch.cat([self._other, interlocutor], -1)[..., -keep - avatar.shape[-1]:]
        total = self._avatar.shape[-1] // self.spf
        mix = (self._avatar + self._other).clamp(-1.0, 1.0)
        return self.cond.features(mix, total)[:, -n:]

    def push(
        self, avatar: torch.Tensor, interlocutor: torch.Tensor, threshold_db: float = -45.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """avatar/interlocutor [B, n * samples_per_frame] -> (talk, listen, mask) for those n frames."""
        n = avatar.shape[-1] // self.spf
        if avatar.shape != interlocutor.shape or n * self.spf != avatar.shape[-1]:
            raise ValueError(f"give both streams the same whole number of video frames ({self.spf} samples each)")
        feats = self.features(avatar, interlocutor)
        if self._vad is None:
            mask = speaking_mask(avatar, interlocutor, self.spf, n, threshold_db)
            self.partner_mask = speaking_mask(interlocutor, None, self.spf, n, threshold_db)
        else:  # a voice detector on BOTH streams, its state carried from chunk to chunk
            if self._detectors is None:
                self._detectors = [(self._vad(), self._vad()) for _ in range(avatar.shape[0])]
            from model.vad import both_streams

            pairs = [both_streams(d[0], d[1], a, o, d[0].leak_db)
                     for d, a, o in zip(self._detectors, avatar.cpu(), interlocutor.cpu(), strict=True)]  # fmt: skip
            mask = torch.stack([torch.from_numpy(m.astype("float32")) for m, _ in pairs])
            self.partner_mask = torch.stack([torch.from_numpy(m.astype("float32")) for _, m in pairs])
            mask = mask.to(feats.device)
        talk, listen = split_talk_listen(feats, mask)
        f = self.cond.frames_per_latent
        return group_latent(talk, f), group_latent(listen, f), mask


def streamed_features(cond: AudioConditioner, wave: torch.Tensor, chunk_frames: int, history_frames: int) -> torch.Tensor:
    """The windowed features [B, T, 2k + 1, D] that a live stream computes for a clip's audio ``wave``
    [B, T * samples_per_frame] (the conversation's mix): frame 0 is the reference (its features are those of
    silence, as the stream's reference slot), frames 1.. are pushed chunk by chunk of ``chunk_frames`` video
    frames through an :class:`AudioStream`, as StreamingGenerator does. Training windows start on this chunk
    grid, so every training feature equals the streamed one (tests/test_model_audio_vae.py)."""
    spf = cond.extractor.samples_per_frame
    total = wave.shape[-1] // spf
    stream = AudioStream(cond, history_frames)
    out = [torch.zeros_like(cond.features(wave[..., :spf], 1))]  # the reference frame: silent
    silence = torch.zeros_like(wave[..., : chunk_frames * spf])
    for a in range(1, total, chunk_frames):
        b = min(a + chunk_frames, total)
        out.append(stream.features(wave[..., a * spf : b * spf], silence[..., : (b - a) * spf]))
    return torch.cat(out, dim=1)
