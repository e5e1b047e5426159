"""AudioDiT: the Wan2.x video transformer plus the paper's two audio attentions, in three attention modes.

Parameter names and numerics follow diffusers' ``WanTransformer3DModel`` (Wan2.2-TI2V flavour: one
timestep per latent frame, the clean reference as frame 0 at timestep 0), so its state dict loads as is
and, with the audio modules at their zero init, the forward equals diffusers' (tests/test_model_dit.py).
Added in every block, after the text cross-attention (paper 3.2):

* ``audio_attn``    -- Audio Attention: video tokens attend to the TALKING audio features of their frame;
* ``interact_attn`` -- Interact Audio Attention: the same, to the LISTENING features.

Both output projections start at zero, so a freshly loaded pretrained model is unchanged at step 0.

One class serves the teacher and the student; ``attention`` picks the mode at run time:
``"bidirectional"`` (teacher), ``"block_causal"`` (training mask over a whole clip) and ``"streaming"``
(one chunk against a :class:`~model.attention.KVCache`). See model/attention.py for the rules.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.utils.checkpoint
from diffusers.models.attention import FeedForward
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanAttention, WanTimeTextImageEmbedding
from torch import nn

from model.attention import CausalLayout, KVCache, attend
from model.memory import LongMemory
from model.rope import RotaryEmbedding3D, apply_rotary


@dataclass
class DiTSpec:
    """Architecture sizes. Field names follow diffusers' WanTransformer3DModel config where they exist."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 32
    freq_dim: int = 256
    ffn_dim: int = 128
    num_layers: int = 2
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_theta: float = 10000.0
    audio_dim: int = 0  # per-token audio feature size; 0 builds no audio modules (plain Wan)
    # the reference latent (frame 0), patch-embedded by its own zero-initialised conv, added to every token at
    # the same place of every frame that can see the reference: Wan I2V's channel-concatenated image
    # condition written as a sum (conv([x, ref]) = conv_x(x) + conv_ref(ref)); off in plain Wan
    reference_embedding: bool = False
    # the order of the audio tokens of a latent frame (which video frame, which offset of its +-k window):
    # a learned embedding per slot, added inside the audio embedder. Without it the frame-local attention is a
    # weighted sum over an unordered set, so it cannot tell which of the latent frame's video frames a sound
    # belongs to. 0: none (order-free, as before); otherwise the number of tokens per latent frame
    audio_slots: int = 0
    # a learned null key (value zero) in both audio attentions: each video token's query decides how much audio
    # it takes, so one attention can drive the mouth without moving the rest of the frame
    audio_null_key: bool = False
    # Long-Short Visual Memory (model/memory.py): this many learned memory tokens per layer summarise the frames
    # the rolling window evicted; every chunk reads them through a zero-initialised gate. 0: none (the paper)
    memory_slots: int = 0
    # "global": each slot pools every evicted token (slots tokens); "spatial": each slot pools, per token
    # position, the evicted frames at that position (slots x tokens-per-frame tokens, read at their places)
    memory_kind: str = "global"
    # "gated": a separate attention over the memory, added through a per-head gate that starts at zero (the
    # model computes what it did without the memory until trained); "joint": the memory's tokens are more keys
    # of the self-attention's softmax, with a learned per-head logit bias (the memory read as past frames are)
    memory_read: str = "gated"
    # the prompt, mean-pooled after the text embedder, through a zero-initialised linear layer, added to the time
    # embedding: a global modulation of every block and the output head (DiT's class embedding, SD3/Flux's
    # pooled text vector), beside the cross-attention. Where the prompt changes per action (InteractiveAvatar),
    # it tells every token which action is requested; off by default (Wan2.2 has no such input)
    prompt_modulation: bool = False

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wan_config(cls, cfg: dict, audio_dim: int) -> DiTSpec:
        """Sizes from a diffusers ``transformer/config.json``; refuses variants we do not reproduce."""
        if cfg.get("image_dim") or cfg.get("added_kv_proj_dim"):
            raise ValueError("Wan image-conditioned (I2V CLIP) transformers are not supported: use a TI2V/T2V model")
        if cfg.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
            raise ValueError(f"unsupported qk_norm {cfg.get('qk_norm')!r}")
        return cls(
            patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
            num_attention_heads=cfg["num_attention_heads"],
            attention_head_dim=cfg["attention_head_dim"],
            in_channels=cfg["in_channels"],
            out_channels=cfg.get("out_channels") or cfg["in_channels"],
            text_dim=cfg["text_dim"],
            freq_dim=cfg.get("freq_dim", 256),
            ffn_dim=cfg["ffn_dim"],
            num_layers=cfg["num_layers"],
            cross_attn_norm=cfg.get("cross_attn_norm", True),
            eps=cfg.get("eps", 1e-6),
            audio_dim=audio_dim,
        )


