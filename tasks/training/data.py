"""Training windows of the curated clips, encoded once: VAE latents, masked audio tokens, the waveform.

A window is 1 + 4 * F video frames (F = train.window_chunks * student.chunk_frames latent frames): its first
frame is the clean reference (latent frame 0, alone, as Wan's causal VAE encodes it), the rest are the F
generated latent frames. Audio tokens are computed over the whole clip (so every frame has its real
context), then split by the curated speaking mask into talking and listening tokens (paper 3.2: the mask
multiplies the features, the waveform is untouched) and grouped per latent frame; slot 0 (the reference)
is silent.

Which clips: training windows come from manifest rows with status ok, ``selected`` by the balancing and split
``train``. Validation windows (evaluations and the per-stage sample video) come from split ``val`` clips
(conversations that share neither a side nor audio with training); ``unseen`` windows from the clips of the
people curation held out entirely. When a degenerate manifest has no val clip, the last training clip is held
out (and a warning says so) -- never a clip that is also trained on.

Files (data/latents/): ``<clip_id>.pt`` per clip and ``index.parquet`` (one row per window). A clip whose file
exists with the same fingerprint is not encoded again; one unreadable clip is reported and skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from model.audio import (
    AudioConditioner,
    group_latent,
    split_talk_listen,
    streamed_features,
    with_reference_slot,
)
from model.vae import VideoVAE
from tasks.common.media import MediaError, read_audio, read_frames
from tasks.config import Config, ConfigError

log = logging.getLogger(__name__)

INDEX = "index.parquet"


def module_device(module: torch.nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def window_latent_frames(cfg: Config) -> int:
    return cfg.train.window_chunks * cfg.student.chunk_frames


def window_video_frames(cfg: Config) -> int:
    return 1 + cfg.vae.temporal_compression * window_latent_frames(cfg)


def fingerprint(cfg: Config) -> str:
    """What a clip's encoded windows depend on."""
    keys = {"video": cfg.video.model_dump(mode="json"), "vae": cfg.vae.model_dump(mode="json"),
            "audio": cfg.audio.model_dump(mode="json"), "chunk": cfg.student.chunk_frames,
            "window_chunks": cfg.train.window_chunks, "stride": cfg.train.window_stride_chunks,
            "audio_features": "streamed"}  # fmt: skip
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class WindowSet:
    """Windows held in memory as stacked tensors (the demo's and a node's working set)."""

    index: pd.DataFrame  # clip_id, window, start_frame, split
    latents: torch.Tensor  # [n, z, 1 + F, h, w]
    talk: torch.Tensor  # [n, 1 + F, A, D]
    listen: torch.Tensor  # [n, 1 + F, A, D]
    wave: torch.Tensor  # [n, samples] the window's audio (mono, audio.sample_rate)
    mask: torch.Tensor  # [n, video frames] 1 speaking, 0 listening
    reference: torch.Tensor  # [n, 3, H, W] uint8, the window's first frame

    def __len__(self) -> int:
        return len(self.index)

    def take(self, idx: list[int] | torch.Tensor) -> WindowSet:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return WindowSet(self.index.iloc[idx.tolist()].reset_index(drop=True), self.latents[idx], self.talk[idx],
                         self.listen[idx], self.wave[idx], self.mask[idx], self.reference[idx])  # fmt: skip


