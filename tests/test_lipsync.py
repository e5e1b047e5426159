"""SyncNet (syncnet_v2 layout) and syncnet_python's Sync-C / Sync-D protocol, without the real weights."""

from __future__ import annotations

import re

import numpy as np
import pytest
import python_speech_features
import torch
from torch import nn

from model.syncnet import SyncNet, load_syncnet
from tasks.evaluation.lipsync import (
    NOT_SET,
    ClipTooShortError,
    face_crops,
    sync_metrics,
    sync_scores,
    syncnet_inputs,
)

# syncnet_v2's nn.Sequential layouts, written out by hand from joonson/syncnet_python SyncNetModel.py:
# (index of each Conv, index of the BatchNorm after it). Identical for the audio and the lip CNNs.
CNN_CONV_BN = [(0, 1), (4, 5), (8, 9), (11, 12), (14, 15), (18, 19)]
FC_LAYERS = [("linear", 0), ("bn", 1), ("linear", 3)]
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def expected_keys() -> list[str]:
    keys: list[str] = []

    def cnn(name: str) -> None:
        for conv, bn in CNN_CONV_BN:
            keys.extend([f"{name}.{conv}.weight", f"{name}.{conv}.bias"])
            keys.extend(f"{name}.{bn}.{k}" for k in BN_KEYS)

    def fc(name: str) -> None:
        for kind, i in FC_LAYERS:
            keys.extend([f"{name}.{i}.weight", f"{name}.{i}.bias"] if kind == "linear" else
                        [f"{name}.{i}.{k}" for k in BN_KEYS])

    cnn("netcnnaud")
    fc("netfcaud")
    fc("netfclip")  # the original registers the lip FC head before the lip CNN
    cnn("netcnnlip")
    return keys


def conv(cin: int, cout: int, *kernel: int) -> int:
    return cin * cout * int(np.prod(kernel)) + cout


def bn(c: int) -> int:
    return 2 * c  # affine weight + bias (running stats are buffers)


FC_HEAD = conv(512, 512) + bn(512) + conv(512, 1024)
AUDIO_CNN = (conv(1, 64, 3, 3) + bn(64) + conv(64, 192, 3, 3) + bn(192) + conv(192, 384, 3, 3) + bn(384)
             + conv(384, 256, 3, 3) + bn(256) + conv(256, 256, 3, 3) + bn(256)
             + conv(256, 512, 5, 4) + bn(512))
LIP_CNN = (conv(3, 96, 5, 7, 7) + bn(96) + conv(96, 256, 1, 5, 5) + bn(256)
           + 3 * (conv(256, 256, 1, 3, 3) + bn(256)) + conv(256, 512, 1, 6, 6) + bn(512))


@pytest.fixture(scope="module")
def net() -> SyncNet:
    torch.manual_seed(0)
    model = SyncNet()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-default BN statistics, so a load that dropped a buffer would show
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


# ---------------------------------------------------------------- (a) layout


def test_state_dict_keys_are_syncnet_v2s(net):
    keys = list(net.state_dict())
    assert keys == expected_keys()
    assert len(keys) == 102
    assert keys[0] == "netcnnaud.0.weight" and "netcnnaud.19.num_batches_tracked" in keys
    assert keys[-1] == "netcnnlip.19.num_batches_tracked" and keys.index("netfcaud.0.weight") == 6 * (2 + 5)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["netcnnaud.0.weight"] == (64, 1, 3, 3)
    assert shapes["netcnnaud.18.weight"] == (512, 256, 5, 4)
    assert shapes["netfcaud.3.weight"] == (1024, 512) and shapes["netfclip.3.bias"] == (1024,)
    assert shapes["netcnnlip.0.weight"] == (96, 3, 5, 7, 7)
    assert shapes["netcnnlip.18.weight"] == (512, 256, 1, 6, 6)


