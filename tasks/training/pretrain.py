"""`streamavatar pretrain`: the demo's stand-in for the pretrained Wan2.2 the paper fine-tunes.

Two models, trained from scratch on real talking-head clips (``pretrain.dirs``, face-cropped; the clips named in
``pretrain.holdout`` are only evaluated on), at a budget longer than ``make demo`` has:

1. the causal streaming autoencoder (tasks/training/vae.py: held-out PSNR / SSIM vs bicubic and untrained);
2. a base video DiT (the same AudioDiT class, the fixed prompt): flow matching on windows of the clips' latents,
   each window's first latent frame the clean reference, exactly as the teacher trains; with silent audio
   tokens, or, with ``pretrain.dit_audio``, each clip's own voice (its streamed features, as training windows
   and the live stream compute them; talking where the live mask (``audio.vad``) hears the voice, or the
   corpus ground truth), so the audio path arrives trained. Measured on held-out windows at fixed noise levels against the
   starting network and the per-channel Gaussian denoiser (the best a model with no learning does), plus a
   sample sheet; with audio also the loss with the audio silenced, the mouth box's loss with another window's
   audio, and the lip sync (mouth opening vs voice envelope, pooled r) of samples before and after.

``--export weights/`` writes ``demo_vae.pt`` and ``demo_dit.pt`` with ``.json`` provenance (command, data digest,
metrics, time, sizes) beside them: the demo's committed defaults (``vae_train.init_from``, ``teacher.init_from``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
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
from model.dit import AudioDiT
from model.losses import region_weight
from model.sampling import euler_sample_sigmas, shift_sigma, teacher_sigmas
from model.text import prompt_embedding
from model.vad import build_vad, clip_mask
from model.vae import VideoVAE
from tasks.common.media import MediaError, ffmpeg_exe, read_audio
from tasks.common.models import build_audio, build_dit, device_of, load_causal_ae, load_dit_weights
from tasks.common.stage import StageResult
from tasks.config import Config, ConfigError, data_path, resolve_path
from tasks.training.common import heldout_fm_losses, mouth_audio_gain, sample_teacher, teacher_velocity
from tasks.training.data import WindowSet, window_video_frames
from tasks.training.engine import (
    Checkpoints,
    Dist,
    Metrics,
    config_digest,
    optimizer_step,
    resume,
    run_loop_for,
    step_generator,
    warmup_cosine,
)
from tasks.training.teacher import teacher_loss
from tasks.training.vae import _to_video, data_digest, fixture_clips, fixture_files, pretrain_vae

log = logging.getLogger(__name__)


def window_starts(length: int, frames: int, stride: int) -> range:
    return range(0, length - frames + 1, stride or frames)


@torch.no_grad()
def encode_windows(vae: VideoVAE, clips: dict[str, np.ndarray], frames: int, flip: bool = False,
                   stride: int = 0, batch: int = 32) -> torch.Tensor:  # fmt: skip
    """Windows of ``frames`` video frames of every clip, starting every ``stride`` frames (0: back to back)
    -> normalised latents [n, z, 1 + F, h, w] (on the CPU), encoded ``batch`` windows at a time on the
    autoencoder's device."""
    vae.eval()
    device = next(vae.parameters()).device
    todo: list[torch.Tensor] = []
    out: list[torch.Tensor] = []

    def flush() -> None:
        if todo:
            out.append(vae.encode(torch.stack(todo).to(device)).cpu())
            todo.clear()

    for name in sorted(clips):
        c = clips[name]
        for s in window_starts(len(c), frames, stride):
            x = _to_video(c[s : s + frames])
            todo.extend([x, x.flip(-1)] if flip else [x])
            if len(todo) >= batch:
                flush()
    flush()
    if not out:
        raise ConfigError(f"pretrain: no clip is {frames} frames long (train.window_chunks sets the window)")
    return torch.cat(out)


