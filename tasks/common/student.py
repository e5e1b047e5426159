"""The trained student DiT from a checkpoint: what the drift bench and `streamavatar generate` stream with."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from model.audio import AudioConditioner
from model.dit import AudioDiT
from model.streaming import StreamingGenerator
from model.text import action_embeddings, prompt_embedding
from tasks.common.models import build_audio, build_dit, build_vae, device_of, dtype_of, stream_settings
from tasks.config import Config, ConfigError, data_path, resolve_path

RANDOM = "random"  # --checkpoint random: the seeded, untrained student


def default_checkpoint(cfg: Config, root: Path) -> Path | None:
    """The last trained student: refine's output, else distill's (what `make demo` leaves behind)."""
    base = root / cfg.train.checkpoint_dir
    for stage in ("refine", "distill"):
        path = base / stage / "final.pt"
        if path.is_file():
            return path
    return None


def load_student(cfg: Config, root: Path, checkpoint: str | Path | None, audio: AudioConditioner,
                 device: torch.device) -> tuple[AudioDiT, dict[str, Any]]:  # fmt: skip
    """(student DiT in eval mode, what it is) for ``checkpoint``: a path, None (the default) or "random"."""
    from tasks.training.common import dit_from_state  # the training package is heavy; import on use

    if checkpoint == RANDOM:
        dit = build_dit(cfg, audio.token_dim, pretrained=False).to(device)
        label = f"random (seeded random-init student, project.seed={cfg.project.seed}; NOT trained)"
        return dit.eval(), {"path": None, "label": label, "trained": False, "step": None}
    if checkpoint is None:
        path = default_checkpoint(cfg, root)
        if path is None:
            ckpt = cfg.train.checkpoint_dir
            raise ConfigError(
                f"no trained student: neither {ckpt}/refine/final.pt nor {ckpt}/distill/final.pt exists; "
                "run `make demo` first (or pass --checkpoint PATH, or --checkpoint random for the untrained "
                "student)"
            )
    else:
        path = resolve_path(checkpoint, root)
        if not path.is_file():
            raise ConfigError(f"--checkpoint {checkpoint}: no such file")
    try:  # tensors and plain containers only: unpickling arbitrary objects would run code from the file
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(f"{path}: refused, it holds more than weights (torch.load weights_only: "
                          f"{str(exc).splitlines()[0]})") from None  # fmt: skip
    if not isinstance(blob, dict) or "model" not in blob:
        raise ConfigError(f"{path}: not a training checkpoint (expected a dict with a 'model' state dict)")
    try:
        dit = dit_from_state(cfg, audio, blob["model"], device)
    except (RuntimeError, ConfigError) as exc:
        raise ConfigError(f"{path} does not fit the configured model.* / vae.* / audio.* (trained with "
                          f"another profile?): {str(exc).splitlines()[0]}") from None  # fmt: skip
    shown = path.relative_to(root) if path.is_relative_to(root) else path
    return dit.eval(), {"path": str(shown), "label": str(shown), "trained": True, "step": blob.get("step")}


def build_stream(cfg: Config, root: Path, checkpoint: str | Path | None, actions: bool = False
                 ) -> tuple[StreamingGenerator, dict]:  # fmt: skip
    """The product's StreamingGenerator around the chosen student, and what that student is; ``actions``: with
    every action's prompt embedding (Cache-Switching, ``set_action``)."""
    device = device_of(cfg)
    audio = build_audio(cfg).to(device)
    dit, info = load_student(cfg, root, checkpoint, audio, device)
    vae = build_vae(cfg, root=root).eval()
    if device.type != "cpu":
        vae.vae.to(dtype_of(cfg))  # the network only: the latent statistics stay float32
    text = prompt_embedding(cfg.model.prompt, cfg.model.text_len, cfg.model.text_dim, cfg.model.text_encoder_path,
                            cache_dir=data_path(cfg, root, "cache"), dtype=dtype_of(cfg))  # fmt: skip
    gen = StreamingGenerator(dit, vae, audio, text.float(), stream_settings(cfg))
    if actions:
        made = action_embeddings(cfg.model.prompt, cfg.model.text_len, cfg.model.text_dim, cfg.model.text_encoder_path,
                                 cache_dir=data_path(cfg, root, "cache"), dtype=dtype_of(cfg))  # fmt: skip
        gen.action_text = {k: v.float() for k, v in made.items() if k != "idle"}
    return gen, info
