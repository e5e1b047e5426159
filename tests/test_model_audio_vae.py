"""model/vae.py, model/audio.py, model/sampling.py and their builders in tasks/common/models.py.

CPU, fp32, tiny random models: every test checks numbers or behaviour that a broken implementation would change.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import AutoencoderKLWan

from model.audio import (
    AudioConditioner,
    AudioStream,
    LogMelFeatures,
    Wav2Vec2Features,
    frame_rms_db,
    group_latent,
    speaking_mask,
    split_talk_listen,
    window_frames,
    with_reference_slot,
)
from model.sampling import (
    ancestral_sample_sigmas,
    euler_sample,
    euler_sample_sigmas,
    few_step_sample,
    student_sigmas,
    teacher_sigmas,
)
from model.vae import VideoVAE, build_wan_vae
from tasks.common.models import build_audio, build_vae
from tasks.config import ConfigError, load_config

SR, FPS = 16000, 25
SPF = SR // FPS  # 640 samples per video frame
SILENCE_FEATURE = -1.0  # LogMelFeatures of digital silence: log10 floor -8, /4 + 1


# ------------------------------------------------------------------------------------------------ helpers
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def noise_wave(frames: int, amp: float = 0.3, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return amp * torch.randn(batch, frames * SPF, generator=gen(seed))


def silence(frames: int, batch: int = 1) -> torch.Tensor:
    return torch.zeros(batch, frames * SPF)


def sine_wave(frames: int, hz: float, amp: float = 0.5) -> torch.Tensor:
    t = torch.arange(frames * SPF, dtype=torch.float64) / SR
    return (amp * torch.sin(2 * math.pi * hz * t)).float()[None]


def upsample_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] per video frame -> [B, T * SPF] per sample."""
    return mask.repeat_interleave(SPF, dim=-1)


def conditioner(window: int = 2, frames_per_latent: int = 4) -> AudioConditioner:
    return AudioConditioner(LogMelFeatures(), window, frames_per_latent)


def frame_tokens(tokens: torch.Tensor, frames_per_latent: int, window: int) -> torch.Tensor:
    """[B, L, n(2k+1), D] per latent frame -> [B, L * n, 2k+1, D] per video frame (inverse of group_latent)."""
    b, latents, _, d = tokens.shape
    return tokens.reshape(b, latents * frames_per_latent, 2 * window + 1, d)


def save_tiny_wav2vec2(folder, hidden: int = 32, layers: int = 2, preprocessor: dict | None = None):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16,) * 7,
        # "layer" (not the default "group") norm: GroupNorm over time after the first conv would cancel a DC
        # offset by itself and hide whether the input is normalised
        feat_extract_norm="layer",
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )  # default conv_kernel / conv_stride: 7 conv layers, 320x -> ~50 Hz at 16 kHz
    Wav2Vec2Model(config).save_pretrained(str(folder))
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


@pytest.fixture(scope="module")
def tiny_vae() -> VideoVAE:
    torch.manual_seed(0)
    return VideoVAE(build_wan_vae("wan-tiny", z_dim=16, base_dim=16)).eval()


@pytest.fixture(scope="module")
def stats_vae() -> VideoVAE:
    """A VAE whose latent statistics are not the identity, so that normalisation bugs show."""
    torch.manual_seed(1)
    vae = AutoencoderKLWan(
        base_dim=16, z_dim=4, num_res_blocks=1,
        latents_mean=[0.5, -1.0, 2.0, 0.0], latents_std=[2.0, 1.0, 0.5, 1.0],
    )  # fmt: skip
    return VideoVAE(vae).eval()


@pytest.fixture(scope="module")
def w2v_path(tmp_path_factory):
    return save_tiny_wav2vec2(tmp_path_factory.mktemp("w2v"))


