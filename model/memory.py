"""Long-Short Visual Memory (InteractiveAvatar's LSVM, our design): a fixed number of memory tokens per layer
that summarise the frames the rolling window has evicted, read by every later chunk beside the Reference Sink
and the short window.

Each layer has ``slots`` learned queries. The memory is attention pooling over the keys (cached before RoPE)
and values of every evicted token: slot m's key and value are the softmax(q_m . k_j / sqrt(d))-weighted means
of the evicted keys and values, per head. Pooling is a softmax over everything evicted so far, so it can be
kept as running statistics (the online softmax: a running max, the sum of the weights and the weighted sums):
bounded state (slots x heads x (2 d + 2) numbers per layer) and a flat per-chunk cost however long the stream
runs, and the block-causal training forward, which pools the same frames at once, computes the same memory.
A chunk's queries read the memory (``model.memory_read``) through their own attention over the slots, added
to the self-attention output through a per-head gate that starts at zero (``gated``: a model with the memory
computes exactly what it did without it until the gate is trained), or as more keys of the self-attention's
own softmax with a learned per-head logit bias (``joint``: the memory is weighed as past frames are).

Two kinds (``model.memory_kind``):

* ``global`` -- each slot pools over every evicted token, whatever its place in the frame: ``slots`` memory
  tokens per layer, read without a RoPE position. What the first LSVM was; measured, it cannot put back a
  small local detail (a cheek mark): a slot's value is a mean over thousands of tokens, with no place.
* ``spatial`` -- each slot pools, at every token position of the frame, over the evicted frames' tokens at
  that position (a softmax over time per position): ``slots x tokens_per_frame`` memory tokens per layer
  (one latent frame's worth per slot), each keeping its place. The chunk reads them with RoPE at that place
  and at the time index of the newest evicted frame (just before the window), so the memory is attended as a
  compressed frame older than the window: what was at a place stays there, however long ago it left.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MemoryState:
    """Running online-softmax statistics of one layer's pooled evicted tokens ([B, slots, places, heads] /
    [..., d])."""

    max: torch.Tensor
    weight: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory's keys and values [B, slots x places, heads, d] (slot-major, as LongMemory.pool)."""
        w = self.weight.unsqueeze(-1)
        return (self.key / w).flatten(1, 2), (self.value / w).flatten(1, 2)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.max, self.weight, self.key, self.value))


MEMORY_KINDS = ("global", "spatial")
MEMORY_READS = ("gated", "joint")


class LongMemory(nn.Module):
    def __init__(self, slots: int, heads: int, head_dim: int, kind: str = "global", read: str = "gated") -> None:
        super().__init__()
        if kind not in MEMORY_KINDS:
            raise ValueError(f"memory kind must be one of {MEMORY_KINDS}, got {kind!r}")
        if read not in MEMORY_READS:
            raise ValueError(f"memory read must be one of {MEMORY_READS}, got {read!r}")
        self.kind, self.read_mode = kind, read
        self.queries = nn.Parameter(torch.randn(slots, heads, head_dim) / head_dim**0.5)
        # gated: the read's output scale per head (zero: read but adds nothing yet); joint: a logit bias per head
        # on the memory keys in the self-attention's softmax (zero: weighed like any other key)
        self.gate = nn.Parameter(torch.zeros(heads))

    def _places(self, k: torch.Tensor) -> torch.Tensor:
        """Evicted frames k [B, F, tokens, heads, d] -> [B, N, P, heads, d]: N tokens pooled at each of P places
        (global: every token at one place; spatial: the F frames at each token position)."""
        return k.flatten(1, 2).unsqueeze(2) if self.kind == "global" else k

    def _logits(self, k: torch.Tensor) -> torch.Tensor:
        """k [B, N, P, heads, d] -> [B, slots, P, heads, N]."""
        return torch.einsum("mhd,bnphd->bmphn", self.queries.float(), k.float()) / k.shape[-1] ** 0.5

    def pool(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory of evicted frames k, v [B, F, tokens, heads, d] at once -> keys, values [B, slots x P,
        heads, d] (P = 1 global, tokens spatial; slot-major)."""
        k, v = self._places(k), self._places(v)
        w = torch.softmax(self._logits(k), dim=-1)
        key = torch.einsum("bmphn,bnphd->bmphd", w, k.float())
        value = torch.einsum("bmphn,bnphd->bmphd", w, v.float())
        return key.flatten(1, 2), value.flatten(1, 2)

    @torch.no_grad()
    def absorb(self, state: MemoryState | None, k: torch.Tensor, v: torch.Tensor) -> MemoryState:
        """``state`` with the evicted frames k, v [B, F, tokens, heads, d] added (the online softmax)."""
        k, v = self._places(k), self._places(v)
        logits = self._logits(k)
        new_max = logits.amax(-1)
        if state is not None:
            new_max = torch.maximum(new_max, state.max)
        p = torch.exp(logits - new_max.unsqueeze(-1))
        weight = p.sum(-1)
        key = torch.einsum("bmphn,bnphd->bmphd", p, k.float())
        value = torch.einsum("bmphn,bnphd->bmphd", p, v.float())
        if state is not None:
            scale = torch.exp(state.max - new_max)
            weight = weight + state.weight * scale
            key = key + state.key * scale.unsqueeze(-1)
            value = value + state.value * scale.unsqueeze(-1)
        return MemoryState(new_max, weight, key, value)

    def keys_at(self, key: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        """The memory's keys as read: spatial ones with RoPE ``cos``/``sin`` (their places, one time index),
        global ones without a position."""
        from model.rope import apply_rotary

        if self.kind != "spatial":
            return key
        if cos is None:
            raise ValueError("a spatial memory is read with its RoPE positions (cos, sin)")
        return apply_rotary(key, cos, sin)

    def attend_with(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """read=joint: queries q [B, T, heads, d] over the self-attention keys/values k, v [B, N, heads, d]
        (RoPE applied) and the memory [B, M, heads, d] in one softmax, the memory's logits raised by the gate
        (per head) -> [B, T, heads * d]: the memory is attended as more frames of the past."""
        import torch.nn.functional as F

        mk = self.keys_at(key.to(q.dtype), cos, sin)
        kk, vv = torch.cat([k, mk], dim=1), torch.cat([v, value.to(v.dtype)], dim=1)
        bias = torch.zeros(q.shape[2], 1, kk.shape[1], dtype=q.dtype, device=q.device)
        bias[:, :, k.shape[1] :] = self.gate.to(q.dtype).view(-1, 1, 1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), attn_mask=bias)
        return out.transpose(1, 2).flatten(2, 3)

    def read(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor | None = None,
             sin: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """read=gated: queries q [B, T, heads, d] (RoPE applied) over the memory [B, M, heads, d] -> [B, T,
        heads * d], each head scaled by its gate (added to the self-attention's output)."""
        from model.attention import attend

        key = self.keys_at(key.to(q.dtype), cos, sin)
        out = attend(q, key, value.to(q.dtype)).unflatten(2, (q.shape[2], -1))
        return (out * self.gate.to(out.dtype).view(1, 1, -1, 1)).flatten(2, 3)
