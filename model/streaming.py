"""StreamingGenerator: reference image in, then audio chunk -> video frames, with bounded state.

start(reference): encode the reference to latent frame 0, run it once at timestep 0 to fill the sink, prime
the VAE's causal cache. step(avatar_audio, interlocutor_audio): the next chunk of C latent frames
(4C video frames; 0.48 s -> 12 frames at the paper's C=3, 25 fps) in N cached steps, decoded at once.
The KV cache holds at most sink + window frames, the VAE cache a fixed number of frames per conv and the
audio stream a fixed history, so memory stays flat however long the stream runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.attention import CausalLayout, KVCache
from model.audio import AudioConditioner, AudioStream
from model.dit import AudioDiT, PreparedContext
from model.sampling import NUM_TRAIN_TIMESTEPS, add_noise, few_step_sample, student_sigmas
from model.vae import StreamingDecoder, VideoVAE


@dataclass
class StreamSettings:
    layout: CausalLayout
    steps: int = 3
    timestep_shift: float = 5.0
    context: str = "noisy"  # "noisy": keep the K/V of the last denoising step (paper); "clean": re-run at t=0
    audio_history_frames: int = 50
    vad_threshold_db: float = -45.0  # the energy gate's level (when ``vad`` is None)
    seed: int = 0
    vad: Callable[[], object] | None = None  # makes a model.vad.VoiceActivity per stream (None: the energy gate)


class StreamingGenerator:
    def __init__(
        self,
        dit: AudioDiT,
        vae: VideoVAE,
        audio: AudioConditioner,
        text: torch.Tensor,
        settings: StreamSettings,
    ) -> None:
        if settings.context not in ("noisy", "clean"):
            raise ValueError(f"context must be 'noisy' or 'clean', got {settings.context!r}")
        self.dit, self.vae, self.audio, self.settings = dit.eval(), vae.eval(), audio, settings
        self.layout = settings.layout
        self.sigmas = student_sigmas(settings.steps, settings.timestep_shift)
        self.device = next(dit.parameters()).device
        self.dtype = dit.dtype
        self._text = text
        self.chunk_video_frames = settings.layout.chunk_frames * vae.temporal
        self.samples_per_chunk = self.chunk_video_frames * audio.extractor.samples_per_frame
        self.cache: KVCache | None = None
        self.decoder: StreamingDecoder | None = None
        self.stream: AudioStream | None = None
        self.context: PreparedContext | None = None
        self.next_frame = 0
        # Cache-Switching (model/interaction.py): each action's prompt embedding -> its cross-attention K/V,
        # computed once at start(); set_action() swaps them at the next chunk boundary
        self.action_text: dict[str, torch.Tensor] = {}
        self.contexts: dict[str, PreparedContext] = {}
        self.action = "idle"
        self._pending: tuple[str, bool] | None = None
        self._recent: list[tuple[torch.Tensor, ...]] = []  # the last chunks' (latents, talk, listen): recache

    @torch.no_grad()
    def start(self, reference_image: torch.Tensor) -> None:
        """reference_image [3, H, W] or [B, 3, H, W] in [-1, 1]; resets all state."""
        img = reference_image if reference_image.ndim == 4 else reference_image[None]
        img = img.to(self.device)
        self.ref_latent = self.vae.encode_reference(img).to(self.dtype)  # [B, z, 1, h, w]
        b = img.shape[0]
        self.cache = KVCache(self.layout, len(self.dit.blocks))
        self.context = self.dit.prepare_text(self._text.to(self.device, self.dtype).expand(b, -1, -1))
        self.contexts = {"idle": self.context}
        for name, emb in self.action_text.items():
            self.contexts[name] = self.dit.prepare_text(emb.to(self.device, self.dtype).expand(b, -1, -1))
        self.action, self._pending, self._recent = "idle", None, []
        self.stream = AudioStream(self.audio, self.settings.audio_history_frames, self.settings.vad, batch=b)
        self.noise = torch.Generator(device=self.device).manual_seed(self.settings.seed)
        silent = torch.zeros(b, 1, self.audio.tokens_per_latent, self.audio.token_dim, device=self.device, dtype=self.dtype)
        zero_t = torch.zeros(b, 1, device=self.device)
        self.dit(self.ref_latent, zero_t, self.context, silent, silent, attention="streaming", layout=self.layout,
                 cache=self.cache, frame_start=0, write_cache=True)  # fmt: skip
        self.decoder = self.vae.stream_decoder()
        self.decoder.decode(self.ref_latent)  # primes the causal cache; the reference frame itself is not output
        self.next_frame = 1

    def set_action(self, name: str, recache: bool = False) -> None:
        """Condition the chunks from the next one on ``name``'s prompt (``action_text``; "idle": the base
        prompt). Cache-Switching: only the cross-attention K/V change; the visual KV cache stays as it is.
        ``recache``: also recompute the window's K/V under the new prompt from its clean latents (LongLive's
        KV re-cache), at the cost of one forward over the window."""
        if name not in self.contexts and name not in self.action_text and name != "idle":
            raise ValueError(f"no prompt for action {name!r}: known {sorted(['idle', *self.action_text])}")
        self._pending = (name, recache)

    @torch.no_grad()
    def _switch(self) -> None:
        name, recache = self._pending
        self._pending = None
        self.action, self.context = name, self.contexts[name]
        if not recache or not self._recent or not self.layout.window_frames:
            return
        cache, b = self.cache, self.ref_latent.shape[0]
        frames = list(cache.window_frames)
        latents = torch.cat([r[0] for r in self._recent], dim=2)[:, :, -len(frames) :]
        talk = torch.cat([r[1] for r in self._recent], dim=1)[:, -len(frames) :]
        listen = torch.cat([r[2] for r in self._recent], dim=1)[:, -len(frames) :]
        for layer in range(cache.num_layers):
            cache.win_k[layer] = cache.win_v[layer] = None
        cache.window_frames = []
        for start in range(0, len(frames), self.layout.chunk_frames):  # clean (t = 0), with their own audio
            part = slice(start, start + self.layout.chunk_frames)
            n = len(frames[part])
            self.dit(latents[:, :, part].to(self.dtype), torch.zeros(b, n, device=self.device), self.context,
                     talk[:, part], listen[:, part], attention="streaming", layout=self.layout, cache=cache,
                     frame_start=frames[start], write_cache=True)  # fmt: skip

    @torch.no_grad()
    def denoise(self, avatar_audio: torch.Tensor, interlocutor_audio: torch.Tensor) -> torch.Tensor:
        """The DiT half of a step: audio for 4C video frames -> the chunk's clean latents [B, z, C, h, w]."""
        talk, listen = self._next_audio(avatar_audio, interlocutor_audio)
        b = self.ref_latent.shape[0]
        c = self.layout.chunk_frames
        _, z, _, h, w = self.ref_latent.shape
        start = self.next_frame
        noise = torch.randn((b, z, c, h, w), generator=self.noise, device=self.device, dtype=torch.float32)

        def velocity(x: torch.Tensor, sigma: float, last: bool) -> torch.Tensor:
            t = torch.full((b, c), sigma * NUM_TRAIN_TIMESTEPS, device=self.device)
            write = last and self.settings.context == "noisy"
            v = self.dit(x.to(self.dtype), t, self.context, talk, listen, attention="streaming", layout=self.layout,
                         cache=self.cache, frame_start=start, write_cache=write)  # fmt: skip
            return v.float()

        x0, _ = few_step_sample(velocity, noise, self.sigmas, generator=self.noise)
        if self.settings.context == "clean":  # Self-Forcing: one more pass at t=0 writes clean K/V
            self.dit(x0.to(self.dtype), torch.zeros(b, c, device=self.device), self.context, talk, listen,
                     attention="streaming", layout=self.layout, cache=self.cache, frame_start=start,
                     write_cache=True)  # fmt: skip
        self.next_frame += c
        self._recent = (self._recent + [(x0, talk, listen)])[-(self.layout.window_frames // c + 1) :]
        return x0

    def _next_audio(self, avatar_audio: torch.Tensor, interlocutor_audio: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """A pending action switch, then the chunk's audio into the stream: (talking, listening) tokens."""
        if self.cache is None:
            raise RuntimeError("call start(reference_image) before step()")
        if self._pending is not None:
            self._switch()
        b = self.ref_latent.shape[0]
        avatar = _batch(avatar_audio, b).to(self.device)
        other = _batch(interlocutor_audio, b).to(self.device)
        if avatar.shape[-1] != self.samples_per_chunk:
            raise ValueError(f"a step takes {self.samples_per_chunk} samples per stream, got {avatar.shape[-1]}")
        talk, listen, self.last_mask = self.stream.push(avatar, other, self.settings.vad_threshold_db)
        self.last_partner_mask = self.stream.partner_mask  # [B, 4C]: who spoke in this chunk (1: speech)
        return talk.to(self.dtype), listen.to(self.dtype)

    @torch.no_grad()
    def observe(self, latents: torch.Tensor, avatar_audio: torch.Tensor, interlocutor_audio: torch.Tensor
                ) -> torch.Tensor:  # fmt: skip
        """Context injection: a chunk of GIVEN clean latents [B, z, C, h, w] (a real video's, encoded) enters the
        stream as if it had generated it: its audio the audio history, its K/V the cache -- written the way
        ``denoise`` writes its own (``context`` "noisy": the latents re-noised to the last step's level, at that
        timestep; "clean": at t = 0) -- and the next chunk follows it. Returns the latents; decode them to keep
        the VAE's causal cache in step. (The memory test of issue [10] shows the stream a real clip up to a
        change, then lets it generate on.)"""
        talk, listen = self._next_audio(avatar_audio, interlocutor_audio)
        b = self.ref_latent.shape[0]
        c = self.layout.chunk_frames
        if latents.ndim != 5 or latents.shape[2] != c or latents.shape[1] != self.ref_latent.shape[1]:
            raise ValueError(f"observe takes one chunk of latents [B, {self.ref_latent.shape[1]}, {c}, h, w], "
                             f"got {tuple(latents.shape)}")  # fmt: skip
        x0 = latents.to(self.device, torch.float32).expand(b, -1, -1, -1, -1)
        if self.settings.context == "noisy":
            sigma = self.sigmas[-1]
            noise = torch.randn(x0.shape, generator=self.noise, device=self.device, dtype=torch.float32)
            x, t = add_noise(x0, noise, sigma), torch.full((b, c), sigma * NUM_TRAIN_TIMESTEPS, device=self.device)
        else:
            x, t = x0, torch.zeros(b, c, device=self.device)
        self.dit(x.to(self.dtype), t, self.context, talk, listen, attention="streaming", layout=self.layout,
                 cache=self.cache, frame_start=self.next_frame, write_cache=True)  # fmt: skip
        self.next_frame += c
        self._recent = (self._recent + [(x0, talk, listen)])[-(self.layout.window_frames // c + 1) :]
        return x0

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE half of a step: latents -> frames [B, 3, 4C, H, W] in [-1, 1]."""
        return self.decoder.decode(latents)

    def step(self, avatar_audio: torch.Tensor, interlocutor_audio: torch.Tensor) -> torch.Tensor:
        return self.decode(self.denoise(avatar_audio, interlocutor_audio))

    def state_nbytes(self) -> dict[str, int]:
        """Bytes held between steps, per component (for the bounded-state checks)."""
        dec = self.decoder.nbytes() if self.decoder else 0
        aud = sum(t.numel() * t.element_size() for t in (self.stream._avatar, self.stream._other) if t is not None) if self.stream else 0
        return {"kv_cache": self.cache.nbytes() if self.cache else 0, "vae_cache": dec, "audio_history": aud}


def _batch(wave: torch.Tensor, b: int) -> torch.Tensor:
    wave = wave.float()
    if wave.ndim == 1:
        wave = wave[None]
    return wave.expand(b, -1) if wave.shape[0] == 1 else wave

