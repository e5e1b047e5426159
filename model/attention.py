"""Which frames a chunk may attend to, at which RoPE time index, and the rolling KV cache.

One set of rules serves the block-causal training mask and cached streaming inference, so that the two
paths see the same keys at the same positions (tests/test_model_streaming.py proves they agree):

* frame 0 is the reference chunk; after it come chunks of ``chunk_frames`` latent frames. A chunk sees
  every earlier chunk it is allowed to (causal between chunks) and all of itself (bidirectional inside);
* the Reference Sink: frames ``< sink_frames`` (the reference plus the first chunk, paper 3.1.1) are
  always visible and never evicted; other past frames are visible while they are among the last
  ``window_frames`` non-sink frames (the rolling window);
* RAPR: keys are cached BEFORE RoPE. Sink frames keep their own index (the reference at 0, the first
  chunk at 1..C). Every other frame ``t`` is rotated at ``t - shift`` with one shift per chunk, so all
  distances between generated frames are kept and the chunk's last frame sits at ``min(e - 1, top)`` when
  the chunk ends (exclusive) at ``e``, with ``top = max(D, S' - 1 + W + C)`` (S' = max(1, sink_frames),
  W = window_frames, C = chunk_frames): the paper's "the current frame takes min(t, D), all other cached
  keys shift to keep their relative positions", except that D is raised just enough for the window and the
  current chunk (W + C frames) to fit above the sink. So no two cached frames share an index and their order
  is kept (``rapr_rule="ordered"``, the default). With the paper's sink 4, window 6, C 3, D 10 the frames of a
  late chunk sit at 0..3 (sink), 4..9 (window), 10..12 (chunk); with the demo's sink 1, window 3, C 3, D 6 the
  top stays D and the rule equals the legacy one. ``rapr_rule="legacy"``: shift ``max(0, e - 1 - D)`` for
  every non-sink frame whatever the sink, so with a sink of 1 + C frames the first chunk collides with window
  frames and appears after the oldest of them (at chunk 601 of the paper's layout: [0,1,2,3, 2,3,4,5,6,7,
  8,9,10]); kept to measure what the ordered rule changes (bench --drift). No index ever exceeds ``top``
  however long the stream runs. With ``rapr=False`` every frame is rotated at its absolute index (vanilla
  RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CausalLayout:
    chunk_frames: int  # C
    sink_frames: int  # 0 (no sink), 1 (reference only) or 1 + k*C (reference + first k chunks)
    window_frames: int  # W, rolling window of non-sink frames
    rapr: bool = True
    max_distance: int = 10  # D
    rapr_rule: str = "ordered"  # or "legacy" (see the module docstring)

    def __post_init__(self) -> None:
        if self.chunk_frames < 1 or self.window_frames < 0 or self.max_distance < 1:
            raise ValueError(f"invalid causal layout {self}")
        if self.rapr_rule not in ("ordered", "legacy"):
            raise ValueError(f"rapr_rule must be 'ordered' or 'legacy', got {self.rapr_rule!r}")
        if self.sink_frames > 1 and (self.sink_frames - 1) % self.chunk_frames:
            raise ValueError(
                f"sink_frames={self.sink_frames} must be 0, 1 or 1 + a multiple of chunk_frames={self.chunk_frames}"
            )

    def chunks(self, num_frames: int) -> list[tuple[int, int]]:
        """[start, end) of the reference chunk and every generation chunk of a ``num_frames`` sequence."""
        if num_frames < 1 or (num_frames - 1) % self.chunk_frames:
            raise ValueError(
                f"a block-causal sequence has 1 reference frame + whole chunks of {self.chunk_frames}; "
                f"got {num_frames} latent frames"
            )
        bounds = [(0, 1)]
        bounds += [(s, s + self.chunk_frames) for s in range(1, num_frames, self.chunk_frames)]
        return bounds

    def is_sink(self, frame: int) -> bool:
        return frame < self.sink_frames

    def visible(self, start: int, end: int) -> list[int]:
        """Key frames (ascending) that the chunk [start, end) attends to."""
        sink = [f for f in range(min(start, self.sink_frames))]
        first_window = max(self.sink_frames, start - self.window_frames)
        return sink + list(range(first_window, start)) + list(range(start, end))

    def evicted(self, start: int) -> list[int]:
        """Frames the chunk starting at ``start`` no longer sees: non-sink frames older than the window (what
        the Long-Short Visual Memory summarises, model/memory.py)."""
        return list(range(self.sink_frames, max(self.sink_frames, start - self.window_frames)))

    def shift(self, end: int) -> int:
        """How far every non-sink frame's RoPE index moves down for the chunk that ends (exclusive) at ``end``."""
        if not self.rapr:
            return 0
        if self.rapr_rule == "legacy":
            return max(0, end - 1 - self.max_distance)
        return max(0, end - 1 - self.top())

    def top(self) -> int:
        """The highest RoPE index of the ordered rule: D, raised so the window and chunk fit above the sink."""
        return max(self.max_distance, max(1, self.sink_frames) - 1 + self.window_frames + self.chunk_frames)

    def time_index(self, frames: list[int], end: int) -> list[int]:
        """RoPE time index of each frame for the chunk that ends (exclusive) at ``end``."""
        shift = self.shift(end)
        return [f if self.is_sink(f) else f - shift for f in frames]


