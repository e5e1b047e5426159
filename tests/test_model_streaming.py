"""Cached streaming against the block-causal mask; Reference Sink; rolling window; RAPR."""

from __future__ import annotations

import pytest
import torch

from model.attention import CausalLayout, KVCache, block_causal_mask
from model.dit import AudioDiT, DiTSpec

AUDIO_DIM = 24


def _model(seed: int = 0) -> AudioDiT:
    torch.manual_seed(seed)
    model = AudioDiT(DiTSpec(audio_dim=AUDIO_DIM)).eval()
    for block in model.blocks:  # trained-looking audio modules, so that they take part in the comparison
        torch.nn.init.normal_(block.audio_attn.to_out.weight, std=0.1)
        torch.nn.init.normal_(block.interact_attn.to_out.weight, std=0.1)
    return model


def _sequence(frames: int, seed: int = 1, size: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(1, frames, generator=g) * 1000
    t[:, 0] = 0
    return dict(
        latents=torch.randn(1, 16, frames, size, size, generator=g),
        timestep=t,
        text=torch.randn(1, 5, 32, generator=g),
        audio_talk=torch.randn(1, frames, 6, AUDIO_DIM, generator=g),
        audio_listen=torch.randn(1, frames, 6, AUDIO_DIM, generator=g),
    )


def _chunk(x: dict, start: int, end: int) -> dict:
    return {
        "latents": x["latents"][:, :, start:end], "timestep": x["timestep"][:, start:end], "text": x["text"],
        "audio_talk": x["audio_talk"][:, start:end], "audio_listen": x["audio_listen"][:, start:end],
    }  # fmt: skip


@torch.no_grad()
def _stream(model: AudioDiT, x: dict, layout: CausalLayout, cache: KVCache | None = None) -> torch.Tensor:
    cache = KVCache(layout, len(model.blocks)) if cache is None else cache
    outs = []
    for start, end in layout.chunks(x["latents"].shape[2]):
        outs.append(model(**_chunk(x, start, end), attention="streaming", layout=layout, cache=cache,
                          frame_start=start, write_cache=True))  # fmt: skip
    return torch.cat(outs, dim=2)


def test_block_causal_mask_structure():
    layout = CausalLayout(chunk_frames=3, sink_frames=4, window_frames=3, rapr=True, max_distance=10)
    mask = block_causal_mask(13, layout).int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # reference chunk: itself
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # chunk 1 (frames 1-3): reference + itself
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # chunk 2: sink (0-3) + itself
        [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],  # chunk 3: sink + window (4-6) + itself
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1],  # chunk 4: sink + window (7-9, 4-6 evicted) + itself
        [1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1],
    ])  # fmt: skip
    assert torch.equal(mask, expected)
    with pytest.raises(ValueError, match="sink_frames"):
        CausalLayout(chunk_frames=3, sink_frames=3, window_frames=6)


@pytest.mark.parametrize("rapr", [True, False])
def test_streaming_equals_masked_forward_without_eviction(rapr):
    """Every frame stays visible (a window wider than the stream). The ordered rule cannot re-encode a window
    wider than D without pushing it into the sink, so its RAPR waits for W + C (test_rapr_* below); the legacy
    rule re-encodes from D on: with it, streaming must still equal the masked forward."""
    model = _model()
    layout = CausalLayout(chunk_frames=3, sink_frames=4, window_frames=1000, rapr=rapr, max_distance=5,
                          rapr_rule="legacy")  # fmt: skip
    x = _sequence(1 + 3 * 6)
    with torch.no_grad():
        masked = model(**x, attention="block_causal", layout=layout)
    streamed = _stream(model, x, layout)
    assert (masked - streamed).abs().max().item() <= 1e-5
    # the comparison has teeth: a vanilla-RoPE cache does not reproduce a RAPR mask (and vice versa)
    other = CausalLayout(3, 4, 1000, rapr=not rapr, max_distance=5, rapr_rule="legacy")
    assert (masked - _stream(model, x, other)).abs().max().item() > 1e-4