def choose_clips(manifest: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training clips, validation clips) of a curated manifest, as the module docstring says."""
    need = {"clip_id", "video_path", "mask_path", "status", "selected", "split"}
    missing = need - set(manifest.columns)
    if missing:
        raise ConfigError(f"curated manifest lacks column(s) {sorted(missing)}; re-run `streamavatar curate`")
    ok = manifest[manifest.status == "ok"]
    train = ok[ok.selected & (ok.split == "train")]
    val = ok[ok.split == "val"]
    if val.empty:  # a degenerate split (e.g. one conversation): hold out the last training clip, say so
        log.warning("the curated manifest has no val clip: holding out training clip %s", train.clip_id.iloc[-1]
                    if len(train) else None)  # fmt: skip
        val, train = train.iloc[-1:], train.iloc[:-1]
    if train.empty:
        raise ConfigError("the curated manifest has no usable training clip (status ok, selected, split train)")
    return train, val


def encode_clip(cfg: Config, root: Path, row: pd.Series, vae: VideoVAE, audio: AudioConditioner) -> dict:
    """All windows of one clip -> tensors (raises MediaError for an unreadable clip)."""
    v, a = cfg.video, cfg.audio
    frames = read_frames(root / row.video_path, v.width, v.height, v.fps)  # [T, H, W, 3] uint8
    wave = read_audio(root / row.video_path, a.sample_rate)
    mask = np.load(root / row.mask_path).astype(np.float32)
    total = min(len(frames), len(mask))
    mask = np.where(mask[:total] > 0, 1.0, 0.0).astype(np.float32)  # unknown (-1: no face) counts as listening
    spf = a.sample_rate // v.fps
    length = window_video_frames(cfg)
    stride_chunks = cfg.train.window_stride_chunks or cfg.train.window_chunks
    stride = stride_chunks * cfg.student.chunk_frames * cfg.vae.temporal_compression
    starts = list(range(0, total - length + 1, stride))
    if not starts:
        raise MediaError(f"{row.video_path}: {total} frames, shorter than one training window of {length}")
    wave_t = torch.from_numpy(np.pad(wave, (0, max(0, total * spf - len(wave))))[: total * spf])[None]
    with torch.no_grad():
        # what the live stream computes (chunk by chunk, past audio only), not the whole clip at once
        feats = streamed_features(audio, wave_t.to(module_device(audio)), cfg.student.chunk_frames * cfg.vae.temporal_compression,
                                  cfg.audio.history_frames).float().cpu()  # fmt: skip
    out = {k: [] for k in ("latents", "talk", "listen", "wave", "mask", "reference")}
    device = vae.mean.device
    for s in starts:
        clip = torch.from_numpy(frames[s : s + length]).permute(3, 0, 1, 2).float() / 127.5 - 1.0  # [3, T, H, W]
        with torch.no_grad():
            lat = vae.encode(clip[None].to(device)).cpu()[0]
        m = torch.from_numpy(mask[s : s + length])
        talk, listen = split_talk_listen(feats[:, s + 1 : s + length], m[None, 1:])
        n = cfg.vae.temporal_compression
        out["latents"].append(lat)
        out["talk"].append(with_reference_slot(group_latent(talk, n))[0])
        out["listen"].append(with_reference_slot(group_latent(listen, n))[0])
        out["wave"].append(wave_t[0, s * spf : (s + length) * spf])
        out["mask"].append(m)
        out["reference"].append(torch.from_numpy(frames[s]).permute(2, 0, 1).contiguous())
    packed = {k: torch.stack(vs) for k, vs in out.items()}
    packed["starts"] = starts
    return packed


def window_action(actions: str | None, start: int, length: int, fps: float, before_s: float = 0.25,
                  within_s: float = 0.5) -> str:  # fmt: skip
    """The action a window is conditioned on: of the clip's annotated actions (the manifest's JSON, seconds),
    the one that BEGINS near the window's start -- from ``before_s`` before its reference frame to ``within_s``
    after it (the nearest such onset) -- else "idle". What a request does in the stream: the action starts at
    the chunk boundary after it. Windows that only show an action's end stay idle: relative to their
    reference frame the head moves back, the opposite way (measured on the interactive corpus: with "any
    action covering 40 % of the window", 35-41 % of the turn windows turned the other way; with onsets,
    0-14 %)."""
    if not isinstance(actions, str) or not actions:
        return "idle"
    best, gap = "idle", None
    t0 = start / fps
    for name, a, _b in json.loads(actions):
        d = a - t0
        if -before_s <= d <= within_s and (gap is None or abs(d) < gap):
            best, gap = name, abs(d)
    return best


def build_windows(cfg: Config, root: Path, vae: VideoVAE, audio: AudioConditioner, progress: bool = True
                  ) -> tuple[pd.DataFrame, dict[str, str]]:  # fmt: skip
    """Encode every training and validation clip not yet encoded; returns (window index, failures)."""
    manifest_path = root / cfg.curate.manifest
    if not manifest_path.is_file():
        raise ConfigError(f"{cfg.curate.manifest}: no curated manifest; run `streamavatar curate` first")
    manifest = pd.read_parquet(manifest_path)
    train, val = choose_clips(manifest)
    unseen = manifest[(manifest.status == "ok") & (manifest.split == "unseen")]  # people never trained on
    out_dir = root / cfg.train.latents_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cfg)
    rows, failures = [], {}
    todo = ([(r, "train") for r in train.itertuples()] + [(r, "val") for r in val.itertuples()]
            + [(r, "unseen") for r in unseen.itertuples()])  # fmt: skip
    for r, split in tqdm(todo, desc="encode windows", unit="clip", disable=not progress):
        path = out_dir / f"{r.clip_id}.pt"
        packed = None
        if path.is_file():
            try:
                packed = torch.load(path, weights_only=True)
                if packed.get("fingerprint") != fp:
                    packed = None
            except Exception:  # noqa: BLE001 -- a half-written or foreign file: encode again
                packed = None
        if packed is None:
            try:
                packed = encode_clip(cfg, root, pd.Series(r._asdict()), vae, audio)
            except (MediaError, OSError, ValueError) as exc:
                failures[r.clip_id] = str(exc)
                log.warning("training windows: %s skipped: %s", r.clip_id, exc)
                continue
            packed["fingerprint"] = fp
            tmp = path.with_suffix(".pt.tmp")
            torch.save(packed, tmp)
            os.replace(tmp, path)
        length = window_video_frames(cfg)
        for w, s in enumerate(packed["starts"]):
            rows.append({"clip_id": r.clip_id, "window": w, "start_frame": int(s), "split": split,
                         "path": str(path.relative_to(root)),
                         "action": window_action(getattr(r, "actions", ""), int(s), length, cfg.video.fps)})  # fmt: skip
    index = pd.DataFrame(rows, columns=["clip_id", "window", "start_frame", "split", "path", "action"])
    tmp = out_dir / (INDEX + ".tmp")
    index.to_parquet(tmp, index=False)
    os.replace(tmp, out_dir / INDEX)
    return index, failures


def windows_digest(cfg: Config, root: Path) -> str:
    """What the encoded windows are (clips, windows, splits, encoding settings): part of every training
    stage's fingerprint, so new data restarts training instead of resuming a run made on other data."""
    index_path = root / cfg.train.latents_dir / INDEX
    if not index_path.is_file():
        return "none"
    index = pd.read_parquet(index_path)
    actions = index["action"] if "action" in index else ["idle"] * len(index)
    rows = sorted(zip(index.clip_id, index.window, index.start_frame, index.split, actions, strict=True))
    if set(actions) <= {"idle"}:  # no action labels: the digest of before labels existed
        rows = [r[:4] for r in rows]
    return hashlib.sha256(json.dumps([fingerprint(cfg), [list(map(str, r)) for r in rows]]).encode()).hexdigest()[:16]