def clip_speaking(cfg: Config, wave: np.ndarray, total: int, speaking: np.ndarray | None = None) -> np.ndarray:
    """Per video frame [total] float32, 1 where the clip's person talks: ``speaking`` (a corpus clip's ground
    truth) cut or padded to the clip, else the live mask of its voice (audio.vad, model/vad.py), as a live
    stream computes it."""
    spf = cfg.audio.sample_rate // cfg.video.fps
    if speaking is not None:
        mask = np.zeros(total, dtype=np.float32)
        n = min(total, len(speaking))
        mask[:n] = np.asarray(speaking[:n], dtype=np.float32) > 0
        return mask
    w = torch.from_numpy(np.pad(wave, (0, max(0, total * spf - len(wave))))[: total * spf]).float()
    return clip_mask(w, build_vad(cfg.audio, fps=cfg.video.fps), total).astype(np.float32)


@torch.no_grad()
def clip_window_audio(cfg: Config, cond: AudioConditioner, wave: np.ndarray, total: int, starts: range,
                      frames: int, speaking: np.ndarray | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """The audio of one clip's windows, as the teacher's windows have it: talk / listen tokens [n, 1 + F, A, D]
    from the live stream's features of a stream started at the window's chunk offset (so each window's tokens
    are what a stream that began on its chunk grid computes), split by :func:`clip_speaking` (``speaking``, per
    frame, 1 = the person talks, or else the live mask of the clip's voice); plus each window's mask
    [n, frames] and waveform [n, frames * spf]."""
    spf = cfg.audio.sample_rate // cfg.video.fps
    chunk = cfg.student.chunk_frames * cfg.vae.temporal_compression
    w = torch.from_numpy(np.pad(wave, (0, max(0, total * spf - len(wave))))[: total * spf]).float()[None]
    mask = torch.from_numpy(clip_speaking(cfg, wave, total, speaking))
    feats: dict[int, torch.Tensor] = {}
    out: dict[str, list] = {"talk": [], "listen": [], "mask": [], "wave": []}
    for s in starts:
        o = s % chunk
        if o not in feats:
            feats[o] = streamed_features(cond, w[:, o * spf :], chunk, cfg.audio.history_frames).float()
        talk, listen = split_talk_listen(feats[o][:, s - o + 1 : s - o + frames], mask[None, s + 1 : s + frames])
        n = cfg.vae.temporal_compression
        out["talk"].append(with_reference_slot(group_latent(talk, n))[0])
        out["listen"].append(with_reference_slot(group_latent(listen, n))[0])
        out["mask"].append(mask[s : s + frames])
        out["wave"].append(w[0, s * spf : (s + frames) * spf])
    return {k: torch.stack(v) for k, v in out.items()}


def clip_voices(cfg: Config, root: Path, names) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Each clip's voice, read from its file in ``pretrain.dirs``: (waveform, speaking) where speaking is the
    ground truth of a clip of a corpus made by `streamavatar corpus` (``videos/<clip>.mp4`` beside
    ``gt/<clip>.json``, whose audio is the conversation's mix) and None for any other (the live mask decides)."""
    files = fixture_files(cfg, root)
    out = {}
    for name in sorted(names):
        try:
            wave = read_audio(files[name], cfg.audio.sample_rate, duration=cfg.pretrain.max_seconds_per_clip)
        except MediaError as exc:
            raise ConfigError(f"pretrain.dit_audio: {files[name]} has no readable audio ({exc})") from exc
        gt = files[name].parent.parent / "gt" / f"{name}.json"
        out[name] = (wave, np.asarray(json.loads(gt.read_text())["speaking"]) if gt.is_file() else None)
    return out


def window_audio(cfg: Config, cond: AudioConditioner, clips: dict[str, np.ndarray],
                 voices: dict[str, tuple[np.ndarray, np.ndarray | None]], frames: int, flip: bool = False,
                 stride: int = 0) -> dict[str, torch.Tensor]:  # fmt: skip
    """:func:`clip_window_audio` of every clip (its voice from :func:`clip_voices` or a pack), in
    :func:`encode_windows`' order (a flipped window hears the same voice)."""
    parts = []
    for name in sorted(clips):
        wave, speaking = voices[name]
        a = clip_window_audio(cfg, cond, wave, len(clips[name]), window_starts(len(clips[name]), frames, stride),
                              frames, speaking)  # fmt: skip
        parts.append({k: v.repeat_interleave(2 if flip else 1, dim=0) for k, v in a.items()})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


PACK_FORMAT = "streamavatar-dit-pack/1"
PACK_CRF = 14  # H.264 quality of the packed crops: ~40 dB PSNR against them, far under the autoencoder's error (~28 dB)


def encode_crops(frames: np.ndarray, fps: int, crf: int = PACK_CRF) -> bytes:
    """[T, H, W, 3] uint8 RGB -> H.264 (4:4:4, ``crf``) in an mp4's bytes (ffmpeg)."""
    t, h, w, _ = frames.shape
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "crops.mp4"
        cmd = [ffmpeg_exe(), "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps),
               "-i", "-", "-c:v", "libx264", "-preset", "slow", "-crf", str(crf), "-pix_fmt", "yuv444p", str(out)]  # fmt: skip
        run = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True)
        if run.returncode != 0:
            raise MediaError(f"ffmpeg could not encode the crops: {run.stderr.decode(errors='replace')[-300:]}")
        return out.read_bytes()


def decode_crops(data: bytes, what: str) -> np.ndarray:
    """An mp4's bytes -> [T, H, W, 3] uint8 RGB through OpenCV's own decoder (no ffmpeg program needed)."""
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "crops.mp4"
        f.write_bytes(data)
        cap = cv2.VideoCapture(str(f))
        frames = []
        while True:
            ok, im = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(im, cv2.COLOR_BGR2RGB))
        cap.release()
    if not frames:
        raise ConfigError(f"pretrain.dit_pack: {what}: OpenCV decoded no frame")
    return np.stack(frames)