@pytest.mark.parametrize("rule", ["ordered", "legacy"])
def test_streaming_equals_masked_forward_with_sink_window_and_rapr(rule):
    model = _model(1)
    layout = CausalLayout(chunk_frames=3, sink_frames=4, window_frames=6, rapr=True, max_distance=10, rapr_rule=rule)
    x = _sequence(1 + 3 * 8, seed=2)
    with torch.no_grad():
        masked = model(**x, attention="block_causal", layout=layout)
    assert (masked - _stream(model, x, layout)).abs().max().item() <= 1e-5
    # both rules re-encode within these 25 frames, differently: the comparison has teeth
    other = CausalLayout(3, 4, 6, rapr=True, max_distance=10, rapr_rule="legacy" if rule == "ordered" else "ordered")
    with torch.no_grad():
        assert (masked - model(**x, attention="block_causal", layout=other)).abs().max().item() > 1e-4


@torch.no_grad()
def test_sink_is_never_evicted_and_cache_stays_bounded():
    model = _model()
    layout = CausalLayout(chunk_frames=3, sink_frames=4, window_frames=6, rapr=True, max_distance=10)
    cache = KVCache(layout, len(model.blocks))
    x = _sequence(1 + 3, size=4)
    model(**_chunk(x, 0, 1), attention="streaming", layout=layout, cache=cache, frame_start=0, write_cache=True)
    first_sink_k, first_sink_v = None, None
    for i in range(200):
        start = 1 + 3 * i
        chunk = _sequence(1 + 3, seed=10 + i, size=4)
        model(**_chunk(chunk, 1, 4), attention="streaming", layout=layout, cache=cache, frame_start=start,
              write_cache=True)  # fmt: skip
        if i == 0:  # the reference frame and the first chunk are now in the sink
            first_sink_k = [k.clone() for k in cache.sink_k]
            first_sink_v = [v.clone() for v in cache.sink_v]
        assert len(cache) <= layout.sink_frames + layout.window_frames
        for layer in range(len(model.blocks)):
            k, v = cache.keys(layer)
            assert k.shape[1] == v.shape[1] == len(cache)
    assert cache.sink_frames == [0, 1, 2, 3]
    assert cache.window_frames == list(range(1 + 3 * 200 - 6, 1 + 3 * 200))
    for layer in range(len(model.blocks)):
        assert torch.equal(cache.sink_k[layer], first_sink_k[layer])
        assert torch.equal(cache.sink_v[layer], first_sink_v[layer])
    # keys are stored BEFORE RoPE: the reference frame's cached keys equal the un-rotated projection
    block = model.blocks[0]
    tokens = model.patch_embedding(x["latents"][:, :, :1]).flatten(2).transpose(1, 2)
    temb = model._time_embedding(torch.zeros(1, 1))[1]
    mod = (block.scale_shift_table.unsqueeze(0) + temb.float()).unsqueeze(2)
    h = (block.norm1(tokens.float()).unflatten(1, (1, -1)) * (1 + mod[..., 1, :]) + mod[..., 0, :]).flatten(1, 2)
    k = block.attn1.norm_k(block.attn1.to_k(h)).unflatten(2, (block.attn1.heads, -1))
    assert (cache.sink_k[0][:, 0] - k).abs().max() <= 1e-6


def _record_rope(model: AudioDiT) -> list[int]:
    seen: list[int] = []
    original = model.rope.forward

    def spy(time_index, height, width):
        seen.extend(time_index.tolist())
        return original(time_index, height, width)

    model.rope.forward = spy
    return seen


@torch.no_grad()
def _chunk_k_output(model: AudioDiT, layout: CausalLayout, k: int) -> torch.Tensor:
    """Fill a cache by streaming 5 chunks, relabel it as if chunk k were next, and run chunk k."""
    cache = KVCache(layout, len(model.blocks))
    x = _sequence(1 + 3 * 5, seed=4, size=4)
    _stream(model, x, layout, cache)
    assert len(cache) == layout.sink_frames + layout.window_frames
    offset = 3 * (k - 5)
    cache.window_frames = [f + offset for f in cache.window_frames]  # same contents, later in the stream
    nxt = _sequence(1 + 3, seed=5, size=4)
    return model(**_chunk(nxt, 1, 4), attention="streaming", layout=layout, cache=cache,
                 frame_start=1 + 3 * 5 + offset)  # fmt: skip


