"""The student is trained on the audio features it sees live: the training windows' talking/listening tokens
equal, frame for frame, what the streaming path (AudioStream, fed chunk by chunk as StreamingGenerator feeds
it, past audio only) computes for the same clip -- for the log-mel features and for a (tiny, random)
Wav2Vec2. The whole-clip extraction that training used before differs at every chunk's edge."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from model.audio import AudioStream, window_frames
from tasks.common.media import read_audio
from tasks.common.models import build_audio, build_vae
from tasks.training.data import encode_clip
from tests.test_model_audio_vae import save_tiny_wav2vec2
from tests.training_data import make_project, tiny_config


def _tokens_the_stream_feeds(audio, wave: torch.Tensor, chunk: int, history: int, per_latent: int) -> torch.Tensor:
    """talk + listen per latent frame for video frames 1.. of ``wave``, pushed chunk by chunk (the avatar's
    voice is the clip's mix, the other stream silent)."""
    spf = audio.extractor.samples_per_frame
    total = wave.shape[-1] // spf
    stream = AudioStream(audio, history)
    out = []
    for a in range(1, total - chunk + 1, chunk):
        piece = wave[..., a * spf : (a + chunk) * spf]
        talk, listen, _ = stream.push(piece, torch.zeros_like(piece))
        out.append(talk + listen)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("features", ["logmel", "wav2vec2"])
def test_training_windows_carry_the_features_the_stream_computes(tmp_path, features):
    root = make_project(tmp_path / "project", seconds=4.0)
    cfg = tiny_config(root)
    if features == "wav2vec2":
        cfg.audio.features = "wav2vec2"
        cfg.audio.wav2vec2_path = str(save_tiny_wav2vec2(tmp_path / "w2v"))
        cfg.audio.wav2vec2_layers = [-1]
    audio = build_audio(cfg)
    vae = build_vae(cfg, pretrained=False)
    manifest = pd.read_parquet(root / cfg.curate.manifest)
    row = manifest[manifest.status == "ok"].iloc[0]
    packed = encode_clip(cfg, root, row, vae, audio)
    assert len(packed["starts"]) >= 2  # windows later in the clip, with past audio before them

    spf = audio.extractor.samples_per_frame
    frames_per_latent = cfg.vae.temporal_compression
    chunk = cfg.student.chunk_frames * frames_per_latent
    wave = read_audio(root / row.video_path, cfg.audio.sample_rate)
    total = len(np.load(root / row.mask_path))
    wave_t = torch.from_numpy(np.pad(wave, (0, max(0, total * spf - len(wave))))[: total * spf])[None]
    streamed = _tokens_the_stream_feeds(audio, wave_t, chunk, cfg.audio.history_frames, frames_per_latent)

    latent_frames = packed["talk"].shape[1] - 1
    for w, s in enumerate(packed["starts"]):
        trained = (packed["talk"][w] + packed["listen"][w])[1:]  # the reference slot is silent
        live = streamed[0, s // frames_per_latent : s // frames_per_latent + latent_frames]
        assert trained.shape == live.shape
        assert (trained - live).abs().max().item() <= 1e-5, (features, w)

    # the comparison has teeth: features of the whole clip at once (the old training path) see past each
    # chunk's end, so they differ from the stream's at chunk edges
    whole = window_frames(audio.extractor(wave_t, total), audio.window)[:, 1:]
    whole = whole[:, : streamed.shape[1] * frames_per_latent].reshape(streamed.shape)
    assert (whole - streamed).abs().max().item() > 1e-3
