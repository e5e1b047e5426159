"""Build the model/ objects from the typed config (the only place where config meets torch modules)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from model.attention import CausalLayout
from model.audio import AudioConditioner, LogMelFeatures, Wav2Vec2Features
from model.causal_ae import CausalVideoAE
from model.dit import AudioDiT, DiTSpec, cast_keeping_fp32, load_wan_transformer
from model.streaming import StreamingGenerator, StreamSettings
from model.vae import VideoVAE, build_wan_vae
from tasks.config import Config, ConfigError, project_root, resolve_path

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_of(cfg: Config) -> torch.device:
    want = cfg.project.device
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("project.device is 'cuda' but no CUDA device is available (use --set project.device=cpu)")
    return torch.device(want)


def dtype_of(cfg: Config) -> torch.dtype:
    return DTYPES[cfg.project.dtype]

_said: dict[str, bool] = {}


def build_audio(cfg: Config) -> AudioConditioner:
    a = cfg.audio
    if a.features == "wav2vec2":
        if not a.wav2vec2_path:
            raise ConfigError("audio.features is 'wav2vec2' but audio.wav2vec2_path is not set (a local checkpoint)")
        extractor = Wav2Vec2Features.from_pretrained(a.wav2vec2_path, a.wav2vec2_layers, fps=cfg.video.fps)
    else:
        if not _said.get("logmel"):  # once per process, not once per stage
            _said["logmel"] = True
            log.info("audio features: log-mel (no pretrained weights; the demo's substitute for Wav2Vec2)")
        extractor = LogMelFeatures(a.sample_rate, cfg.video.fps, a.n_mels)
    return AudioConditioner(extractor, a.window_frames, cfg.vae.temporal_compression)


def dit_spec(cfg: Config, audio_dim: int) -> DiTSpec:
    m = cfg.model
    return DiTSpec(
        patch_size=tuple(m.patch_size), num_attention_heads=m.num_heads, attention_head_dim=m.head_dim,
        in_channels=cfg.vae.z_dim, out_channels=cfg.vae.z_dim, text_dim=m.text_dim, freq_dim=m.freq_dim,
        ffn_dim=m.ffn_dim, num_layers=m.num_layers, eps=m.eps, audio_dim=audio_dim,
        reference_embedding=m.reference_embedding,
        audio_slots=audio_tokens_per_latent(cfg) if m.audio_slots and audio_dim else 0,
        audio_null_key=m.audio_null_key, memory_slots=m.memory_slots, memory_kind=m.memory_kind,
        memory_read=m.memory_read, prompt_modulation=m.prompt_modulation,
    )  # fmt: skip


def audio_tokens_per_latent(cfg: Config) -> int:
    """Audio tokens per latent frame: each of its video frames brings its +-k window of feature frames."""
    return cfg.vae.temporal_compression * (2 * cfg.audio.window_frames + 1)


def build_dit(cfg: Config, audio_dim: int, pretrained: bool = True, dtype: torch.dtype | None = None) -> AudioDiT:
    """The AudioDiT of the profile: random init, or Wan weights from ``model.pretrained_path``; its parameters
    in ``dtype`` (default ``project.dtype``; training passes float32: master weights, bf16 via autocast)."""
    spec = dit_spec(cfg, audio_dim)
    device, dtype = device_of(cfg), dtype or dtype_of(cfg)
    if pretrained and cfg.model.pretrained_path:
        model = load_wan_transformer(cfg.model.pretrained_path, audio_dim, dtype=dtype, device=device,
                                     audio_slots=spec.audio_slots, audio_null_key=spec.audio_null_key,
                                     memory_slots=spec.memory_slots, memory_kind=spec.memory_kind,
                                     memory_read=spec.memory_read,
                                     prompt_modulation=spec.prompt_modulation)  # fmt: skip
        wrong = {k: (getattr(model.spec, k), v) for k, v in spec.to_json().items() if getattr(model.spec, k) != v}
        if wrong:
            detail = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in wrong.items())
            raise ConfigError(f"model.* does not match {cfg.model.pretrained_path}: {detail}")
        model.checkpoint_blocks = cfg.train.activation_checkpointing
        return model
    torch.manual_seed(cfg.project.seed)
    if device.type == "cpu":
        model = AudioDiT(spec)
    else:  # initialised where it runs: a 5B model's random init on the CPU then a copy takes a minute
        with torch.device(device):
            model = AudioDiT(spec)
    model = cast_keeping_fp32(model.to(device), dtype)
    model.checkpoint_blocks = cfg.train.activation_checkpointing
    return model


# spec fields whose modules a DiT saved without them can gain on loading: (saved value meaning "absent", the
# state-dict keys they add). The reference embedding starts at zero, so the loaded model computes exactly what
# the saved one did; the audio slots and null keys change nothing while the saved audio modules are at their
# zero-output start (a base DiT), and start training from their init otherwise.
_ADDABLE = {
    "reference_embedding": (False, lambda k: k.startswith("reference_embedding.")),
    "audio_slots": (0, lambda k: k == "audio_embedder.slot"),
    "audio_null_key": (False, lambda k: k.endswith("_attn.null_k")),
    "memory_slots": (0, lambda k: ".long_memory." in k),
    "prompt_modulation": (False, lambda k: k.startswith("prompt_modulation.")),
}


# spec fields added after checkpoints were saved without them: their value in those checkpoints
_NEWER = {"memory_kind": "global", "memory_read": "gated"}


def _memory_trained(state: dict) -> bool:
    """Whether a saved DiT's long memory was trained (a gate moved off its zero start)."""
    return any(float(v.abs().sum()) > 0 for k, v in state.items() if k.endswith(".long_memory.gate"))


