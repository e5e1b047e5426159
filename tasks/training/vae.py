"""Stages `vae` and `pretrain`: train the demo's causal streaming autoencoder (model/causal_ae.py).

The paper fine-tunes a pretrained Wan2.2 whose VAE comes with it. The demo's stand-in has two steps:

- ``pretrain`` (``streamavatar pretrain``, not part of ``make demo``): from scratch on real talking-head clips
  (``pretrain.dirs``: ../shared/fixtures/talking and /speakervid by default), each cropped around the face FaceMesh
  finds; clips named in ``pretrain.holdout`` are only evaluated on. Its result is committed as
  ``weights/demo_vae.pt`` with its provenance (``weights/demo_vae.json``: command, data digest, metrics, time).
- ``vae`` (in the pipeline, before ``teacher``): starts from ``vae_train.init_from`` (those weights; null: from
  scratch) and trains on the curated training clips at the demo resolution; the curated validation clips are
  held out. Writes ``vae_train.out`` (data/checkpoints/vae/final.pt), which ``vae.pretrained_path`` points at.
  With ``vae.kind`` wan-tiny / wan2.2 (the paper profile) the stage has nothing to train and says so.

A step: ``batch_size`` random ``clip_frames``-long windows (random horizontal flips), encoded, the latents
perturbed by ``latent_noise`` x their per-channel std (the decoder learns to tolerate what the DiT will get
wrong; relative to the std, so the encoder cannot outgrow it), decoded; loss MSE + ``l1_weight`` x L1.
Both report PSNR / SSIM on held-out 17-frame windows against the untrained network (or the starting weights)
and a bicubic baseline (downscale by the spatial factor and back: a comparable number of values per frame),
and a contact sheet (rows: original, reconstruction, bicubic). Resumable: step checkpoints as every stage.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity
from tqdm import tqdm

from model.causal_ae import CausalVideoAE
from tasks.common.media import MediaError, read_frames
from tasks.common.models import build_causal_ae, causal_ae_spec, device_of
from tasks.common.stage import StageResult
from tasks.config import Config, ConfigError, data_path, resolve_path
from tasks.training.data import choose_clips
from tasks.training.engine import (
    Checkpoints,
    Dist,
    Metrics,
    config_digest,
    history_csv,
    optimizer_step,
    resume,
    run_loop_for,
    step_generator,
    warmup_cosine,
)

log = logging.getLogger(__name__)

EVAL_FRAMES = 17  # 1 + 4 x 4: the reference and four latent steps
VIDEO_EXT = {".mp4", ".mov", ".mkv", ".webm", ".avi"}


# ------------------------------------------------------------------------------------------------- frames
def face_box(frames: np.ndarray, scale: float) -> tuple[int, int, int] | None:
    """(x0, y0, side) of a square around the face FaceMesh finds (median over 5 frames), or None."""
    from tasks.common.facemesh import FaceMesh

    mesh = FaceMesh(static_image_mode=True)
    boxes = []
    try:
        for i in np.linspace(0, len(frames) - 1, 5).astype(int):
            lm = mesh(frames[i])
            if lm is not None:
                boxes.append([lm[:, 0].min(), lm[:, 1].min(), lm[:, 0].max(), lm[:, 1].max()])
    finally:
        mesh.close()
    if not boxes:
        return None
    x1, y1, x2, y2 = np.median(np.asarray(boxes), axis=0)
    h, w = frames.shape[1:3]
    side = int(min(scale * max(x2 - x1, y2 - y1), w, h))
    x0 = int(np.clip((x1 + x2) / 2 - side / 2, 0, w - side))
    y0 = int(np.clip((y1 + y2) / 2 - side / 2, 0, h - side))
    return x0, y0, side


def held_out_names(names, patterns: list[str]) -> set[str]:
    """The clip names ``pretrain.holdout`` names: exact names or shell patterns (``sy0*``: the corpus
    conversations whose id starts with 0, both sides)."""
    return {k for k in names if any(fnmatch.fnmatchcase(k, pat) for pat in patterns)}


def fixture_files(cfg: Config, root: Path) -> dict[str, Path]:
    """The video files of ``pretrain.dirs``: clip name (the file's stem) -> path, in folder then name order."""
    files: dict[str, Path] = {}
    for d in cfg.pretrain.dirs:
        folder = resolve_path(d, root)
        if not folder.is_dir():
            raise ConfigError(f"pretrain.dirs: {folder} is not a folder")
        for f in sorted(f for f in folder.iterdir() if f.suffix.lower() in VIDEO_EXT):
            files.setdefault(f.stem, f)
    return files


def fixture_clips(cfg: Config, root: Path, progress: bool = True, cache_dir: Path | None = None
                  ) -> tuple[dict, dict, dict[str, str]]:  # fmt: skip
    """(train, held-out, failures) of ``pretrain.dirs``: name -> [T, H, W, 3] uint8 face crops at the demo size.
    With ``cache_dir``, the crops are kept there (keyed by the files and the settings) for the next run."""
    p, v = cfg.pretrain, cfg.video
    files = list(fixture_files(cfg, root).values())
    key = config_digest({"files": [[f.name, f.stat().st_size] for f in files], "video": v.model_dump(mode="json"),
                         "seconds": p.max_seconds_per_clip, "scale": p.face_scale})  # fmt: skip
    cache = cache_dir / f"crops_{key}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            crops = {k: z[k] for k in z.files}
        failures = json.loads(cache.with_suffix(".json").read_text())
    else:
        crops, failures = _face_crops(files, cfg, progress)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache.with_suffix(".tmp.npz"), **crops)
            cache.with_suffix(".json").write_text(json.dumps(failures))
            cache.with_suffix(".tmp.npz").replace(cache)
    held_out = held_out_names(crops, p.holdout)
    train = {k: c for k, c in crops.items() if k not in held_out}
    held = {k: c for k, c in crops.items() if k in held_out}
    missing = sorted(pat for pat in p.holdout if not any(fnmatch.fnmatchcase(k, pat) for k in crops))
    if missing:
        log.warning("pretrain.holdout: %s not found in pretrain.dirs", missing)
    return train, held, failures