def window_splits(cfg: Config, root: Path) -> set[str]:
    """The splits data/latents holds windows of (train, val, and unseen when an identity is held out)."""
    index_path = root / cfg.train.latents_dir / INDEX
    return set(pd.read_parquet(index_path, columns=["split"]).split) if index_path.is_file() else set()


def load_windows(cfg: Config, root: Path, split: str, limit: int | None = None) -> WindowSet:
    """The windows of ``split`` ("train" or "val") from data/latents, stacked."""
    index_path = root / cfg.train.latents_dir / INDEX
    if not index_path.is_file():
        raise ConfigError(f"{index_path.relative_to(root)}: no training windows; run `streamavatar teacher` first")
    index = pd.read_parquet(index_path)
    index = index[index.split == split].reset_index(drop=True)
    if "action" not in index:  # an index written before action labels
        index["action"] = "idle"
    if limit is not None:
        index = index.iloc[:limit]
    if index.empty:
        raise ConfigError(f"no {split} windows in {index_path.relative_to(root)}")
    cache: dict[str, dict] = {}
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("latents", "talk", "listen", "wave", "mask", "reference")}
    for r in index.itertuples():
        if r.path not in cache:
            cache[r.path] = torch.load(root / r.path, weights_only=True)
        for k in parts:
            parts[k].append(cache[r.path][k][r.window])
    stacked = {k: torch.stack(v) for k, v in parts.items()}
    return WindowSet(index, **stacked)