def without_untrained_memory(model: AudioDiT, state: dict) -> tuple[dict, bool]:
    """``state`` less its long memory when that memory was never trained (its gates at their zero start: a
    teacher's, which evicts nothing) and ``model`` has a memory of its own, which then keeps its init whatever
    the saved slots, kind and read; and whether it was dropped."""
    if not model.spec.memory_slots or _memory_trained(state) or not any(".long_memory." in k for k in state):
        return state, False
    return {k: v for k, v in state.items() if ".long_memory." not in k}, True


def load_dit_weights(model: AudioDiT, blob: dict, where: str) -> None:
    """A saved DiT ({"model", "spec"}) into ``model``; ``where`` names the file and the setting in errors.

    A DiT saved without the reference embedding, the audio slots or the audio null keys loads into one with
    them (the added modules keep their init, see ``_ADDABLE``): how a base DiT is continued with them."""
    want = model.spec.to_json()
    saved = blob.get("spec") or {}
    have = {**{k: absent for k, (absent, _) in _ADDABLE.items()}, **_NEWER, **saved}
    state, dropped = without_untrained_memory(model, blob["model"])
    if dropped:  # nothing learned in it: the model's own memory keeps its init
        have["memory_slots"] = 0
    added = [k for k, (absent, _) in _ADDABLE.items() if want.get(k) != absent and have.get(k) == absent]
    for k in added:
        have[k] = want[k]
    if "memory_slots" in added:  # the memory's kind and read come with it
        have["memory_kind"], have["memory_read"] = want["memory_kind"], want["memory_read"]
    if have != want:
        raise ConfigError(f"{where} holds a DiT {blob.get('spec')}, but model.* builds {want}")
    missing, unexpected = model.load_state_dict(state, strict=not added)
    if unexpected or any(not any(_ADDABLE[a][1](k) for a in added) for k in missing):
        raise ConfigError(f"{where}: weights do not fit (missing {missing}, unexpected {unexpected})")


def causal_ae_spec(cfg: Config) -> dict:
    """What a causal autoencoder checkpoint records of vae.* (``spec``) and must match to be loaded."""
    v = cfg.vae
    return {"z_dim": v.z_dim, "widths": list(v.widths), "temporal": v.temporal_compression, "patch": v.patch,
            "decoder_blocks": v.decoder_blocks}


def build_causal_ae(cfg: Config) -> CausalVideoAE:
    v = cfg.vae
    return CausalVideoAE(v.z_dim, tuple(v.widths), v.temporal_compression, v.patch, v.decoder_blocks)


