"""Fréchet distance known answers; FID / FVD through tiny TorchScript stand-ins for the standard networks."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tasks.evaluation.fidelity import (
    feature_stats,
    fid,
    frechet_distance,
    fvd,
    load_feature_net,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def spd(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def sym_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


# ---------------------------------------------------------------- Fréchet distance


def test_identical_statistics_are_at_distance_zero():
    mu, sigma = np.random.default_rng(0).standard_normal(6), spd(6, 1)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_one_dimensional_gaussians():
    # N(0, 1) vs N(3, 4): (0 - 3)^2 + 1 + 4 - 2 sqrt(1 * 4) = 9 + 5 - 4 = 10
    assert frechet_distance(np.array([0.0]), np.array([[1.0]]), np.array([3.0]), np.array([[4.0]])) == \
        pytest.approx(10.0, abs=1e-9)
    assert frechet_distance(0.0, 1.0, 3.0, 4.0) == pytest.approx(10.0, abs=1e-9)  # scalars are 1-D stats


def test_diagonal_covariances():
    # diagonal S1, S2 commute: tr(S1 + S2 - 2 sqrt(S1 S2)) = sum_i (sqrt(a_i) - sqrt(b_i))^2
    a, b = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 1.0, 9.0, 1.0])
    mu1, mu2 = np.array([1.0, 0.0, 0.0, 2.0]), np.array([0.0, 0.0, 2.0, 2.0])
    expected = 1 + 4 + ((1 - 2) ** 2 + (2 - 1) ** 2 + 0 + (0.5 - 1) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-9)


def test_general_case_matches_the_symmetric_form():
    # tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), whose argument is symmetric PSD (an independent route)
    s1, s2 = spd(5, 2), spd(5, 3)
    mu1, mu2 = np.arange(5.0), np.ones(5)
    r = sym_sqrt(s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(sym_sqrt(r @ s2 @ r))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_singular_covariances_stay_finite():
    x = np.random.default_rng(4).standard_normal((3, 6))  # 3 samples in 6-D: rank-2 covariance
    mu, sigma = feature_stats(x)
    assert np.linalg.matrix_rank(sigma) == 2
    value = frechet_distance(mu, sigma, mu + 1.0, sigma)
    assert np.isfinite(value) and value == pytest.approx(6.0, abs=1e-3)
    zero = np.zeros((4, 4))
    assert frechet_distance(np.zeros(4), zero, np.ones(4), zero) == pytest.approx(4.0, abs=1e-5)


def test_feature_stats_and_shape_errors():
    x = np.random.default_rng(5).standard_normal((50, 3))
    mu, sigma = feature_stats(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False))  # unbiased, 1 / (N - 1)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(x[:1])
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(mu, sigma, mu[:2], sigma[:2, :2])


# ---------------------------------------------------------------- TorchScript stand-ins


class ImageNet(nn.Module):
    """Stands in for inception-2015-12-05.pt: same call ``net(uint8 [N, 3, H, W], return_features=True)``,
    any H, W (pooled to 2 x 2 inside), 8-d features. Raises on anything but the StyleGAN3 convention."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("proj", torch.randn(12, 8, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise RuntimeError("expected uint8 [N, 3, H, W]")
        if not return_features:
            raise RuntimeError("expected return_features=True")
        pooled = F.adaptive_avg_pool2d(x.float() / 128.0 - 1.0, 2).flatten(1)  # [N, 12]
        return torch.tanh(pooled @ self.proj) * 10.0