def write_pack(cfg: Config, root: Path, train: dict[str, np.ndarray], held: dict[str, np.ndarray],
               path: Path, progress: bool = True) -> tuple[dict, dict, dict]:  # fmt: skip
    """Everything `pretrain --what dit` reads from the clips, in one file (``pretrain.dit_pack``): each clip's
    face crops as H.264 (4:4:4, crf ``PACK_CRF``: ~40 dB against the crops), its voice as 16-bit PCM at
    ``audio.sample_rate`` (LZMA; a corpus conversation's two sides share one copy of the mix) and its speaking
    mask, decided here (a corpus clip's truth, or the live mask of audio.vad), so the machine that reads it
    needs neither the clips nor an ffmpeg program, mediapipe or the VAD's model. The crops are decoded here as
    the reader will (OpenCV) and their digest recorded: both machines train on the same pixels. Returns the
    meta and the decoded (train, held-out) crops."""
    clips = {**train, **held}
    voices = clip_voices(cfg, root, clips)
    arrays: dict[str, np.ndarray] = {}
    decoded: dict[str, np.ndarray] = {}
    meta = {"format": PACK_FORMAT, "video": cfg.video.model_dump(mode="json"), "sample_rate": cfg.audio.sample_rate,
            "crf": PACK_CRF, "train": sorted(train), "held": sorted(held), "clips": {}}  # fmt: skip
    for name in tqdm(sorted(clips), desc="pretrain: pack", unit="clip", disable=not progress):
        c = clips[name]
        video = encode_crops(c, cfg.video.fps)
        back = decode_crops(video, name)
        if back.shape != c.shape:
            raise MediaError(f"pretrain: {name}: the packed crops decode to {back.shape}, not {c.shape}")
        decoded[name] = back
        arrays[f"video/{name}"] = np.frombuffer(video, dtype=np.uint8)
        wave, speaking = voices[name]
        pcm = (np.clip(wave, -1.0, 32767 / 32768) * 32768).round().astype("<i2").tobytes()
        wkey = hashlib.sha256(pcm).hexdigest()[:16]
        if f"wave/{wkey}" not in arrays:
            arrays[f"wave/{wkey}"] = np.frombuffer(lzma.compress(pcm, preset=6), dtype=np.uint8)
        arrays[f"speaking/{name}"] = clip_speaking(cfg, wave, len(c), speaking).astype(np.uint8)
        meta["clips"][name] = {"shape": list(c.shape), "wave": wkey,
                               "crops_sha256": hashlib.sha256(back.tobytes()).hexdigest()}  # fmt: skip
    meta["data_digest"] = data_digest({k: decoded[k] for k in train})
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return meta, {k: decoded[k] for k in train}, {k: decoded[k] for k in held}