def test_rapr_makes_chunk_output_independent_of_stream_position():
    model = _model()
    layout = CausalLayout(chunk_frames=3, sink_frames=4, window_frames=6, rapr=True, max_distance=10)
    seen = _record_rope(model)
    at_5, at_5000 = _chunk_k_output(model, layout, 5), _chunk_k_output(model, layout, 5000)
    assert torch.equal(at_5, at_5000)
    assert max(seen) <= layout.max_distance + layout.window_frames and min(seen) >= 0
    # vanilla absolute RoPE: the same cache contents give a different chunk far into the stream
    vanilla = CausalLayout(chunk_frames=3, sink_frames=4, window_frames=6, rapr=False, max_distance=10)
    v5, v5000 = _chunk_k_output(model, vanilla, 5), _chunk_k_output(model, vanilla, 5000)
    assert (v5 - v5000).abs().max().item() > 1e-2
    assert max(seen) > 10_000  # vanilla indices grow without bound


def test_rapr_positions_follow_the_paper():
    layout = CausalLayout(chunk_frames=3, sink_frames=4, window_frames=6, rapr=True, max_distance=10)
    # early chunks: absolute positions (no shift until the chunk ends beyond the sink + D)
    assert layout.time_index([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], end=10) == list(range(10))
    # chunk [601, 604): the sink anchored at 0..3 (reference 0, first chunk 1..3), then the window with its
    # distances kept and the current frames on top; D = 10 is raised to 12 so that the 9 frames fit above the sink
    keys = layout.visible(601, 604)
    assert keys == [0, 1, 2, 3, 595, 596, 597, 598, 599, 600, 601, 602, 603]
    assert layout.time_index(keys, end=604) == list(range(13))
    # a D that leaves room keeps the paper's min(t, D) for the current frame (a gap below the window)
    roomy = CausalLayout(chunk_frames=3, sink_frames=4, window_frames=6, rapr=True, max_distance=15)
    assert roomy.time_index(keys, end=604) == [0, 1, 2, 3, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    # the legacy rule (kept for the drift bench) put the sink's first chunk among the window frames
    legacy = CausalLayout(chunk_frames=3, sink_frames=4, window_frames=6, rapr=True, max_distance=10, rapr_rule="legacy")
    assert legacy.time_index(keys, end=604) == [0, 1, 2, 3, 2, 3, 4, 5, 6, 7, 8, 9, 10]


LAYOUTS = [(6, 3, 10), (3, 3, 6), (12, 3, 5), (0, 2, 1), (4, 2, 30), (6, 3, 15)]  # window, chunk, D


@pytest.mark.parametrize("sink, window, chunk, distance", [
    (sink, *layout) for sink in (0, 1, 4, 7) for layout in LAYOUTS
    if sink <= 1 or (sink - 1) % layout[1] == 0  # a sink is the reference + whole chunks
])  # fmt: skip
def test_rapr_keeps_every_cached_frame_distinct_and_in_order(sink, window, chunk, distance):
    """The rule, stated without the layout's own planning: a frame's index is its absolute index until the
    stream is long; then the current chunk's last frame sits at top = max(D, max(1, sink) - 1 + W + C), every
    other non-sink frame keeps its distance to it, and sink frames keep their own index. Checked against
    time_index for every chunk of a long stream: indices distinct, ascending in frame order, bounded by top."""
    layout = CausalLayout(chunk_frames=chunk, sink_frames=sink, window_frames=window, rapr=True, max_distance=distance)
    top = max(distance, max(1, sink) - 1 + window + chunk)
    for start in range(1, 1 + chunk * 400, chunk):
        end = start + chunk
        keys = layout.visible(start, end)
        last = min(end - 1, top)
        expected = [f if f < sink else last - (end - 1 - f) for f in keys]
        got = layout.time_index(keys, end)
        assert got == expected, (start, keys, got)
        assert got == sorted(set(got)), (start, keys, got)  # distinct and in frame order
        assert 0 <= min(got) and max(got) <= top


def _reference_model(seed: int = 0) -> AudioDiT:
    torch.manual_seed(seed)
    model = AudioDiT(DiTSpec(audio_dim=AUDIO_DIM, reference_embedding=True)).eval()
    torch.nn.init.normal_(model.reference_embedding.weight, std=0.1)  # trained-looking, not its zero start
    return model


@pytest.mark.parametrize("sink", [1, 0])
def test_reference_embedding_streams_exactly_and_follows_the_reference_keys(sink):
    """The reference embedding reaches a chunk exactly when the reference's keys do: streamed chunks equal the
    block-causal forward with a sink, and without one (the reference evicted after the first window)."""
    model = _reference_model()
    layout = CausalLayout(chunk_frames=3, sink_frames=sink, window_frames=3, rapr=True, max_distance=6)
    x = _sequence(1 + 3 * 4, seed=3)
    with torch.no_grad():
        masked = model(**x, attention="block_causal", layout=layout)
    assert (masked - _stream(model, x, layout)).abs().max().item() <= 1e-5
    # the embedding is added to the tokens of every frame whose chunk sees the reference's keys, and no other
    lat = x["latents"]
    tokens = torch.zeros(1, 13 * 16, model.spec.dim)
    with torch.no_grad():
        added = model.add_reference(tokens, lat, "block_causal", layout, None, 0, False).unflatten(1, (13, 16))
    per_frame = added.abs().amax(dim=(0, 2, 3)) > 0
    sees = [any(0 in layout.visible(s, e) for s, e in layout.chunks(13) if s <= f < e) for f in range(13)]
    assert per_frame.tolist() == sees and sees[1] and (sink or not sees[-1])


def test_reference_embedding_starts_at_zero_and_loads_a_dit_saved_without_it():
    from tasks.common.models import load_dit_weights
    from tasks.config import ConfigError

    base = _model()
    x = _sequence(1 + 3 * 2, seed=4)
    with_ref = AudioDiT(DiTSpec(audio_dim=AUDIO_DIM, reference_embedding=True)).eval()
    load_dit_weights(with_ref, {"model": base.state_dict(), "spec": base.spec.to_json()}, "test")
    with torch.no_grad():  # a continued base DiT computes exactly what it did before training the embedding
        assert torch.equal(with_ref(**x), base(**x))
    with pytest.raises(ConfigError, match="holds a DiT"):
        load_dit_weights(AudioDiT(DiTSpec(audio_dim=AUDIO_DIM, num_layers=3)),
                         {"model": base.state_dict(), "spec": base.spec.to_json()}, "test")  # fmt: skip


def test_audio_slots_and_null_keys_stream_exactly_and_load_into_a_base_dit():
    from tasks.common.models import load_dit_weights

    torch.manual_seed(2)
    model = AudioDiT(DiTSpec(audio_dim=AUDIO_DIM, audio_slots=6, audio_null_key=True)).eval()
    for block in model.blocks:  # trained-looking audio modules
        torch.nn.init.normal_(block.audio_attn.to_out.weight, std=0.1)
        torch.nn.init.normal_(block.interact_attn.null_k, std=1.0)
    layout = CausalLayout(chunk_frames=3, sink_frames=1, window_frames=3, rapr=True, max_distance=6)
    x = _sequence(1 + 3 * 4, seed=5)
    with torch.no_grad():
        masked = model(**x, attention="block_causal", layout=layout)
    assert (masked - _stream(model, x, layout)).abs().max().item() <= 1e-5
    # a base DiT (audio at its zero-output start) saved without them: continued, it computes what it did
    torch.manual_seed(3)
    base = AudioDiT(DiTSpec(audio_dim=AUDIO_DIM)).eval()
    load_dit_weights(model, {"model": base.state_dict(), "spec": base.spec.to_json()}, "test")
    with torch.no_grad():
        assert torch.equal(model(**x), base(**x))
    assert model.audio_embedder.slot.abs().sum() > 0  # the slots keep their (random) init


def _memory_model(seed: int = 6, slots: int = 4, kind: str = "global", read: str = "gated") -> AudioDiT:
    torch.manual_seed(seed)
    model = AudioDiT(DiTSpec(audio_dim=AUDIO_DIM, memory_slots=slots, memory_kind=kind, memory_read=read)).eval()
    for block in model.blocks:  # a trained-looking memory: the gate open
        torch.nn.init.normal_(block.long_memory.gate, std=1.0)
    return model


@pytest.mark.parametrize("kind,read", [("global", "gated"), ("spatial", "gated"), ("spatial", "joint")])
@pytest.mark.parametrize("sink", [0, 1])
def test_long_memory_streams_exactly_and_stays_bounded(sink, kind, read):
    """The Long-Short Visual Memory: chunk by chunk, the evicted frames are pooled as running statistics; the
    block-causal forward pools the same frames at once: the same outputs. Its state does not grow."""
    model = _memory_model(kind=kind, read=read)
    layout = CausalLayout(chunk_frames=3, sink_frames=sink, window_frames=3, rapr=True, max_distance=6)
    x = _sequence(1 + 3 * 7, seed=7)
    with torch.no_grad():
        masked = model(**x, attention="block_causal", layout=layout)
    cache = KVCache(layout, len(model.blocks))
    assert (masked - _stream(model, x, layout, cache)).abs().max().item() <= 1e-5
    assert all(m is not None for m in cache.memory)  # frames were evicted and summarised
    # teeth: without the memory (same weights otherwise) the late chunks differ; the early ones (nothing
    # evicted yet) do not
    plain = AudioDiT(DiTSpec(audio_dim=AUDIO_DIM)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".long_memory." not in k})
    with torch.no_grad():
        without = plain(**x, attention="block_causal", layout=layout)
    first_evicting = 7  # chunk [7, 10) is the first to which a frame of [1, 4) is evicted (sink 0 loses frame 0 at 4)
    assert torch.equal(masked[:, :, :4], without[:, :, :4])
    assert (masked[:, :, first_evicting:] - without[:, :, first_evicting:]).abs().max() > 1e-3
    # bounded: the state after a long stream is the size it was after the first eviction
    long = _sequence(1 + 3 * 20, seed=8)
    sizes = []
    cache = KVCache(layout, len(model.blocks))
    with torch.no_grad():
        for start, end in layout.chunks(long["latents"].shape[2]):
            model(**_chunk(long, start, end), attention="streaming", layout=layout, cache=cache, frame_start=start,
                  write_cache=True)  # fmt: skip
            sizes.append(cache.nbytes())
    assert len(set(sizes[4:])) == 1, sizes