def stream_decode(vae: VideoVAE, latents: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    dec = vae.stream_decoder()
    outs = [dec.decode(latents[:, :, :1])]
    for start in range(1, latents.shape[2], chunk):
        outs.append(dec.decode(latents[:, :, start : start + chunk]))
    assert dec.frames_decoded == sum(o.shape[2] for o in outs)
    return outs


# ------------------------------------------------------------------------------------------------ VAE
def test_streaming_decode_equals_full_decode(tiny_vae):
    latents = torch.randn(1, 16, 1 + 3 * 3, 4, 4, generator=gen(0))
    with torch.no_grad():
        full = tiny_vae.decode(latents)
    outs = stream_decode(tiny_vae, latents, chunk=3)
    assert [o.shape[2] for o in outs] == [1, 12, 12, 12]
    streamed = torch.cat(outs, dim=2)
    assert full.shape == streamed.shape == (1, 3, 1 + 4 * 9, 32, 32)
    assert (streamed - full).abs().max().item() <= 1e-4
    assert full.abs().mean() > 0.05  # a real signal, not a collapsed all-zero decode

    # the causal cache matters: chunk 2 decoded right after frame 0 (chunk 1 skipped) is different
    dec = tiny_vae.stream_decoder()
    dec.decode(latents[:, :, :1])
    skipped = dec.decode(latents[:, :, 4:7])
    assert skipped.shape == full[:, :, 13:25].shape
    assert (skipped - full[:, :, 13:25]).abs().max().item() > 1e-2
    # and a fresh decoder treats its first latent frame as the single-image frame 0
    assert tiny_vae.stream_decoder().decode(latents[:, :, 4:7]).shape[2] == 1 + 4 * 2


def test_encode_reference_shape_and_normalised_encode(tiny_vae, stats_vae):
    image = torch.rand(2, 3, 32, 32, generator=gen(1)) * 2 - 1
    with torch.no_grad():
        ref = tiny_vae.encode_reference(image)
        assert ref.shape == (2, 16, 1, 32 // 8, 32 // 8)
        assert tiny_vae.latent_size(32, 48) == (4, 6)
        with pytest.raises(ValueError, match="multiple"):
            tiny_vae.latent_size(30, 32)

        video = torch.rand(1, 3, 5, 32, 32, generator=gen(2)) * 2 - 1
        raw = stats_vae.vae.encode(video).latent_dist.mode()
        mean = torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, -1, 1, 1, 1)
        std = torch.tensor([2.0, 1.0, 0.5, 1.0]).view(1, -1, 1, 1, 1)
        enc = stats_vae.encode(video)
    assert enc.shape == (1, 4, 2, 4, 4)
    torch.testing.assert_close(enc, (raw - mean) / std, atol=1e-6, rtol=0)


def test_decode_un_normalises_latents(stats_vae):
    latents = torch.randn(1, 4, 3, 4, 4, generator=gen(3))
    mean = torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, -1, 1, 1, 1)
    std = torch.tensor([2.0, 1.0, 0.5, 1.0]).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        ours = stats_vae.decode(latents)
        expected = stats_vae.vae.decode(latents * std + mean).sample
        raw = stats_vae.vae.decode(latents).sample
    assert ours.shape == (1, 3, 1 + 4 * 2, 32, 32)
    assert (ours - expected).abs().max().item() <= 1e-6
    assert (ours - raw).abs().max().item() > 1e-3  # the statistics really change the decode
    # the streaming decoder un-normalises the same way
    streamed = torch.cat(stream_decode(stats_vae, latents, chunk=1), dim=2)
    assert (streamed - ours).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------------------------ audio: mask
def test_split_talk_listen_is_features_times_mask():
    features = torch.randn(2, 20, 5, 8, generator=gen(4))
    mask = (torch.rand(2, 20, generator=gen(5)) > 0.5).float()
    assert 0 < mask.sum() < mask.numel()
    talk, listen = split_talk_listen(features, mask)
    assert torch.equal(talk, features * mask[:, :, None, None])
    on, off = mask.bool(), ~mask.bool()
    assert torch.all(listen[on] == 0) and torch.all(talk[off] == 0)
    assert torch.equal(listen[off], features[off])
    torch.testing.assert_close(talk + listen, features, atol=0, rtol=0)