def read_pack(cfg: Config, path: Path) -> tuple[dict, dict, dict, dict]:
    """(train, held-out, voices, meta) of a pack written by :func:`write_pack`; voices: name -> (waveform,
    speaking mask). Each clip's crops are checked against the digest the pack recorded."""
    if not path.is_file():
        raise ConfigError(f"pretrain.dit_pack: {path} does not exist (write one with `pretrain --what pack`)")
    try:
        z = np.load(path)
        meta = json.loads(z["meta"].tobytes())
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"pretrain.dit_pack: {path} is not a pack ({exc})") from exc
    if meta.get("format") != PACK_FORMAT:
        raise ConfigError(f"pretrain.dit_pack: {path} has format {meta.get('format')!r}, expected {PACK_FORMAT}")
    if meta["video"] != cfg.video.model_dump(mode="json") or meta["sample_rate"] != cfg.audio.sample_rate:
        raise ConfigError(f"pretrain.dit_pack: {path} was packed for video {meta['video']} at "
                          f"{meta['sample_rate']} Hz; this config has {cfg.video.model_dump(mode='json')} at "
                          f"{cfg.audio.sample_rate} Hz")  # fmt: skip
    clips, voices = {}, {}
    for name, info in meta["clips"].items():
        c = decode_crops(z[f"video/{name}"].tobytes(), f"{path}: clip {name}")
        if list(c.shape) != info["shape"] or hashlib.sha256(c.tobytes()).hexdigest() != info["crops_sha256"]:
            raise ConfigError(f"pretrain.dit_pack: {path}: clip {name} decodes to other pixels than were packed "
                              f"(shape {list(c.shape)} vs {info['shape']}): another H.264 decoder?")  # fmt: skip
        clips[name] = c
        pcm = np.frombuffer(lzma.decompress(z[f"wave/{info['wave']}"].tobytes()), dtype="<i2")
        voices[name] = (pcm.astype(np.float32) / 32768, z[f"speaking/{name}"].astype(np.float32))
    train = {k: clips[k] for k in meta["train"]}
    held = {k: clips[k] for k in meta["held"]}
    return train, held, voices, meta


@torch.no_grad()
def lip_sync(cfg: Config, model: AudioDiT | None, vae: VideoVAE, held: WindowSet, text: torch.Tensor,
             limit: int) -> dict[str, float]:  # fmt: skip
    """Lip sync of the model's samples (the teacher sampler, teacher_sampler.*) of ``limit`` held-out windows
    (evenly spread) where the clip talks (live mask mean >= 0.5): the voice envelope against FaceMesh's mouth opening,
    pooled over the windows at the best lag within evaluate.max_lag_frames (tasks/evaluation/metrics.py, as
    the evaluate stage), its chance level (the envelope reversed) and the face rate. ``model`` None: the
    held-out frames themselves (decoded latents: the ground truth through the autoencoder)."""
    from tasks.evaluation import metrics

    talking = torch.nonzero(held.mask[:, 1:].float().mean(1) >= 0.5).flatten()
    if not len(talking) or limit < 1:
        return {}
    talking = talking[torch.linspace(0, len(talking) - 1, min(limit, len(talking))).round().long()].unique().tolist()
    w = held.take(talking)
    if model is None:
        video = vae.decode(w.latents)
    else:
        model.eval()
        g = torch.Generator().manual_seed(cfg.project.seed)
        x = torch.randn(w.latents.shape, generator=g)
        x[:, :, :1] = w.latents[:, :, :1]
        video = vae.decode(sample_teacher(cfg, model, model.prepare_text(text.expand(len(w), -1, -1)), x, w.talk,
                                          w.listen))  # fmt: skip
        model.train()
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).numpy()[:, 1:]
    spf = cfg.audio.sample_rate // cfg.video.fps
    e, series, faces = cfg.evaluate, [], []
    for i in range(len(w)):
        kp = metrics.extract_keypoints(frames[i], norm_height=e.keypoint_norm_height, min_side=e.keypoint_min_side)
        faces.append(kp.detection_rates()["face"])
        voice = (w.wave[i, spf:] * w.mask[i, 1:].repeat_interleave(spf)).numpy()
        env = metrics.audio_envelope(voice, cfg.audio.sample_rate, cfg.video.fps, frames.shape[1])
        series.append((env, metrics.mouth_series(kp.face)))
    r = metrics.pooled_lagged_correlation(series, e.max_lag_frames)
    null = metrics.pooled_lagged_correlation(series, e.max_lag_frames, reverse_audio=True)
    nan = float("nan")
    return {"lip_corr": nan if r["best_corr"] is None else r["best_corr"],
            "lip_lag": nan if r["best_lag"] is None else float(r["best_lag"]),
            "lip_corr_null": nan if null["best_corr"] is None else null["best_corr"],
            "face_rate": float(np.mean(faces)), "lip_windows": float(len(w))}  # fmt: skip


