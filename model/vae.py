"""The video autoencoder behind one interface: normalised latents, reference encoding and streaming decode.

Two networks fit it: Wan's causal 3D VAE (diffusers AutoencoderKLWan; the paper profile loads Wan2.2's) and the
demo's :class:`~model.causal_ae.CausalVideoAE` (trained by the ``vae`` stage on 2 CPU cores).

Wan's causal 3D VAE maps 1 + 4k frames to 1 + k latent frames: the first latent frame is one image, each
later one four frames. The reference image is therefore latent frame 0 on its own. Decoding runs latent
frame by latent frame with a per-conv cache of the last frames; :class:`StreamingDecoder` keeps that cache
between chunks, so decoding chunk after chunk gives the same frames as one full decode (tested).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
from torch import nn

from model.causal_ae import CausalAEStreamState, CausalVideoAE

# Wan2.2-TI2V-5B VAE architecture (its diffusers vae/config.json); weights and latent statistics come from
# the checkpoint when one is given.
WAN22_VAE = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
    temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
    scale_factor_temporal=4, scale_factor_spatial=16,
)  # fmt: skip


def build_wan_vae(kind: str, z_dim: int, base_dim: int, pretrained_path: str | None = None) -> AutoencoderKLWan:
    """A randomly initialised AutoencoderKLWan ("wan-tiny" or "wan2.2" layout), or one loaded from a path."""
    if pretrained_path:
        root = Path(pretrained_path)
        folder = root / "vae" if (root / "vae" / "config.json").is_file() else root
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no diffusers VAE config at {folder}/config.json (vae.pretrained_path)")
        return AutoencoderKLWan.from_pretrained(str(folder))
    if kind == "wan2.2":
        cfg = dict(WAN22_VAE)
    elif kind == "wan-tiny":
        cfg = dict(base_dim=base_dim, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                   temperal_downsample=[False, True, True])  # fmt: skip
    else:
        raise ValueError(f"unknown VAE kind {kind!r}")
    cfg["z_dim"] = z_dim if kind == "wan-tiny" else cfg["z_dim"]
    cfg["latents_mean"] = [0.0] * cfg["z_dim"]
    cfg["latents_std"] = [1.0] * cfg["z_dim"]
    return AutoencoderKLWan(**cfg)


class VideoVAE(nn.Module):
    """Pixels in [-1, 1] <-> latents normalised by the checkpoint's per-channel mean/std (Wan's config carries
    them; for the causal autoencoder they are given, measured on its training frames)."""

    def __init__(self, vae: AutoencoderKLWan | CausalVideoAE, latents_mean: list[float] | None = None,
                 latents_std: list[float] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.vae = vae
        self.causal_ae = isinstance(vae, CausalVideoAE)
        if self.causal_ae:
            z = vae.z_dim
            mean, std = latents_mean or [0.0] * z, latents_std or [1.0] * z
            self.temporal, self.spatial = vae.temporal, vae.spatial
        else:
            cfg = vae.config
            mean, std = cfg.latents_mean, cfg.latents_std
            self.temporal, self.spatial = cfg.scale_factor_temporal, cfg.scale_factor_spatial
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1, 1), persistent=False)

    @property
    def z_dim(self) -> int:
        return self.vae.z_dim if self.causal_ae else self.vae.config.z_dim

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        if height % self.spatial or width % self.spatial:
            raise ValueError(f"frame size {width}x{height} is not a multiple of the VAE's {self.spatial}")
        return height // self.spatial, width // self.spatial

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, 1 + 4k, H, W] in [-1, 1] -> normalised latent mean [B, z, 1 + k, h, w]."""
        video = video.to(self.mean.device, self.vae.dtype)
        raw = self.vae.encode(video) if self.causal_ae else self.vae.encode(video).latent_dist.mode()
        return (raw.float() - self.mean) / self.std

    def encode_reference(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> latent frame 0, [B, z, 1, h, w]."""
        return self.encode(image.unsqueeze(2))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, z, F, h, w] -> frames [B, 3, 1 + 4(F-1), H, W] in [-1, 1]."""
        z = (latents.float() * self.std + self.mean).to(self.vae.dtype)
        if self.causal_ae:
            return self.vae.decode(z).float()
        return self.vae.decode(z).sample.float()

    def stream_decoder(self) -> StreamingDecoder:
        return StreamingDecoder(self)


class StreamingDecoder:
    """Decodes latent chunks in order; the causal conv caches live here, not on the shared VAE module."""

    def __init__(self, video_vae: VideoVAE) -> None:
        self.video_vae = video_vae
        vae = video_vae.vae
        if video_vae.causal_ae:
            self._state = CausalAEStreamState()
        else:
            self._feat_map: list = [None] * vae._cached_conv_counts["decoder"]
        self._first = True
        self.frames_decoded = 0

    def nbytes(self) -> int:
        """Bytes of decoder state kept between chunks (bounded: one time step per memory block / conv cache)."""
        held = self._state.last.values() if self.video_vae.causal_ae else self._feat_map
        return sum(t.numel() * t.element_size() for t in held if isinstance(t, torch.Tensor))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Next latent frames [B, z, f, h, w] -> their frames [B, 3, n, H, W] (n = 4f, or 1 + 4(f-1) first)."""
        vvae = self.video_vae
        vae = vvae.vae
        z = (latents.float() * vvae.std + vvae.mean).to(vae.dtype)
        if vvae.causal_ae:
            out = vae.decode(z, self._state).clamp(-1.0, 1.0).float()
            self.frames_decoded += out.shape[2]
            return out
        x = vae.post_quant_conv(z)
        outs = []
        for i in range(x.shape[2]):
            out = vae.decoder(x[:, :, i : i + 1], feat_cache=self._feat_map, feat_idx=[0], first_chunk=self._first)
            self._first = False
            outs.append(out)
        out = torch.cat(outs, dim=2)
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        out = out.clamp(-1.0, 1.0).float()
        self.frames_decoded += out.shape[2]
        return out