@pytest.mark.parametrize("kind,read", [("global", "gated"), ("spatial", "gated"), ("spatial", "joint")])
def test_long_memory_remembers_what_left_the_window(kind, read):
    """Change a frame that is long evicted: the model with memory answers differently, the one without cannot."""
    model = _memory_model(9, kind=kind, read=read)
    layout = CausalLayout(chunk_frames=3, sink_frames=1, window_frames=3, rapr=True, max_distance=6)
    x = _sequence(1 + 3 * 5, seed=10)
    y = {k: v.clone() for k, v in x.items()}
    y["latents"][:, :, 1:4] += 3.0  # the first generated chunk: out of the window by the last chunk
    plain = AudioDiT(DiTSpec(audio_dim=AUDIO_DIM)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".long_memory." not in k})
    with torch.no_grad():
        last = slice(13, 16)
        for m, changes in ((model, True), (plain, False)):
            a = m(**x, attention="block_causal", layout=layout)[:, :, last]
            b = m(**y, attention="block_causal", layout=layout)[:, :, last]
            assert ((a - b).abs().max() > 1e-3) == changes


def test_spatial_memory_keeps_each_place_apart():
    """model.memory_kind=spatial: one memory token per slot and token position, pooled over the evicted frames
    at that position only (a change at one place moves that place's tokens, in every slot, and nothing else);
    the global memory mixes every place into each slot. Streamed (online) equals pooled at once."""
    from model.memory import LongMemory

    torch.manual_seed(0)
    frames, tokens, heads, dim, slots = 5, 6, 2, 8, 3
    k, v = torch.randn(1, frames, tokens, heads, dim), torch.randn(1, frames, tokens, heads, dim)
    k2, v2 = k.clone(), v.clone()
    k2[:, 1:3, 4] += 2.0  # place 4 of two evicted frames
    v2[:, 1:3, 4] -= 3.0
    spatial, global_ = LongMemory(slots, heads, dim, "spatial"), LongMemory(slots, heads, dim, "global")
    with torch.no_grad():
        a_k, a_v = spatial.pool(k, v)
        b_k, b_v = spatial.pool(k2, v2)
        assert a_k.shape == (1, slots * tokens, heads, dim)  # slot-major: token j of slot m at m * tokens + j
        moved = ((a_v - b_v).abs().amax((0, 2, 3)) > 1e-4).view(slots, tokens)
        assert moved[:, 4].all() and not moved[:, [0, 1, 2, 3, 5]].any()
        g_a, g_b = global_.pool(k, v)[1], global_.pool(k2, v2)[1]
        assert g_a.shape == (1, slots, heads, dim) and ((g_a - g_b).abs().amax((0, 2, 3)) > 1e-4).all()
        state = None
        for f in range(frames):  # online, one evicted frame at a time
            state = spatial.absorb(state, k[:, f : f + 1], v[:, f : f + 1])
        s_k, s_v = state.read()
        assert torch.allclose(s_k, a_k, atol=1e-5) and torch.allclose(s_v, a_v, atol=1e-5)
    with pytest.raises(ValueError, match="RoPE"):  # a spatial memory is read at its places, never without
        spatial.read(torch.randn(1, 4, heads, dim), a_k, a_v)
    with pytest.raises(ValueError, match="memory kind"):
        LongMemory(slots, heads, dim, "temporal")


