"""model/losses.py against direct evaluations of the formulas."""

from __future__ import annotations

import math

import torch

from model.losses import (
    approx_r1,
    approx_r2,
    fake_score_loss,
    flow_matching_loss,
    relativistic_d_loss,
    relativistic_g_loss,
    sid_generator_loss,
    x0_regression_loss,
)

SHAPE = (3, 4, 5, 2, 3)  # [B, C, F, H, W]


def _tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(SHAPE, generator=g) for _ in range(3))


def _sid_direct(x: torch.Tensor, f_real: torch.Tensor, f_fake: torch.Tensor, alpha: float) -> torch.Tensor:
    """SiD written out: per sample mean[(fr - ff)((fr - x) - a (fr - ff))] / stopgrad(mean|x - fr|)."""
    x, fr, ff = x.double(), f_real.double(), f_fake.double()
    losses = []
    for b in range(x.shape[0]):
        w = (x[b] - fr[b]).abs().mean().detach()
        losses.append(((fr[b] - ff[b]) * ((fr[b] - x[b]) - alpha * (fr[b] - ff[b]))).mean() / w)
    return torch.stack(losses).mean()


def test_sid_generator_loss_matches_formula_in_float64():
    x, f_real, f_fake = _tensors()
    for alpha in (1.2, 1.0):
        got = sid_generator_loss(x, f_real, f_fake, alpha)
        assert got.dtype == torch.float64 and got.ndim == 0
        assert abs(got.item() - _sid_direct(x, f_real, f_fake, alpha).item()) < 1e-12
    assert (
        sid_generator_loss(x, f_real, f_fake, 1.2).item() != sid_generator_loss(x, f_real, f_fake, 1.0).item()
    )


def test_sid_generator_loss_gradient_equals_autograd_of_formula():
    x0, f_real, f_fake = _tensors(1)
    # the score predictions depend on x (frozen but differentiable nets): f = x * c + d
    c = torch.rand(SHAPE, generator=torch.Generator().manual_seed(2))

    def grad_of(fn):
        x = x0.clone().requires_grad_(True)
        fn(x, x * c + f_real, x * (1 - c) + f_fake, 1.2).backward()
        return x.grad

    got, expected = grad_of(sid_generator_loss), grad_of(_sid_direct)
    assert torch.isfinite(got).all()
    assert (got.double() - expected.double()).abs().max().item() < 1e-6
    assert got.abs().max().item() > 0


def test_sid_generator_loss_mask_excludes_reference_frame():
    x, f_real, f_fake = _tensors(3)
    mask = torch.ones(SHAPE[0], SHAPE[2])
    mask[:, 0] = 0
    x2 = x.clone()
    x2[:, :, 0] += 10.0
    base = sid_generator_loss(x, f_real, f_fake, 1.2, mask=mask)
    assert sid_generator_loss(x2, f_real, f_fake, 1.2, mask=mask).item() == base.item()
    assert (
        sid_generator_loss(x2, f_real, f_fake, 1.2).item()
        != sid_generator_loss(x, f_real, f_fake, 1.2).item()
    )
    # equals the unmasked loss on frames 1.. only
    expected = _sid_direct(x[:, :, 1:], f_real[:, :, 1:], f_fake[:, :, 1:], 1.2)
    assert abs(base.item() - expected.item()) < 1e-12


def test_flow_matching_and_regression_losses():
    noise, x0, other = _tensors(4)
    assert flow_matching_loss(noise - x0, noise, x0).item() == 0.0
    assert fake_score_loss(noise - x0, noise, x0).item() == 0.0
    assert flow_matching_loss(other, noise, x0).item() > 0
    assert torch.allclose(flow_matching_loss(other, noise, x0), ((other - (noise - x0)) ** 2).mean())
    assert x0_regression_loss(x0, x0).item() == 0.0
    assert torch.allclose(x0_regression_loss(other, x0), ((other - x0) ** 2).mean())

    mask = torch.ones(SHAPE[0], SHAPE[2])
    mask[:, 0] = 0
    pred = (noise - x0).clone()
    pred[:, :, 0] += 5.0  # wrong only on the masked-out reference frame
    assert flow_matching_loss(pred, noise, x0, weight_mask=mask).item() == 0.0
    assert flow_matching_loss(pred, noise, x0).item() > 0
    # mean over the selected elements only
    masked = flow_matching_loss(other, noise, x0, weight_mask=mask)
    assert torch.allclose(masked, ((other - (noise - x0))[:, :, 1:] ** 2).mean())
    assert torch.allclose(x0_regression_loss(other, x0, mask), ((other - x0)[:, :, 1:] ** 2).mean())


def test_relativistic_losses():
    z = torch.zeros(4, 6)
    assert abs(relativistic_d_loss(z, z).item() - math.log(2)) < 1e-6
    assert abs(relativistic_g_loss(z, z).item() - math.log(2)) < 1e-6
    real, fake = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 3.0]])
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(5.0))) / 2
    assert abs(relativistic_d_loss(real, fake).item() - expected) < 1e-6
    assert relativistic_d_loss(real + 1, fake).item() < relativistic_d_loss(real, fake).item()
    assert relativistic_g_loss(real + 1, fake).item() > relativistic_g_loss(real, fake).item()
    # the two losses mirror each other
    assert abs(relativistic_g_loss(real, fake).item() - relativistic_d_loss(fake, real).item()) < 1e-7


def test_approx_r1_finite_differences():
    # float64: the finite difference of a float32 D loses ~6 digits to cancellation
    x = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sigma = 0.01
    assert approx_r1(lambda v: torch.full((v.shape[0],), 2.0), x, sigma).item() == 0.0
    assert approx_r2 is approx_r1

    w = torch.randn(3, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def linear(v: torch.Tensor) -> torch.Tensor:
        return (v * w).flatten(1).sum(1)

    got = approx_r1(linear, x, sigma, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    explicit = ((sigma * (eps * w).flatten(1).sum(1)) ** 2).mean()
    assert abs(got.item() / explicit.item() - 1) < 1e-9
    # in expectation sigma^2 ||w||^2 (many samples)
    many = x[:1].expand(20000, -1, -1)
    mc = approx_r1(linear, many, sigma, generator=torch.Generator().manual_seed(8))
    closed = sigma**2 * (w**2).sum()
    assert abs(mc.item() / closed.item() - 1) < 0.05