def block_causal_mask(num_frames: int, layout: CausalLayout) -> torch.Tensor:
    """Frame-level boolean mask [query frame, key frame]: True where attention is allowed."""
    mask = torch.zeros(num_frames, num_frames, dtype=torch.bool)
    for start, end in layout.chunks(num_frames):
        mask[start:end, layout.visible(start, end)] = True
    return mask


class KVCache:
    """Per-layer keys (normalised, BEFORE RoPE) and values of past frames: a sink and a rolling window.

    Tensors are [batch, frames, tokens_per_frame, heads, head_dim]. The sink is written once and never
    touched again; the window keeps the newest ``window_frames`` non-sink frames. Frame bookkeeping is
    plain Python (no device syncs).
    """

    def __init__(self, layout: CausalLayout, num_layers: int) -> None:
        self.layout = layout
        self.num_layers = num_layers
        self.sink_frames: list[int] = []
        self.window_frames: list[int] = []
        empty: list[torch.Tensor | None] = [None] * num_layers
        self.sink_k, self.sink_v = list(empty), list(empty)
        self.win_k, self.win_v = list(empty), list(empty)
        self.reference: torch.Tensor | None = None  # latent frame 0, for AudioDiT's reference embedding
        self.memory: list = [None] * num_layers  # per layer: the evicted frames' MemoryState (model/memory.py)

    @property
    def frames(self) -> list[int]:
        return self.sink_frames + self.window_frames

    def __len__(self) -> int:
        return len(self.sink_frames) + len(self.window_frames)

    def keys(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        parts_k = [t for t in (self.sink_k[layer], self.win_k[layer]) if t is not None]
        parts_v = [t for t in (self.sink_v[layer], self.win_v[layer]) if t is not None]
        if not parts_k:
            return None, None
        return torch.cat(parts_k, dim=1), torch.cat(parts_v, dim=1)

    def write(self, layer: int, frames: list[int], k: torch.Tensor, v: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
        """Add one chunk's keys/values ([B, len(frames), tokens, heads, dim]) to ``layer``; returns the keys and
        values of the frames this pushes out of the window (oldest first), or None."""
        n_sink = sum(1 for f in frames if self.layout.is_sink(f))
        if n_sink:
            self.sink_k[layer] = _append(self.sink_k[layer], k[:, :n_sink])
            self.sink_v[layer] = _append(self.sink_v[layer], v[:, :n_sink])
        if n_sink == len(frames):
            return None
        keep = self.layout.window_frames
        all_k = _append(self.win_k[layer], k[:, n_sink:])
        all_v = _append(self.win_v[layer], v[:, n_sink:])
        self.win_k[layer] = all_k[:, -keep:] if keep else None
        self.win_v[layer] = all_v[:, -keep:] if keep else None
        out = all_k.shape[1] - keep
        return (all_k[:, :out], all_v[:, :out]) if out > 0 else None

    def advance(self, frames: list[int]) -> None:
        """Record that ``frames`` were written to every layer (call once per chunk, after all layers)."""
        for f in frames:
            if self.layout.is_sink(f):
                self.sink_frames.append(f)
            else:
                self.window_frames.append(f)
        keep = self.layout.window_frames
        self.window_frames = self.window_frames[-keep:] if keep else []

    def nbytes(self) -> int:
        tensors = [t for group in (self.sink_k, self.sink_v, self.win_k, self.win_v) for t in group]
        tensors.append(self.reference)
        held = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return held + sum(m.nbytes() for m in self.memory if m is not None)


def _append(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    new = new.detach()
    return new if old is None else torch.cat([old, new], dim=1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA on [B, tokens, heads, dim] tensors; returns [B, tokens, heads*dim]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2, 3)