def test_a_closed_memory_loads_as_any_memory_a_trained_one_only_as_its_own():
    """A DiT saved with its memory at the closed start (a teacher: bidirectional, nothing evicted) loads into
    a student with any memory (other slots, kind, read): the student's memory keeps its own init and every
    other weight loads. Once a gate has moved, the memory's settings are part of what was learned."""
    from tasks.common.models import load_dit_weights
    from tasks.config import ConfigError

    torch.manual_seed(1)
    closed = AudioDiT(DiTSpec(audio_dim=AUDIO_DIM, memory_slots=4)).eval()
    saved = {"model": closed.state_dict(), "spec": {k: v for k, v in closed.spec.to_json().items()
                                                    if k not in ("memory_kind", "memory_read")}}  # saved before they existed
    torch.manual_seed(2)
    student = AudioDiT(DiTSpec(audio_dim=AUDIO_DIM, memory_slots=1, memory_kind="spatial", memory_read="joint")).eval()
    init = {k: v.clone() for k, v in student.state_dict().items()}
    load_dit_weights(student, saved, "closed.pt")
    for k, v in student.state_dict().items():
        assert torch.equal(v, init[k] if ".long_memory." in k else closed.state_dict()[k]), k
    trained = _memory_model(3)  # gates open, kind global, read gated
    with pytest.raises(ConfigError, match="memory_kind"):
        load_dit_weights(student, {"model": trained.state_dict(), "spec": trained.spec.to_json()}, "trained.pt")


