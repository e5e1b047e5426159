"""Training losses of the teacher (flow matching), the SiD distillation and the adversarial stage.

Pure tensor functions: no I/O, no model calls except through the callable given to :func:`approx_r1`.
Video tensors are latents [B, C, F, H, W]; a ``weight_mask`` / ``mask`` of shape [B, F] selects latent
frames (dim 2), so the clean reference frame 0 -- an input, not a prediction -- can be left out of a loss.
Any other mask broadcastable to the tensors is used as is. Masked losses are means over the selected
elements only, so their scale does not depend on how many frames a clip has.

Convention (Wan, as model/sampling.py): x_t = (1 - s) x0 + s noise, velocity v = noise - x0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _broadcast_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B, F] frame mask as [B, 1, F, 1, 1] for [B, C, F, H, W]; other masks must already broadcast."""
    if like.ndim == 5 and mask.ndim == 2:
        mask = mask[:, None, :, None, None]
    return mask.to(like.dtype).expand_as(like)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    m = _broadcast_mask(mask, values)
    return (values * m).sum() / m.sum()


def flow_matching_loss(
    velocity_pred: torch.Tensor,
    noise: torch.Tensor,
    x0: torch.Tensor,
    weight_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rectified-flow loss  mean_sel (v_pred - (noise - x0))^2.

    The target is the straight-path velocity d x_t / d s of x_t = (1 - s) x0 + s noise. ``weight_mask``
    ([B, F] frame mask or broadcastable) restricts the mean to the selected elements.
    """
    return _masked_mean((velocity_pred - (noise - x0)) ** 2, weight_mask)


def region_weight(height: int, width: int, box: tuple[float, float, float, float], weight: float,
                  outside: float = 1.0) -> torch.Tensor:  # fmt: skip
    """[height, width] loss weights: ``weight`` inside ``box`` = (top, bottom, left, right) as fractions of the
    frame (a latent pixel counts when its centre lies inside), ``outside`` elsewhere."""
    top, bottom, left, right = box
    if not (0.0 <= top < bottom <= 1.0 and 0.0 <= left < right <= 1.0):
        raise ValueError(f"box {box} is not (top, bottom, left, right) with 0 <= top < bottom <= 1, 0 <= left < right <= 1")
    ys = (torch.arange(height) + 0.5) / height
    xs = (torch.arange(width) + 0.5) / width
    inside = ((ys >= top) & (ys < bottom))[:, None] & ((xs >= left) & (xs < right))[None, :]
    if not inside.any():
        raise ValueError(f"box {box} holds no pixel centre of a {height}x{width} frame")
    return torch.where(inside, torch.tensor(float(weight)), torch.tensor(float(outside)))


def x0_regression_loss(
    x0_pred: torch.Tensor, x0_target: torch.Tensor, weight_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Data-space regression  mean_sel (x0_pred - x0_target)^2  (e.g. the ODE-pair initialisation)."""
    return _masked_mean((x0_pred - x0_target) ** 2, weight_mask)


def fake_score_loss(
    velocity_pred: torch.Tensor,
    noise: torch.Tensor,
    x0: torch.Tensor,
    weight_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fake-score network's denoising loss  mean_sel (v_pred - (noise - x0))^2  on generator samples.

    Same formula as :func:`flow_matching_loss`, with ``x0`` the DETACHED generator sample: the fake score
    learns the score of the generator's distribution (SiD's ``SID_EDMLoss.__call__``), and must not push
    gradients into the generator. Kept as its own function so a config cannot silently swap the two.
    """
    return flow_matching_loss(velocity_pred, noise, x0, weight_mask)


def sid_generator_loss(
    x: torch.Tensor,
    f_real: torch.Tensor,
    f_fake: torch.Tensor,
    alpha: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score identity Distillation generator loss (Zhou et al. 2024, official ``SID_EDMLoss.generator_loss``).

    Per sample b, with element means taken over the selected elements only:

        L_b = mean_sel[(f_real - f_fake) * ((f_real - x) - alpha * (f_real - f_fake))] / w_b
        w_b = stopgrad(max(mean_sel |x - f_real|, 1e-5))

    and the loss is mean_b L_b. ``x`` is the generator sample (carries the gradient), ``f_real`` /
    ``f_fake`` the x0 predictions of the teacher and the fake score on the noised ``x``. They are NOT
    detached here: as in official SiD the score networks are frozen but differentiable in their input, so
    the gradient also flows into ``x`` through them. Only the normaliser w is detached (official: under
    ``torch.no_grad``; its 1e-5 floor is kept). alpha weighs the squared-difference term (SiD's default is
    1.2). The official code returns the element-wise tensor and its loop
    reduces it; the mean here only rescales by a constant. Computed in float64 because the two factors are
    differences of nearly equal predictions (cancellation in low precision); returns a float64 scalar.
    """
    x, f_real, f_fake = x.double(), f_real.double(), f_fake.double()
    dims = tuple(range(1, x.ndim))
    m = torch.ones_like(x) if mask is None else _broadcast_mask(mask, x)
    count = m.sum(dim=dims)
    with torch.no_grad():
        w = ((x - f_real).abs() * m).sum(dim=dims) / count
        w = w.clamp(min=1e-5)
    diff = f_real - f_fake
    per_element = diff * ((f_real - x) - alpha * diff)
    per_sample = (per_element * m).sum(dim=dims) / count
    return (per_sample / w).mean()


def relativistic_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Relativistic pairing GAN (R3GAN) discriminator loss  mean softplus(D(fake) - D(real)).

    Minimised when each real sample scores above its paired fake; logits must have equal shapes.
    """
    return F.softplus(fake_logits - real_logits).mean()


def relativistic_g_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Relativistic pairing GAN generator loss  mean softplus(D(real) - D(fake)): the mirror of the D loss."""
    return F.softplus(real_logits - fake_logits).mean()


def approx_r1(
    d_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma: float,
    generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Finite-difference gradient penalty  mean (D(x + sigma eps) - D(x))^2,  eps ~ N(0, I).

    For small sigma this is ~ sigma^2 * mean ||grad_x D||^2 (per logit), i.e. R1 up to a constant folded
    into the penalty weight, without the double backward that exact R1 needs through a video DiT (APT /
    Seaweed-APT2 use sigma ~ 0.01). ``d_fn`` must be deterministic (no dropout), or the difference measures
    its noise. Gradients flow into D's parameters through both calls; detach ``x`` beforehand if it comes
    from the generator. ``eps`` is drawn with ``generator`` when given (on ``x``'s device).
    ``approx_r2`` is this same function, applied to generator samples (R2) instead of real data (R1).
    """
    if eps is None:  # ``eps`` given: drawn beforehand (a micro batch's slice of the whole batch's draw)
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return ((d_fn(x + sigma * eps) - d_fn(x)) ** 2).mean()


# R2 is the same penalty evaluated on (detached) generator samples instead of real data.
approx_r2 = approx_r1


def gaussian_denoiser_velocity(x_t: torch.Tensor, sigma: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
                               ) -> torch.Tensor:  # fmt: skip
    """The best velocity a denoiser with no learning can give: each latent element treated as an independent
    Gaussian with its channel's ``mean`` and ``var`` ([1, z, 1, 1, 1]); x_t = (1 - s) x0 + s eps, v = eps - x0,
    so E[v | x_t] = -mean + Cov(v, x_t) / Var(x_t) * (x_t - (1 - s) mean). The baseline a trained flow-matching
    model must beat on held-out data. ``sigma``: [B]."""
    s = sigma.view(-1, 1, 1, 1, 1).to(x_t.dtype)
    cov = s - (1 - s) * var
    var_t = (1 - s) ** 2 * var + s**2
    return -mean + cov / var_t * (x_t - (1 - s) * mean)