def test_conditioner_tokens_and_silenced_latent_frames():
    cond = conditioner(window=2, frames_per_latent=4)
    wave = noise_wave(20, batch=2, seed=6)
    mask = torch.tensor(
        [[1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1], [1] * 20], dtype=torch.float32
    )
    talk, listen = cond(wave, mask)
    dim = cond.extractor.dim
    assert dim == cond.token_dim == 40 * 4
    assert cond.tokens_per_latent == 4 * 5
    assert talk.shape == listen.shape == (2, 5, 4 * 5, dim)

    # latent frames 1 and 3 of sample 0 have all four video frames silent -> exactly zero talk tokens
    assert torch.all(talk[0, 1] == 0) and torch.all(talk[0, 3] == 0)
    assert torch.all(listen[0, 0] == 0) and torch.all(listen[0, 4] == 0)
    assert talk[0, 0].abs().sum() > 0 and listen[0, 1].abs().sum() > 0
    # the mixed latent frame 2: the mask is applied per video frame inside the latent frame's tokens
    per_frame_talk = frame_tokens(talk, 4, 2)[0, 8:12]
    per_frame_listen = frame_tokens(listen, 4, 2)[0, 8:12]
    for j, m in enumerate([1, 0, 1, 0]):
        assert (per_frame_talk[j].abs().sum() > 0) == bool(m)
        assert (per_frame_listen[j].abs().sum() > 0) == (not m)
    # sample 1 speaks throughout: talk carries the full features, listen nothing
    full = group_latent(cond.features(wave, 20), 4)
    assert torch.equal(talk[1], full[1]) and torch.all(listen[1] == 0)


def test_mask_is_applied_after_feature_extraction_not_to_the_waveform():
    cond = conditioner(window=2, frames_per_latent=4)
    wave = noise_wave(20, seed=7)
    mask = torch.tensor([[1.0] * 10 + [0.0] * 10])
    post = cond.extractor(wave, 20) * mask[:, :, None]
    pre = cond.extractor(wave * upsample_mask(mask), 20)
    assert not torch.allclose(pre, post)
    # pre-masking would also cut the STFT context of the last talking frame (frame 9)
    assert not torch.allclose(pre[:, 9], post[:, 9])
    torch.testing.assert_close(pre[:, :9], post[:, :9])
    # pre-masked silence is the log floor, not zero, and carries none of the audio
    assert torch.all(pre[:, 11:] == SILENCE_FEATURE)

    # the conditioner follows the paper: window of the unmasked features, then x mask / x (1 - mask)
    talk, listen = cond(wave, mask)
    windowed = window_frames(cond.extractor(wave, 20), 2)
    assert torch.equal(talk, group_latent(windowed * mask[:, :, None, None], 4))
    assert torch.equal(listen, group_latent(windowed * (1 - mask)[:, :, None, None], 4))
    pre_talk = group_latent(window_frames(pre, 2) * mask[:, :, None, None], 4)
    assert not torch.allclose(talk, pre_talk)
    # the listening stream holds the (varying) audio of the silent-avatar frames
    assert listen[0, 3].std() > 0.01


# ------------------------------------------------------------------------------------------------ audio: log-mel
def test_logmel_shape_energy_and_padding():
    ext = LogMelFeatures()
    assert (ext.samples_per_frame, ext.hop, ext.sub) == (640, 160, 4)
    feats = ext(torch.cat([silence(20, batch=1), noise_wave(20, seed=8)]), 20)
    assert feats.shape == (2, 20, 40 * 4)
    assert torch.all(feats[0] == SILENCE_FEATURE)

    wave = torch.cat([silence(10), sine_wave(10, 1000.0)], dim=-1)
    feats = ext(wave, 20)
    assert feats.shape == (1, 20, 160)
    loud, quiet = feats[0, 10:].mean(), feats[0, :10].mean()
    assert loud > quiet + 0.15, (loud, quiet)
    per_frame = feats[0].mean(-1)  # (frames 9 and 10 see the onset's spectral splatter)
    assert per_frame[11:19].min() > per_frame[:9].max() + 0.1
    assert torch.all(feats[0, :9] == SILENCE_FEATURE)
    # layout [T, sub * n_mels]: in every sub-frame of a sine frame, the loudest mel band is the one at 1 kHz,
    # at about log10(|0.5 * sum(hann)/2|^2) / 4 + 1 ~ 1.9
    per_sub = feats[0, 15].reshape(4, 40)
    band_1k = int(ext.fbank[round(1000 / (SR / ext.n_fft))].argmax())
    assert per_sub.argmax(dim=-1).tolist() == [band_1k] * 4
    assert torch.all(per_sub.max(dim=-1).values > 1.5)

    # short input: zero-padded to T frames; long input: truncated
    short = noise_wave(5, seed=9)
    padded = torch.cat([short, silence(3)], dim=-1)
    out = ext(short, 8)
    assert out.shape == (1, 8, 160)
    assert torch.equal(out, ext(padded, 8))
    assert torch.all(out[0, 6:] == SILENCE_FEATURE) and torch.all(out[0, :5] > SILENCE_FEATURE)
    assert torch.equal(ext(noise_wave(12, seed=9), 5), ext(noise_wave(12, seed=9)[:, : 5 * SPF], 5))
    assert ext(short[0], 5).shape == (1, 5, 160)  # 1-D waves get a batch axis

    with pytest.raises(ValueError, match="does not split"):
        LogMelFeatures(fps=24)