@dataclass
class PreparedContext:
    """Text cross-attention keys/values of every layer, computed once per prompt (the prompt is fixed).

    With ``text`` set instead (``kv`` empty) the context is lazy: the raw prompt embedding, which each block
    turns into its keys/values inside its own forward. That is what a model sharded with FSDP2 needs: its
    weights are only gathered inside the forward of the module that owns them."""

    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    text: torch.Tensor | None = None
    pooled: torch.Tensor | None = None  # [B, dim] the embedded prompt's mean over its tokens (prompt modulation)


class AudioAttention(nn.Module):
    """Frame-local cross-attention: the tokens of latent frame f attend to the audio tokens of frame f."""

    def __init__(self, dim: int, heads: int, eps: float, null_key: bool = False) -> None:
        super().__init__()
        self.heads = heads
        # a key (after the key norm) whose value is zero: the share of attention it takes is audio not taken
        self.null_k = nn.Parameter(torch.zeros(heads, dim // heads)) if null_key else None
        self.norm = FP32LayerNorm(dim, eps, elementwise_affine=True)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)  # the pretrained video model is unchanged at step 0
        nn.init.zeros_(self.to_out.bias)

    def forward(self, x: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """x: [B, F, tokens, dim]; audio: [B, F, A, dim] (already embedded). Returns [B, F, tokens, dim]."""
        b, f, n, d = x.shape
        h = self.norm(x.float()).type_as(x)
        q = self.norm_q(self.to_q(h)).reshape(b * f, n, self.heads, -1)
        k = self.norm_k(self.to_k(audio)).reshape(b * f, audio.shape[2], self.heads, -1)
        v = self.to_v(audio).reshape(b * f, audio.shape[2], self.heads, -1)
        if self.null_k is not None:
            k = torch.cat([k, self.null_k.to(k.dtype).expand(b * f, 1, -1, -1)], dim=1)
            v = torch.cat([v, v.new_zeros(b * f, 1, *v.shape[2:])], dim=1)
        return self.to_out(attend(q, k, v)).reshape(b, f, n, d)


SLOT_INIT_STD = 0.5  # the spread of the embedded log-mel tokens per channel is ~0.3-0.4


class AudioEmbedder(nn.Module):
    """Projects per-token audio features (wav2vec2 layers or log-mel) into the model width."""

    def __init__(self, audio_dim: int, dim: int, slots: int = 0) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(audio_dim, dim)
        self.act = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(dim, dim)
        # one learned vector per token slot of a latent frame, before the nonlinearity: the embedded token then
        # depends on where it sits, and a sum over the frame's tokens can weigh each slot differently (what a
        # projection of the concatenated window does, at the cost of one vector per slot)
        self.slot = nn.Parameter(torch.randn(slots, dim) * SLOT_INIT_STD) if slots else None

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        h = self.linear_1(audio)
        if self.slot is not None:
            if audio.shape[-2] != self.slot.shape[0]:
                raise ValueError(f"audio has {audio.shape[-2]} tokens per latent frame, the embedder {self.slot.shape[0]} slots")
            h = h + self.slot.to(h.dtype)
        return self.linear_2(self.act(h))


@dataclass
class _Segment:
    """One SDPA call of self-attention: a token range of queries and the frames it reads keys from."""

    query: slice  # token range in the current input
    key_frames: list[int] | None  # frames of the current input to gather keys from (None: all)
    cos_q: torch.Tensor
    sin_q: torch.Tensor
    cos_k: torch.Tensor
    sin_k: torch.Tensor
    evicted: list[int] | None = None  # block-causal: frames of the input the long memory summarises
    cos_m: torch.Tensor | None = None  # RoPE of a spatial long memory's tokens (model/memory.py), when it has some
    sin_m: torch.Tensor | None = None


class AudioDiTBlock(nn.Module):
    def __init__(self, spec: DiTSpec) -> None:
        super().__init__()
        dim, heads = spec.dim, spec.num_attention_heads
        # Names mirror diffusers' WanTransformerBlock so pretrained weights load unchanged.
        self.norm1 = FP32LayerNorm(dim, spec.eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim=dim, heads=heads, dim_head=spec.attention_head_dim, eps=spec.eps)
        self.attn2 = WanAttention(
            dim=dim, heads=heads, dim_head=spec.attention_head_dim, eps=spec.eps,
            cross_attention_dim_head=spec.attention_head_dim,
        )  # fmt: skip
        self.norm2 = FP32LayerNorm(dim, spec.eps, elementwise_affine=True) if spec.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, inner_dim=spec.ffn_dim, activation_fn="gelu-approximate")
        self.norm3 = FP32LayerNorm(dim, spec.eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.audio_attn = AudioAttention(dim, heads, spec.eps, spec.audio_null_key) if spec.audio_dim else None
        self.interact_attn = AudioAttention(dim, heads, spec.eps, spec.audio_null_key) if spec.audio_dim else None
        self.long_memory = (LongMemory(spec.memory_slots, heads, spec.attention_head_dim, spec.memory_kind,
                                       spec.memory_read) if spec.memory_slots else None)  # fmt: skip
        self.regions: dict | None = None  # compiled head/tail (AudioDiT.compile_blocks); None: eager

    def text_kv(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.attn2
        k = attn.norm_k(attn.to_k(text)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(text).unflatten(2, (attn.heads, -1))
        return k, v

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = self.attn1
        q = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(x)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(x).unflatten(2, (attn.heads, -1))
        return q, k, v

    def _attend_cached(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        segments: list[_Segment],
        frames: int,
        cache: KVCache | None,
        layer: int,
        write: list[int] | None,
    ) -> torch.Tensor:
        """Self-attention over the segments and the KV cache (reads and writes it): the eager part of a block
        (its Python state changes chunk by chunk; see :meth:`AudioDiT.compile_blocks`)."""
        k_frames = k.unflatten(1, (frames, -1))  # [B, F, tokens, heads, dim], keys before RoPE
        v_frames = v.unflatten(1, (frames, -1))
        past_k, past_v = cache.keys(layer) if cache is not None else (None, None)
        memory = self.long_memory
        outs = []
        for seg in segments:
            if seg.key_frames is None:
                kk, vv = k_frames, v_frames
            else:
                kk, vv = k_frames[:, seg.key_frames], v_frames[:, seg.key_frames]
            if past_k is not None:
                kk, vv = torch.cat([past_k, kk], dim=1), torch.cat([past_v, vv], dim=1)
            qq = apply_rotary(q[:, seg.query], seg.cos_q, seg.sin_q)
            kk = apply_rotary(kk.flatten(1, 2), seg.cos_k, seg.sin_k)
            mem = None
            if memory is not None:  # the long memory of evicted frames, when there is one yet
                if seg.evicted:
                    mem = memory.pool(k_frames[:, seg.evicted], v_frames[:, seg.evicted])
                elif cache is not None and cache.memory[layer] is not None:
                    mem = cache.memory[layer].read()
            if mem is not None and memory.read_mode == "joint":
                out = memory.attend_with(qq, kk, vv.flatten(1, 2), *mem, seg.cos_m, seg.sin_m).type_as(q)
            else:
                out = attend(qq, kk, vv.flatten(1, 2)).type_as(q)
                if mem is not None:
                    out = out + memory.read(qq, *mem, seg.cos_m, seg.sin_m).type_as(q)
            outs.append(out)
        if write is not None and cache is not None:
            evicted = cache.write(layer, write, k_frames, v_frames)
            if memory is not None and evicted is not None:
                ek, ev = evicted
                cache.memory[layer] = memory.absorb(cache.memory[layer], ek, ev)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        text_kv: tuple[torch.Tensor, torch.Tensor] | torch.Tensor,
        segments: list[_Segment],
        frames: int,
        audio_talk: torch.Tensor | None = None,
        audio_listen: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        write: list[int] | None = None,
    ) -> torch.Tensor:
        # the block in three parts: the tensor-only head and tail (what compile_blocks compiles, one graph shared
        # by every block) around the self-attention over the segments and the cache (eager)
        regions = self.regions or _EAGER_REGIONS
        q, k, v, mod = regions["head"](self, x, temb, frames)
        out = self._attend_cached(q, k, v, segments, frames, cache, layer, write)
        if isinstance(text_kv, torch.Tensor):  # the embedded prompt: this layer's keys/values here
            text_kv = self.text_kv(text_kv)
        return regions["tail"](self, x, out, mod, text_kv[0], text_kv[1], frames, audio_talk, audio_listen)

    def _head(self, x: torch.Tensor, temb: torch.Tensor, frames: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:  # fmt: skip
        # temb: [B, F, 6, dim], one modulation per latent frame (Wan2.2-TI2V's expanded timesteps)
        mod = (self.scale_shift_table.unsqueeze(0) + temb.float()).unsqueeze(2)  # [B, F, 1, 6, dim]
        shift, scale, gate, c_shift, c_scale, c_gate = mod.unbind(3)  # each [B, F, 1, dim]
        h = _modulate(self.norm1, x, scale, shift, frames)
        q, k, v = self._qkv(h)
        return q, k, v, (gate, c_shift, c_scale, c_gate)

    def _tail(self, x: torch.Tensor, out: torch.Tensor, mod: tuple[torch.Tensor, ...], text_k: torch.Tensor,
              text_v: torch.Tensor, frames: int, audio_talk: torch.Tensor | None, audio_listen: torch.Tensor | None
              ) -> torch.Tensor:  # fmt: skip
        gate, c_shift, c_scale, c_gate = mod
        # 1. (the self-attention's output projection and gated residual)
        x = _gated(x, self.attn1.to_out[0](out), gate, frames)

        # 2. text cross-attention (this layer's cached keys/values of the prompt)
        h = self.norm2(x.float()).type_as(x)
        attn = self.attn2
        q = attn.norm_q(attn.to_q(h)).unflatten(2, (attn.heads, -1))
        x = x + attn.to_out[0](attend(q, text_k, text_v).type_as(q))

        # 3. audio attention (talking) and interact audio attention (listening), frame-local
        if self.audio_attn is not None and audio_talk is not None:
            xf = x.unflatten(1, (frames, -1))
            x = x + self.audio_attn(xf, audio_talk).flatten(1, 2)
            if audio_listen is not None:
                x = x + self.interact_attn(xf, audio_listen).flatten(1, 2)

        # 4. feed-forward
        h = _modulate(self.norm3, x, c_scale, c_shift, frames)
        return _gated(x, self.ffn(h), c_gate, frames)


def _modulate(norm: nn.Module, h: torch.Tensor, sc: torch.Tensor, sh: torch.Tensor, frames: int) -> torch.Tensor:
    return (norm(h.float()).unflatten(1, (frames, -1)) * (1 + sc) + sh).flatten(1, 2).type_as(h)


def _gated(h: torch.Tensor, y: torch.Tensor, g: torch.Tensor, frames: int) -> torch.Tensor:
    return (h.float() + (y.float().unflatten(1, (frames, -1)) * g).flatten(1, 2)).type_as(h)


_EAGER_REGIONS = {"head": AudioDiTBlock._head, "tail": AudioDiTBlock._tail}


class AudioDiT(nn.Module):
    def __init__(self, spec: DiTSpec) -> None:
        super().__init__()
        if spec.patch_size[0] != 1:
            raise ValueError("chunks are whole latent frames: the temporal patch size must be 1")
        self.spec = spec
        # activation checkpointing: each block's activations are recomputed in the backward pass instead of kept
        # (forwards without a KV cache: a cached streaming forward is left alone, because by the time the backward
        # pass would recompute it the cache holds later chunks)
        self.checkpoint_blocks = False
        dim = spec.dim
        self.rope = RotaryEmbedding3D(spec.attention_head_dim, spec.rope_theta)
        self.patch_embedding = nn.Conv3d(spec.in_channels, dim, kernel_size=spec.patch_size, stride=spec.patch_size)
        self.reference_embedding = None
        if spec.reference_embedding:  # zero at the start: a model without it is continued exactly
            self.reference_embedding = nn.Conv3d(spec.in_channels, dim, kernel_size=spec.patch_size,
                                                 stride=spec.patch_size)  # fmt: skip
            nn.init.zeros_(self.reference_embedding.weight)
            nn.init.zeros_(self.reference_embedding.bias)
        self.condition_embedder = WanTimeTextImageEmbedding(
            dim=dim, time_freq_dim=spec.freq_dim, time_proj_dim=dim * 6, text_embed_dim=spec.text_dim
        )
        self.audio_embedder = AudioEmbedder(spec.audio_dim, dim, spec.audio_slots) if spec.audio_dim else None
        self.prompt_modulation = None
        if spec.prompt_modulation:  # zero at the start: a model without it is continued exactly
            self.prompt_modulation = nn.Linear(dim, dim)
            nn.init.zeros_(self.prompt_modulation.weight)
            nn.init.zeros_(self.prompt_modulation.bias)
        self.blocks = nn.ModuleList([AudioDiTBlock(spec) for _ in range(spec.num_layers)])
        self.norm_out = FP32LayerNorm(dim, spec.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, spec.out_channels * math.prod(spec.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (some small parts stay float32, see :func:`cast_keeping_fp32`)."""
        return self.proj_out.weight.dtype

    # -- conditioning -------------------------------------------------------------------------------------
    def prepare_text(self, text: torch.Tensor) -> PreparedContext:
        """Embed the prompt and compute every layer's cross-attention K/V once; for a model sharded with FSDP2
        (whose weights exist only inside forward), a lazy context that the forward computes."""
        if self.sharded:
            return PreparedContext(text=text)
        states = self.condition_embedder.text_embedder(text)
        return PreparedContext([block.text_kv(states) for block in self.blocks], pooled=self.pool_prompt(states))

    def pool_prompt(self, states: torch.Tensor) -> torch.Tensor | None:
        """The embedded prompt [B, L, dim] -> its mean over tokens [B, dim] when the model modulates by it."""
        return states.mean(dim=1) if self.prompt_modulation is not None else None

    def lazy_context(self, context: PreparedContext, blocks: int) -> PreparedContext:
        """A lazy context (the raw prompt) made concrete: the embedded prompt for each of ``blocks`` blocks (each
        block turns it into its K/V inside its own forward: FSDP-safe) and its pooled vector."""
        states = self.condition_embedder.text_embedder(context.text)
        return PreparedContext([states] * blocks, pooled=self.pool_prompt(states))

    def compile_blocks(self, backend: str = "inductor") -> None:
        """Regional torch.compile: each block's tensor-only head (modulation, q/k/v) and tail (output projection,
        cross- and audio attention, feed-forward) are compiled, ONE graph each shared by every block and every
        chunk length (dynamic shapes); the self-attention over the KV cache stays eager. Compiling the whole
        forward recompiles at every new cache state (sink empty, window growing, write pass or not: measured 8
        recompiles in 6 chunks; at 928x704 on an H200 inductor did not finish warming up in 5.5 min)."""
        regions = {name: torch.compile(fn, dynamic=True, backend=backend) for name, fn in _EAGER_REGIONS.items()}
        for block in self.blocks:
            block.regions = regions

    @property
    def sharded(self) -> bool:
        """Whether FSDP2 shards the weights (DTensor parameters)."""
        return type(self.proj_out.weight).__name__ == "DTensor"

    def embed_audio(self, audio: torch.Tensor | None) -> torch.Tensor | None:
        if audio is None or self.audio_embedder is None:
            return None
        return self.audio_embedder(audio)

    def _time_embedding(self, timestep: torch.Tensor, pooled: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Per-frame timesteps [B, F] (and the pooled prompt [B or 1, dim] under prompt modulation) -> temb
        [B, F, dim] and its projection [B, F, 6, dim]."""
        emb = self.condition_embedder
        b, f = timestep.shape
        t = emb.timesteps_proj(timestep.flatten()).unflatten(0, (b, f))
        dtype = next(iter(emb.time_embedder.parameters())).dtype
        temb = emb.time_embedder(t.to(dtype)).type_as(self.proj_out.weight)
        if self.prompt_modulation is not None:
            if pooled is None:
                raise ValueError("a model with prompt_modulation needs the pooled prompt (PreparedContext.pooled)")
            temb = temb + self.prompt_modulation(pooled.type_as(temb))[:, None]
        proj = emb.time_proj(emb.act_fn(temb)).unflatten(2, (6, -1))
        return temb, proj

    # -- attention plans ------------------------------------------------------------------------------------
    def _plan(
        self,
        attention: str,
        frames: int,
        height: int,
        width: int,
        layout: CausalLayout | None,
        cache: KVCache | None,
        frame_start: int,
        device: torch.device,
    ) -> list[_Segment]:
        tpf = height * width

        def rope(index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            return self.rope(torch.tensor(index, device=device), height, width)

        def memory_rope(start: int, end: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            """A spatial memory's places, at the time index of the newest evicted frame (just before the
            window) for the chunk [start, end); (None, None) without one or before anything was evicted."""
            newest = start - layout.window_frames - 1
            if self.spec.memory_kind != "spatial" or not self.spec.memory_slots or newest < layout.sink_frames:
                return None, None
            return rope(layout.time_index([newest], end) * self.spec.memory_slots)

        if attention == "bidirectional":
            cos, sin = rope(list(range(frames)))
            return [_Segment(slice(None), None, cos, sin, cos, sin)]
        if layout is None:
            raise ValueError(f"attention={attention!r} needs a CausalLayout")
        if attention == "block_causal":
            segments = []
            for start, end in layout.chunks(frames):
                keys = layout.visible(start, end)
                cos_q, sin_q = rope(layout.time_index(list(range(start, end)), end))
                cos_k, sin_k = rope(layout.time_index(keys, end))
                evicted = layout.evicted(start) if self.spec.memory_slots else None
                segments.append(_Segment(slice(start * tpf, end * tpf), keys, cos_q, sin_q, cos_k, sin_k, evicted,
                                         *memory_rope(start, end)))  # fmt: skip
            return segments
        if attention == "streaming":
            if cache is None:
                raise ValueError("streaming attention needs a KVCache")
            end = frame_start + frames
            own = list(range(frame_start, end))
            cos_q, sin_q = rope(layout.time_index(own, end))
            cos_k, sin_k = rope(layout.time_index(cache.frames + own, end))
            return [_Segment(slice(None), None, cos_q, sin_q, cos_k, sin_k, None, *memory_rope(frame_start, end))]
        raise ValueError(f"unknown attention mode {attention!r}; use bidirectional, block_causal or streaming")

    def add_reference(self, x: torch.Tensor, latents: torch.Tensor, attention: str, layout: CausalLayout | None,
                      cache: KVCache | None, frame_start: int, write_cache: bool) -> torch.Tensor:  # fmt: skip
        """Tokens ``x`` [B, F * tokens, dim] + the reference embedding on every frame that sees the reference.

        The reference is latent frame 0: in a sequence that starts at frame 0 it is ``latents[:, :, :1]``; a
        streaming chunk takes it from ``cache`` (stored when frame 0 was written) while frame 0 is among the
        cached frames, the same rule as the block-causal mask (a layout without a sink loses the reference's
        embedding when it loses the reference's keys)."""
        if self.reference_embedding is None:
            return x
        b, _, frames = latents.shape[:3]
        if frame_start == 0:
            reference = latents[:, :, :1]
            if cache is not None and write_cache:
                cache.reference = reference.detach()
        else:
            reference = cache.reference if cache is not None and 0 in cache.frames else None
        if reference is None:
            return x
        ref = self.reference_embedding(reference.to(x.dtype)).flatten(2).transpose(1, 2)  # [B, tokens, dim]
        if attention == "block_causal":
            sees = torch.zeros(frames, dtype=x.dtype, device=x.device)
            for start, end in layout.chunks(frames):
                sees[start:end] = float(0 in layout.visible(start, end))
            return (x.unflatten(1, (frames, -1)) + sees.view(1, -1, 1, 1) * ref[:, None]).flatten(1, 2)
        return (x.unflatten(1, (frames, -1)) + ref[:, None]).flatten(1, 2)

    # -- forward --------------------------------------------------------------------------------------------
    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor | PreparedContext,
        audio_talk: torch.Tensor | None = None,
        audio_listen: torch.Tensor | None = None,
        *,
        attention: str = "bidirectional",
        layout: CausalLayout | None = None,
        cache: KVCache | None = None,
        frame_start: int = 0,
        write_cache: bool = False,
    ) -> torch.Tensor:
        """Predict the flow-matching velocity.

        latents [B, C, F, H, W]; timestep [B, F] (one per latent frame, 0 for the clean reference) or [B];
        text [B, L, text_dim] or a :class:`PreparedContext`; audio_talk / audio_listen [B, F, A, audio_dim]
        per latent frame (talking = features x mask, listening = features x (1 - mask)).
        In ``"streaming"`` mode ``latents`` is one chunk whose first frame has absolute index
        ``frame_start``; with ``write_cache`` its keys/values are added to ``cache`` afterwards.
        """
        b, _, frames, height, width = latents.shape
        p_t, p_h, p_w = self.spec.patch_size
        hp, wp = height // p_h, width // p_w
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(b, frames)

        # 1. patchify; per-frame time modulation; conditioning
        x = self.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()
        x = self.add_reference(x, latents, attention, layout, cache, frame_start, write_cache)
        context = text if isinstance(text, PreparedContext) else PreparedContext(text=text)
        if not context.kv:  # the prompt embedded here, each layer's K/V in its own block (FSDP-safe)
            context = self.lazy_context(context, len(self.blocks))
        temb, temb_proj = self._time_embedding(timestep, context.pooled)
        talk, listen = self.embed_audio(audio_talk), self.embed_audio(audio_listen)
        segments = self._plan(attention, frames, hp, wp, layout, cache, frame_start, latents.device)
        write = list(range(frame_start, frame_start + frames)) if (write_cache and cache is not None) else None

        # 2. transformer blocks
        recompute = self.checkpoint_blocks and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, temb_proj, context.kv[i], segments, frames, talk,
                                                      listen, None, i, None, use_reentrant=False)  # fmt: skip
            else:
                x = block(x, temb_proj, context.kv[i], segments, frames, talk, listen, cache, i, write)
        if write is not None:
            cache.advance(write)

        # 3. output modulation, projection, unpatchify
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unsqueeze(2).unbind(3)
        x = (self.norm_out(x.float()).unflatten(1, (frames, -1)) * (1 + scale) + shift).flatten(1, 2).type_as(x)
        x = self.proj_out(x)
        x = x.reshape(b, frames, hp, wp, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    # -- weights --------------------------------------------------------------------------------------------
    def audio_parameter_names(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.startswith("audio_embedder.") or ".audio_attn." in n
                or ".interact_attn." in n}  # fmt: skip


def load_wan_transformer(
    path: str | Path, audio_dim: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    audio_slots: int = 0, audio_null_key: bool = False, memory_slots: int = 0, memory_kind: str = "global",
    memory_read: str = "gated", prompt_modulation: bool = False,
) -> AudioDiT:
    """Build an AudioDiT from a local diffusers Wan transformer directory (e.g. Wan2.2-TI2V-5B-Diffusers).

    ``path`` is the model root (with ``transformer/``) or the transformer folder itself. Every Wan weight
    must be present; the audio modules, the long memory and the prompt modulation (absent from Wan checkpoints)
    keep their zero-output init, with ``audio_slots`` / ``audio_null_key`` / ``memory_*`` /
    ``prompt_modulation`` as in :class:`DiTSpec`.
    """
    from safetensors.torch import load_file

    root = Path(path)
    folder = root / "transformer" if (root / "transformer" / "config.json").is_file() else root
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no diffusers transformer config at {cfg_file} (model.pretrained_path={path})")
    spec = DiTSpec.from_wan_config(json.loads(cfg_file.read_text()), audio_dim=audio_dim)
    spec = replace(spec, audio_slots=audio_slots if audio_dim else 0, audio_null_key=audio_null_key,
                   memory_slots=memory_slots, memory_kind=memory_kind, memory_read=memory_read,
                   prompt_modulation=prompt_modulation)  # fmt: skip
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    with torch.device("meta"):
        model = AudioDiT(spec)
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(shard), device=str(device)))
    # what diffusers keeps in float32 is loaded at the file's precision, never through the compute dtype
    state = {k: v.to(torch.float32 if _keeps_fp32(k) and dtype != torch.float32 else dtype) for k, v in state.items()}
    added = model.audio_parameter_names() | {n for n in model.state_dict()
                                              if ".long_memory." in n or n.startswith("prompt_modulation.")}
    expected = set(model.state_dict()) - added
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{folder}: not a Wan transformer we can load: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    # The audio modules were built on the meta device: build them for real (zero-output init).
    if spec.audio_dim:
        with torch.device(device):
            model.audio_embedder = AudioEmbedder(spec.audio_dim, spec.dim, spec.audio_slots)
            for block in model.blocks:
                block.audio_attn = AudioAttention(spec.dim, spec.num_attention_heads, spec.eps, spec.audio_null_key)
                block.interact_attn = AudioAttention(spec.dim, spec.num_attention_heads, spec.eps, spec.audio_null_key)
    if spec.memory_slots:
        with torch.device(device):
            for block in model.blocks:
                block.long_memory = LongMemory(spec.memory_slots, spec.num_attention_heads, spec.attention_head_dim,
                                               spec.memory_kind, spec.memory_read)  # fmt: skip
    if spec.prompt_modulation:
        with torch.device(device):
            model.prompt_modulation = nn.Linear(spec.dim, spec.dim)
            nn.init.zeros_(model.prompt_modulation.weight)
            nn.init.zeros_(model.prompt_modulation.bias)
    return cast_keeping_fp32(model, dtype)


# Kept in float32 whatever the compute dtype, as diffusers does for Wan (_keep_in_fp32_modules): the time
# embedding MLP, the modulation tables and the affine cross-attention norm.
FP32_PARTS = ("condition_embedder.time_embedder.", "scale_shift_table", ".norm2.")


def _keeps_fp32(name: str) -> bool:
    return any(part in name for part in FP32_PARTS)


def cast_keeping_fp32(model: AudioDiT, dtype: torch.dtype) -> AudioDiT:
    """``model`` in ``dtype`` except FP32_PARTS, which keep their float32 values exactly (copied aside before
    the cast: a round trip through bf16 would round them, unlike diffusers' from_pretrained)."""
    if dtype == torch.float32:
        return model.to(dtype)
    kept = {name: p.data.to(torch.float32, copy=True) for name, p in model.named_parameters() if _keeps_fp32(name)}
    model.to(dtype)
    for name, param in model.named_parameters():
        if name in kept:
            param.data = kept[name]
    return model