def test_joint_read_is_one_softmax_over_the_window_and_the_memory():
    """read=joint: the memory's keys join the self-attention's softmax, their logits raised by the gate (per
    head); a very negative gate leaves the attention over the window alone."""
    from model.attention import attend
    from model.memory import LongMemory

    torch.manual_seed(4)
    b, t, n, m, heads, dim = 1, 5, 7, 3, 2, 8
    q, k, v = torch.randn(b, t, heads, dim), torch.randn(b, n, heads, dim), torch.randn(b, n, heads, dim)
    mk, mv = torch.randn(b, m, heads, dim), torch.randn(b, m, heads, dim)
    mem = LongMemory(1, heads, dim, "global", "joint")
    with torch.no_grad():
        mem.gate.copy_(torch.tensor([0.7, -1.3]))
        out = mem.attend_with(q, k, v, mk, mv).unflatten(2, (heads, dim))
        logits = torch.einsum("bthd,bnhd->bhtn", q, torch.cat([k, mk], 1)) / dim**0.5
        logits[..., n:] += mem.gate.view(1, heads, 1, 1)
        want = torch.einsum("bhtn,bnhd->bthd", logits.softmax(-1), torch.cat([v, mv], 1))
        assert torch.allclose(out, want, atol=1e-5)
        mem.gate.fill_(-1e4)
        assert torch.allclose(mem.attend_with(q, k, v, mk, mv), attend(q, k, v), atol=1e-5)