def load_causal_ae(cfg: Config, path: str | Path, root: Path | None = None) -> VideoVAE:
    """The causal autoencoder of a `vae` / `pretrain` checkpoint, with its latent statistics."""
    file = resolve_path(path, root or project_root())
    if not file.is_file():
        hint = ("run `streamavatar vae` first" if Path(path).as_posix().endswith("vae/final.pt")
                else "see docs/pretrain.md: the demo VAE")  # fmt: skip
        raise ConfigError(f"vae.pretrained_path: {file} does not exist ({hint})")
    state = torch.load(file, map_location="cpu", weights_only=True)
    for key in ("model", "latents_mean", "latents_std", "spec"):
        if key not in state:
            raise ConfigError(f"{file}: not a causal autoencoder checkpoint (no '{key}')")
    want = causal_ae_spec(cfg)
    if {"decoder_blocks": 0, **state["spec"]} != want:
        raise ConfigError(f"{file} holds a causal autoencoder {state['spec']}, but vae.* says {want}")
    ae = build_causal_ae(cfg)
    ae.load_state_dict(state["model"])
    return VideoVAE(ae, state["latents_mean"], state["latents_std"])


def build_vae(cfg: Config, pretrained: bool = True, root: Path | None = None) -> VideoVAE:
    v = cfg.vae
    path = v.pretrained_path if pretrained else None
    with torch.random.fork_rng():  # a random VAE (tests) must be the same one in every stage and process
        torch.manual_seed(cfg.project.seed)
        if v.kind == "causal-ae":
            vae = load_causal_ae(cfg, path, root) if path else VideoVAE(build_causal_ae(cfg))
        else:
            vae = VideoVAE(build_wan_vae(v.kind, v.z_dim, v.base_dim, path))
    if (vae.temporal, vae.spatial, vae.z_dim) != (v.temporal_compression, v.spatial_compression, v.z_dim):
        raise ConfigError(
            f"vae.* says z_dim {v.z_dim}, {v.temporal_compression}x time, {v.spatial_compression}x space, but the "
            f"{v.kind} VAE has z_dim {vae.z_dim}, {vae.temporal}x, {vae.spatial}x"
        )
    vae.latent_size(cfg.video.height, cfg.video.width)
    return vae.to(device_of(cfg))


def build_layout(cfg: Config) -> CausalLayout:
    s = cfg.student
    return CausalLayout(s.chunk_frames, s.sink_frames, s.window_frames, s.rapr, s.rapr_max_distance, s.rapr_rule)


def fixed_prompt(cfg: Config) -> torch.Tensor:
    """The fixed prompt's embedding [1, text_len, text_dim]: a seeded stand-in until a text encoder is set."""
    g = torch.Generator().manual_seed(1234)
    return torch.randn(1, cfg.model.text_len, cfg.model.text_dim, generator=g)


def stream_settings(cfg: Config, seed: int | None = None) -> StreamSettings:
    s = cfg.student
    return StreamSettings(
        layout=build_layout(cfg), steps=s.steps, timestep_shift=s.timestep_shift, context=s.context,
        audio_history_frames=cfg.audio.history_frames, vad_threshold_db=cfg.audio.vad_threshold_db,
        seed=cfg.project.seed if seed is None else seed, vad=vad_factory(cfg),
    )  # fmt: skip


def vad_factory(cfg: Config):
    """Makes the live mask's voice detector of ``audio.vad`` (model/vad.py); None for the plain energy gate
    without hangover (the same mask as the old gate). Silero's model is loaded (and warmed up) once, here: a
    missing file is an error now, not at the first chunk, and each detector (two per stream and batch row, at
    every ``start``) gets a copy of it (4 ms) instead of loading the file again (84 ms: 55 s of the demo's
    evaluation, which starts 224 streams)."""
    a = cfg.audio
    if a.vad == "energy" and a.vad_hangover_ms == 0 and a.vad_leak_db == 0:
        return None
    from model.vad import build_vad, silero_model

    template = silero_model(a.vad_model_path) if a.vad == "silero" else None
    return functools.partial(build_vad, a, template, fps=cfg.video.fps)


def build_generator(cfg: Config, pretrained: bool = True) -> StreamingGenerator:
    audio = build_audio(cfg).to(device_of(cfg))
    dit = build_dit(cfg, audio.token_dim, pretrained)
    vae = build_vae(cfg, pretrained)
    if device_of(cfg).type != "cpu":
        vae.vae.to(dtype_of(cfg))  # the network only: the latent mean/std buffers stay float32
    return StreamingGenerator(dit, vae, audio, fixed_prompt(cfg), stream_settings(cfg))
