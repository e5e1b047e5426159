"""A tiny causal streaming video autoencoder: the demo's stand-in for Wan's VAE.

Same contract as Wan's causal VAE (model/vae.py): 1 + 4k frames <-> 1 + k latent frames, the first latent frame
is one image (the reference), each later one four frames; 8x (or 2^n) spatial compression. Small enough to
train on 2 CPU cores in minutes and to decode in real time there (the TAEHV idea: per-frame 2D convs, a few
"memory" blocks that see the previous time step, temporal grouping by channel reshapes).

Encoder: per frame, strided 2D convs down to the latent grid; the four frames of a latent step are stacked on
channels and mixed into ``z_dim`` channels. Frame 0 is repeated four times, so latent frame 0 sees the reference
image only. Decoder: per latent step a memory block over latent steps, then a channel-to-time split into four
frames, then per frame memory blocks over frames and nearest-neighbour upsampling convs. Latent step 0 decodes to
four frames of which the last is the reference (the three warm-up frames are dropped, as TAEHV does).

Causal by construction: a memory block's only look back is the previous time step's input, so decoding chunk
after chunk with :class:`CausalAEStreamState` gives the frames of one whole decode (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
    # He init keeps the activations' scale through the plain (non-residual) path; torch's default shrinks it
    # layer after layer, and the untrained decoder then outputs a constant for hundreds of steps
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    nn.init.zeros_(conv.bias)
    return conv


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = _conv(c, c), _conv(c, c)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: deep stacks train from step 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class MemBlock(nn.Module):
    """Residual block that also sees the previous time step's input: the decoder's only temporal context."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = _conv(2 * c, c), _conv(c, c)
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """x, past: [B, T, C, H, W] (past[:, t] is the input at t - 1)."""
        b, t = x.shape[:2]
        h = torch.cat([x, past], dim=2).flatten(0, 1)
        h = self.conv2(F.silu(self.conv1(F.silu(h))))
        return x + h.view(b, t, *h.shape[1:])