def test_parameter_count(net):
    assert AUDIO_CNN + LIP_CNN + 2 * FC_HEAD == 13_631_616
    assert sum(p.numel() for p in net.parameters()) == AUDIO_CNN + LIP_CNN + 2 * FC_HEAD
    assert sum(p.numel() for p in net.netcnnaud.parameters()) == AUDIO_CNN
    assert sum(p.numel() for p in net.netcnnlip.parameters()) == LIP_CNN


def test_embedding_shapes(net):
    with torch.no_grad():
        lip = net.forward_lip(torch.rand(2, 3, 5, 224, 224) * 255)
        aud = net.forward_aud(torch.randn(2, 1, 13, 20) * 10)
    assert lip.shape == aud.shape == (2, 1024)


# ---------------------------------------------------------------- (b) loading


def test_prefixed_state_dict_without_counters_loads_identically(net, tmp_path):
    # as a SyncNetInstance would save it (``__S__.`` prefix), from before PyTorch had num_batches_tracked
    state = {f"__S__.{k}": v.clone() for k, v in net.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / "syncnet_v2.model"
    torch.save(state, path)
    loaded = load_syncnet(path)
    assert not loaded.training
    gen = torch.Generator().manual_seed(2)
    video, mfcc = torch.rand(1, 3, 5, 224, 224, generator=gen) * 255, torch.randn(1, 1, 13, 20, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_lip(video), net.forward_lip(video), rtol=0, atol=0)
        torch.testing.assert_close(loaded.forward_aud(mfcc), net.forward_aud(mfcc), rtol=0, atol=0)


def test_load_errors_name_the_path(net, tmp_path):
    missing = tmp_path / "nowhere" / "syncnet_v2.model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_syncnet(missing)
    state = net.state_dict()
    bad = tmp_path / "bad.model"
    torch.save({k: v for k, v in state.items() if k != "netfclip.3.weight"}, bad)
    with pytest.raises(RuntimeError, match=rf"(?s){re.escape(str(bad))}.*netfclip\.3\.weight"):
        load_syncnet(bad)
    extra = tmp_path / "extra.model"
    torch.save({**state, "netfclip.9.weight": torch.zeros(1)}, extra)
    with pytest.raises(RuntimeError, match=re.escape(str(extra))):
        load_syncnet(extra)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=re.escape(str(junk))):
        load_syncnet(junk)


# ---------------------------------------------------------------- (c) inputs and scores


def test_inputs_follow_syncnet_python():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (7, 40, 30, 3), dtype=np.uint8)
    frames[:, :, :, 0], frames[:, :, :, 2] = 10, 200  # R = 10, B = 200
    wave = (rng.standard_normal(16000) * 0.1).astype(np.float32)
    video, mfcc = syncnet_inputs(frames, wave, 16000)
    assert video.dtype == torch.uint8 and video.shape == (3, 7, 224, 224)
    assert (video[0] == 200).all() and (video[2] == 10).all()  # BGR, as cv2.imread gives syncnet_python
    pcm16 = np.clip(np.rint(wave.astype(np.float64) * 32768), -32768, 32767).astype(np.int16)
    reference = python_speech_features.mfcc(pcm16, 16000).T  # what syncnet_python computes from its wav
    n_steps = 1 + int(np.ceil((16000 - 400) / 160))  # 25 ms windows every 10 ms
    assert mfcc.shape == (13, n_steps) == reference.shape
    np.testing.assert_allclose(mfcc.numpy(), reference, rtol=1e-5, atol=1e-4)
    video48, mfcc48 = syncnet_inputs(frames, np.repeat(wave, 3), 48000)  # resampled to 16 kHz first
    assert mfcc48.shape == mfcc.shape and torch.equal(video48, video)


