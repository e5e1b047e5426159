"""Student forcing (Self-Forcing, paper 3.1.1): the causal student generates a clip chunk by chunk through its
own streaming path, each chunk conditioned on the K/V the student itself wrote for the earlier chunks.

Training needs a gradient without back-propagating through the whole rollout: every chunk picks one exit step
of the N-step sampler (drawn by the caller, the same on every rank) and only that step's forward runs with
autograd on; the steps before it run under ``no_grad``, and cache writes are detached (KVCache stores
``.detach()``-ed tensors). The chunk's output is the exit step's x0 prediction.

The context the next chunk sees is what inference writes: with ``context="noisy"`` (the paper) the K/V of the
chunk's last denoising step; after an early exit the remaining steps still run (without grad) so that the
cache holds exactly what :class:`~model.streaming.StreamingGenerator` would have written. With
``context="clean"`` (Self-Forcing) one more pass at t=0 on the output writes clean K/V.

All randomness comes in as tensors (initial and re-noising noise), so a batch can be cut into per-rank slices
of one global draw and multi-process training matches one process on the whole batch.
"""

from __future__ import annotations

import torch

from model.attention import CausalLayout, KVCache
from model.dit import AudioDiT, PreparedContext
from model.sampling import NUM_TRAIN_TIMESTEPS, add_noise, predict_x0


def student_rollout(
    dit: AudioDiT,
    reference: torch.Tensor,
    context: PreparedContext,
    audio_talk: torch.Tensor | None,
    audio_listen: torch.Tensor | None,
    layout: CausalLayout,
    sigmas: list[float],
    noise: torch.Tensor,
    renoise: torch.Tensor,
    exit_steps: list[int],
    context_mode: str = "noisy",
    grad: bool = True,
) -> torch.Tensor:
    """Generate ``F`` latent frames after the reference.

    reference [B, z, 1, h, w] (clean latent frame 0); audio_* [B, 1 + F, A, D] (slot 0: the reference's);
    noise [B, z, F, h, w] (each chunk's starting noise); renoise [max(N - 1, 1), B, z, F, h, w] (fresh noise of
    the re-noising between steps); exit_steps: one step index in [0, N) per chunk. Returns [B, z, 1 + F, h, w]:
    the reference followed by every chunk's exit-step x0.
    """
    if context_mode not in ("noisy", "clean"):
        raise ValueError(f"context_mode must be 'noisy' or 'clean', got {context_mode!r}")
    b, _, frames, _, _ = noise.shape
    chunks = layout.chunks(1 + frames)[1:]
    if len(exit_steps) != len(chunks):
        raise ValueError(f"{len(chunks)} chunks need {len(chunks)} exit steps, got {len(exit_steps)}")
    n = len(sigmas)
    if any(not 0 <= e < n for e in exit_steps):
        raise ValueError(f"exit steps must lie in [0, {n}), got {exit_steps}")
    dev = reference.device
    dtype = dit.dtype

    def audio(a: torch.Tensor | None, s: int, e: int) -> torch.Tensor | None:
        return None if a is None else a[:, s:e].to(dtype)

    cache = KVCache(layout, len(dit.blocks))
    with torch.no_grad():  # the reference fills the sink once, at timestep 0
        dit(reference.to(dtype), torch.zeros(b, 1, device=dev), context, audio(audio_talk, 0, 1),
            audio(audio_listen, 0, 1), attention="streaming", layout=layout, cache=cache, frame_start=0,
            write_cache=True)  # fmt: skip
    outputs = [reference]
    for c, (start, end) in enumerate(chunks):
        talk, listen = audio(audio_talk, start, end), audio(audio_listen, start, end)
        x = noise[:, :, start - 1 : end - 1]
        out = None
        for k, sigma in enumerate(sigmas):
            last = k == n - 1
            write = last and context_mode == "noisy"
            t = torch.full((b, end - start), sigma * NUM_TRAIN_TIMESTEPS, device=dev)
            with torch.set_grad_enabled(grad and k == exit_steps[c]):
                v = dit(x.to(dtype), t, context, talk, listen, attention="streaming", layout=layout, cache=cache,
                        frame_start=start, write_cache=write).float()  # fmt: skip
                x0 = predict_x0(x, v, sigma)
            if k == exit_steps[c]:
                out = x0
            if not last:
                x = add_noise(x0.detach(), renoise[k, :, :, start - 1 : end - 1], sigmas[k + 1])
        if context_mode == "clean":
            with torch.no_grad():
                dit(out.detach().to(dtype), torch.zeros(b, end - start, device=dev), context, talk, listen,
                    attention="streaming", layout=layout, cache=cache, frame_start=start,
                    write_cache=True)  # fmt: skip
        outputs.append(out)
    return torch.cat(outputs, dim=2)