def _shift(x: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """The previous step of every step of x [B, T, ...]: ``last`` (or zeros) for step 0."""
    first = torch.zeros_like(x[:, :1]) if last is None else last
    return torch.cat([first, x[:, :-1]], dim=1)


@dataclass
class CausalAEStreamState:
    """What a streaming decode keeps between chunks: each memory block's last input, and whether the warm-up
    frames of latent step 0 are still to be dropped."""

    last: dict[str, torch.Tensor] = field(default_factory=dict)
    first: bool = True


class CausalVideoAE(nn.Module):
    """Pixels [B, 3, 1 + 4k, H, W] in [-1, 1] <-> raw latents [B, z, 1 + k, H / s, W / s]."""

    def __init__(self, z_dim: int = 16, widths: tuple[int, ...] = (32, 64, 128), temporal: int = 4,
                 patch: int = 2, decoder_blocks: int = 0) -> None:  # fmt: skip
        """``decoder_blocks``: residual blocks after each of the decoder's upsampling convs (identity at
        initialisation, so a decoder without them is continued exactly by :meth:`load_grown`)."""
        super().__init__()
        self.z_dim, self.widths, self.temporal, self.patch = z_dim, tuple(widths), temporal, patch
        self.decoder_blocks = decoder_blocks
        self.spatial = patch * 2 ** (len(widths) - 1)
        w = self.widths
        # encoder: per frame down to the latent grid, then the frames of a latent step mixed on channels
        self.enc_in = _conv(3 * patch * patch, w[0])  # full resolution is only pixel-(un)shuffled
        self.enc_down = nn.ModuleList(_conv(w[i - 1], w[i], stride=2) for i in range(1, len(w)))
        self.enc_res = nn.ModuleList(ResBlock(w[i]) for i in range(1, len(w)))
        self.enc_mix = _conv(temporal * w[-1], w[-1], k=1)
        self.enc_mix_res = ResBlock(w[-1])
        self.enc_out = _conv(w[-1], z_dim)
        # decoder: latent steps (memory over steps), a channel -> time split, then frames (memory over frames)
        self.dec_in = _conv(z_dim, w[-1])
        self.dec_step_mem = MemBlock(w[-1])
        self.dec_step_res = ResBlock(w[-1])
        self.dec_grow = _conv(w[-1], temporal * w[-1], k=1)
        self.dec_frame_mem = nn.ModuleList(MemBlock(w[i]) for i in range(len(w) - 1, 0, -1))
        self.dec_up = nn.ModuleList(_conv(w[i], w[i - 1]) for i in range(len(w) - 1, 0, -1))
        self.dec_up_res = nn.ModuleList(nn.Sequential(*(ResBlock(w[i - 1]) for _ in range(decoder_blocks)))
                                        for i in range(len(w) - 1, 0, -1))  # fmt: skip
        self.dec_out = _conv(w[0], 3 * patch * patch)
        with torch.no_grad():
            self.dec_out.weight.mul_(0.1)  # an untrained decoder outputs about mid-grey, not +-3

    def load_grown(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Loads the weights of an autoencoder with fewer ``decoder_blocks``: every tensor of ``state`` must fit, and
        only the extra blocks (identity at initialisation) may be missing; returns the names left at their init."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("dec_up_res.") for k in missing):
            raise ValueError(f"weights do not fit this autoencoder (missing {missing}, unexpected {unexpected})")
        return missing

    @property
    def dtype(self) -> torch.dtype:
        return self.enc_in.weight.dtype

    # ------------------------------------------------------------------------------------------- encode
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = video.shape
        if (t - 1) % self.temporal:
            raise ValueError(f"{t} frames: the causal autoencoder takes 1 + {self.temporal}k frames")
        if h % self.spatial or w % self.spatial:
            raise ValueError(f"frame size {w}x{h} is not a multiple of the autoencoder's {self.spatial}")
        # 1. frame 0 repeated so latent step 0 is the reference alone
        x = torch.cat([video[:, :, :1].expand(-1, -1, self.temporal - 1, -1, -1), video], dim=2)
        x = F.pixel_unshuffle(x.transpose(1, 2).flatten(0, 1), self.patch)  # [B * T', 3 p p, H / p, W / p]
        # 2. per frame down to the latent grid
        x = self.enc_in(x)
        for down, res in zip(self.enc_down, self.enc_res, strict=True):
            x = res(down(F.silu(x)))
        # 3. the frames of each latent step stacked on channels and mixed
        steps = x.shape[0] // (b * self.temporal)
        x = x.view(b * steps, self.temporal * x.shape[1], *x.shape[2:])
        x = self.enc_mix_res(self.enc_mix(x))
        z = self.enc_out(F.silu(x))
        return z.view(b, steps, *z.shape[1:]).transpose(1, 2)

    # ------------------------------------------------------------------------------------------- decode
    def decode(self, z: torch.Tensor, state: CausalAEStreamState | None = None) -> torch.Tensor:
        """Raw latents [B, z, f, h, w] -> frames [B, 3, n, H, W]. Without ``state``: the whole clip (n = 1 + 4(f-1)).
        With one: the next chunk of a stream (the state is updated; n = 4f, or 1 + 4(f-1) for the first)."""
        whole = state is None
        state = state or CausalAEStreamState()
        b, _, f, h, w = z.shape
        # 1. latent steps, with memory over steps
        x = self.dec_in(z.transpose(1, 2).flatten(0, 1))
        x = x.view(b, f, *x.shape[1:])
        x = self.dec_step_mem(x, _shift(x, state.last.get("step")))
        state.last["step"] = x[:, -1:].detach()
        x = self.dec_step_res(x.flatten(0, 1))
        # 2. each latent step grows into its frames
        x = self.dec_grow(F.silu(x))
        x = x.view(b, f * self.temporal, x.shape[1] // self.temporal, h, w)
        # 3. per frame: memory over frames, then up to full resolution
        for i, (mem, up, res) in enumerate(zip(self.dec_frame_mem, self.dec_up, self.dec_up_res, strict=True)):
            x = mem(x, _shift(x, state.last.get(f"frame{i}")))
            state.last[f"frame{i}"] = x[:, -1:].detach()
            t = x.shape[1]
            y = F.interpolate(F.silu(x.flatten(0, 1)), scale_factor=2.0, mode="nearest")
            y = res(up(y))
            x = y.view(b, t, *y.shape[1:])
        out = F.pixel_shuffle(self.dec_out(F.silu(x.flatten(0, 1))), self.patch)
        out = out.view(b, -1, *out.shape[1:]).transpose(1, 2)  # [B, 3, 4f, H, W]
        # 4. latent step 0's three warm-up frames are dropped: its last frame is the reference
        if state.first:
            out = out[:, :, self.temporal - 1 :]
            state.first = False
        if whole:
            state.last.clear()
        return out
