"""`streamavatar pretrain`: the demo's stand-in for the pretrained Wan2.2 the paper fine-tunes.

Two models, trained from scratch on real talking-head clips (``pretrain.dirs``, face-cropped; the clips named in
``pretrain.holdout`` are only evaluated on), at a budget longer than ``make demo`` has:

1. the causal streaming autoencoder (tasks/training/vae.py: held-out PSNR / SSIM vs bicubic and untrained);
2. a base video DiT without audio (the same AudioDiT class with silent audio tokens, the fixed prompt): flow
   matching on windows of the clips' latents, each window's first latent frame the clean reference, exactly as
   the teacher trains. Measured on held-out windows at fixed noise levels against the untrained network and the
   per-channel Gaussian denoiser (the best a model with no learning does), plus a sample sheet.

``--export weights/`` writes ``demo_vae.pt`` and ``demo_dit.pt`` with ``.json`` provenance (command, data digest,
metrics, time, sizes) beside them: the demo's committed defaults (``vae_train.init_from``, ``teacher.init_from``).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from model.dit import AudioDiT
from model.sampling import euler_sample_sigmas, shift_sigma, teacher_sigmas
from model.text import prompt_embedding
from model.vae import VideoVAE
from tasks.common.models import build_audio, build_dit, load_causal_ae, load_dit_weights
from tasks.common.stage import StageResult
from tasks.config import Config, ConfigError, resolve_path
from tasks.training.common import heldout_fm_losses, teacher_velocity
from tasks.training.data import window_video_frames
from tasks.training.engine import (
    Checkpoints,
    Dist,
    Metrics,
    config_digest,
    optimizer_step,
    resume,
    run_loop,
    step_generator,
    warmup_cosine,
)
from tasks.training.teacher import teacher_loss
from tasks.training.vae import _to_video, data_digest, fixture_clips, pretrain_vae


@torch.no_grad()
def encode_windows(vae: VideoVAE, clips: dict[str, np.ndarray], frames: int, flip: bool = False,
                   stride: int = 0) -> torch.Tensor:  # fmt: skip
    """Windows of ``frames`` video frames of every clip, starting every ``stride`` frames (0: back to back)
    -> normalised latents [n, z, 1 + F, h, w]."""
    vae.eval()
    out = []
    for name in sorted(clips):
        c = clips[name]
        for s in range(0, len(c) - frames + 1, stride or frames):
            x = _to_video(c[s : s + frames])[None]
            out.append(vae.encode(x)[0])
            if flip:
                out.append(vae.encode(x.flip(-1))[0])
    if not out:
        raise ConfigError(f"pretrain: no clip is {frames} frames long (train.window_chunks sets the window)")
    return torch.stack(out)


def silent(model: AudioDiT, latents: torch.Tensor, tokens: int) -> torch.Tensor:
    """All-zero audio tokens [B, 1 + F, tokens, audio_dim]: the base model hears nothing."""
    return torch.zeros(latents.shape[0], latents.shape[2], tokens, model.spec.audio_dim)


def heldout_losses(model: AudioDiT | None, val: torch.Tensor, text: torch.Tensor, tokens: int, mean: torch.Tensor,
                   var: torch.Tensor) -> dict[str, float]:  # fmt: skip
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
                 progress: bool) -> tuple[AudioDiT, dict, Path]:  # fmt: skip
    p = cfg.pretrain
    frames = window_video_frames(cfg)
    data = encode_windows(vae, train, frames, flip=True, stride=p.dit_window_stride)
    val = encode_windows(vae, held, frames)
    mean = data.mean(dim=(0, 2, 3, 4), keepdim=True)[0:1]
    var = data.var(dim=(0, 2, 3, 4), keepdim=True)[0:1]
    audio = build_audio(cfg)
    tokens = audio.tokens_per_latent
    text = prompt_embedding(cfg.model.prompt, cfg.model.text_len, cfg.model.text_dim, cfg.model.text_encoder_path,
                            cache_dir=root / "data" / "cache").float()  # fmt: skip
    model = build_dit(cfg, audio.token_dim, pretrained=False)
    init_digest = None
    if p.dit_init_from:
        path = resolve_path(p.dit_init_from, root)
        if not path.is_file():
            raise ConfigError(f"pretrain.dit_init_from: {path} does not exist (null trains from scratch)")
        load_dit_weights(model, torch.load(path, map_location="cpu", weights_only=True),
                         f"pretrain.dit_init_from: {path}")  # fmt: skip
        init_digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    before = heldout_losses(model, val, text, tokens, mean, var)
    baseline = heldout_losses(None, val, text, tokens, mean, var)
    fingerprint = config_digest({"model": cfg.model.model_dump(mode="json"), "vae": data_digest(train),
                                 "frames": frames, "lr": p.dit_lr, "batch": p.dit_batch_size,
                                 "latents": float(data.sum()), "seed": cfg.project.seed,
                                 **({"init": init_digest} if init_digest else {})})  # fmt: skip
    ckpt = Checkpoints(out_dir / "dit_checkpoints", fingerprint, cfg.train.keep_checkpoints)
    opt = torch.optim.AdamW(model.parameters(), lr=p.dit_lr, weight_decay=0.0)
    start = resume(ckpt, model, opt)
    model.train()

    def step(s: int) -> dict[str, float]:
        g = step_generator(cfg.project.seed, "pretrain_dit", s)
        idx = torch.randint(len(data), (p.dit_batch_size,), generator=g)
        sigma = shift_sigma(torch.rand(p.dit_batch_size, generator=g), cfg.teacher.timestep_shift)
        noise = torch.randn((p.dit_batch_size, *data.shape[1:]), generator=g)
        warmup_cosine(opt, p.dit_lr, s, p.dit_iterations, warmup=50, floor=0.1)
        x0 = data[idx]
        a = silent(model, x0, tokens)
        loss = teacher_loss(model, x0, sigma, noise, text.expand(len(idx), -1, -1), a, a)
        gnorm = optimizer_step(loss, opt, model, Dist(), cfg.train.grad_clip)
        return {"loss": float(loss.detach()), "grad_norm": gnorm}

    def save(s: int) -> None:
        ckpt.save(s, {"model": model.state_dict(), "optimizer": opt.state_dict()})

    metrics = Metrics(ckpt.dir / "metrics.jsonl", "pretrain_dit", cfg.train.log_every, True, fresh=start == 0)
    t0 = time.perf_counter()
    run_loop("pretrain dit", start, p.dit_iterations, step, save, metrics, cfg.train.checkpoint_every, progress)
    after = heldout_losses(model, val, text, tokens, mean, var)
    m = {"dit_" + k: v for k, v in after.items()}
    m.update({"dit_before_" + k: v for k, v in before.items()})
    m.update({"dit_gaussian_" + k: v for k, v in baseline.items()})
    m.update({"dit_train_windows": float(len(data)), "dit_heldout_windows": float(len(val)),
              "dit_steps": float(p.dit_iterations), "dit_train_seconds": time.perf_counter() - t0,
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
    """``what``: "vae", "dit" (with the VAE already in ``pretrain.out_dir``) or "all"."""
    if cfg.vae.kind != "causal-ae":
        raise ConfigError(f"pretrain trains the demo's causal autoencoder; vae.kind is {cfg.vae.kind}")
    if what not in ("all", "vae", "dit"):
        raise ConfigError(f"pretrain: what must be all, vae or dit, got {what!r}")
    p = cfg.pretrain
    if p.threads:
        torch.set_num_threads(p.threads)
    out_dir = resolve_path(p.out_dir, root)
    t0 = time.time()
    train, held, failures = fixture_clips(cfg, root, progress, cache_dir=out_dir)
    if not train:
        raise ConfigError(f"pretrain.dirs {p.dirs}: no usable training clip ({failures})")
    common = {"command": " ".join(["streamavatar", *sys.argv[1:]]), "data_digest": data_digest(train),
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
        model, dm, sheet = pretrain_dit(cfg, root, vae, train, held, out_dir, progress)
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
    return StageResult("pretrain", metrics=m, artifacts=artifacts, outputs=outputs, failures=failures,
                       summary="pretrain: " + "; ".join(parts))
