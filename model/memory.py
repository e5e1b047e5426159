"""Long-Short Visual Memory (InteractiveAvatar's LSVM, our design): a fixed number of memory tokens per layer
that summarise the frames the rolling window has evicted, read by every later chunk beside the Reference Sink
and the short window.

Each layer has ``slots`` learned queries. The memory is attention pooling over the keys (cached before RoPE)
and values of every evicted token: slot m's key and value are the softmax(q_m . k_j / sqrt(d))-weighted means
of the evicted keys and values, per head. Pooling is a softmax over everything evicted so far, so it can be
kept as running statistics (the online softmax: a running max, the sum of the weights and the weighted sums):
bounded state (slots x heads x (2 d + 2) numbers per layer) and a flat per-chunk cost however long the stream
runs, and the block-causal training forward, which pools the same frames at once, computes the same memory.
A chunk's queries read the memory through their own attention over the slots (memory keys carry no RoPE
position), added to the self-attention output through a per-head gate that starts at zero: a model with the
memory computes exactly what it did without it until the gate is trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MemoryState:
    """Running online-softmax statistics of one layer's pooled evicted tokens ([B, slots, heads] / [..., d])."""

    max: torch.Tensor
    weight: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight.unsqueeze(-1)
        return self.key / w, self.value / w

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.max, self.weight, self.key, self.value))


class LongMemory(nn.Module):
    def __init__(self, slots: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(slots, heads, head_dim) / head_dim**0.5)
        self.gate = nn.Parameter(torch.zeros(heads))  # zero: the memory is read but adds nothing yet

    def _logits(self, k: torch.Tensor) -> torch.Tensor:
        """k [B, N, heads, d] -> [B, slots, heads, N]."""
        return torch.einsum("mhd,bnhd->bmhn", self.queries.float(), k.float()) / k.shape[-1] ** 0.5

    def pool(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory of evicted tokens k, v [B, N, heads, d] at once -> keys, values [B, slots, heads, d]."""
        w = torch.softmax(self._logits(k), dim=-1)
        return torch.einsum("bmhn,bnhd->bmhd", w, k.float()), torch.einsum("bmhn,bnhd->bmhd", w, v.float())

    @torch.no_grad()
    def absorb(self, state: MemoryState | None, k: torch.Tensor, v: torch.Tensor) -> MemoryState:
        """``state`` with the evicted tokens k, v [B, N, heads, d] added (the online softmax)."""
        logits = self._logits(k)
        new_max = logits.amax(-1)
        if state is not None:
            new_max = torch.maximum(new_max, state.max)
        p = torch.exp(logits - new_max.unsqueeze(-1))
        weight = p.sum(-1)
        key = torch.einsum("bmhn,bnhd->bmhd", p, k.float())
        value = torch.einsum("bmhn,bnhd->bmhd", p, v.float())
        if state is not None:
            scale = torch.exp(state.max - new_max)
            weight = weight + state.weight * scale
            key = key + state.key * scale.unsqueeze(-1)
            value = value + state.value * scale.unsqueeze(-1)
        return MemoryState(new_max, weight, key, value)

    def read(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Queries q [B, T, heads, d] (RoPE applied) over the memory [B, slots, heads, d] -> [B, T, heads * d],
        each head scaled by its gate."""
        from model.attention import attend

        out = attend(q, key.to(q.dtype), value.to(q.dtype)).unflatten(2, (q.shape[2], -1))
        return (out * self.gate.to(out.dtype).view(1, 1, -1, 1)).flatten(2, 3)
