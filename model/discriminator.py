"""Consistency-Aware Discriminator (StreamAvatar 3.1.2): a DiT backbone, per-frame Q-Formers, two heads.

The backbone is a copy of the teacher :class:`~model.dit.AudioDiT` (trained with the discriminator), run
with bidirectional attention on the (noised) latents. After a few evenly spaced intermediate blocks a
BLIP-2 Q-Former reads each latent frame's tokens with learnable per-frame queries; the pooled query
outputs, averaged over the Q-Formers, give one feature per frame. Two heads score them:

* Local Realism Branch      -- a linear logit per generated frame (frames 1..F-1): is this frame real?
* Global Consistency Branch -- the reference frame's feature (frame 0) attends to all later frames'
  features, then a linear logit: do the generated frames keep the reference identity?
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from model.dit import AudioDiT, PreparedContext


def qformer_blocks(num_layers: int, num_qformers: int) -> list[int]:
    """Backbone block after which each Q-Former reads: ``round((i + 1) * L / (N_Q + 1)) - 1``, i < N_Q.

    The N_Q points split the L blocks into N_Q + 1 equal parts, so features come from shallow to deep
    blocks but never from the last one (closest to the velocity output). Python's ``round`` (ties to
    even), clipped to [0, L - 1]; with few blocks several Q-Formers share one (L=2, N_Q=3 -> [0, 0, 1]).
    """
    return [min(max(round((i + 1) * num_layers / (num_qformers + 1)) - 1, 0), num_layers - 1)
            for i in range(num_qformers)]  # fmt: skip


def _heads_for(dim: int) -> int:
    """About one 32-wide head per 32 channels, lowered until it divides ``dim``."""
    heads = max(1, dim // 32)
    while dim % heads:
        heads -= 1
    return heads


class ConsistencyAwareDiscriminator(nn.Module):
    def __init__(
        self,
        backbone: AudioDiT,
        num_qformers: int,
        queries: int,
        qformer_layers: int,
        qformer_dim: int,
        max_frames: int = 64,
    ) -> None:
        super().__init__()
        if num_qformers < 1:
            raise ValueError("the discriminator needs at least one Q-Former")
        self.backbone = backbone
        self.tap_blocks = qformer_blocks(len(backbone.blocks), num_qformers)
        heads = _heads_for(qformer_dim)
        config = Blip2QFormerConfig(
            hidden_size=qformer_dim, num_hidden_layers=qformer_layers, num_attention_heads=heads,
            intermediate_size=2 * qformer_dim, encoder_hidden_size=backbone.spec.dim, cross_attention_frequency=1,
            # approx_r1/r2 compare D(x + sigma eps) with D(x): a stochastic D would make that difference noise
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        self.qformers = nn.ModuleList([Blip2QFormerModel(config) for _ in range(num_qformers)])
        # Random, not BLIP-2's zeros: identical queries get identical gradients and would never separate.
        self.queries = nn.Parameter(torch.randn(max_frames, queries, qformer_dim) * config.initializer_range)
        self.local_head = nn.Linear(qformer_dim, 1)
        self.global_attn = nn.MultiheadAttention(qformer_dim, heads, batch_first=True)
        self.global_head = nn.Linear(qformer_dim, 1)

    @property
    def max_frames(self) -> int:
        return self.queries.shape[0]

    def frame_features(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor | PreparedContext,
        audio_talk: torch.Tensor | None = None,
        audio_listen: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One feature per latent frame [B, F, qformer_dim]; the mean over the Q-Formers.

        Inputs as :meth:`AudioDiT.forward`. The backbone's loop is repeated here (same calls, bidirectional
        attention) so its hidden states can be read without changing model/dit.py; it stops after the
        deepest tapped block, so later blocks and the output head take no part.
        """
        bb = self.backbone
        b, _, frames, height, width = latents.shape
        if frames > self.max_frames:
            raise ValueError(
                f"{frames} latent frames but the discriminator has queries for {self.max_frames}"
            )
        _, p_h, p_w = bb.spec.patch_size
        hp, wp = height // p_h, width // p_w
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(b, frames)
        depth = max(self.tap_blocks) + 1

        # 1. patchify; per-frame time modulation; conditioning (text K/V only for the blocks that run)
        x = bb.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()
        x = bb.add_reference(x, latents, "bidirectional", None, None, 0, False)
        if isinstance(text, PreparedContext) and text.kv:
            text_kv, pooled = text.kv, text.pooled
        else:
            lazy = bb.lazy_context(text if isinstance(text, PreparedContext) else PreparedContext(text=text), depth)
            text_kv, pooled = [bb.blocks[i].text_kv(lazy.kv[i]) for i in range(depth)], lazy.pooled
        _, temb_proj = bb._time_embedding(timestep, pooled)
        talk, listen = bb.embed_audio(audio_talk), bb.embed_audio(audio_listen)
        segments = bb._plan("bidirectional", frames, hp, wp, None, None, 0, latents.device)

        # 2. backbone blocks; after a tapped block, its Q-Formers read each frame's tokens separately
        query = self.queries[:frames].unsqueeze(0).expand(b, -1, -1, -1).flatten(0, 1)  # [B*F, Q, d]
        feature = None
        for i in range(depth):
            x = bb.blocks[i](x, temb_proj, text_kv[i], segments, frames, talk, listen)
            tokens = x.unflatten(1, (frames, -1)).flatten(0, 1)  # [B*F, tokens per frame, dim]
            for k in (k for k, block in enumerate(self.tap_blocks) if block == i):
                out = self.qformers[k](query_embeds=query, encoder_hidden_states=tokens).last_hidden_state
                pooled = out.mean(dim=1).unflatten(0, (b, frames))  # [B, F, d]
                feature = pooled if feature is None else feature + pooled
        return feature / len(self.qformers)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor | PreparedContext,
        audio_talk: torch.Tensor | None = None,
        audio_listen: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Logits ``local`` [B, F-1] (one per generated frame) and ``global_`` [B] (reference consistency).

        Frame 0 of ``latents`` must be the clean reference frame; it gets no local logit.
        """
        if latents.shape[2] < 2:
            raise ValueError("the discriminator needs the reference frame and at least one generated frame")
        feature = self.frame_features(latents, timestep, text, audio_talk, audio_listen)
        ref, rest = feature[:, :1], feature[:, 1:]
        # 1. local realism: every generated frame on its own
        local = self.local_head(rest).squeeze(-1)
        # 2. global consistency: the reference queries the generated frames
        attended, _ = self.global_attn(ref, rest, rest, need_weights=False)
        global_ = self.global_head(attended[:, 0]).squeeze(-1)
        return {"local": local, "global_": global_}

    def logits(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor | PreparedContext,
        audio_talk: torch.Tensor | None = None,
        audio_listen: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """All logits as one [B, F] tensor (F-1 local, then the global one) for the relativistic losses."""
        out = self(latents, timestep, text, audio_talk, audio_listen)
        return torch.cat([out["local"], out["global_"][:, None]], dim=1)
