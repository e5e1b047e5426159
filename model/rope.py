"""3D rotary position embedding of the Wan transformer, computed for arbitrary (time, height, width) indices.

Wan splits each head's channels into a time part and equal height and width parts and rotates channel pairs
(interleaved) by ``index * theta ** (-2i / dim)``. diffusers precomputes a 1024-row table; we compute the
angles from the index tensors directly (same float64 arithmetic, so identical values) because RAPR and the
streaming cache ask for time indices chosen per chunk, and an uncapped stream runs past any fixed table.
"""

from __future__ import annotations

import torch


def split_head_dim(head_dim: int) -> tuple[int, int, int]:
    """(time, height, width) channel counts of one head, as in diffusers' WanRotaryPosEmbed."""
    h_dim = w_dim = 2 * (head_dim // 6)
    return head_dim - h_dim - w_dim, h_dim, w_dim


def _axis_angles(index: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=index.device) / dim))
    return torch.outer(index.to(torch.float64), freqs)  # [S, dim/2]


class RotaryEmbedding3D(torch.nn.Module):
    """cos/sin tables for tokens laid out frame-major (frame, row, column), one time index per frame."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.t_dim, self.h_dim, self.w_dim = split_head_dim(head_dim)

    def forward(self, time_index: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``time_index``: [F] RoPE time index of each latent frame (any integers, not just 0..F-1).

        Returns (cos, sin), each [1, F*height*width, 1, head_dim] in float32, ready to broadcast over
        [batch, tokens, heads, head_dim].
        """
        device = time_index.device
        n_frames = time_index.numel()
        angle_t = _axis_angles(time_index.reshape(-1), self.t_dim, self.theta)
        angle_h = _axis_angles(torch.arange(height, device=device), self.h_dim, self.theta)
        angle_w = _axis_angles(torch.arange(width, device=device), self.w_dim, self.theta)
        angles = torch.cat(
            [
                angle_t.view(n_frames, 1, 1, -1).expand(n_frames, height, width, -1),
                angle_h.view(1, height, 1, -1).expand(n_frames, height, width, -1),
                angle_w.view(1, 1, width, -1).expand(n_frames, height, width, -1),
            ],
            dim=-1,
        )  # [F, H, W, head_dim/2]
        angles = angles.reshape(1, n_frames * height * width, 1, -1)
        cos = angles.cos().repeat_interleave(2, dim=-1).float()
        sin = angles.sin().repeat_interleave(2, dim=-1).float()
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x`` [B, S, heads, head_dim] (Wan / diffusers convention)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = cos[..., 0::2]
    sin = sin[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)