def test_face_crops_cut_syncnet_pythons_square():
    frames = np.zeros((8, 200, 200, 3), np.uint8)
    # box (80, 60, 120, 100): s = 20, crop rows cy - s .. cy + 1.8 s, columns cx -+ 1.4 s
    frames[:, 60:116, 72:128] = 255
    boxes = np.tile([80.0, 60.0, 120.0, 100.0], (8, 1))
    boxes[3] = np.nan  # a missed detection: interpolated from its neighbours
    crops = face_crops(frames, boxes)
    assert crops.shape == (8, 224, 224, 3) and crops.dtype == np.uint8
    assert (crops == 255).all()
    corner = face_crops(frames, np.tile([0.0, 0.0, 40.0, 40.0], (8, 1)))  # s = 20: columns -8 .. 48
    assert (corner[:, :, :28] == 110).all()  # the 8 padded columns (x 224 / 56), grey as in the original
    assert (corner[:, :, 40:] == 0).all()
    with pytest.raises(ValueError, match="no frame has a face box"):
        face_crops(frames, np.full((8, 4), np.nan))


def test_random_net_scores_have_the_protocols_shape(net):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (12, 48, 48, 3), dtype=np.uint8)
    wave = (rng.standard_normal(int(0.44 * 24000)) * 0.1).astype(np.float32)  # 0.44 s = 11 frames at 24 kHz
    out = sync_scores(net, frames, wave, 24000, vshift=3, batch=4)
    assert set(out) == {"sync_c", "sync_d", "offset", "dists_by_offset", "n_windows"}
    assert out["n_windows"] == 11 - 5  # min(12 frames, 11 audio frames) - 5, as syncnet_python iterates
    dists = out["dists_by_offset"]
    assert len(dists) == 2 * 3 + 1 and all(np.isfinite(dists))
    assert out["sync_d"] == pytest.approx(min(dists)) and out["sync_c"] >= 0
    assert out["sync_c"] == pytest.approx(float(np.median(dists)) - min(dists), abs=1e-6)
    assert out["offset"] == 3 - int(np.argmin(dists)) and -3 <= out["offset"] <= 3


def test_too_short_clip_is_a_clear_error(net):
    frames = np.zeros((5, 32, 32, 3), np.uint8)
    with pytest.raises(ClipTooShortError, match="at least 6 frames"):
        sync_scores(net, frames, np.zeros(16000, np.float32), 16000)
    with pytest.raises(ValueError, match="at least 6 frames"):  # enough video, too little audio
        sync_scores(net, np.zeros((20, 32, 32, 3), np.uint8), np.zeros(3000, np.float32), 16000)


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-9)


class CodeNet(nn.Module):
    """Known-answer embedder: both streams embed the 5 per-frame "codes" of their window, so windows carrying
    the same codes coincide.

    Lip: the log mean brightness of each of the 5 frames. Audio: c0/2 of MFCC steps 1, 5, 9, 13, 17 of the
    window -- each of those 25 ms MFCC frames lies inside one 40 ms video frame -- and
    c0 = log energy = 2 log(amplitude) + const. Both are centred and scaled to unit norm, which removes the
    constants.
    """

    def forward_lip(self, video: torch.Tensor) -> torch.Tensor:
        return _unit(torch.log(video.mean(dim=(1, 3, 4))))

    def forward_aud(self, mfcc: torch.Tensor) -> torch.Tensor:
        return _unit(mfcc[:, 0, 0, 1::4].double() / 2).float()


