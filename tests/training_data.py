"""A tiny curated project for the training tests: a few real mp4 clips (moving shapes, a voice-like tone),
speaking masks and a curated manifest, in the layout `streamavatar curate` writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tasks.common.media import write_video, write_wav
from tasks.config import Config

CLIPS = [("tr_a", True, "train"), ("tr_b", True, "train"), ("va_a", False, "val")]  # va_a: a held-out conversation


def tiny_config(root: Path) -> Config:
    cfg = Config()
    cfg.tracking.enabled = False
    cfg.vae.pretrained_path = None  # a random causal autoencoder: these tests train the DiT stages only
    cfg.teacher.init_from = None
    cfg.model.num_layers, cfg.model.num_heads, cfg.model.head_dim, cfg.model.ffn_dim = 2, 2, 16, 128
    cfg.train.window_chunks = 2  # 1 + 6 latent frames = 25 video frames per window
    cfg.train.checkpoint_every = 2
    cfg.train.val_windows = 1
    cfg.train.sample_video = False
    cfg.teacher.iterations = 4
    cfg.ode_pairs.steps = 6
    cfg.ode_pairs.eta = 0.0  # the ODE (CausVid's, the paper profile's); the demo's stochastic pairs: test_training
    cfg.teacher_sampler.steps = 6
    cfg.ode_init.iterations = 4
    cfg.ode_init.lr = 1e-3  # enough steps to beat the untrained student on the held-out pairs
    cfg.distill.iterations = 4
    cfg.refine.iterations = 2
    cfg.refine.qformer_dim = 16
    cfg.evaluate.seeds = 1  # one draw, measured in-process (tests/test_evaluate.py sets the demo's 3 and 2 workers)
    cfg.evaluate.workers = 0
    return cfg


def make_project(root: Path, seconds: float = 2.0, fps: int = 25, size: int = 64) -> Path:
    """Write clips, masks and data/manifests/curated.parquet under ``root``; returns ``root``."""
    clips, masks = root / "data/curated/clips", root / "data/curated/masks"
    clips.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    n = int(seconds * fps)
    rows = []
    yy, xx = np.mgrid[0:size, 0:size]
    for k, (clip_id, selected, split) in enumerate(CLIPS):
        frames = []
        for t in range(n):
            cx, cy = size / 2 + 10 * np.sin(0.2 * t + k), size / 2 + 6 * np.cos(0.15 * t)
            disk = ((xx - cx) ** 2 + (yy - cy) ** 2 < (12 + k) ** 2).astype(np.float32)
            img = np.stack([disk * 200 + 30, (1 - disk) * 120 + 40 * k, np.full_like(disk, 90)], -1)
            frames.append(img.astype(np.uint8))
        sr = 16000
        tt = np.arange(int(seconds * sr)) / sr
        mask = ((np.arange(n) // 12) % 2 == 0).astype(np.int8)
        gate = np.repeat(mask, sr // fps)[: len(tt)].astype(np.float32)
        voice = 0.3 * np.sin(2 * np.pi * (180 + 40 * k) * tt) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * tt))
        other = 0.2 * np.sin(2 * np.pi * 260 * tt)
        wav = root / f"{clip_id}.wav"
        write_wav(wav, voice * gate + other * (1 - gate), sr)
        write_video(clips / f"{clip_id}.mp4", frames, fps, audio_path=wav, audio_rate=sr)
        wav.unlink()
        np.save(masks / f"{clip_id}.npy", mask)
        rows.append({"clip_id": clip_id, "video_path": f"data/curated/clips/{clip_id}.mp4",
                     "mask_path": f"data/curated/masks/{clip_id}.npy", "status": "ok", "selected": selected,
                     "split": split, "category": "mixed", "reason": ""})  # fmt: skip
    (root / "data/manifests").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(root / "data/manifests/curated.parquet", index=False)
    return root