def test_long_memory_starts_closed_and_loads_a_dit_saved_without_it():
    from tasks.common.models import load_dit_weights

    base = _model()
    layout = CausalLayout(chunk_frames=3, sink_frames=1, window_frames=3, rapr=True, max_distance=6)
    x = _sequence(1 + 3 * 5, seed=11)
    torch.manual_seed(12)
    with_memory = AudioDiT(DiTSpec(audio_dim=AUDIO_DIM, memory_slots=4)).eval()
    load_dit_weights(with_memory, {"model": base.state_dict(), "spec": base.spec.to_json()}, "test")
    with torch.no_grad():  # gate at zero: exactly the base DiT, streamed or masked
        assert torch.equal(with_memory(**x, attention="block_causal", layout=layout),
                           base(**x, attention="block_causal", layout=layout))  # fmt: skip
        assert torch.equal(_stream(with_memory, x, layout), _stream(base, x, layout))
    # trainable: the gate gets a gradient from a loss on a chunk that reads the memory
    with_memory.train()
    out = with_memory(**x, attention="block_causal", layout=layout)
    out[:, :, 13:].square().mean().backward()
    assert all(b.long_memory.gate.grad.abs().sum() > 0 for b in with_memory.blocks)


def _prompt_model(seed: int = 7) -> AudioDiT:
    torch.manual_seed(seed)
    model = AudioDiT(DiTSpec(audio_dim=AUDIO_DIM, prompt_modulation=True)).eval()
    torch.nn.init.normal_(model.prompt_modulation.weight, std=0.5)  # trained-looking, not its zero start
    return model


def test_prompt_modulation_streams_exactly_and_tells_prompts_apart():
    """The pooled prompt added to the time embedding: streamed chunks equal the block-causal forward, a prepared
    context equals the raw prompt, and the modulation (not the cross-attention) separates two prompts that share
    their first tokens; the discriminator's backbone loop takes it too."""
    from model.discriminator import ConsistencyAwareDiscriminator

    model = _prompt_model()
    layout = CausalLayout(chunk_frames=3, sink_frames=1, window_frames=3, rapr=True, max_distance=6)
    x = _sequence(1 + 3 * 3, seed=8)
    with torch.no_grad():
        masked = model(**x, attention="block_causal", layout=layout)
        assert (masked - _stream(model, x, layout)).abs().max().item() <= 1e-5
        assert (model(**{**x, "text": model.prepare_text(x["text"])}) - model(**x)).abs().max().item() <= 1e-6
        other = x["text"].clone()
        other[:, 3:] = torch.randn(1, 2, 32, generator=torch.Generator().manual_seed(9))  # another action's words
        gap = (model(**x) - model(**{**x, "text": other})).abs().mean()
        for block in model.blocks:  # the cross-attention's value path closed: only the modulation hears the prompt
            torch.nn.init.zeros_(block.attn2.to_v.weight)
            torch.nn.init.zeros_(block.attn2.to_v.bias)
        gap_modulation = (model(**x) - model(**{**x, "text": other})).abs().mean()
        torch.nn.init.zeros_(model.prompt_modulation.weight)
        gap_none = (model(**x) - model(**{**x, "text": other})).abs().mean()
    assert gap > 0 and gap_modulation > 0.05 * gap and gap_none == 0
    disc = ConsistencyAwareDiscriminator(_prompt_model(), 2, 4, 1, 16, max_frames=16).eval()
    with torch.no_grad():
        lazy = disc.frame_features(x["latents"], x["timestep"], x["text"], x["audio_talk"], x["audio_listen"])
        ready = disc.frame_features(x["latents"], x["timestep"], disc.backbone.prepare_text(x["text"]),
                                    x["audio_talk"], x["audio_listen"])  # fmt: skip
        moved = disc.frame_features(x["latents"], x["timestep"], other, x["audio_talk"], x["audio_listen"])
    assert (lazy - ready).abs().max().item() <= 1e-5 and (lazy - moved).abs().max().item() > 1e-4


def test_prompt_modulation_starts_at_zero_and_loads_a_dit_saved_without_it():
    from tasks.common.models import load_dit_weights

    base = _model()
    x = _sequence(1 + 3 * 2, seed=10)
    with_mod = AudioDiT(DiTSpec(audio_dim=AUDIO_DIM, prompt_modulation=True)).eval()
    load_dit_weights(with_mod, {"model": base.state_dict(), "spec": base.spec.to_json()}, "test")
    with torch.no_grad():  # a continued base DiT computes exactly what it did before training the modulation
        assert torch.equal(with_mod(**x), base(**x))
    with pytest.raises(ValueError, match="pooled prompt"):
        with_mod._time_embedding(x["timestep"])