def coded_clip(
    t: int, delay: int, audio_late: bool, sample_rate: int, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Frames of uniform brightness code[t] and a 1 kHz tone whose amplitude in frame t is proportional to the
    code; one of the two streams is delayed by ``delay`` frames (random codes fill its start)."""
    rng = np.random.default_rng(seed)
    codes = rng.uniform(30, 250, t + delay)
    video_codes, audio_codes = (codes[delay:], codes[:t]) if audio_late else (codes[:t], codes[delay:])
    frames = np.broadcast_to(video_codes.round().astype(np.uint8)[:, None, None, None], (t, 16, 16, 3)).copy()
    per_frame = sample_rate // 25
    n = np.arange(t * per_frame)
    amplitude = np.repeat(audio_codes.round() / 255 * 0.5, per_frame)
    return frames, (amplitude * np.sin(2 * np.pi * 1000 * n / sample_rate)).astype(np.float32)


@pytest.mark.parametrize(("audio_late", "sample_rate", "expected"), [
    (True, 16000, -3),  # audio delayed by 3 frames -> offset -3
    (False, 16000, 3),  # video delayed by 3 frames (audio ahead) -> offset +3
    (True, 48000, -3),  # same, through the 48 kHz -> 16 kHz resampler
])
def test_offset_search_finds_a_known_delay(audio_late, sample_rate, expected):
    frames, wave = coded_clip(40, 3, audio_late, sample_rate)
    out = sync_scores(CodeNet(), frames, wave, sample_rate, vshift=6)
    assert out["offset"] == expected
    dists = np.array(out["dists_by_offset"])
    best = 6 - expected
    assert int(np.argmin(dists)) == best
    # the matching offset pairs identical codes except the 3 windows compared with zero padding (distance 1)
    assert dists[best] == pytest.approx(3 / out["n_windows"], abs=0.02)
    assert np.delete(dists, best).min() > 0.5 and out["sync_c"] > 0.5


def test_distances_equal_the_per_window_loop_of_calc_pdist():
    """The vectorised search equals syncnet_python's loop: for each visual window i, distances to audio
    windows i - vshift .. i + vshift of the zero-padded audio embeddings, then the mean over i per offset."""
    frames, wave = coded_clip(30, 2, True, 16000, seed=4)
    vshift, net = 4, CodeNet()
    out = sync_scores(net, frames, wave, 16000, vshift=vshift)
    video, mfcc = syncnet_inputs(frames, wave, 16000)
    n = out["n_windows"]
    lip = net.forward_lip(torch.stack([video[:, i:i + 5] for i in range(n)]).float())
    aud = net.forward_aud(torch.stack([mfcc[:, 4 * i:4 * i + 20] for i in range(n)]).unsqueeze(1))
    padded = torch.cat([torch.zeros(vshift, aud.shape[1]), aud, torch.zeros(vshift, aud.shape[1])])
    rows = [nn.functional.pairwise_distance(lip[[i]].repeat(2 * vshift + 1, 1), padded[i:i + 2 * vshift + 1])
            for i in range(n)]
    expected = torch.stack(rows, 1).mean(1)
    np.testing.assert_allclose(out["dists_by_offset"], expected.numpy(), rtol=1e-6, atol=1e-6)
    assert out["offset"] == vshift - int(expected.argmin()) == -2


# ---------------------------------------------------------------- (d) sync_metrics


def test_sync_metrics_without_weights_is_skipped_not_a_number(tmp_path):
    frames, wave = np.zeros((10, 16, 16, 3), np.uint8), np.zeros(16000, np.float32)
    assert sync_metrics("", frames, wave, 16000) == {"status": NOT_SET}
    assert NOT_SET == "skipped: evaluate.syncnet_path is not set"
    missing = tmp_path / "syncnet_v2.model"
    assert sync_metrics(str(missing), frames, wave, 16000) == {"status": f"skipped: no weights at {missing}"}


def test_sync_metrics_with_weights(net, tmp_path):
    path = tmp_path / "syncnet_v2.model"
    torch.save(net.state_dict(), path)
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    wave = (rng.standard_normal(8 * 640) * 0.1).astype(np.float32)
    out = sync_metrics(str(path), frames, wave, 16000, device="cpu", vshift=2)
    assert out["status"] == "ok" and out["n_windows"] == 3 and len(out["dists_by_offset"]) == 5
    short = sync_metrics(str(path), frames[:5], wave, 16000, device="cpu")
    assert short["status"].startswith("skipped: SyncNet needs at least 6 frames") and "sync_c" not in short
