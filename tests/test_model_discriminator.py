"""The Consistency-Aware Discriminator on a tiny AudioDiT: shapes, wiring of the per-frame Q-Formers, gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import Blip2QFormerModel

from model.discriminator import ConsistencyAwareDiscriminator, qformer_blocks
from model.dit import AudioDiT, DiTSpec

B, C, F, H, W = 2, 4, 1 + 6, 4, 4
NQ, QUERIES = 3, 2
TOKENS = (H // 2) * (W // 2)  # patch (1, 2, 2)


def _disc(seed: int = 0) -> ConsistencyAwareDiscriminator:
    torch.manual_seed(seed)
    spec = DiTSpec(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=8,
                   ffn_dim=32, num_layers=2, audio_dim=6)  # fmt: skip
    backbone = AudioDiT(spec)
    return ConsistencyAwareDiscriminator(backbone, num_qformers=NQ, queries=QUERIES, qformer_layers=1,
                                         qformer_dim=32, max_frames=8)  # fmt: skip


def _inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(B, F, generator=g) * 1000
    t[:, 0] = 0
    return dict(
        latents=torch.randn(B, C, F, H, W, generator=g),
        timestep=t,
        text=torch.randn(B, 3, 8, generator=g),
        audio_talk=torch.randn(B, F, 5, 6, generator=g),
        audio_listen=torch.randn(B, F, 5, 6, generator=g),
    )


def test_qformer_block_placement():
    assert qformer_blocks(2, 3) == [0, 0, 1]
    assert qformer_blocks(30, 3) == [7, 14, 21]
    assert qformer_blocks(30, 1) == [14]
    assert qformer_blocks(1, 2) == [0, 0]


def test_shapes_and_qformers():
    disc = _disc()
    x = _inputs()
    out = disc(**x)
    assert out["local"].shape == (B, F - 1)
    assert out["global_"].shape == (B,)
    logits = disc.logits(**x)
    assert logits.shape == (B, F)
    assert torch.equal(logits[:, -1], out["global_"]) and torch.equal(logits[:, :-1], out["local"])
    assert len(disc.qformers) == NQ and all(isinstance(q, Blip2QFormerModel) for q in disc.qformers)
    # a prepared prompt gives the same logits; a timestep per clip works; too many frames is refused
    prepared = disc(**{**x, "text": disc.backbone.prepare_text(x["text"])})
    assert torch.allclose(prepared["local"], out["local"])
    assert torch.allclose(prepared["global_"], out["global_"])
    assert disc(**{**x, "timestep": x["timestep"][:, 1]})["local"].shape == (B, F - 1)
    with pytest.raises(ValueError):
        disc(**{**x, "latents": torch.randn(B, C, 9, H, W)})


def test_gradients_reach_queries_backbone_and_heads():
    disc = _disc()
    disc.logits(**_inputs()).sum().backward()
    params = [disc.queries, disc.backbone.blocks[0].attn1.to_q.weight, disc.local_head.weight,
              disc.global_head.weight, disc.global_attn.in_proj_weight, disc.qformers[0].layernorm.weight]  # fmt: skip
    for p in params:
        assert p.grad is not None and p.grad.abs().sum().item() > 0
    # only the first F rows of the per-frame queries are used
    assert disc.queries.grad[F:].abs().sum().item() == 0


@torch.no_grad()
def test_reference_frame_changes_global_logit():
    disc = _disc()
    x = _inputs()
    base = disc(**x)["global_"]
    lat = x["latents"].clone()
    lat[:, :, 0] += 1.0
    assert (disc(**{**x, "latents": lat})["global_"] - base).abs().min().item() > 1e-6


@torch.no_grad()
def test_each_frame_queries_only_its_own_tokens():
    disc = _disc()
    queries = disc.queries[:F]
    # distinct learnable queries per frame
    assert all(not torch.equal(queries[i], queries[j]) for i in range(F) for j in range(i))

    seen, block_out = [], {}
    hooks = [q.register_forward_hook(lambda m, a, kw, o: seen.append((kw["query_embeds"], kw["encoder_hidden_states"])),
                                     with_kwargs=True) for q in disc.qformers]  # fmt: skip
    for i, block in enumerate(disc.backbone.blocks):
        hooks.append(block.register_forward_hook(lambda m, a, o, i=i: block_out.__setitem__(i, o)))
    disc(**_inputs())
    for h in hooks:
        h.remove()

    assert len(seen) == NQ
    for k, (query, states) in enumerate(seen):
        assert states.shape == (B * F, TOKENS, disc.backbone.spec.dim)
        # row b*F + f holds exactly frame f's tokens of the tapped block, and frame f's queries
        frames = block_out[disc.tap_blocks[k]].unflatten(1, (F, -1))  # [B, F, tokens, dim]
        assert torch.equal(states.unflatten(0, (B, F)), frames)
        assert torch.equal(query.unflatten(0, (B, F)), queries.unsqueeze(0).expand(B, -1, -1, -1))