def silent(model: AudioDiT, latents: torch.Tensor, tokens: int) -> torch.Tensor:
    """All-zero audio tokens [B, 1 + F, tokens, audio_dim]: the base model hears nothing."""
    return torch.zeros(latents.shape[0], latents.shape[2], tokens, model.spec.audio_dim)


def heldout_losses(model: AudioDiT | None, val: torch.Tensor, text: torch.Tensor, tokens: int, mean: torch.Tensor,
                   var: torch.Tensor, held: WindowSet | None = None) -> dict[str, float]:  # fmt: skip
    """Held-out flow-matching losses with the windows' own audio (``held``) or silent audio tokens."""
    if held is not None:
        return heldout_fm_losses(model, val, text, held.talk, held.listen, mean, var)
    a = torch.zeros(val.shape[0], val.shape[2], tokens, model.spec.audio_dim if model is not None else 1)
    return heldout_fm_losses(model, val, text, a, a, mean, var)


@torch.no_grad()
def sample_sheet(model: AudioDiT, vae: VideoVAE, val: torch.Tensor, text: torch.Tensor, tokens: int, path: Path,
                 n: int = 3, steps: int = 24, shift: float = 5.0) -> Path:  # fmt: skip
    """Rows: held-out windows; columns: ground truth at 4 times, then the model's sample from the same reference."""
    model.eval()
    pick = val[torch.linspace(0, len(val) - 1, min(n, len(val))).long()]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(pick.shape, generator=g)
    x[:, :, :1] = pick[:, :, :1]
    a = silent(model, pick, tokens)
    fn = teacher_velocity(model, model.prepare_text(text.expand(len(pick), -1, -1)), a, a, 1.0)
    gen = vae.decode(euler_sample_sigmas(fn, x, teacher_sigmas(steps, shift))).clamp(-1, 1)
    gt = vae.decode(pick).clamp(-1, 1)
    t = gt.shape[2]
    cols = [0, t // 3, 2 * t // 3, t - 1]
    rows = [torch.cat([gt[i, :, j] for j in cols] + [gen[i, :, j] for j in cols], dim=2) for i in range(len(pick))]
    img = ((torch.cat(rows, dim=1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    img = cv2.resize(img, (img.shape[1] * 2, img.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    model.train()
    return path


def pretrain_dit(cfg: Config, root: Path, vae: VideoVAE, train: dict, held: dict, out_dir: Path,
                 progress: bool, voices: dict | None = None) -> tuple[AudioDiT, dict, Path]:  # fmt: skip
    """``voices``: name -> (waveform, speaking) of every clip (a pack's); None: read from the clips' files.
    Trains on ``project.device`` (a GPU: the windows are encoded and kept there); measures on the CPU."""
    p = cfg.pretrain
    frames = window_video_frames(cfg)
    device = device_of(cfg)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    vae.to(device)
    data = encode_windows(vae, train, frames, flip=True, stride=p.dit_window_stride, batch=p.dit_encode_batch)
    val = encode_windows(vae, held, frames, batch=p.dit_encode_batch)
    vae.cpu()
    mean = data.mean(dim=(0, 2, 3, 4), keepdim=True)[0:1]
    var = data.var(dim=(0, 2, 3, 4), keepdim=True)[0:1]
    audio = build_audio(cfg)
    tokens = audio.tokens_per_latent
    sounds = held_set = None
    if p.dit_audio:  # the clips' own voices: train windows in encode_windows' order, held-out ones on the chunk grid
        if voices is None:
            voices = clip_voices(cfg, root, {**train, **held})
        sounds = window_audio(cfg, audio, train, voices, frames, flip=True, stride=p.dit_window_stride)
        ha = window_audio(cfg, audio, held, voices, frames)
        held_set = WindowSet(pd.DataFrame({"window": range(len(val))}), val, ha["talk"], ha["listen"], ha["wave"],
                             ha["mask"], torch.zeros(len(val), 3, 1, 1, dtype=torch.uint8))  # fmt: skip
    text = prompt_embedding(cfg.model.prompt, cfg.model.text_len, cfg.model.text_dim, cfg.model.text_encoder_path,
                            cache_dir=data_path(cfg, root, "cache")).float()  # fmt: skip
    model = build_dit(cfg, audio.token_dim, pretrained=False, dtype=torch.float32).cpu()
    init_digest = None
    if p.dit_init_from:
        path = resolve_path(p.dit_init_from, root)
        if not path.is_file():
            raise ConfigError(f"pretrain.dit_init_from: {path} does not exist (null trains from scratch)")
        load_dit_weights(model, torch.load(path, map_location="cpu", weights_only=True),
                         f"pretrain.dit_init_from: {path}")  # fmt: skip
        init_digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    before = heldout_losses(model, val, text, tokens, mean, var, held_set)
    baseline = heldout_losses(None, val, text, tokens, mean, var, held_set)
    lip_before = lip_sync(cfg, model, vae, held_set, text, p.dit_lip_windows) if held_set is not None else {}
    fingerprint = config_digest({"model": cfg.model.model_dump(mode="json"), "vae": data_digest(train),
                                 "frames": frames, "lr": p.dit_lr, "batch": p.dit_batch_size,
                                 "latents": float(data.sum()), "seed": cfg.project.seed,
                                 **({"init": init_digest} if init_digest else {}),
                                 **({"audio": [p.dit_audio_dropout, p.dit_mouth_weight, float(sounds["talk"].sum()),
                                               cfg.audio.model_dump(mode="json")]} if sounds else {})})  # fmt: skip
    ckpt = Checkpoints(out_dir / "dit_checkpoints", fingerprint, cfg.train.keep_checkpoints)
    model.to(device)  # the windows, their audio and the optimiser's state live where the model trains
    train_data = data.to(device)
    train_sounds = {k: sounds[k].to(device) for k in ("talk", "listen")} if sounds is not None else None
    train_text = text.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=p.dit_lr, weight_decay=0.0)
    start = resume(ckpt, model, opt)
    model.train()
    spatial = None
    if p.dit_mouth_weight != 1.0:
        spatial = region_weight(*data.shape[-2:], cfg.teacher.mouth_box, p.dit_mouth_weight).to(device)

    def step(s: int) -> dict[str, float]:
        g = step_generator(cfg.project.seed, "pretrain_dit", s)
        idx = torch.randint(len(data), (p.dit_batch_size,), generator=g)
        sigma = shift_sigma(torch.rand(p.dit_batch_size, generator=g), cfg.teacher.timestep_shift).to(device)
        gn = g if device.type == "cpu" else torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,), generator=g)))
        noise = torch.randn((p.dit_batch_size, *data.shape[1:]), generator=gn, device=device)  # drawn where it is used
        warmup_cosine(opt, p.dit_lr, s, schedule["total"], warmup=50, floor=0.1)
        at = idx.to(device)
        x0 = train_data[at]
        if train_sounds is None:
            talk = listen = silent(model, x0, tokens).to(device)
        else:
            keep = (torch.rand(len(idx), generator=g) >= p.dit_audio_dropout).float().view(-1, 1, 1, 1).to(device)
            talk, listen = train_sounds["talk"][at] * keep, train_sounds["listen"][at] * keep
        loss = teacher_loss(model, x0, sigma, noise, train_text.expand(len(idx), -1, -1), talk, listen, spatial)
        gnorm = optimizer_step(loss, opt, model, Dist(), cfg.train.grad_clip)
        return {"loss": float(loss.detach()), "grad_norm": gnorm}

    def save(s: int) -> None:
        ckpt.save(s, {"model": model.state_dict(), "optimizer": opt.state_dict()})

    metrics = Metrics(ckpt.dir / "metrics.jsonl", "pretrain_dit", cfg.train.log_every, True, fresh=start == 0)
    schedule = {"total": p.dit_iterations}  # lowered to the steps that fit pretrain.dit_max_seconds
    t0 = time.perf_counter()
    run_loop_for("pretrain dit", start, schedule, p.dit_max_seconds, step, save, metrics, cfg.train.checkpoint_every,
                 progress)  # fmt: skip
    train_seconds = time.perf_counter() - t0
    model.cpu()
    after = heldout_losses(model, val, text, tokens, mean, var, held_set)
    m = {"dit_" + k: v for k, v in after.items()}
    m.update({"dit_before_" + k: v for k, v in before.items()})
    m.update({"dit_gaussian_" + k: v for k, v in baseline.items()})
    if held_set is not None:
        m["dit_fm_loss_no_audio"] = heldout_losses(model, val, text, tokens, mean, var)["fm_loss"]
        m.update({"dit_" + k: v for k, v in mouth_audio_gain(model, held_set, text, cfg.teacher.mouth_box).items()})
        m.update({"dit_" + k: v for k, v in lip_sync(cfg, model, vae, held_set, text, p.dit_lip_windows).items()})
        m.update({"dit_before_" + k: v for k, v in lip_before.items()})
        m.update({"dit_gt_" + k: v for k, v in lip_sync(cfg, None, vae, held_set, text, p.dit_lip_windows).items()})
        m["dit_talking_share"] = float(sounds["mask"].float().mean())
    m.update({"dit_train_windows": float(len(data)), "dit_heldout_windows": float(len(val)),
              "dit_steps": float(schedule["total"]), "dit_train_seconds": train_seconds,
              "dit_params_m": sum(q.numel() for q in model.parameters()) / 1e6,
              "dit_continued": float(init_digest is not None)})  # fmt: skip
    sheet = sample_sheet(model, vae, val, text, tokens, out_dir / "dit_samples.png")
    return model, m, sheet


def _export(src: Path, dst: Path, provenance: dict) -> list[Path]:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    info = {**provenance, "sha256": hashlib.sha256(dst.read_bytes()).hexdigest(), "size_bytes": dst.stat().st_size}
    dst.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return [dst, dst.with_suffix(".json")]


def run_pretrain(cfg: Config, root: Path, progress: bool = True, export: str | None = None,
                 what: str = "all") -> StageResult:  # fmt: skip
    """``what``: "vae", "dit" (with the VAE already in ``pretrain.out_dir``), "all" (each on ``pretrain.dit_pack``
    when set), or "pack" (``pretrain.out_dir``/dit_pack.npz: the clips for another machine)."""
    if cfg.vae.kind != "causal-ae":
        raise ConfigError(f"pretrain trains the demo's causal autoencoder; vae.kind is {cfg.vae.kind}")
    if what not in ("all", "vae", "dit", "pack"):
        raise ConfigError(f"pretrain: what must be all, vae, dit or pack, got {what!r}")
    p = cfg.pretrain
    if p.dit_pack and what == "pack":
        raise ConfigError("pretrain.dit_pack: `pretrain --what pack` packs pretrain.dirs; it does not read a pack")
    if p.threads:
        torch.set_num_threads(p.threads)
    out_dir = resolve_path(p.out_dir, root)
    t0 = time.time()
    voices, pack_info = None, None
    if p.dit_pack:
        pack = resolve_path(p.dit_pack, root)
        train, held, voices, meta = read_pack(cfg, pack)
        failures: dict[str, str] = {}
        pack_info = {"file": pack.name, "sha256": hashlib.sha256(pack.read_bytes()).hexdigest(),
                     "data_digest": meta["data_digest"]}  # fmt: skip
    else:
        train, held, failures = fixture_clips(cfg, root, progress, cache_dir=out_dir)
    if not train:
        raise ConfigError(f"pretrain.dirs {p.dirs}: no usable training clip ({failures})")
    if what == "pack":
        path = out_dir / "dit_pack.npz"
        meta, _, _ = write_pack(cfg, root, train, held, path, progress)
        seconds = sum(c["shape"][0] for c in meta["clips"].values()) / cfg.video.fps
        m = {"pack_clips": float(len(meta["clips"])), "pack_train_clips": float(len(train)),
             "pack_video_seconds": seconds, "pack_voices": float(len({c["wave"] for c in meta["clips"].values()})),
             "pack_mb": path.stat().st_size / 2**20, "wall_seconds": time.time() - t0}  # fmt: skip
        return StageResult("pretrain", metrics=m, outputs=[path], failures=failures,
                           summary=f"pretrain: packed {len(meta['clips'])} clips ({len(train)} train, {len(held)} "
                           f"held out; {seconds:.0f} s of video) into {path} ({m['pack_mb']:.1f} MB)")  # fmt: skip
    common = {"command": " ".join(["streamavatar", *sys.argv[1:]]), "data_digest": data_digest(train),
              **({"pack": pack_info} if pack_info else {}),
              "train_clips": sorted(train), "heldout_clips": sorted(held), "torch": str(torch.__version__),
              "config": {k: cfg.section(k).model_dump(mode="json") for k in ("video", "vae", "vae_train", "pretrain",
                                                                             "model", "train")}}  # fmt: skip
    for key in ("vae_init_from", "dit_init_from"):
        src = getattr(p, key)
        if src and resolve_path(src, root).with_suffix(".json").is_file():  # the earlier run's own provenance
            common.setdefault("continued_from", {})[key] = json.loads(resolve_path(src, root).with_suffix(".json").read_text())
    m: dict[str, float] = {}
    artifacts, outputs = [], []
    vae_file = out_dir / "demo_vae.pt"
    if what in ("all", "vae"):
        _, vm, vae_artifacts = pretrain_vae(cfg, root, train, held, out_dir, progress, common)
        m.update(vm)
        artifacts += vae_artifacts
        outputs.append(vae_file)
        if export:
            outputs += _export(vae_file, resolve_path(export, root) / "demo_vae.pt",
                               {**common, "metrics": vm, "seconds": time.time() - t0})  # fmt: skip
    if what in ("all", "dit"):
        t1 = time.time()
        vae = load_causal_ae(cfg, vae_file, root)
        model, dm, sheet = pretrain_dit(cfg, root, vae, train, held, out_dir, progress, voices)
        m.update(dm)
        dit_file = out_dir / "demo_dit.pt"
        torch.save({"model": model.state_dict(), "spec": model.spec.to_json(), "vae_digest": data_digest(train)},
                   dit_file)  # fmt: skip
        artifacts.append(sheet)
        outputs.append(dit_file)
        if export:
            outputs += _export(dit_file, resolve_path(export, root) / "demo_dit.pt",
                               {**common, "metrics": dm, "seconds": time.time() - t1})  # fmt: skip
    m["wall_seconds"] = time.time() - t0
    (out_dir / "metrics.json").write_text(json.dumps(m, indent=2))
    artifacts.append(out_dir / "metrics.json")
    parts = []
    if "psnr" in m:
        start = "at the start" if p.vae_init_from else "untrained"
        parts.append(f"VAE held-out PSNR {m['psnr']:.2f} dB / SSIM {m['ssim']:.3f} (bicubic {m['psnr_bicubic']:.2f} "
                     f"dB, {start} {m['psnr_before']:.2f} dB)")  # fmt: skip
    if "dit_fm_loss" in m:
        start = "at the start" if p.dit_init_from else "untrained"
        parts.append(f"DiT held-out flow-matching loss {m['dit_fm_loss']:.4f} ({start} {m['dit_before_fm_loss']:.4f}, "
                     f"Gaussian denoiser {m['dit_gaussian_fm_loss']:.4f})")  # fmt: skip
    if "dit_lip_corr" in m:
        parts.append(f"lip sync of held-out samples r {m['dit_lip_corr']:.3f} (chance {m['dit_lip_corr_null']:.3f}; "
                     f"before {m.get('dit_before_lip_corr', float('nan')):.3f}; the clips themselves "
                     f"{m.get('dit_gt_lip_corr', float('nan')):.3f}); mouth loss with another window's audio "
                     f"{100 * m.get('dit_mouth_audio_gain', float('nan')):+.1f} %")  # fmt: skip
    return StageResult("pretrain", metrics=m, artifacts=artifacts, outputs=outputs, failures=failures,
                       summary="pretrain: " + "; ".join(parts))