class VideoNet(nn.Module):
    """Stands in for i3d_torchscript.pt: ``net(uint8 [N, 3, T, H, W], rescale, resize, return_features)``,
    6-d features. Raises on anything but StyleGAN-V's ``rescale=True, resize=True, return_features=True``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("proj", torch.randn(24, 6, generator=torch.Generator().manual_seed(1)))

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 5 or x.shape[1] != 3:
            raise RuntimeError("expected uint8 [N, 3, T, H, W]")
        if not (rescale and resize and return_features):
            raise RuntimeError("expected rescale=True, resize=True, return_features=True")
        y = x.float() / 127.5 - 1.0
        y = F.interpolate(y, size=(x.shape[2], 16, 16), mode="trilinear", align_corners=False)
        pooled = F.adaptive_avg_pool3d(y, 2).flatten(1)  # [N, 24]
        return torch.tanh(pooled @ self.proj) * 10.0


def script(module: nn.Module, path: Path) -> Path:
    torch.jit.script(module).save(str(path))
    return path


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    return script(ImageNet(), tmp_path_factory.mktemp("nets") / "inception-2015-12-05.pt")


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory) -> Path:
    return script(VideoNet(), tmp_path_factory.mktemp("nets") / "i3d_torchscript.pt")


def images(n: int, seed: int, shift: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, (n, 24, 20, 3)).astype(np.int64)
    base[:, :12] += rng.integers(0, 50, (n, 1, 1, 3))  # some per-image structure in the top half
    return np.clip(base + shift, 0, 255).astype(np.uint8)


def direct_distance(net: nn.Module, real: torch.Tensor, fake: torch.Tensor, **kwargs: bool) -> float:
    with torch.no_grad():
        fr, ff = (net(x, **kwargs).double().numpy() for x in (real, fake))
    mu_r, s_r = feature_stats(fr)
    mu_f, s_f = feature_stats(ff)
    return frechet_distance(mu_r, s_r, mu_f, s_f)


# ---------------------------------------------------------------- FID


def test_fid_of_a_set_with_itself_is_zero(inception_file):
    real = images(40, 0)
    out = fid(real, real, str(inception_file), batch=16, device="cpu")
    assert out["status"] == "ok" and (out["n_real"], out["n_fake"]) == (40, 40)
    assert abs(out["value"]) < 1e-6
    assert "2048" in out["note"] and "biased" in out["note"]


def test_fid_equals_the_distance_of_directly_computed_features(inception_file):
    real, fake = images(40, 0), images(30, 1, shift=40)
    out = fid(real, fake, str(inception_file), batch=16, device="cpu")
    as_tensor = [torch.from_numpy(x).permute(0, 3, 1, 2).contiguous() for x in (real, fake)]
    expected = direct_distance(ImageNet(), *as_tensor, return_features=True)
    assert out["status"] == "ok" and out["value"] > 1.0
    assert out["value"] == pytest.approx(expected, rel=1e-6)


def test_fid_without_weights_or_samples_is_skipped(inception_file, tmp_path):
    real = images(4, 0)
    assert fid(real, real, "") == {"status": "skipped: evaluate.inception_path is not set"}
    missing = tmp_path / "inception-2015-12-05.pt"
    assert fid(real, real, str(missing)) == {"status": f"skipped: no weights at {missing}"}
    few = fid(real, real[:1], str(inception_file), device="cpu")
    assert few["status"] == "skipped: FID needs at least 2 real and 2 fake images, got 4 and 1"
    assert "value" not in few
    assert fid(None, real, str(inception_file)) == {"status": "skipped: no real images"}
    with pytest.raises(ValueError, match="uint8"):
        fid(real.astype(np.float32), real, str(inception_file))


# ---------------------------------------------------------------- FVD


def clips(n: int, t: int, seed: int, shift: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ramp = np.linspace(0, rng.uniform(20, 80), t)[:, None, None, None]  # brightening over time
        frames = rng.integers(0, 150, (t, 20, 20, 3)) + ramp + shift
        out.append(np.clip(frames, 0, 255).astype(np.uint8))
    return out


def test_fvd_of_a_set_with_itself_is_zero(i3d_file):
    real = clips(12, 10, 0)
    out = fvd(real, real, str(i3d_file), clip_len=8, device="cpu")
    assert out["status"] == "ok" and (out["n_real"], out["n_fake"]) == (12, 12)
    assert abs(out["value"]) < 1e-6
    assert "first 8 consecutive frames" in out["note"]


def test_fvd_equals_the_distance_of_directly_computed_features(i3d_file):
    real, fake = clips(12, 10, 0), clips(10, 9, 1, shift=30)
    short = [c[:5] for c in clips(2, 5, 2)]
    out = fvd(real, fake + short, str(i3d_file), clip_len=8, batch=3, device="cpu")
    assert out["status"] == "ok" and (out["n_real"], out["n_fake"]) == (12, 10)
    assert "2 of 12 fake clips are shorter than 8 frames" in out["note"]
    as_tensor = [torch.from_numpy(np.stack([c[:8] for c in s])).permute(0, 4, 1, 2, 3).contiguous()
                 for s in (real, fake)]
    expected = direct_distance(VideoNet(), *as_tensor, rescale=True, resize=True, return_features=True)
    assert out["value"] > 1.0 and out["value"] == pytest.approx(expected, rel=1e-6)


def test_fvd_without_weights_or_clips_is_skipped(i3d_file, tmp_path):
    real = clips(3, 8, 0)
    assert fvd(real, real, "") == {"status": "skipped: evaluate.i3d_path is not set"}
    missing = tmp_path / "i3d_torchscript.pt"
    assert fvd(real, real, str(missing)) == {"status": f"skipped: no weights at {missing}"}
    out = fvd(real, [c[:4] for c in real], str(i3d_file), clip_len=8, device="cpu")
    assert out["status"].startswith("skipped: FVD needs at least 2 real and 2 fake clips of >= 8 frames")
    assert "value" not in out and "3 of 3 fake clips are shorter" in out["note"]
    assert fvd(None, real, str(i3d_file)) == {"status": "skipped: no real clips"}


def test_load_feature_net_errors_name_the_path(tmp_path, inception_file):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_feature_net(missing, "inception")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not torchscript")
    with pytest.raises(RuntimeError, match=re.escape(str(junk))):
        load_feature_net(junk, "i3d")
    net = load_feature_net(inception_file, "inception")
    assert net(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), return_features=True).shape == (2, 8)