def _face_crops(files: list[Path], cfg: Config, progress: bool) -> tuple[dict, dict[str, str]]:
    p, v = cfg.pretrain, cfg.video
    crops, failures = {}, {}
    for f in tqdm(files, desc="pretrain: face crops", unit="clip", disable=not progress):
        try:
            frames = read_frames(f, fps=v.fps, duration=p.max_seconds_per_clip)
        except MediaError as exc:
            failures[f.name] = str(exc)
            continue
        box = face_box(frames, p.face_scale)
        if box is None:
            failures[f.name] = "no face found"
            continue
        x0, y0, s = box
        crops[f.stem] = np.stack([cv2.resize(fr[y0 : y0 + s, x0 : x0 + s], (v.width, v.height),
                                             interpolation=cv2.INTER_AREA) for fr in frames])  # fmt: skip
        del frames
    return crops, failures


def curated_clips(cfg: Config, root: Path, progress: bool = True) -> tuple[dict, dict, dict[str, str]]:
    """(train, held-out, failures) of the curated manifest at the demo size: training clips and the held-out
    ones, exactly as the teacher splits them."""
    manifest = root / cfg.curate.manifest
    if not manifest.is_file():
        raise ConfigError(f"{cfg.curate.manifest}: no curated manifest; run `streamavatar curate` first")
    train_rows, val_rows = choose_clips(pd.read_parquet(manifest))
    v = cfg.video
    out: tuple[dict, dict] = ({}, {})
    failures = {}
    todo = [(r, 0) for r in train_rows.itertuples()] + [(r, 1) for r in val_rows.itertuples()]
    for r, which in tqdm(todo, desc="vae: read clips", unit="clip", disable=not progress):
        try:
            out[which][r.clip_id] = read_frames(root / r.video_path, v.width, v.height, v.fps)
        except (MediaError, OSError) as exc:
            failures[r.clip_id] = str(exc)
    return out[0], out[1], failures