# ------------------------------------------------------------------------------------------------ audio: windows
def test_window_frames_group_latent_and_reference_slot():
    feats = torch.arange(5.0).view(1, 5, 1)
    win = window_frames(feats, 1)
    assert win.shape == (1, 5, 3, 1)
    assert win[0, :, :, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]]
    assert window_frames(feats, 2)[0, 0, :, 0].tolist() == [0, 0, 0, 1, 2]
    zero = window_frames(torch.randn(2, 5, 3, generator=gen(10)), 0)
    assert zero.shape == (2, 5, 1, 3)

    tokens = torch.arange(8.0).view(1, 8, 1, 1).expand(1, 8, 3, 2)  # value = video frame index
    grouped = group_latent(tokens, 4)
    assert grouped.shape == (1, 2, 12, 2)
    assert grouped[0, 0, :, 0].tolist() == [0.0] * 3 + [1.0] * 3 + [2.0] * 3 + [3.0] * 3
    assert torch.all(grouped[0, 1] >= 4)
    with pytest.raises(ValueError, match="whole latent frames"):
        group_latent(torch.zeros(1, 7, 3, 2), 4)

    audio = torch.randn(2, 3, 12, 4, generator=gen(11))
    slotted = with_reference_slot(audio)
    assert slotted.shape == (2, 4, 12, 4)
    assert torch.all(slotted[:, 0] == 0) and torch.equal(slotted[:, 1:], audio)