def data_digest(clips: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(clips):
        h.update(name.encode())
        h.update(hashlib.sha256(clips[name].tobytes()).digest())
    return h.hexdigest()[:16]


def _to_video(frames: np.ndarray) -> torch.Tensor:
    """[T, H, W, 3] uint8 -> [3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def sample_batch(clips: list[np.ndarray], n: int, frames: int, g: torch.Generator) -> torch.Tensor:
    out = []
    for _ in range(n):
        c = clips[int(torch.randint(len(clips), (1,), generator=g))]
        s = int(torch.randint(len(c) - frames + 1, (1,), generator=g))
        x = _to_video(c[s : s + frames])
        out.append(x.flip(-1) if torch.rand(1, generator=g) < 0.5 else x)
    return torch.stack(out)


def eval_windows(clips: dict[str, np.ndarray], count: int) -> list[torch.Tensor]:
    """Up to ``count`` 17-frame windows spread evenly over the held-out clips (deterministic)."""
    wins = []
    for name in sorted(clips):
        c = clips[name]
        starts = list(range(0, len(c) - EVAL_FRAMES + 1, EVAL_FRAMES))
        wins.append([_to_video(c[s : s + EVAL_FRAMES]) for s in starts])
    out, i = [], 0
    while len(out) < count and any(i < len(w) for w in wins):  # round robin: every clip gets its share
        out += [w[i] for w in wins if i < len(w)]
        i += 1
    return out[:count]


# ------------------------------------------------------------------------------------------------ measures
def psnr_ssim(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM over frames; [3, T, H, W] in [-1, 1]."""
    a = ((pred.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 3, 0).numpy().astype(np.float64)
    b = ((target.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 3, 0).numpy().astype(np.float64)
    psnrs, ssims = [], []
    for x, y in zip(a, b, strict=True):
        mse = float(np.mean((x - y) ** 2))
        psnrs.append(100.0 if mse == 0 else 10 * math.log10(255.0**2 / mse))
        ssims.append(structural_similarity(x, y, channel_axis=2, data_range=255.0))
    return float(np.mean(psnrs)), float(np.mean(ssims))


def bicubic(video: torch.Tensor, factor: int) -> torch.Tensor:
    """The baseline: each frame downscaled by ``factor`` (area) and back up (bicubic)."""
    frames = video.transpose(0, 1)  # [T, 3, H, W]
    small = F.interpolate(frames, scale_factor=1 / factor, mode="area")
    return F.interpolate(small, size=frames.shape[-2:], mode="bicubic", align_corners=False).transpose(0, 1)


@torch.no_grad()
def evaluate_ae(ae: CausalVideoAE, windows: list[torch.Tensor]) -> dict[str, float]:
    ae.eval()
    p, s = zip(*(psnr_ssim(ae.decode(ae.encode(w[None]))[0], w) for w in windows), strict=True)
    ae.train()
    return {"psnr": float(np.mean(p)), "ssim": float(np.mean(s))}


def evaluate_bicubic(windows: list[torch.Tensor], factor: int) -> dict[str, float]:
    p, s = zip(*(psnr_ssim(bicubic(w, factor), w) for w in windows), strict=True)
    return {"psnr": float(np.mean(p)), "ssim": float(np.mean(s))}


@torch.no_grad()
def latent_stats(ae: CausalVideoAE, clips: dict[str, np.ndarray], frames: int, device: torch.device | None = None,
                 batch: int = 32) -> tuple[list[float], list[float]]:  # fmt: skip
    """Per-channel mean and std of the latents of the training clips (windows of ``frames``), encoded ``batch``
    windows at a time on ``device`` (default: where the autoencoder is; it is left where it was)."""
    home = next(ae.parameters()).device
    device = device or home
    ae.eval().to(device)
    wins = [c[s : s + frames] for c in clips.values() for s in range(0, len(c) - frames + 1, frames)]
    zs = []
    for i in range(0, len(wins), batch):
        x = torch.stack([_to_video(w) for w in wins[i : i + batch]]).to(device)
        zs.append(ae.encode(x).transpose(0, 1).flatten(1).double().cpu())
    ae.to(home)
    z = torch.cat(zs, dim=1)
    return z.mean(1).float().tolist(), z.std(1).clamp_min(1e-4).float().tolist()


def contact_sheet(ae: CausalVideoAE, windows: list[torch.Tensor], factor: int, path: Path, n: int = 6) -> Path:
    """Rows: original, reconstruction, bicubic; columns: frame 8 of up to ``n`` held-out windows."""
    cols = []
    with torch.no_grad():
        for w in windows[:n]:  # round robin over the held-out clips: the first n cover them all
            rec = ae.decode(ae.encode(w[None]))[0]
            col = [x[:, EVAL_FRAMES // 2] for x in (w, rec, bicubic(w, factor))]
            cols.append(torch.cat(col, dim=1))
    sheet = torch.cat(cols, dim=2)
    img = ((sheet.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    img = cv2.resize(img, (img.shape[1] * 3, img.shape[0] * 3), interpolation=cv2.INTER_NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return path


# ------------------------------------------------------------------------------------------------ training
def train_autoencoder(cfg: Config, stage: str, ckpt_dir: Path, train: dict, held: dict, init: dict | None,
                      iterations: int, lr: float, progress: bool, decoder_only: bool = False, max_seconds: float = 0.0
                      ) -> tuple[CausalVideoAE, dict, list[torch.Tensor]]:  # fmt: skip
    """Trains (or resumes) the causal autoencoder on ``project.device``; returns it (on the CPU) and its metrics
    against the baselines, measured on the CPU.

    ``decoder_only`` freezes the encoder: the latents stay exactly what they were (so a DiT trained on them stays
    valid) while the decoder keeps learning. ``max_seconds`` > 0: as many of the ``iterations`` as fit that
    training time (engine.run_loop_for)."""
    t = cfg.vae_train
    if t.threads:
        torch.set_num_threads(t.threads)
    if (t.clip_frames - 1) % cfg.vae.temporal_compression:
        raise ConfigError(f"vae_train.clip_frames must be 1 + {cfg.vae.temporal_compression}k, got {t.clip_frames}")
    clips = [c for c in train.values() if len(c) >= t.clip_frames]
    if not clips:
        raise ConfigError(f"{stage}: no training clip with at least vae_train.clip_frames={t.clip_frames} frames")
    windows = eval_windows(held, t.eval_windows)
    if not windows:
        raise ConfigError(f"{stage}: no held-out clip with at least {EVAL_FRAMES} frames to evaluate on")
    torch.manual_seed(cfg.project.seed)
    ae = build_causal_ae(cfg)
    if init is not None:
        ae.load_grown(init["model"])
    before = evaluate_ae(ae, windows)
    fingerprint = config_digest({"spec": causal_ae_spec(cfg), "video": cfg.video.model_dump(mode="json"), "lr": lr,
                                 "train": {k: v for k, v in t.model_dump(mode="json").items() if k != "iterations"},
                                 "data": data_digest(train), "init": init.get("digest") if init else None,
                                 "seed": cfg.project.seed, "decoder_only": decoder_only})  # fmt: skip
    ckpt = Checkpoints(ckpt_dir, fingerprint, cfg.train.keep_checkpoints)
    device = device_of(cfg)  # trains there (a GPU for `pretrain` on a pack); measures on the CPU
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ae.to(device)
    if decoder_only:
        for name, q in ae.named_parameters():
            q.requires_grad_(not name.startswith("enc_"))
    opt = torch.optim.AdamW([q for q in ae.parameters() if q.requires_grad], lr=lr, weight_decay=0.0)
    start = resume(ckpt, ae, opt)

    def step(s: int) -> dict[str, float]:
        g = step_generator(cfg.project.seed, stage, s)
        x = sample_batch(clips, t.batch_size, t.clip_frames, g).to(device)
        warmup_cosine(opt, lr, s, schedule["total"], t.warmup, floor=0.05)
        with torch.set_grad_enabled(not decoder_only):
            z = ae.encode(x)
        std = z.detach().std(dim=(0, 2, 3, 4), keepdim=True)
        noise = torch.randn(z.shape, generator=g).to(device)  # drawn on the CPU: the same steps on any device
        y = ae.decode(z + t.latent_noise * std * noise)
        mse = F.mse_loss(y, x)
        loss = mse + t.l1_weight * F.l1_loss(y, x)
        gnorm = optimizer_step(loss, opt, ae, Dist(), cfg.train.grad_clip)
        return {"loss": float(loss.detach()), "psnr_train": 10 * math.log10(4.0 / max(float(mse.detach()), 1e-10)),
                "grad_norm": gnorm}  # fmt: skip

    def save(s: int) -> None:
        ckpt.save(s, {"model": ae.state_dict(), "optimizer": opt.state_dict()})

    metrics = Metrics(ckpt.dir / "metrics.jsonl", stage, cfg.train.log_every, True, fresh=start == 0)
    t0 = time.perf_counter()
    schedule = {"total": iterations}
    last = run_loop_for(stage, start, schedule, max_seconds, step, save, metrics, cfg.train.checkpoint_every, progress)
    train_seconds = time.perf_counter() - t0
    ae.cpu()
    after = evaluate_ae(ae, windows)
    base = evaluate_bicubic(windows, cfg.vae.spatial_compression)
    m = {"psnr": after["psnr"], "ssim": after["ssim"], "psnr_before": before["psnr"], "ssim_before": before["ssim"],
         "psnr_bicubic": base["psnr"], "ssim_bicubic": base["ssim"], "psnr_gain_over_bicubic": after["psnr"] - base["psnr"],
         "eval_windows": float(len(windows)), "train_clips": float(len(clips)), "heldout_clips": float(len(held)),
         "train_frames": float(sum(len(c) for c in clips)), "steps": float(schedule["total"]),
         "train_seconds": train_seconds, "params_m": sum(p.numel() for p in ae.parameters()) / 1e6}  # fmt: skip
    m.update({f"last_{k}": v for k, v in last.items()})
    m["decoder_only"] = float(decoder_only)
    for q in ae.parameters():
        q.requires_grad_(True)
    return ae, m, windows


def kept_stats(init: dict | None, decoder_only: bool) -> tuple[list[float], list[float]] | None:
    """The latent statistics to keep: the starting weights' when only the decoder trained (the encoder is
    theirs, so the normalised latents -- what a DiT trained on them, e.g. the base DiT, knows -- must stay exactly
    theirs too); None otherwise (measured afresh on the training clips)."""
    if decoder_only and init is not None and "latents_mean" in init and "latents_std" in init:
        return list(init["latents_mean"]), list(init["latents_std"])
    return None


def save_weights(cfg: Config, ae: CausalVideoAE, train: dict, path: Path, extra: dict,
                 stats: tuple[list[float], list[float]] | None = None) -> dict:  # fmt: skip
    """The autoencoder with its latent statistics (``stats``, else measured on ``train``) and ``extra``."""
    mean, std = stats if stats is not None else latent_stats(ae, train, cfg.vae_train.clip_frames, device_of(cfg))
    state = {"model": ae.state_dict(), "latents_mean": mean, "latents_std": std, "spec": causal_ae_spec(cfg), **extra}
    state["digest"] = hashlib.sha256(json.dumps([extra.get("data_digest"), extra.get("metrics")],
                                                sort_keys=True).encode()).hexdigest()[:16]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return state


def _report(report: Path, m: dict, sheet: Path) -> list[Path]:
    report.mkdir(parents=True, exist_ok=True)
    (report / "metrics.json").write_text(json.dumps(m, indent=2))
    return [report / "metrics.json", sheet]


def _summary(stage: str, m: dict) -> str:
    return (f"{stage}: held-out PSNR {m['psnr']:.2f} dB / SSIM {m['ssim']:.3f} (before training {m['psnr_before']:.2f} "
            f"dB; bicubic baseline {m['psnr_bicubic']:.2f} dB / {m['ssim_bicubic']:.3f}) on {int(m['eval_windows'])} "
            f"windows of {int(m['heldout_clips'])} held-out clips")  # fmt: skip


def load_init(cfg: Config, where: str, field: str, root: Path) -> dict:
    """Saved autoencoder weights to start from, checked against vae.*; a clear error naming ``field``."""
    path = resolve_path(where, root)
    if not path.is_file():
        raise ConfigError(f"{field}: {path} does not exist (null trains from scratch)")
    init = torch.load(path, map_location="cpu", weights_only=True)
    have, want = {"decoder_blocks": 0, **(init.get("spec") or {})}, causal_ae_spec(cfg)
    grown = {**have, "decoder_blocks": want["decoder_blocks"]} == want and have["decoder_blocks"] <= want["decoder_blocks"]
    if not grown:  # the same autoencoder, or the same with fewer decoder blocks (grown, the new ones identity)
        raise ConfigError(f"{field}: {path} holds {init.get('spec')}, vae.* says {want}")
    return init


def run_vae(cfg: Config, root: Path, progress: bool = True) -> StageResult:
    """Stage `vae`: fine-tune the causal autoencoder on the curated training clips."""
    report = data_path(cfg, root, "reports", "vae")
    if cfg.vae.kind != "causal-ae":
        report.mkdir(parents=True, exist_ok=True)
        m = {"skipped": 1.0}
        (report / "metrics.json").write_text(json.dumps(m))
        history_csv(report / "none.jsonl", report / "loss.csv")  # header only: nothing trained
        return StageResult("vae", metrics=m, summary=f"vae: nothing to train (vae.kind={cfg.vae.kind} is loaded "
                                                     f"from vae.pretrained_path)")  # fmt: skip
    t = cfg.vae_train
    init = load_init(cfg, t.init_from, "vae_train.init_from", root) if t.init_from else None
    train, held, failures = curated_clips(cfg, root, progress)
    ae, m, windows = train_autoencoder(cfg, "vae", root / cfg.train.checkpoint_dir / "vae", train, held, init,
                                       t.iterations, t.lr, progress, decoder_only=t.decoder_only)  # fmt: skip
    m["init_from_pretrained"] = float(init is not None)
    out = resolve_path(t.out, root)
    save_weights(cfg, ae, train, out, {"data_digest": data_digest(train), "metrics": m},
                 kept_stats(init, t.decoder_only))  # fmt: skip
    sheet = contact_sheet(ae, windows, cfg.vae.spatial_compression, report / "reconstructions.png")
    curve = history_csv(root / cfg.train.checkpoint_dir / "vae" / "metrics.jsonl", report / "loss.csv")
    return StageResult("vae", metrics=m, artifacts=[*_report(report, m, sheet), curve], outputs=[out], failures=failures,
                       summary=_summary("vae", m))  # fmt: skip


def pretrain_vae(cfg: Config, root: Path, train: dict, held: dict, out_dir: Path, progress: bool, provenance: dict
                 ) -> tuple[CausalVideoAE, dict, list[Path]]:  # fmt: skip
    """The `pretrain` command's first half (tasks/training/pretrain.py): the autoencoder from scratch on face crops
    of real clips; writes ``out_dir``/demo_vae.pt and its contact sheet."""
    p = cfg.pretrain
    init = load_init(cfg, p.vae_init_from, "pretrain.vae_init_from", root) if p.vae_init_from else None
    ae, m, windows = train_autoencoder(cfg, "pretrain", out_dir / "checkpoints", train, held, init, p.iterations,
                                       p.lr, progress, decoder_only=p.vae_decoder_only,
                                       max_seconds=p.vae_max_seconds)  # fmt: skip
    save_weights(cfg, ae, train, out_dir / "demo_vae.pt", {**provenance, "metrics": m},
                 kept_stats(init, p.vae_decoder_only))  # fmt: skip
    sheet = contact_sheet(ae, windows, cfg.vae.spatial_compression, out_dir / "reconstructions.png")
    return ae, m, [sheet]