# ------------------------------------------------------------------------------------------------ audio: wav2vec2
def test_wav2vec2_features_from_a_local_checkpoint(w2v_path):
    from transformers import Wav2Vec2Model

    ext = Wav2Vec2Features.from_pretrained(w2v_path, layers=[-2, -1])
    assert ext.dim == 2 * 32 and ext.normalize is True and not ext.model.training
    wave = noise_wave(6, batch=2, seed=12)
    with torch.no_grad():
        feats = ext(wave, 6)
        assert feats.shape == (2, 6, 64)
        # endpoints of the 50 Hz -> 25 fps resampling are the model's own first/last hidden states
        model = Wav2Vec2Model.from_pretrained(str(w2v_path)).eval()
        norm = (wave - wave.mean(-1, keepdim=True)) / torch.sqrt(wave.var(-1, keepdim=True) + 1e-7)
        hidden = model(norm, output_hidden_states=True).hidden_states
        assert len(hidden) == 3 and hidden[-1].shape[1] == 2 * 6 - 1  # ~50 Hz
        torch.testing.assert_close(feats[:, 0, :32], hidden[-2][:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(feats[:, -1, 32:], hidden[-1][:, -1], atol=1e-5, rtol=1e-5)
        # per-utterance normalisation makes the features independent of the input gain and DC offset
        torch.testing.assert_close(ext(3.0 * wave + 0.5, 6), feats, atol=1e-4, rtol=1e-4)
        assert ext(wave, 10).shape == (2, 10, 64)  # short input is padded to the frame count
        assert Wav2Vec2Features(ext.model, [-3]).dim == 32  # embeddings output: the lowest valid index

    with pytest.raises(ValueError, match="wav2vec2_layers"):
        Wav2Vec2Features.from_pretrained(w2v_path, layers=[-1, 3])
    with pytest.raises(ValueError, match="wav2vec2_layers"):
        Wav2Vec2Features(ext.model, [-4])
    missing = w2v_path.parent / "no-such-w2v"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        Wav2Vec2Features.from_pretrained(missing, layers=[-1])


def test_wav2vec2_preprocessor_config_turns_normalisation_off(tmp_path):
    path = save_tiny_wav2vec2(tmp_path / "w2v", preprocessor={"do_normalize": False})
    ext = Wav2Vec2Features.from_pretrained(path, layers=[-1])
    assert ext.normalize is False
    wave = noise_wave(4, seed=13)
    with torch.no_grad():
        assert (ext(3.0 * wave + 0.5, 4) - ext(wave, 4)).abs().max() > 0.1


# ------------------------------------------------------------------------------------------------ audio: live mask
def test_speaking_mask_and_frame_rms_db():
    avatar = torch.cat([noise_wave(10, amp=0.3, seed=14), silence(10)], dim=-1)
    other = noise_wave(20, amp=0.3, seed=15)  # the interlocutor talking does not make the avatar talk
    mask = speaking_mask(avatar, other, SPF, 20)
    assert mask.tolist() == [[1.0] * 10 + [0.0] * 10]
    assert speaking_mask(silence(20), other, SPF, 20).sum() == 0

    db = frame_rms_db(avatar, SPF, 20)
    assert db.shape == (1, 20)
    assert torch.all(db[0, 10:] < -100)
    assert torch.all((db[0, :10] > -13) & (db[0, :10] < -8))  # 0.3 RMS = -10.5 dBFS
    torch.testing.assert_close(frame_rms_db(torch.full((1, 2 * SPF), 0.1), SPF, 2), torch.full((1, 2), -20.0))
    # the threshold decides: 0.003 RMS (-50.5 dB) is under the -45 dB gate, over a -60 dB one
    quiet = noise_wave(4, amp=0.003, seed=16)
    assert speaking_mask(quiet, None, SPF, 4).sum() == 0
    assert speaking_mask(quiet, None, SPF, 4, threshold_db=-60.0).sum() == 4


# ------------------------------------------------------------------------------------------------ audio: stream
def test_audio_stream_chunks_match_offline_features():
    cond = conditioner(window=2, frames_per_latent=4)
    stream = AudioStream(cond, history_frames=50)
    # 0.1 RMS (-20 dB): the mix never reaches the +-1 clip, so it is the plain sum
    a1, o1 = noise_wave(12, amp=0.1, seed=17), silence(12)  # the avatar talks
    a2, o2 = silence(12), noise_wave(12, amp=0.1, seed=18)  # only the interlocutor talks
    talk1, listen1, mask1 = stream.push(a1, o1)
    talk2, listen2, mask2 = stream.push(a2, o2)
    dim = cond.extractor.dim
    for t in (talk1, listen1, talk2, listen2):
        assert t.shape == (1, 3, 20, dim)
    assert mask1.shape == mask2.shape == (1, 12)
    assert mask1.tolist() == [[1.0] * 12] and mask2.tolist() == [[0.0] * 12]
    assert talk1.abs().sum() > 0 and torch.all(listen1 == 0)
    assert torch.all(talk2 == 0) and listen2.abs().sum() > 0

    # with enough history, the second chunk (which ends where the conversation ends) equals one offline pass
    # over the whole mix; in the first chunk only the frames whose +-2 window and STFT context stay inside
    # the chunk do (the future is unknown while streaming, so the right edge is repeated)
    mix = torch.cat([a1 + o1, a2 + o2], dim=-1)
    talk, listen = cond(mix, torch.cat([mask1, mask2], dim=1))
    torch.testing.assert_close(talk2, talk[:, 3:], atol=1e-5, rtol=0)
    torch.testing.assert_close(listen2, listen[:, 3:], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        frame_tokens(talk1, 4, 2)[:, :9], frame_tokens(talk, 4, 2)[:, :9], atol=1e-5, rtol=0
    )
    assert not torch.allclose(frame_tokens(talk1, 4, 2)[:, 11], frame_tokens(talk, 4, 2)[:, 11], atol=1e-3)

    # without history the second chunk's first frames lose their left context
    blind = AudioStream(cond, history_frames=0)
    blind.push(a1, o1)
    _, listen_blind, _ = blind.push(a2, o2)
    assert not torch.allclose(listen_blind[:, 0], listen2[:, 0], atol=1e-3)

    with pytest.raises(ValueError, match="whole number"):
        stream.push(noise_wave(2)[:, :-1], silence(2)[:, :-1])
    with pytest.raises(ValueError, match="same"):
        stream.push(noise_wave(2), silence(3))


# ------------------------------------------------------------------------------------------------ builders
def test_build_audio_and_vae_from_config(tmp_path, w2v_path):
    cfg = load_config(root=tmp_path, use_params=False)
    cond = build_audio(cfg)
    assert isinstance(cond.extractor, LogMelFeatures)
    assert (cond.window, cond.frames_per_latent, cond.token_dim) == (2, 4, 40 * 4)

    with pytest.raises(ConfigError, match="wav2vec2_path"):
        build_audio(load_config(root=tmp_path, use_params=False, sets=["audio.features=wav2vec2"]))
    sets = ["audio.features=wav2vec2", f"audio.wav2vec2_path={w2v_path}", "audio.wav2vec2_layers=[-2, -1]"]
    cond = build_audio(load_config(root=tmp_path, use_params=False, sets=sets))
    assert isinstance(cond.extractor, Wav2Vec2Features) and cond.token_dim == 64

    vae = build_vae(cfg, pretrained=False)  # the demo's causal autoencoder
    assert vae.causal_ae and (vae.z_dim, vae.temporal, vae.spatial) == (16, 4, 4)
    with pytest.raises(ValueError, match="spatial_compression is 16"):
        load_config(root=tmp_path, use_params=False, sets=["vae.spatial_compression=16"])
    with pytest.raises(ConfigError, match="run `streamavatar vae` first"):
        build_vae(cfg, root=tmp_path)  # the default path: the vae stage's output, not there yet
    wan = ["vae.kind=wan-tiny", "vae.spatial_compression=8"]
    vae = build_vae(load_config(root=tmp_path, use_params=False, sets=wan), pretrained=False)
    assert not vae.causal_ae and (vae.z_dim, vae.temporal, vae.spatial) == (16, 4, 8)
    with pytest.raises(ConfigError, match="16x space"):
        build_vae(load_config(root=tmp_path, use_params=False, sets=[*wan[:1], "vae.spatial_compression=16"]),
                  pretrained=False)  # fmt: skip
    with pytest.raises(FileNotFoundError, match="vae.pretrained_path"):
        build_vae(load_config(root=tmp_path, use_params=False, sets=[*wan, f"vae.pretrained_path={tmp_path}"]))


# ------------------------------------------------------------------------------------------------ sampling
def test_student_sigmas_follow_the_shifted_schedule():
    assert student_sigmas(3, 5.0) == pytest.approx([1.0, 0.9090909, 0.7142857], abs=1e-6)
    assert [s * 1000 for s in student_sigmas(4, 5.0)] == pytest.approx(
        [1000.0, 937.5, 833.333, 625.0], abs=1e-2
    )
    assert student_sigmas(2, 1.0) == pytest.approx([1.0, 0.5])  # shift 1: plain linear levels


def test_few_step_sample_with_an_oracle_recovers_x0():
    x0_true = torch.randn(2, 4, 3, 5, generator=gen(20))
    noise = torch.randn(2, 4, 3, 5, generator=gen(21))
    sigmas = student_sigmas(3, 5.0)
    calls = []

    def oracle(x, sigma, last):
        calls.append((sigma, last))
        return (x - x0_true) / sigma

    x0, last_input = few_step_sample(oracle, noise, sigmas, generator=gen(22))
    torch.testing.assert_close(x0, x0_true, atol=1e-5, rtol=1e-5)
    assert calls == [(sigmas[0], False), (sigmas[1], False), (sigmas[2], True)]
    # the last step's input is x0 re-noised to the last level with fresh noise (not the initial noise)
    fresh = (last_input - (1 - sigmas[-1]) * x0_true) / sigmas[-1]
    assert 0.5 < fresh.std() < 1.5 and not torch.allclose(fresh, noise, atol=1e-3)
    again, again_input = few_step_sample(oracle, noise, sigmas, generator=gen(22))
    assert torch.equal(again_input, last_input)  # the generator makes the re-noising reproducible


def test_euler_sample_follows_the_straight_path():
    x0_true = torch.randn(1, 4, 2, 3, 3, generator=gen(23))
    noise = torch.randn(1, 4, 2, 3, 3, generator=gen(24))
    seen = []

    def keep(step, sigma, x):
        seen.append((step, sigma, x.clone()))

    out = euler_sample(lambda x, sigma: noise - x0_true, noise, steps=4, shift=5.0, keep=keep)
    assert (out - x0_true).abs().max().item() <= 1e-4
    assert [s for s, _, _ in seen] == list(range(5))
    sigmas = [sigma for _, sigma, _ in seen]
    assert sigmas[0] == pytest.approx(1.0) and sigmas[-1] == 0.0
    assert all(a > b for a, b in zip(sigmas[:-1], sigmas[1:], strict=True))
    assert sigmas[1] > 0.9  # shift 5 keeps the first steps at high noise
    torch.testing.assert_close(seen[0][2], noise)
    for _, sigma, x in seen:  # every state lies on x = (1 - s) x0 + s noise
        torch.testing.assert_close(x, (1 - sigma) * x0_true + sigma * noise, atol=1e-4, rtol=0)


def test_ancestral_sampler_is_euler_at_eta_0_and_resamples_noise_at_eta_1():
    sigmas = teacher_sigmas(8, 5.0)
    weight = torch.randn(4, 4, generator=gen(30)) * 0.3

    def imperfect(x, sigma):  # any velocity field: a fixed linear map of the state
        return torch.einsum("bcfhw,cd->bdfhw", x, weight) * (1 + sigma)

    noise = torch.randn(2, 4, 3, 3, 3, generator=gen(31))
    noise[:, :, 0] = 0.5  # the given (clean reference) frame
    ode = euler_sample_sigmas(imperfect, noise, sigmas)
    torch.testing.assert_close(ancestral_sample_sigmas(imperfect, noise, sigmas, eta=0.0), ode, atol=1e-5, rtol=0)
    a = ancestral_sample_sigmas(imperfect, noise, sigmas, eta=1.0, generator=gen(1), given_frames=1)
    b = ancestral_sample_sigmas(imperfect, noise, sigmas, eta=1.0, generator=gen(1), given_frames=1)
    c = ancestral_sample_sigmas(imperfect, noise, sigmas, eta=1.0, generator=gen(2), given_frames=1)
    assert torch.equal(a, b) and not torch.allclose(a[:, :, 1:], c[:, :, 1:], atol=1e-3)  # fresh noise, seeded
    assert not torch.allclose(a, ode, atol=1e-3)
    assert torch.equal(a[:, :, :1], noise[:, :, :1])  # the given frame is kept
    # with the exact velocity of a single data point every sampler lands on it, whatever noise it re-draws
    x0_true = torch.randn(2, 4, 3, 3, 3, generator=gen(32))

    def oracle(x, sigma):
        return (x - x0_true) / sigma

    out = ancestral_sample_sigmas(oracle, noise, sigmas, eta=1.0, generator=gen(3))
    torch.testing.assert_close(out, x0_true, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="eta"):
        ancestral_sample_sigmas(oracle, noise, sigmas, eta=1.5)


@pytest.mark.slow
def test_wan22_vae_layout_streams_like_it_decodes():
    """The paper's VAE layout (Wan2.2: z 48, residual, patchified 16x): chunked decode equals full decode."""
    vae = VideoVAE(build_wan_vae("wan2.2", z_dim=48, base_dim=160))
    assert (vae.z_dim, vae.temporal, vae.spatial) == (48, 4, 16)
    latents = torch.randn(1, 48, 1 + 3 * 2, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = vae.decode(latents)
        dec = vae.stream_decoder()
        parts = [dec.decode(latents[:, :, :1])] + [dec.decode(latents[:, :, s : s + 3]) for s in (1, 4)]
    assert [p.shape[2] for p in parts] == [1, 12, 12]
    assert (torch.cat(parts, dim=2) - full).abs().max().item() <= 1e-4
